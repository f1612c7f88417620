"""The bundled demo: ambient diffusion on the 8x8 digits, CPU only, no download.

3% of scikit-learn's digits stay clean (54 images); the rest are corrupted by a Gaussian
blur (0.6 px, sigma_min 1.0) or by additive Gaussian noise (std 0.4 = sigma_min). With
the same budget per run and several seeds it trains: (1) the clean images only, (2) all
data with the plain loss, (3) contraction only, (4) the ambient loss, (5) a dataloop
started from (4); then prints the Frechet distance to the clean versions of the corrupted
images (which no model saw) and the share of samples that copy a clean training image.

Output: OUT/NNNNN-demo-digits/ with metrics.json, demo.json, table.md, report.png, config.json and every
run's folder (training log, checkpoints, denoiser).

presets:
  default  2 seeds, mlp-base, 1500 steps per run: about 4.5 minutes on 2 cores
  quick    1 seed, tiny budget: a smoke test (under a minute); the numbers mean nothing
  study    3 seeds and four loop variants (fine-tune / scratch x sigma_min/8 / sigma_min/2)

examples:
  ambient-fast demo
  ambient-fast demo --quick
  ambient-fast demo --preset study --jobs 2
  ambient-fast demo --corruptions noise --seeds 0 1 2 --total-images 512000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .options import dump_dry_run, float_in, positive_float, positive_int

HELP = "run the bundled digits demo (ambient vs baselines vs dataloops) and print the table"


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
        default=["blur", "noise"],
        help="datasets (default: both)",
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
        "corruptions": tuple(dict.fromkeys(args.corruptions)),
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
