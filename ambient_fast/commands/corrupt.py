"""Corrupt a share of a dataset into a new annotated version (the source is never modified).

Corrupted samples are annotated with sigma_min (a preset, the noise std, or --sigma-min),
clean ones with 0; the version's manifest lists the corrupted keys.

corruptions and their parameters:
  blur        --sigma-blur PX           preset sigma_min: 0.6 -> 1.2, 0.8 -> 1.9, 1.0 -> 2.4
  jpeg        --quality Q               preset sigma_min: 18 -> 1.6, 25 -> 1.3, 50 -> 1.2
  noise       --std S ([-1, 1] units)   sigma_min = S; stored as float tensors (unclipped)
  mask        --holes N --hole-size PX  needs --sigma-min
  downsample  --factor F                needs --sigma-min

examples:
  ambient-fast corrupt --src data/cifar10 --dst data/cifar10-blur0.6 --corruption blur --sigma-blur 0.6 --fraction 0.9
  ambient-fast corrupt --src data/digits --dst data/digits-noise --corruption noise --std 0.2 \\
      --fraction 0.97 --selection exact
  ambient-fast corrupt --digits data/digits --dst data/digits-jpeg --corruption jpeg --quality 25 --fraction 0.9
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import (
    dump_dry_run,
    existing_dir,
    float_in,
    nonnegative_float,
    nonnegative_int,
    number,
    output_state,
    positive_float,
    positive_int,
)

HELP = "corrupt a share of a dataset into a new version annotated with sigma_min"

_PARAMS = {
    "blur": ("sigma_blur",),
    "jpeg": ("quality",),
    "noise": ("std",),
    "mask": ("holes", "hole_size", "pixel_fraction", "fill"),
    "downsample": ("factor",),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(_parser=parser)
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--src", type=existing_dir, help="source dataset folder")
    src.add_argument(
        "--digits", type=Path, metavar="DIR", help="export the bundled 8x8 digits to DIR and use them as the source"
    )
    parser.add_argument("--dst", type=Path, help="new dataset folder (must not exist)")
    parser.add_argument("--corruption", choices=tuple(_PARAMS), help="corruption kind")
    parser.add_argument(
        "--fraction", type=float_in(0.0, 1.0), default=0.9, help="share of samples to corrupt (default: %(default)s)"
    )
    parser.add_argument(
        "--selection",
        choices=("per_sample", "exact"),
        default="per_sample",
        help="per-sample coin flips, or exactly round(fraction*N) (default: %(default)s)",
    )
    parser.add_argument(
        "--sigma-min",
        type=nonnegative_float,
        default=None,
        help="annotation of corrupted samples (default: preset / noise std)",
    )
    parser.add_argument(
        "--seed", type=nonnegative_int, default=0, help="selection and corruption seed (default: %(default)s)"
    )
    g = parser.add_argument_group("corruption parameters")
    g.add_argument("--sigma-blur", type=positive_float, help="blur std in pixels")
    g.add_argument("--quality", type=number(int, at_least=1, at_most=95), help="JPEG quality 1-95")
    g.add_argument("--std", type=positive_float, help="noise std in [-1, 1] units")
    g.add_argument("--holes", type=positive_int, help="mask: number of holes")
    g.add_argument("--hole-size", type=positive_int, help="mask: hole side in pixels")
    g.add_argument("--pixel-fraction", type=float_in(0.0, 1.0), help="mask: share of pixels dropped")
    g.add_argument("--fill", type=float, help="mask: fill value")
    g.add_argument("--factor", type=positive_int, help="downsample factor")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dry-run", action="store_true", help="validate the options, print the plan, write nothing")


def run(args: argparse.Namespace) -> int:
    parser = args._parser
    if args.src is None and args.digits is None:
        parser.error("argument --src: required (or --digits DIR)")
    if args.dst is None:
        parser.error("argument --dst: required")
    if args.corruption is None:
        parser.error("argument --corruption: required")
    if output_state(args.dst) == "taken":
        parser.error(f"argument --dst: {args.dst} exists (a corruption writes a new version)")
    allowed = _PARAMS[args.corruption]
    params = {
        name: getattr(args, name) for names in _PARAMS.values() for name in names if getattr(args, name) is not None
    }
    foreign = sorted(set(params) - set(allowed))
    if foreign:
        flag = "--" + foreign[0].replace("_", "-")
        parser.error(
            f"argument {flag}: not a parameter of {args.corruption} "
            f"(its parameters: {', '.join('--' + a.replace('_', '-') for a in allowed)})"
        )
    required = {"blur": "sigma_blur", "jpeg": "quality", "noise": "std", "downsample": "factor"}.get(args.corruption)
    if required and required not in params:
        parser.error(f"argument --{required.replace('_', '-')}: required for --corruption {args.corruption}")
    from ..data import corruption_sigma_min

    try:
        level, source = corruption_sigma_min(args.corruption, params, args.sigma_min)
    except ValueError as err:
        parser.error(f"argument --sigma-min: {err}")
    src = args.src if args.src is not None else args.digits
    if args.dry_run:
        dump_dry_run(
            f"corrupt {args.fraction:g} of {src} into {args.dst}",
            {
                "corruption": args.corruption,
                **params,
                "sigma_min": level,
                "sigma_min_source": source,
                "selection": args.selection,
                "seed": args.seed,
            },
        )
        return 0
    from ..data import corrupt_dataset, export_digits

    if args.digits is not None:
        src = export_digits(args.digits)
    out = corrupt_dataset(
        src,
        args.dst,
        args.corruption,
        fraction=args.fraction,
        seed=args.seed,
        sigma_min=args.sigma_min,
        selection=args.selection,
        progress=not args.no_progress,
        **params,
    )
    print(f"wrote {out} ({args.corruption}, sigma_min {level:g} from {source})")
    return 0
