"""The bundled demo: ambient diffusion and Ambient Dataloops on the 8x8 digits, CPU only, no download.

3% of scikit-learn's digits stay clean (54 images); the rest carry Gaussian noise of std 0.4
(annotated sigma_min = 0.4). With one training budget per run and 2 seeds it trains the 54
clean images only and the ambient loss (loop 1), then, from the ambient model, a dataloop
(fine-tune on the original data restored by the previous model, annotated sigma_min / 8) and
the same-compute control (fine-tune on the original data, nothing restored), loop by loop.
It prints, per loop, the Frechet distance to the clean versions of the corrupted images
(which no model saw), the share of samples copying a clean training image, and the restored
data's distance (FD, MSE) to those clean versions.

Output: OUT/NNNNN-demo-digits/ with metrics.json, demo.json, table.md, report.png, config.json and every
run's folder (training log, checkpoints, denoiser, restored data versions).

presets:
  default  noise, 2 seeds, mlp-base, 5 loops (20 training runs of 1500 steps): {minutes} on 2 idle cores
  quick    1 seed, tiny budget, 2 loops: a smoke test (under a minute); the numbers mean nothing
  study    noise and blur, baselines plain / contraction, chains rho 8 / 4 / 2 and scratch (94 runs, ~5x)

examples:
  ambient-fast demo
  ambient-fast demo --quick
  ambient-fast demo --preset study --jobs 2
  ambient-fast demo --seeds 0 1 2 --loops 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..loops.demo import DEMO_MINUTES
from .options import dump_dry_run, float_in, positive_float, positive_int

__doc__ = __doc__.format(minutes=DEMO_MINUTES)  # the one measured demo time (also README, docs)

HELP = f"run the bundled digits demo: ambient loss, dataloop vs same-compute control ({DEMO_MINUTES})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(_parser=parser)
    parser.add_argument(
        "--out", type=Path, default=Path("runs"), help="parent of the run folder (default: %(default)s)"
    )
    parser.add_argument(
        "--preset", choices=("default", "quick", "study"), default="default", help="settings (default: %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="same as --preset quick (CI smoke test)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, metavar="SEED", help="training seeds (default: the preset's)"
    )
    parser.add_argument(
        "--corruptions",
        nargs="+",
        choices=("blur", "noise"),
        default=None,
        help="datasets (default: the preset's; default preset: noise)",
    )
    parser.add_argument(
        "--loops",
        type=positive_int,
        default=None,
        help="loops per chain, loop 1 = the ambient model (default: the preset's)",
    )
    parser.add_argument(
        "--clean-fraction", type=float_in(0.001, 1.0), default=0.03, help="share of clean images (default: %(default)s)"
    )
    parser.add_argument(
        "--sigma-blur", type=positive_float, default=0.6, help="blur std in pixels (default: %(default)s)"
    )
    parser.add_argument(
        "--blur-sigma-min",
        type=positive_float,
        default=1.0,
        help="annotation of the blurred images (default: %(default)s)",
    )
    parser.add_argument(
        "--noise-std",
        type=positive_float,
        default=0.4,
        help="noise std in [-1, 1] units, = its sigma_min (default: %(default)s)",
    )
    parser.add_argument("--network", default=None, help="network preset (default: the preset's)")
    parser.add_argument(
        "--total-images", type=positive_int, default=None, help="training images per run (default: the preset's)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=256, help="training batch (default: %(default)s)")
    parser.add_argument(
        "--eval-samples",
        type=positive_int,
        default=None,
        help="generated samples per evaluation (default: the preset's)",
    )
    parser.add_argument("--jobs", type=positive_int, default=2, help="parallel worker processes (default: %(default)s)")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="where the demo datasets are built (default: inside the run folder)",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate the options, print the plan, write nothing")


def run(args: argparse.Namespace) -> int:
    parser = args._parser
    preset = "quick" if args.quick else args.preset
    if args.quick and args.preset != "default":
        parser.error("argument --quick: not allowed with --preset")
    if args.seeds is not None and any(s < 0 for s in args.seeds):
        parser.error(f"argument --seeds: must be >= 0, got {args.seeds}")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        parser.error(f"argument --seeds: repeated seed in {args.seeds}")
    if args.network is not None:
        from ..nn import NETWORK_PRESETS

        if args.network not in NETWORK_PRESETS:
            parser.error(f"argument --network: unknown network {args.network!r}; known: {', '.join(NETWORK_PRESETS)}")
    kwargs = {
        "preset": preset,
        "seeds": tuple(args.seeds) if args.seeds is not None else None,
        "corruptions": tuple(dict.fromkeys(args.corruptions)) if args.corruptions is not None else None,
        "loops": args.loops,
        "clean_fraction": args.clean_fraction,
        "sigma_blur": args.sigma_blur,
        "blur_sigma_min": args.blur_sigma_min,
        "noise_std": args.noise_std,
        "network": args.network,
        "total_images": args.total_images,
        "batch_size": args.batch_size,
        "eval_samples": args.eval_samples,
        "jobs": args.jobs,
        "data_root": str(args.data_root) if args.data_root is not None else None,
    }
    if args.dry_run:
        dump_dry_run(f"run the {preset} demo into {args.out / 'NNNNN-demo-digits'}", kwargs)
        return 0
    from ..loops.demo import format_table, run_demo
    from ..runtime import next_run_dir, read_json

    t0 = time.perf_counter()
    run_dir = next_run_dir(args.out, "demo-digits")
    print(f"demo ({preset}) -> {run_dir}")
    result = run_demo(run_dir, **kwargs)
    config = read_json(run_dir / "config.json")
    print()
    print(format_table(result, config))
    print(
        f"\nreport: {run_dir / 'report.png'}  table: {run_dir / 'table.md'}  "
        f"({(time.perf_counter() - t0) / 60:.1f} min)"
    )
    return 0
