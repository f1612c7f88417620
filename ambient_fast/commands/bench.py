"""Measure training and sampling throughput on synthetic data (nothing is read or kept).

Training runs the real loop (ambient_fast.loops.train: noise-level-first batches, ambient
loss, Adam, EMA) on random images with 90% of them corrupt (sigma_min = 1), and reports
images/s after --warmup steps, for each --compile setting asked for (so the CPU
"does torch.compile help here" question is answered by measurement). Sampling runs EDM Heun
(18 steps, 35 network evaluations) and reports images/s and network evaluations/s.

examples:
  ambient-fast bench                                   # digits MLP on this machine
  ambient-fast bench --network unet-digits --compile both
  ambient-fast bench --network unet-cifar10 --shape 3,32,32 --batch-size 512 --precision bf16 --device cuda
  ambient-fast bench --json bench.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from .options import nonnegative_int, positive_int

HELP = "measure training (images/s, eager vs compiled) and sampling throughput"


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 1,8,8, got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return dims


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(_parser=parser)
    parser.add_argument("--network", default="mlp-base", help="network preset (default: %(default)s)")
    parser.add_argument(
        "--shape", type=_shape, default=(1, 8, 8), metavar="C,H,W", help="sample shape (default: 1,8,8)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=256, help="training batch (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=60, help="timed training steps (default: %(default)s)")
    parser.add_argument("--warmup", type=nonnegative_int, default=20, help="untimed steps first (default: %(default)s)")
    parser.add_argument(
        "--compile",
        choices=("off", "on", "both"),
        default="off",
        help="torch.compile setting(s) to time (default: %(default)s)",
    )
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype (default: %(default)s)"
    )
    parser.add_argument(
        "--sample-batch", type=positive_int, default=1024, help="images per sampling batch (default: %(default)s)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--dry-run", action="store_true", help="validate the options and print the plan")


def run(args: argparse.Namespace) -> int:
    parser = args._parser
    from ..nn import NETWORK_PRESETS

    if args.network not in NETWORK_PRESETS and args.network not in ("mlp", "unet"):
        parser.error(f"argument --network: unknown network {args.network!r}; known: {', '.join(NETWORK_PRESETS)}")
    if args.network.startswith("unet") and len(args.shape) != 3:
        parser.error(f"argument --shape: a UNet needs C,H,W, got {args.shape}")
    settings = ["off", "on"] if args.compile == "both" else [args.compile]
    if args.dry_run:
        print(
            f"dry run: would time {args.steps} training steps of {args.network} at batch {args.batch_size} "
            f"on samples {args.shape} with compile {settings}, then sampling; nothing written"
        )
        return 0
    import torch

    from ..loops.evaluate import generate
    from ..loops.train import train
    from ..runtime import resolve_device

    device = resolve_device(args.device)
    gen = torch.Generator().manual_seed(0)
    n = max(4 * args.batch_size, 1024)
    images = torch.rand((n, *args.shape), generator=gen) * 2 - 1
    sigma_min = torch.where(torch.rand(n, generator=gen) < 0.9, 1.0, 0.0)
    data = (images, sigma_min, torch.zeros(n), torch.arange(n), None)
    results: dict = {
        "network": args.network,
        "shape": list(args.shape),
        "batch_size": args.batch_size,
        "device": str(device),
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "train": {},
    }
    log_every = max(1, args.steps // 4)
    for setting in settings:
        with tempfile.TemporaryDirectory() as tmp:
            total = (args.warmup + args.steps) * args.batch_size
            t0 = time.perf_counter()
            r = train(
                data,
                tmp,
                network=args.network,
                total_images=total,
                batch_size=args.batch_size,
                compile=setting,
                precision=args.precision,
                device=str(device),
                log_every=log_every,
                checkpoint_images=total,
                progress=False,
                resume=False,
            )
            wall = time.perf_counter() - t0
        timed = [x for x in r.log if x["step"] > args.warmup]
        ips = sum(x["images_per_second"] for x in timed) / max(len(timed), 1)
        results["train"][f"compile_{setting}"] = {"images_per_second": ips, "wall_seconds_incl_startup": wall}
        print(f"train  compile={setting:3s}: {ips:10.0f} img/s  ({wall:.1f} s wall incl. start-up and compile)")

    from ..restoration import load_denoiser

    with tempfile.TemporaryDirectory() as tmp:
        r = train(
            data,
            tmp,
            network=args.network,
            total_images=args.batch_size,
            batch_size=args.batch_size,
            device=str(device),
            progress=False,
            resume=False,
        )
        denoiser = load_denoiser(r.denoiser_path, device=device)
    results["parameters"] = sum(p.numel() for p in denoiser.net.parameters())
    generate(denoiser, min(args.sample_batch, 64), args.shape, device=device)  # warm-up
    t0 = time.perf_counter()
    generate(denoiser, args.sample_batch, args.shape, device=device, batch_size=args.sample_batch)
    dt = time.perf_counter() - t0
    results["sample"] = {"images_per_second": args.sample_batch / dt, "nfe_per_second": 35 * args.sample_batch / dt}
    print(
        f"sample heun-18 (35 NFE): {args.sample_batch / dt:10.0f} img/s, "
        f"{35 * args.sample_batch / dt:.0f} network evaluations/s "
        f"({results['parameters']:,} parameters)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0
