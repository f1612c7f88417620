"""Restore every corrupt sample of a dataset version by posterior sampling (SPEC 5).

Each sample with sigma_min > 0 (> --sigma-out) is noised to its sigma_min with its own
seed (derived from --seed and the sample's index), integrated on its own grid down to 0 (or
--sigma-out) with the denoiser, stored in the dataset's format and annotated
sigma_min / --rho-ambient (or --sigma-out). Clean samples are copied byte for byte. The new
version (same format as --src, new annotations.jsonl, manifest.json) appears atomically at
--dst. A killed run restarted with the same arguments resumes where it stopped; changed
arguments are refused. On CUDA the whole sampling loop of a batch is one CUDA graph.

The JSON report (counts, images/s, NFE/s, arguments) goes to stdout, or to --report FILE;
the progress bar and the summary line go to stderr (rank 0 only).

examples:
  ambient-fast restore --model runs/00003-train-cifar/denoiser.safetensors \\
      --src data/cifar-blur --dst data/cifar-blur-restored-1
  ambient-fast restore --model ckpt.safetensors --src data/digits-blur --dst out/r1 \\
      --method stochastic --num-steps 64 --sigma-out 0.1
  ambient-fast restore --model ckpt.safetensors --src data/x --dst out/x1 --dry-run
  torchrun --nproc-per-node 8 -m ambient_fast.cli restore --model ckpt.safetensors \\
      --src data/cifar-blur --dst data/cifar-restored --batch-size 1024 --precision bf16
  ambient-fast restore --diffusers models/my-sd --src shards/diffusiondb --dst shards/restored-1 \
      --guidance-scale 3.5 --store-latents        # latent text-to-image, captions kept
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from ..loops.options import nonnegative_float, nonnegative_int, positive_int

HELP = "restore a dataset's corrupt samples by posterior sampling (resumable, multi-GPU)"

_SEED_LIMIT = 2**32


def _float_at_least(low: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low <= value < float("inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number >= {low:g}, got {text}")
        return value

    parse.__name__ = f"float >= {low:g}"
    return parse


def _positive_float(text: str) -> float:
    value = _float_at_least(0.0)(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _seed(text: str) -> int:
    value = nonnegative_int(text)
    if value >= _SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be < 2^32, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..restoration.sampler import COMPILE_MODES, METHODS, START_NOISE

    parser.set_defaults(_parser=parser)
    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="CKPT",
        help="denoiser checkpoint (save_denoiser format); or --diffusers for latent text-to-image",
    )
    io.add_argument(
        "--src",
        type=Path,
        required=True,
        metavar="DATA",
        help="dataset version to restore (any ambient_fast.data format)",
    )
    io.add_argument("--dst", type=Path, required=True, metavar="OUT", help="new dataset version (must not exist)")
    io.add_argument(
        "--report", type=Path, default=None, metavar="FILE", help="write the JSON report here (default: stdout)"
    )
    s = parser.add_argument_group("sampling (SPEC 5)")
    s.add_argument(
        "--num-steps",
        type=positive_int,
        default=None,
        metavar="K",
        help="grid points per sample before the final level; Heun to 0 uses 2K-1 NFE "
        "(default: 18, the anchors' 35 NFE; latent: 30 on the global grid)",
    )
    s.add_argument(
        "--method",
        choices=METHODS,
        default="heun",
        help="heun: deterministic (anchor); stochastic: posterior sampling (reverse SDE) (default: %(default)s)",
    )
    s.add_argument(
        "--seed", type=_seed, default=0, help="run seed; sample i's noise comes from (seed, i) (default: %(default)s)"
    )
    s.add_argument(
        "--rho-ambient",
        type=_float_at_least(1.0),
        default=None,
        metavar="R",
        help="new annotation sigma_min / R when restoring to 0 (default: 8, the anchors' pixel runs; latent: 2)",
    )
    s.add_argument(
        "--sigma-out",
        type=nonnegative_float,
        default=0.0,
        help="stop at this level and store the noisy state, annotated sigma_out; samples at or below it are "
        "copied through (default: 0 = to the data)",
    )
    s.add_argument("--rho", type=_positive_float, default=7.0, help="grid curvature (default: %(default)s)")
    s.add_argument(
        "--sigma-floor", type=_positive_float, default=0.002, help="lowest positive grid level (default: %(default)s)"
    )
    s.add_argument(
        "--start-noise",
        choices=START_NOISE,
        default=None,
        help="fresh (anchor), training (the frozen training noise), none (data stored noisy) "
        "(default: from --src's manifest: none where it says the data is stored noisy, else fresh)",
    )
    s.add_argument(
        "--training-noise-seed",
        type=_seed,
        default=0,
        help="the training's noise_seed, for --start-noise training (default: %(default)s)",
    )
    e = parser.add_argument_group("engine")
    e.add_argument(
        "--batch-size",
        type=positive_int,
        default=256,
        metavar="B",
        help="samples per device batch, per rank (default: %(default)s)",
    )
    e.add_argument(
        "--shard-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="restored samples per shard, a multiple of --batch-size (default: >= 1024)",
    )
    e.add_argument(
        "--state-dtype",
        choices=("float32", "float64"),
        default=None,
        help="sampler state (anchors: float64) (default: float32; latent: float64)",
    )
    e.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="network autocast dtype (default: %(default)s)",
    )
    e.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="none",
        help="torch.compile the per-step function (default: %(default)s)",
    )
    e.add_argument(
        "--cuda-graph",
        choices=("auto", "on", "off"),
        default="auto",
        help="capture the K-step loop as one CUDA graph; auto = on CUDA unless --compile "
        "reduce-overhead (default: %(default)s)",
    )
    e.add_argument(
        "--device", default="auto", help="auto (cuda:LOCAL_RANK or cpu), cpu, cuda, cuda:N (default: %(default)s)"
    )
    e.add_argument(
        "--workers",
        type=positive_int,
        default=4,
        help="IO threads per rank (decode, encode, write) (default: %(default)s)",
    )
    r = parser.add_argument_group("run control")
    r.add_argument("--restart", action="store_true", help="discard an unfinished run into --dst instead of resuming it")
    r.add_argument(
        "--fsync", action="store_true", help="flush each shard to disk before journaling it (survives power loss)"
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar or summary line")
    r.add_argument("--dry-run", action="store_true", help="validate everything, print the plan, write nothing")
    from ..latent.cli import add_latent_arguments

    add_latent_arguments(parser, common=False)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-option rules and paths (``parser.error`` names the option)."""
    if args.shard_size is not None and args.shard_size % args.batch_size:
        parser.error(
            f"argument --shard-size: must be a multiple of --batch-size ({args.batch_size}), got {args.shard_size}"
        )
    if args.cuda_graph == "on" and args.compile == "reduce-overhead":
        parser.error("argument --cuda-graph: 'on' is not allowed with --compile reduce-overhead (graphs cannot nest)")
    if not args.model.is_file():
        parser.error(f"argument --model: no such file: {args.model}")
    if not args.src.exists():
        parser.error(f"argument --src: no such dataset: {args.src}")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        parser.error(f"argument --device: expected auto, cpu or cuda[:N], got {args.device!r}")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"argument --device: {args.device} requested but CUDA is not available")
    if args.cuda_graph == "on" and not torch.cuda.is_available():
        parser.error("argument --cuda-graph: 'on' needs CUDA")


def pixel_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options shared with ``--diffusers`` whose default differs per path (pixel: anchors' CIFAR)."""
    args.num_steps = 18 if args.num_steps is None else args.num_steps
    args.rho_ambient = 8.0 if args.rho_ambient is None else args.rho_ambient
    args.state_dtype = args.state_dtype or "float32"
    return args


def _run_latent(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``--diffusers``: latent text-to-image restoration of WebDataset shards (ambient_fast.latent)."""
    from ..latent.cli import run_latent

    if args.model is not None:
        parser.error("argument --model: not allowed with --diffusers (the pipeline folder holds the model)")
    if not args.src.exists():
        parser.error(f"argument --src: no such dataset: {args.src}")
    args.resume = not args.restart  # like pixel restoration, an unfinished run into --dst is continued
    args.annotations = None
    args.device = None if args.device == "auto" else args.device
    args.state_dtype = args.state_dtype or "float64"
    return run_latent(args)


def run(args: argparse.Namespace) -> int:
    parser = args._parser
    if args.diffusers is not None:
        return _run_latent(parser, args)
    if args.model is None:
        parser.error("one of the arguments --model or --diffusers is required")
    pixel_defaults(args)
    _check(parser, args)
    from ..data.errors import DatasetError
    from ..data.nature_noise import resolve_start_noise

    try:
        args.start_noise, warning = resolve_start_noise(args.src, args.start_noise)
    except DatasetError as err:
        parser.error(f"argument --src: {err}")
    except ValueError as err:
        parser.error(f"argument --start-noise: {err}")
    if warning:
        print(f"ambient-fast restore: warning: {warning}", file=sys.stderr)
    from ..restoration import read_denoiser_config
    from ..restoration.distributed import init_from_env

    try:
        read_denoiser_config(args.model)
    except (ValueError, FileNotFoundError) as err:
        parser.error(f"argument --model: {err}")
    ctx = init_from_env()
    device = None if args.device == "auto" else args.device
    try:
        report = _restore(args, device)
        # Meet right before teardown, so no rank closes its gloo sockets while a peer is still
        # between its last collective and destroy_process_group (a rare SIGABRT seen in CI).
        # Success path only: after a rank-local error a barrier could wait on a peer that is
        # blocked in a different collective.
        ctx.barrier()
    except (ValueError, FileExistsError, FileNotFoundError) as err:  # bad data, changed arguments, existing dst
        print(f"ambient-fast restore: error: {err}", file=sys.stderr)
        return 1
    finally:
        if ctx.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if ctx.is_main:
        text = json.dumps(asdict(report), indent=1, sort_keys=True) + "\n"
        if args.report is not None and not args.dry_run:
            args.report.write_text(text)
        else:
            sys.stdout.write(text)
    return 0


def _restore(args: argparse.Namespace, device: str | None):
    from ..restoration import restore_dataset

    return restore_dataset(
        args.model,
        args.src,
        args.dst,
        num_steps=args.num_steps,
        batch_size=args.batch_size,
        method=args.method,
        seed=args.seed,
        rho_ambient=args.rho_ambient,
        sigma_out=args.sigma_out,
        rho=args.rho,
        sigma_floor=args.sigma_floor,
        start_noise=args.start_noise,
        training_noise_seed=args.training_noise_seed,
        state_dtype=args.state_dtype,
        precision=args.precision,
        compile=args.compile,
        cuda_graph={"auto": None, "on": True, "off": False}[args.cuda_graph],
        shard_size=args.shard_size,
        device=device,
        num_workers=args.workers,
        restart=args.restart,
        fsync=args.fsync,
        progress=not args.no_progress,
        dry_run=args.dry_run,
    )
