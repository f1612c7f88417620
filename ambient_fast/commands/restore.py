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
      --method sde --num-steps 64 --sigma-out 0.1
  ambient-fast restore --model ckpt.safetensors --src data/x --dst out/x1 --dry-run
  torchrun --nproc-per-node 8 -m ambient_fast.cli restore --model ckpt.safetensors \\
      --src data/cifar-blur --dst data/cifar-restored --batch-size 1024 --precision bf16
  ambient-fast restore --model ckpt.safetensors --src shards/laion-jpeg --dst shards/laion-r1 \\
      --resize --output-codec webp          # JPEG WebDataset shards in, lossless WebP out, captions kept
  ambient-fast restore --diffusers models/my-sd --src shards/diffusiondb --dst shards/restored-1 \\
      --guidance-scale 3.5 --store-latents  # latent text-to-image on the same engine (anchors' global grid)

Images (JPEG, PNG, WebP) are decoded by DALI where it is installed (--reader), checked
against --max-pixels before anything is allocated, and restored samples are written
losslessly (PNG under the same key) unless --output-codec asks for a lossy re-encode (the
manifest and report then say it is a corruption the new sigma_min does not describe).
Captions, JSON and unknown members of a sample travel through untouched; clean samples are
decode-checked and copied byte for byte; a sample that does not decode is skipped and named
(or fatal with --on-bad-sample raise). A second run on one --dst gets one line naming the
run that holds its lock; a stale lock from a killed run is taken over (from another host:
once its holder's heartbeat has been silent for 10 minutes, so a restarted cluster job
continues wherever its rank 0 lands).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .options import nonnegative_float, number, positive_int

HELP = "restore a dataset's corrupt samples by posterior sampling (resumable, multi-GPU)"

_SEED_LIMIT = 2**32


_positive_float = number(float, above=0)
_seed = number(int, at_least=0, below=_SEED_LIMIT)


def _output_codec(text: str) -> str:
    from ..restoration import parse_output_codec

    try:
        return str(parse_output_codec(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).replace("output_codec must be", "expected")) from None


def _resolution(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    if not sep:
        height = width = text
    if not (height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 256x256) or one size, got {text!r}")
    return int(height), int(width)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..restoration.dataset import READERS
    from ..restoration.io import DEFAULT_MAX_PIXELS
    from ..restoration.sampler import COMPILE_MODES, METHODS, START_NOISE
    from ..restoration.stages import GRID_SCHEDULES

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
    io.add_argument(
        "--output-codec",
        type=_output_codec,
        default="png",
        metavar="CODEC",
        help="restored images: png (lossless), webp (lossless), webp:Q or jpeg:Q (lossy, Q 1-100: a new "
        "corruption the new sigma_min does not describe) (default: %(default)s)",
    )
    io.add_argument(
        "--on-bad-sample",
        choices=("skip", "raise"),
        default="skip",
        help="a sample that does not decode: skip it (counted and named in the report) or stop (default: %(default)s)",
    )
    io.add_argument(
        "--resize",
        action="store_true",
        help="resize and centre-crop restored images of another size to the run's (else they are refused)",
    )
    io.add_argument(
        "--resolution",
        type=_resolution,
        default=None,
        metavar="HxW",
        help="size of the restored images (default: the first restored sample's)",
    )
    io.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse any image whose header says more pixels, before allocating (default: %(default)s = 4096^2)",
    )
    io.add_argument(
        "--reader",
        choices=READERS,
        default="auto",
        help="image decoder: dali (GPU decode on CUDA, DALI's CPU pipeline on CPU), pil, or auto = dali where "
        "installed (default: %(default)s)",
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
        help="heun: deterministic (anchor); sde: posterior sampling (reverse SDE; 'stochastic' is its deprecated "
        "alias) (default: %(default)s)",
    )
    s.add_argument(
        "--seed", type=_seed, default=0, help="run seed; sample i's noise comes from (seed, i) (default: %(default)s)"
    )
    s.add_argument(
        "--rho-ambient",
        type=number(float, at_least=1.0),
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
        "--grid",
        choices=GRID_SCHEDULES,
        default=None,
        help="per_sample: a rho grid from each sample's sigma_min (SPEC 5, anchors' pixel runs); global: the "
        "global EDM grid from --sigma-max truncated at each level (anchors' text-to-image) "
        "(default: per_sample; latent: global)",
    )
    s.add_argument(
        "--sigma-max", type=_positive_float, default=80.0, help="top of the global grid (default: %(default)s)"
    )
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
        default=1024,
        metavar="N",
        help="source samples per shard: one chunk (tar shard, tensor part) of the new version and the unit of "
        "resume (default: %(default)s)",
    )
    e.add_argument(
        "--state-dtype",
        choices=("float32", "float64"),
        default="float32",
        help="sampler state (anchors: float64) (default: %(default)s)",
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
    r.add_argument("--no-progress", action="store_true", help="no progress bar or summary line")
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="validate everything, print the plan and the batch's host and device memory, write nothing",
    )
    t = parser.add_argument_group("latent text-to-image restoration (--diffusers)")
    t.add_argument("--diffusers", type=Path, default=None, metavar="DIR", help="local diffusers pipeline folder")
    t.add_argument(
        "--guidance-scale",
        type=number(float, at_least=0.0),
        default=3.5,
        help="classifier-free guidance scale (anchors: 3.5; 1 = no guidance) (default: %(default)s)",
    )
    t.add_argument(
        "--timestep-mapping",
        choices=("interpolated", "nearest"),
        default="interpolated",
        help="sigma -> the model's timestep (default: %(default)s)",
    )
    t.add_argument("--negative-caption", default="", help="caption of the unconditional rows (default: empty)")
    t.add_argument("--store-latents", action="store_true", help="also write key.latent.npy per restored sample")
    t.add_argument(
        "--latent-dtype",
        choices=("float16", "bfloat16", "float32"),
        default="float16",
        help="stored latent dtype (default: %(default)s)",
    )
    t.add_argument("--encode-sample", action="store_true", help="VAE posterior sample instead of its mean")


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-option rules and paths (``parser.error`` names the option)."""
    if args.cuda_graph == "on" and args.compile == "reduce-overhead":
        parser.error("argument --cuda-graph: 'on' is not allowed with --compile reduce-overhead (graphs cannot nest)")
    if args.model is not None and not args.model.is_file():
        parser.error(f"argument --model: no such file: {args.model}")
    if args.diffusers is not None and not (args.diffusers / "model_index.json").is_file():
        parser.error(f"argument --diffusers: not a diffusers pipeline folder (no model_index.json): {args.diffusers}")
    if args.grid == "global" and args.sigma_out > 0:
        parser.error("argument --sigma-out: must be 0 with --grid global (the global grid integrates to 0)")
    if not args.src.exists():
        parser.error(f"argument --src: no such dataset: {args.src}")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        parser.error(f"argument --device: expected auto, cpu or cuda[:N], got {args.device!r}")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"argument --device: {args.device} requested but CUDA is not available")
    if args.cuda_graph == "on" and not torch.cuda.is_available():
        parser.error("argument --cuda-graph: 'on' needs CUDA")


def path_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options whose default differs per path: pixel = anchors' CIFAR restoration
    (18-point per-sample grid, rho_ambient 8); ``--diffusers`` = anchors' text-to-image
    restoration (30-point global grid, rho_ambient 2, ANCHORS 3.3)."""
    latent = args.diffusers is not None
    args.num_steps = (30 if latent else 18) if args.num_steps is None else args.num_steps
    args.rho_ambient = (2.0 if latent else 8.0) if args.rho_ambient is None else args.rho_ambient
    args.grid = args.grid or ("global" if latent else "per_sample")
    return args


def run(args: argparse.Namespace) -> int:
    parser = args._parser
    if args.diffusers is not None and args.model is not None:
        parser.error("argument --model: not allowed with --diffusers (the pipeline folder holds the model)")
    if args.model is None and args.diffusers is None:
        parser.error("one of the arguments --model or --diffusers is required")
    path_defaults(args)
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
    from ..restoration import DestinationLocked, read_denoiser_config
    from ..runtime import init_runtime, shutdown

    if args.model is not None:
        try:
            read_denoiser_config(args.model)
        except (ValueError, FileNotFoundError) as err:
            parser.error(f"argument --model: {err}")
    ctx = init_runtime()
    device = None if args.device == "auto" else args.device
    ok = False
    try:
        report = _restore(args, device)
        ok = True
    except DestinationLocked as err:  # one line: who holds --dst
        print(f"ambient-fast restore: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileExistsError, FileNotFoundError) as err:  # bad data, changed arguments, existing dst
        print(f"ambient-fast restore: error: {err}", file=sys.stderr)
        return 1
    finally:
        shutdown(ctx, ok=ok)
    if ctx.is_main:
        text = json.dumps(asdict(report), indent=1, sort_keys=True) + "\n"
        if args.report is not None and not args.dry_run:
            args.report.write_text(text)
        else:
            sys.stdout.write(text)
    return 0


def _model(args: argparse.Namespace, device: str | None) -> dict:
    """``restore_dataset``'s model keywords: a pixel checkpoint, or the latent path's stages."""
    if args.diffusers is None:
        return {"denoiser": args.model}
    from ..restoration.latent_stages import LatentSettings, latent_restoration

    settings = LatentSettings(
        guidance_scale=args.guidance_scale,
        encode_sample=args.encode_sample,
        store_latents=args.store_latents,
        latent_dtype=args.latent_dtype,
    )
    return latent_restoration(
        args.diffusers,
        settings,
        seed=args.seed,
        device=device,
        timestep_mapping=args.timestep_mapping,
        negative_caption=args.negative_caption,
    )


def _restore(args: argparse.Namespace, device: str | None):
    from ..restoration import restore_dataset

    return restore_dataset(
        **_model(args, device),
        src=args.src,
        dst=args.dst,
        num_steps=args.num_steps,
        batch_size=args.batch_size,
        method=args.method,
        seed=args.seed,
        rho_ambient=args.rho_ambient,
        sigma_out=args.sigma_out,
        rho=args.rho,
        sigma_floor=args.sigma_floor,
        grid=args.grid,
        sigma_max=args.sigma_max,
        start_noise=args.start_noise,
        training_noise_seed=args.training_noise_seed,
        state_dtype=args.state_dtype,
        precision=args.precision,
        compile=args.compile,
        cuda_graph={"auto": None, "on": True, "off": False}[args.cuda_graph],
        shard_size=args.shard_size,
        output_codec=args.output_codec,
        on_bad_sample=args.on_bad_sample,
        resize=args.resize,
        resolution=args.resolution,
        max_pixels=args.max_pixels,
        reader=args.reader,
        device=device,
        num_workers=args.workers,
        restart=args.restart,
        progress=not args.no_progress,
        dry_run=args.dry_run,
    )
