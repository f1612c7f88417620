"""Run Ambient Dataloops (SPEC 6): train, evaluate, restore the data, re-annotate, repeat.

Every loop's model, restored data version, metrics and config sit side by side in an
auto-numbered run folder:

  OUT/00003-loop-DESC/
    config.json  state.json  metrics.json  report.png
    loop-1/train/{config.json,log.jsonl,training-state.safetensors,denoiser.safetensors}
    loop-1/metrics.json
    loop-1/data/            data_1: the original data restored by model_1 (sigma_min / rho_ambient)
    loop-2/...

The metric is computed against the clean versions of the corrupted samples where --ref
holds them (same keys as in --data: the demo's rule), else against all of --ref; the output
says which. Each restored version is scored the same way (FD and MSE to the clean versions).
The run stops early when the metric has not improved for --patience loops (default 2: a
one-loop dip is tolerated), and metrics.json marks the best loop and, when it stopped, where
the "madness regime" started. --train-on original is the same-compute control: every loop
trains on the original data, nothing is restored. A killed run continues with --resume
RUN_DIR from the last finished stage (training from its last checkpoint, restoration from
the last sample).

examples:
  ambient-fast loop --data data/digits-noise --ref data/digits-noise-clean --loops 3
  ambient-fast loop --data data/cifar-blur --ref data/cifar-clean --metric fid \\
      --network unet-cifar10 --total-images 20000000 --init scratch --rho-ambient 8
  ambient-fast loop --data data/digits-noise --ref data/digits-clean --init previous --train-on original
  ambient-fast loop --resume runs/00003-loop-digits-noise
  ambient-fast loop --data data/digits-noise --ref data/digits-clean --dry-run
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import (
    add_train_arguments,
    check_train_args,
    check_training_data,
    dump_dry_run,
    existing_dir,
    float_above,
    open_dataset_arg,
    positive_int,
    train_kwargs_from_args,
)

HELP = "run Ambient Dataloops: train, evaluate, restore, re-annotate, repeat"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..restoration.sampler import METHODS

    parser.set_defaults(_parser=parser)
    parser.add_argument("--data", type=existing_dir, help="original annotated dataset (never modified)")
    parser.add_argument(
        "--ref",
        type=existing_dir,
        default=None,
        help="clean reference dataset for the metric (omit: no evaluation, no early stop)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs"), help="parent of the run folder (default: %(default)s)"
    )
    parser.add_argument("--desc", default=None, help="run folder suffix (default: the dataset's name)")
    parser.add_argument(
        "--resume", type=existing_dir, default=None, metavar="RUN_DIR", help="continue the loop run in RUN_DIR"
    )
    g = parser.add_argument_group("loop")
    g.add_argument("--loops", type=positive_int, default=2, help="train/restore rounds (default: %(default)s)")
    g.add_argument(
        "--init",
        choices=("scratch", "previous"),
        default="scratch",
        help="loop k starts from scratch (anchors) or loop k-1's EMA (default: %(default)s)",
    )
    g.add_argument(
        "--start-model",
        type=Path,
        default=None,
        metavar="CKPT",
        help="use this denoiser as loop 1's model instead of training it (e.g. an Ambient-o model)",
    )
    g.add_argument(
        "--patience",
        type=positive_int,
        default=2,
        help="stop after this many loops without improvement; 2 tolerates a one-loop dip (default: %(default)s)",
    )
    g.add_argument(
        "--train-on",
        choices=("restored", "original"),
        default="restored",
        help="loop k trains on data_(k-1) (the dataloop), or on the original data with nothing restored "
        "(the same-compute control) (default: %(default)s)",
    )
    g.add_argument(
        "--metric",
        choices=("fd_digits", "fid"),
        default="fd_digits",
        help="Frechet distance to --ref (default: %(default)s)",
    )
    g.add_argument(
        "--eval-samples",
        type=positive_int,
        default=2000,
        help="generated samples per evaluation (default: %(default)s)",
    )
    g.add_argument(
        "--eval-steps", type=positive_int, default=18, help="sampler grid points, Heun (default: %(default)s)"
    )
    g.add_argument("--no-memorisation", action="store_true", help="skip the memorisation rate")
    g.add_argument(
        "--reannotate",
        choices=("restore", "classifier"),
        default="restore",
        help="new sigma_min: the restoration's sigma_min/rho-ambient, or the classifier (default: %(default)s)",
    )
    g = parser.add_argument_group("restoration")
    g.add_argument(
        "--rho-ambient",
        type=float_above(1.0),
        default=8.0,
        metavar="R",
        help="trust rate: restored samples are annotated sigma_min / R (anchors: 8; default: %(default)s)",
    )
    # The old name of --rho-ambient, kept only to refuse it (argparse would otherwise take
    # "--rho" as an abbreviation of --rho-ambient; --rho is the grid's curvature in restore).
    g.add_argument("--rho", type=str, default=None, help=argparse.SUPPRESS)
    g.add_argument(
        "--restore-steps",
        type=positive_int,
        default=18,
        help="grid points per sample (anchors: 18; default: %(default)s)",
    )
    g.add_argument(
        "--restore-method",
        choices=METHODS,
        default="heun",
        help="restoration sampler, as restore --method ('stochastic': deprecated alias of sde) (default: %(default)s)",
    )
    parser.add_argument("--no-report", action="store_true", help="skip report.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--dry-run", action="store_true", help="validate the options, print the config, write nothing")
    add_train_arguments(parser, skip=("seed", "device"))
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed (loop k trains with seed + k - 1; default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] (default: %(default)s)")


def loop_kwargs_from_args(args: argparse.Namespace) -> dict:
    """The :func:`ambient_fast.loops.run_dataloop` keyword arguments given on the command line."""
    train_kwargs = {k: v for k, v in train_kwargs_from_args(args).items() if k not in ("seed", "device")}
    return {
        "loops": args.loops,
        "init": args.init,
        "start_model": str(args.start_model) if args.start_model is not None else None,
        "train_kwargs": train_kwargs,
        "restore_kwargs": {
            "rho_ambient": args.rho_ambient,
            "num_steps": args.restore_steps,
            "method": args.restore_method,
        },
        "reannotate": args.reannotate,
        "reference": str(args.ref) if args.ref is not None else None,
        "metric": args.metric,
        "eval_samples": args.eval_samples,
        "eval_steps": args.eval_steps,
        "memorisation": not args.no_memorisation,
        "patience": args.patience,
        "train_on": args.train_on,
        "seed": args.seed,
        "device": args.device,
        "report": not args.no_report,
    }


def run(args: argparse.Namespace) -> int:
    parser = args._parser
    if args.rho is not None:
        parser.error(
            "argument --rho: renamed --rho-ambient (the trust rate: restored samples get sigma_min / R); "
            "--rho is the sampling grid's curvature in restore"
        )
    check_train_args(parser, args)
    if args.seed < 0:
        parser.error(f"argument --seed: must be >= 0, got {args.seed}")
    from ..runtime import read_json

    if args.resume is not None:
        if not (args.resume / "config.json").exists():
            parser.error(f"argument --resume: {args.resume} has no config.json (not a loop run)")
        saved = read_json(args.resume / "config.json")
        kwargs = {k: v for k, v in saved.items() if k not in ("data", "run_dir", "resume", "progress")}
        if args.loops != parser.get_default("loops"):  # continue a finished run with more loops
            kwargs["loops"] = args.loops
        data, run_dir = Path(saved["data"]), args.resume
    else:
        if args.data is None:
            parser.error("argument --data: required (unless --resume is given)")
        if args.metric == "fid" and args.ref is not None:
            from ..eval import resolve_inception_weights

            try:
                resolve_inception_weights()
            except FileNotFoundError as err:
                parser.error(f"argument --metric: fid needs the Inception weights: {err}")
        kwargs = loop_kwargs_from_args(args)
        data, run_dir = args.data, None
    _check_inputs(parser, data, kwargs)
    if args.dry_run:
        where = run_dir or args.out / f"NNNNN-loop-{args.desc or data.name}"
        dump_dry_run(f"run {kwargs['loops']} loop(s) on {data} into {where}", kwargs)
        return 0
    from ..loops.dataloop import run_dataloop
    from ..runtime import init_runtime, print0, shared_run_dir, shutdown

    ctx = init_runtime(kwargs["device"])
    ok = False
    try:
        run_dir = run_dir or shared_run_dir(args.out, f"loop-{args.desc or data.name}")
        result = run_dataloop(data, run_dir, **kwargs, resume=args.resume is not None, progress=not args.no_progress)
        ok = True
    finally:
        shutdown(ctx, ok=ok)
    if result.reference is not None:
        print0(f"{kwargs['metric']} against {result.reference}")
    for r in result.loops:
        value = f"{r['value']:.3f}" if r.get("value") is not None else "-"
        line = f"loop {r['loop']}: {kwargs['metric']} {value}"
        if r.get("memorisation") is not None:
            line += f", copies {100 * r['memorisation']:.1f}%"
        if r.get("data_value") is not None:
            line += f"; restored data: {kwargs['metric']} {r['data_value']:.3f}, MSE {r['data_mse']:.4f}"
        print0(line + (" (best)" if r["loop"] == result.best_loop else ""))
    if result.stopped_early:
        print0(
            f"stopped early: no improvement for {kwargs['patience']} loop(s); "
            f"the madness regime starts at loop {result.madness_from}"
        )
    print0(f"run folder: {result.run_dir}")
    return 0


def _check_inputs(parser: argparse.ArgumentParser, data: Path, kwargs: dict) -> None:
    """Before any work (and in a dry run): the data opens and the network fits it with a
    reader that exists, the reference opens with the data's sample shape, and the start
    model is a checkpoint for that shape."""
    dataset = check_training_data(parser, "--data", data, kwargs["train_kwargs"])
    shape = tuple(dataset.sample_shape)
    if kwargs["reference"] is not None:
        reference = open_dataset_arg(parser, "--ref", Path(kwargs["reference"]))
        if tuple(reference.sample_shape) != shape:
            parser.error(
                f"argument --ref: samples are {tuple(reference.sample_shape)}, the data's are {shape} "
                "(the reference holds clean samples of the data's shape)"
            )
    if kwargs["start_model"] is not None:
        from ..nn import read_denoiser_config

        try:
            stored = read_denoiser_config(kwargs["start_model"]).extra.get("sample_shape")
        except (FileNotFoundError, ValueError) as err:
            parser.error(f"argument --start-model: {err}")
        if stored is not None and tuple(stored) != shape:
            parser.error(f"argument --start-model: trained on samples {tuple(stored)}, the data's are {shape}")
