"""Frechet distance of a model's samples (or of a dataset) to a clean reference.

metrics:
  fid        Inception-v3 pool3 features (pytorch-fid weights from a local file:
             $AMBIENT_FAST_INCEPTION_WEIGHTS or torch hub's cache; never downloads)
  fd_digits  the bundled digits feature network (the demo's metric; 8x8 digits only)

The reference is a dataset folder, or for fid an .npz of statistics (mu, sigma).

examples:
  ambient-fast fid --model runs/00003-train-digits/denoiser.safetensors --ref data/digits-8x8 --metric fd_digits
  ambient-fast fid --model runs/00007-train-cifar/denoiser.safetensors --ref cifar10-32x32.npz --num-samples 50000
  ambient-fast fid --samples runs/00004-loop-cifar/loop-1/data --ref data/cifar10 --memorisation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .options import existing_dir, positive_float, positive_int

HELP = "Frechet distance (FID or the digits FD) of samples or a model to a reference"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(_parser=parser)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--model", type=Path, default=None, metavar="CKPT", help="denoiser checkpoint to sample from")
    what.add_argument("--samples", type=existing_dir, default=None, metavar="DIR", help="dataset folder of samples")
    parser.add_argument("--ref", type=Path, help="reference dataset folder (or .npz statistics for fid)")
    parser.add_argument(
        "--metric", choices=("fid", "fd_digits"), default="fid", help="feature space (default: %(default)s)"
    )
    parser.add_argument(
        "--num-samples", type=positive_int, default=10000, help="samples generated from --model (default: %(default)s)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=18, help="Heun grid points (default: %(default)s, NFE 35)"
    )
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default: %(default)s)")
    parser.add_argument(
        "--memorisation",
        action="store_true",
        help="also report the share of samples within --threshold of a --ref image",
    )
    parser.add_argument(
        "--threshold", type=positive_float, default=None, help="RMS copy distance (default: the digits threshold, 0.1)"
    )
    parser.add_argument(
        "--inception-weights", type=Path, default=None, metavar="PATH", help="pytorch-fid Inception weights (fid)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--dry-run", action="store_true", help="validate the options and print the plan")


def run(args: argparse.Namespace) -> int:
    parser = args._parser
    if args.model is None and args.samples is None:
        parser.error("argument --model/--samples: one is required")
    if args.model is not None:
        from ..nn import read_denoiser_config

        try:
            read_denoiser_config(args.model)
        except (FileNotFoundError, ValueError) as err:
            parser.error(f"argument --model: {err}")
    if args.ref is None:
        parser.error("argument --ref: required")
    ref_is_stats = args.ref.suffix == ".npz"
    if ref_is_stats and (args.metric != "fid" or args.memorisation):
        parser.error("argument --ref: .npz statistics work only for --metric fid without --memorisation")
    if not ref_is_stats and not args.ref.is_dir():
        parser.error(f"argument --ref: no such folder or .npz file: {args.ref}")
    if args.seed < 0:
        parser.error(f"argument --seed: must be >= 0, got {args.seed}")
    if args.dry_run:
        source = f"{args.num_samples} samples of {args.model}" if args.model else str(args.samples)
        print(f"dry run: would compute {args.metric} of {source} against {args.ref}; nothing written")
        return 0
    from .. import eval as ev
    from ..data import load_dataset_tensors, open_dataset
    from ..data.stream import iter_images
    from ..loops.evaluate import generate
    from ..runtime import resolve_device

    # Samples and a folder reference stream through the data pipeline (bounded memory);
    # the memorisation rate and the digits FD need the images in memory.
    device = resolve_device(args.device)
    in_memory = args.memorisation or args.metric == "fd_digits"
    reference = None if ref_is_stats else load_dataset_tensors(args.ref).images if in_memory else open_dataset(args.ref)
    if args.model is not None:
        from ..nn import load_denoiser

        shape = tuple(_model_shape(args.model)) if ref_is_stats else tuple(_sample_shape(reference))
        samples = generate(
            load_denoiser(args.model, device=device),
            args.num_samples,
            shape,
            steps=args.steps,
            seed=args.seed,
            device=device,
        ).clamp(-1, 1)
        batches = samples.split(250)
    elif in_memory:
        samples = load_dataset_tensors(args.samples).images
        batches = samples.split(250)
    else:
        samples = open_dataset(args.samples)
        batches = iter_images(samples, 250)
    if args.metric == "fd_digits":
        value = ev.fd_digits(samples, reference)
    else:
        try:
            extractor = ev.inception_feature_extractor(args.inception_weights, device)
        except FileNotFoundError as err:
            parser.error(f"argument --inception-weights: {err}")
        if ref_is_stats:
            ref_stats = str(args.ref)
        elif isinstance(reference, torch.Tensor):
            ref_stats = reference
        else:
            ref_stats = ev.feature_statistics(iter_images(reference, 250), extractor)
        value = ev.fid_from_batches(batches, ref_stats, extractor=extractor)
    result = {"metric": args.metric, "value": value, "num_samples": len(samples)}
    if args.memorisation:
        kwargs = {} if args.threshold is None else {"threshold": args.threshold}
        result["memorisation"] = ev.memorisation_rate(samples, reference, **kwargs)
    print(json.dumps(result))
    if args.json is not None:
        from ..runtime import write_json

        write_json(args.json, result)
    return 0


def _sample_shape(reference) -> tuple[int, ...]:
    return tuple(reference.shape[1:]) if isinstance(reference, torch.Tensor) else tuple(reference.sample_shape)


def _model_shape(path: Path) -> list[int]:
    from ..nn import read_denoiser_config

    shape = read_denoiser_config(path).extra.get("sample_shape")
    if shape is None:
        raise ValueError(f"{path}: no sample_shape in its metadata; pass --ref as a dataset folder instead of .npz")
    return shape
