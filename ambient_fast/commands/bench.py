"""Measure training and sampling throughput on synthetic data (nothing is read or kept).

Training runs the real loop (ambient_fast.loops.train: noise-level-first batches, ambient
loss, Adam, EMA) on random images with 90% of them corrupt (sigma_min = 1), and reports
images/s after --warmup steps, for each --compile setting asked for (so the CPU
"does torch.compile help here" question is answered by measurement). Sampling runs EDM Heun
(18 steps, 35 network evaluations) and reports images/s and network evaluations/s.

``ambient-fast bench kernels`` instead micro-benchmarks the fused ops (loss, Euler, Heun, churn,
ancestral): fused vs eager vs torch.compile, fwd and fwd+bwd, median and spread over interleaved
rounds, bytes moved, GB/s and % of a copy timed in the same rounds (ambient_fast.bench.kernels).

examples:
  ambient-fast bench                                   # digits MLP on this machine
  ambient-fast bench kernels --op loss --shape 16,4,64,64 --dtype fp32,bf16
  ambient-fast bench kernels --json kernels.json       # every op at the three default shapes
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


def _sizes(text: str, counts: tuple[int, ...], form: str) -> tuple[int, ...]:
    """Comma-separated positive sizes, as many as one of ``counts`` (one-line argparse error)."""
    try:
        dims = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {form} (comma-separated integers), got {text!r}") from None
    if len(dims) not in counts:
        raise argparse.ArgumentTypeError(f"expected {form} ({' or '.join(map(str, counts))} sizes), got {text!r}")
    if any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return dims


def _shape(text: str) -> tuple[int, ...]:
    """A sample shape C,H,W."""
    return _sizes(text, (3,), "C,H,W")


def _kernel_shape(text: str) -> tuple[int, ...]:
    """C,H,W (batch 16) or B,C,H,W."""
    dims = _sizes(text, (3, 4), "C,H,W or B,C,H,W")
    return dims if len(dims) == 4 else (16, *dims)


def _choices(allowed: tuple[str, ...], what: str):
    def parse(text: str) -> list[str]:
        values = [v for v in text.split(",") if v]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
        return values

    return parse


def _add_kernel_arguments(parser: argparse.ArgumentParser) -> None:
    from ..bench.kernels import DTYPES, OPS

    parser.set_defaults(_parser=parser)
    parser.add_argument(
        "--op", type=_choices(OPS, "op"), default=list(OPS), metavar="|".join(OPS),
        help="op(s), comma-separated (default: all)",
    )
    parser.add_argument(
        "--shape", type=_kernel_shape, action="append", default=None, metavar="C,H,W|B,C,H,W",
        help="shape (repeatable; default: 128,3,32,32 16,4,64,64 64,4,128,128)",
    )
    parser.add_argument(
        "--dtype", type=_choices(tuple(DTYPES), "dtype"), default=["fp32", "bf16"], metavar=",".join(DTYPES),
        help="dtype(s), comma-separated (default: fp32,bf16)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads (default: %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=21, help="interleaved timing rounds (default: 21)")
    parser.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed rounds first (default: 3)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (saves compile time)")
    parser.add_argument(
        "--json", nargs="?", const="-", default=None, metavar="PATH",
        help="write the results as JSON to PATH (stdout without PATH) instead of the table",
    )


def _run_kernels(args: argparse.Namespace) -> int:
    import sys

    import torch

    from ..bench.kernels import SHAPES, markdown_table, run_kernel_bench
    from ..runtime import resolve_device

    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    to_stdout = args.json == "-"

    def progress(row) -> None:
        print(
            f"{row.op:9s} {'x'.join(map(str, row.shape)):14s} {row.dtype} {row.phase:7s} {row.impl:7s} "
            f"{row.median_us:10.1f} us  {row.gbps:7.1f} GB/s  {100 * row.copy_fraction:4.0f}% copy  "
            f"{row.vs_eager:5.2f}x eager",
            file=sys.stderr if to_stdout else sys.stdout,
            flush=True,
        )

    result = run_kernel_bench(
        args.op, args.shape or SHAPES, args.dtype, device, rounds=args.rounds, warmup=args.warmup,
        with_compile=not args.no_compile, progress=progress,
    )
    if args.json is None:
        print(markdown_table(result["rows"]))
    elif to_stdout:
        print(json.dumps(result, indent=2))
    else:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(_parser=parser, suite=None)
    suites = parser.add_subparsers(dest="suite", metavar="{kernels}")
    _add_kernel_arguments(
        suites.add_parser(
            "kernels",
            help="micro-benchmark the fused ops (fused vs eager vs torch.compile)",
            description=__doc__.split("\n\n")[2] if __doc__ else None,
        )
    )
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
    if args.suite == "kernels":
        return _run_kernels(args)
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
