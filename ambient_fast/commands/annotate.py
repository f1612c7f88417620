"""Annotate the corrupt samples of a dataset with sigma_min, into a new dataset version.

Corrupt samples are those annotated sigma_min > 0 in the source (e.g. by `corrupt`);
clean ones keep 0. Samples are copied byte for byte; the source is never modified.

methods:
  --fixed SIGMA            one level for every corrupt sample
  --preset KIND:LEVEL      the anchors' presets: blur:0.6 (1.2), blur:0.8 (1.9), blur:1.0 (2.4),
                           jpeg:18 (1.6), jpeg:25 (1.3), jpeg:50 (1.2)
  --classifier             Ambient-o: a noisy-input clean-vs-corrupt classifier; each sample
                           gets the first sigma where P(corrupt) < 0.5 + epsilon
                           (the dataset is read as `train` reads it: in memory when it fits
                           --cache-budget, else streamed by DALI or torch; see --cache, --stream)

examples:
  ambient-fast annotate --src data/cifar-blur --dst data/cifar-blur-ann --preset blur:0.6
  ambient-fast annotate --src data/digits-blur --dst data/digits-blur-clf --classifier --steps 2000
  ambient-fast annotate --src data/digits-blur --classifier --dry-run
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import (
    add_input_arguments,
    check_input_args,
    check_network,
    check_train_args,
    dump_dry_run,
    existing_dir,
    float_in,
    nonnegative_int,
    number,
    open_dataset_arg,
    output_state,
    positive_float,
    positive_int,
)

HELP = "annotate corrupt samples with sigma_min (fixed presets or the Ambient-o classifier)"


def _preset(text: str) -> tuple[str, float]:
    kind, _, level = text.partition(":")
    try:
        return kind, float(level)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KIND:LEVEL like blur:0.6 or jpeg:25, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(_parser=parser)
    parser.add_argument("--src", type=existing_dir, help="dataset folder (never modified)")
    parser.add_argument(
        "--dst", type=Path, default=None, help="new dataset version with the annotation (required unless --dry-run)"
    )
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--fixed", type=positive_float, default=None, metavar="SIGMA", help="one sigma_min for every corrupt sample"
    )
    how.add_argument(
        "--preset", type=_preset, default=None, metavar="KIND:LEVEL", help="anchors' preset, e.g. blur:0.6"
    )
    how.add_argument("--classifier", action="store_true", help="Ambient-o classifier annotation")
    g = parser.add_argument_group("classifier")
    g.add_argument("--network", default="mlp-small", help="classifier backbone (default: %(default)s)")
    g.add_argument("--steps", type=positive_int, default=1500, help="classifier training steps (default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=256, help="classifier batch (default: %(default)s)")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="classifier learning rate (default: %(default)s)")
    g.add_argument(
        "--sigma-lo", type=positive_float, default=0.01, help="lowest level of the grid (default: %(default)s)"
    )
    g.add_argument(
        "--sigma-hi", type=positive_float, default=10.0, help="highest level of the grid (default: %(default)s)"
    )
    g.add_argument("--num-sigmas", type=number(int, at_least=2), default=64, help="grid points (default: %(default)s)")
    g.add_argument(
        "--trials", type=positive_int, default=4, help="noise draws per sample and level (default: %(default)s)"
    )
    g.add_argument(
        "--epsilon",
        type=float_in(0.0, 0.5),
        default=0.05,
        help="P(corrupt) < 0.5 + epsilon counts as chance (default: %(default)s)",
    )
    g.add_argument(
        "--smooth-span", type=positive_float, default=4.0, help="EWM span along the grid (default: %(default)s)"
    )
    g.add_argument("--seed", type=nonnegative_int, default=0, help="seed (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] (default: %(default)s)")
    add_input_arguments(g)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--dry-run", action="store_true", help="validate the options, print the plan, write nothing")


def run(args: argparse.Namespace) -> int:
    parser = args._parser
    if args.src is None:
        parser.error("argument --src: required")
    if args.fixed is None and args.preset is None and not args.classifier:
        parser.error("argument --fixed/--preset/--classifier: choose one method")
    if args.dst is None and not args.dry_run:
        parser.error("argument --dst: required (annotations go to a new dataset version)")
    if args.dst is not None and output_state(args.dst) == "taken":
        parser.error(f"argument --dst: {args.dst} exists (annotations go to a new dataset version)")
    if args.sigma_lo >= args.sigma_hi:
        parser.error(f"argument --sigma-hi: must be > --sigma-lo ({args.sigma_lo}), got {args.sigma_hi}")
    from ..loops.annotate import fixed_sigma_min

    level = args.fixed
    if args.preset is not None:
        try:
            level = fixed_sigma_min(*args.preset)
        except ValueError as err:
            parser.error(f"argument --preset: {err}")
    if args.classifier:
        config = {
            k: getattr(args, k)
            for k in (
                "network",
                "steps",
                "batch_size",
                "lr",
                "sigma_lo",
                "sigma_hi",
                "num_sigmas",
                "trials",
                "epsilon",
                "smooth_span",
                "seed",
                "device",
                "cache",
                "cache_budget_bytes",
                "stream",
            )
        }
        backend = _check_classifier_input(parser, args)
    else:
        config = {"sigma_min": level}
    if args.dry_run:
        how = f"classifier, dataset read by {backend}" if args.classifier else "fixed"
        dump_dry_run(f"annotate {args.src} into {args.dst or '<DST>'} ({how})", config)
        return 0
    from ..loops.annotate import annotate_classifier, annotate_fixed

    if args.classifier:
        result = annotate_classifier(args.src, args.dst, **config, progress=not args.no_progress)
        levels = result.sigma_min[result.annotated]
        print(
            f"classifier accuracy {result.train_accuracy:.3f} (dataset read by {result.input_backend}); "
            f"sigma_min of {len(levels)} corrupt samples: "
            f"median {float(levels.median()):.3f}, "
            f"10%-90% {float(levels.quantile(0.1)):.3f}-{float(levels.quantile(0.9)):.3f}"
        )
    else:
        annotate_fixed(args.src, args.dst, level, progress=not args.no_progress)
        print(f"sigma_min = {level:g} on every corrupt sample")
    print(f"wrote {args.dst}")
    return 0


def _check_classifier_input(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The device exists, the dataset opens, the backbone is known and fits its samples, and
    ``--cache``/``--stream`` name a reader that can read it: the backend they choose."""
    check_train_args(parser, args)
    dataset = open_dataset_arg(parser, "--src", args.src)
    check_network(parser, args.network, None, tuple(dataset.sample_shape))
    return check_input_args(parser, dataset, vars(args))
