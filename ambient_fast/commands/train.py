"""Train an EDM denoiser with the ambient loss and noise-level-first batches.

The run goes to an auto-numbered folder OUT/NNNNN-train-DESC/ holding config.json,
log.jsonl, training-state.safetensors (model, EMA, optimiser, step, RNG and sampler state;
rewritten every --checkpoint-images) and denoiser.safetensors (the EMA denoiser).

modes:
  clean        only the samples with sigma_min = 0
  plain        every sample as if clean (the usual diffusion loss)
  contraction  corrupt samples only above their buffered sigma_min, plain loss
  ambient      the ambient loss (SPEC 2)

examples:
  ambient-fast train --data data/digits-blur --mode ambient --total-images 512000
  ambient-fast train --data data/cifar-blur --network unet-cifar10 --precision bf16 --allow-tf32
  torchrun --nproc-per-node 8 -m ambient_fast.cli train --data data/cifar-blur --batch-size 512
  ambient-fast train --resume runs/00003-train-digits      # continue a killed run
  ambient-fast train --data data/digits-blur --dry-run     # validate and show the config
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
    train_kwargs_from_args,
)

HELP = "train a denoiser with the ambient loss (EDM-style, noise-level-first batches)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(_parser=parser)
    parser.add_argument("--data", type=existing_dir, help="dataset folder with annotations.jsonl")
    parser.add_argument(
        "--out", type=Path, default=Path("runs"), help="parent of the run folder (default: %(default)s)"
    )
    parser.add_argument("--desc", default=None, help="run folder suffix (default: the dataset's name)")
    parser.add_argument(
        "--resume", type=existing_dir, default=None, metavar="RUN_DIR", help="continue the training run in RUN_DIR"
    )
    parser.add_argument(
        "--init", type=Path, default=None, metavar="CKPT", help="start from this denoiser (e.g. a previous loop's)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate the options, the data and the network; write nothing"
    )
    add_train_arguments(parser)


def run(args: argparse.Namespace) -> int:
    parser = args._parser
    check_train_args(parser, args)
    if args.resume is None and args.data is None:
        parser.error("argument --data: required (unless --resume is given)")
    kwargs = train_kwargs_from_args(args)
    if args.resume is not None:
        from ..loops.train import RESUMABLE_CHANGES
        from ..runtime import read_json

        config_path = args.resume / "config.json"
        if not config_path.exists():
            parser.error(f"argument --resume: {args.resume} has no config.json (not a training run)")
        saved = read_json(config_path)
        data = Path(saved["data"])
        # The run's own options win; those that do not change the trajectory (length,
        # checkpoint and log cadence, device, input backend) may be given on the command line.
        given = {k for k in RESUMABLE_CHANGES & set(kwargs) if getattr(args, k) != parser.get_default(k)}
        kwargs.update({k: v for k, v in saved.items() if k in kwargs and k not in given})
        if isinstance(kwargs.get("betas"), list):
            kwargs["betas"] = tuple(kwargs["betas"])
        init = saved.get("init")
    else:
        data, init = args.data, args.init
    if init is not None and not Path(init).is_file():
        parser.error(f"argument --init: no such file: {init}")
    check_training_data(parser, "--data", data, kwargs)
    kwargs["init"] = str(init) if init is not None else None
    desc = args.desc or data.name
    if args.dry_run:
        where = args.resume or args.out / f"NNNNN-train-{desc}"
        dump_dry_run(f"train on {data} into {where}", kwargs)
        return 0
    from ..loops.train import train
    from ..runtime import init_runtime, print0, shared_run_dir, shutdown

    ctx = init_runtime(kwargs.get("device", "auto"))
    ok = False
    try:
        # The folder is named here and created by train() once the data and the network are
        # known to work, so a failed start leaves no empty run folder.
        run_dir = args.resume or shared_run_dir(args.out, f"train-{desc}", create=False)
        result = train(data, run_dir, **kwargs, resume=args.resume is not None, progress=not args.no_progress)
        ok = True
    finally:
        shutdown(ctx, ok=ok)
    print0(f"trained {result.images} images in {result.steps} steps ({result.images_per_second:.0f} img/s)")
    print0(f"denoiser: {result.denoiser_path}")
    return 0
