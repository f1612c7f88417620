"""Command-line options of latent text-to-image restoration (``ambient-fast restore --diffusers``).

:func:`add_latent_arguments` adds the options to a parser (every value is checked by its
``type``: ranges and choices fail at parse time), :func:`run_latent` runs them. ``--dry-run``
opens the source and the model folder's index, prints the plan as JSON (samples to restore,
levels, steps and network evaluations per level) and exits without loading any weights.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..data import open_dataset
from ..samplers.restore import RESTORE_SIGMA_FLOOR
from .components import load_components
from .restore import GRID_SCHEDULES, LatentRestoreConfig, latent_restoration_grid
from .shards import LATENT_DTYPES, restore_latent_shards

__all__ = ["add_latent_arguments", "run_latent"]

_STATE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _number(kind: type, low: float, *, inclusive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low}, got {value}")
        return value

    return parse


def add_latent_arguments(parser: argparse.ArgumentParser, *, common: bool = True) -> None:
    """Add the latent restoration options to ``parser``.

    Args:
        parser: the ``restore`` command's parser (or a fresh one).
        common: also add the options a pixel restore command already has (``--src``,
            ``--dst``, ``--batch-size``, ``--num-steps``, ``--method``, ``--seed``,
            ``--device``, ``--resume``, ``--dry-run``, ``--annotations``,
            ``--rho-ambient``, ``--rho``, ``--sigma-floor``, ``--state-dtype``); pass False
            when the parser defines them with the same destinations (``num_steps`` and
            ``rho_ambient`` then need ``None`` defaults to get the text-to-image defaults
            30/18 and 2; ``state_dtype`` must be ``"float64"`` or ``"float32"``).
    """
    if common:
        parser.add_argument("--src", type=Path, required=True, help="WebDataset shards with key.txt captions")
        parser.add_argument("--dst", type=Path, required=True, help="new dataset version folder")
        parser.add_argument("--batch-size", type=_number(int, 1, inclusive=True), default=16, help="samples per batch")
        parser.add_argument("--num-steps", type=_number(int, 1, inclusive=True), default=None,
                            help="grid points (default 30 global / 18 per_sample)")
        parser.add_argument("--method", choices=("heun", "euler", "stochastic"), default="heun", help="sampler")
        parser.add_argument("--seed", type=_number(int, 0, inclusive=True), default=0, help="run seed")
        parser.add_argument("--device", default=None, help="torch device (default cuda if available)")
        parser.add_argument("--resume", action="store_true", help="continue an interrupted run into --dst")
        parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
        parser.add_argument("--annotations", type=Path, default=None, help="sidecar instead of the source's own")
        parser.add_argument("--rho-ambient", type=_number(float, 1, inclusive=False), default=None,
                            help="new sigma_min = sigma_min / rho_ambient (default 2, the anchors' text-to-image)")
        parser.add_argument("--sigma-floor", type=_number(float, 0, inclusive=False), default=RESTORE_SIGMA_FLOOR,
                            help="lowest positive level")
        parser.add_argument("--rho", type=_number(float, 0, inclusive=False), default=7.0, help="grid curvature")
        parser.add_argument("--state-dtype", choices=tuple(_STATE_DTYPES), default="float64",
                            help="sampler state dtype")
    group = parser.add_argument_group("latent text-to-image restoration")
    group.add_argument("--diffusers", type=Path, required=common, default=None, help="local diffusers pipeline folder")
    group.add_argument("--guidance-scale", type=_number(float, 0, inclusive=True), default=3.5,
                       help="classifier-free guidance scale (anchors: 3.5; 1 = no guidance)")
    group.add_argument("--grid", choices=GRID_SCHEDULES, default="global",
                       help="global: anchors' truncated EDM grid; per_sample: rho grid from each sigma_min")
    group.add_argument("--sigma-max", type=_number(float, 0, inclusive=False), default=80.0,
                       help="top of the global grid")
    group.add_argument("--timestep-mapping", choices=("interpolated", "nearest"), default="interpolated",
                       help="sigma -> model timestep")
    group.add_argument("--negative-caption", default="", help="caption of the unconditional pass")
    group.add_argument("--store-latents", action="store_true", help="also write key.latent.npy per sample")
    group.add_argument("--latent-dtype", choices=tuple(LATENT_DTYPES), default="float16", help="stored latent dtype")
    group.add_argument("--encode-sample", action="store_true", help="VAE posterior sample instead of its mean")
    group.add_argument("--chunk-size", type=_number(int, 1, inclusive=True), default=1024,
                       help="samples per output shard (unit of resume)")


def _config(args: argparse.Namespace) -> LatentRestoreConfig:
    return LatentRestoreConfig(
        guidance_scale=args.guidance_scale,
        schedule=args.grid,
        num_steps=args.num_steps,
        rho=args.rho,
        sigma_max=args.sigma_max,
        sigma_floor=args.sigma_floor,
        method=args.method,
        rho_ambient=args.rho_ambient if args.rho_ambient is not None else LatentRestoreConfig.rho_ambient,
        encode_sample=args.encode_sample,
        state_dtype=_STATE_DTYPES[args.state_dtype],
    )


def _plan(args: argparse.Namespace, config: LatentRestoreConfig) -> dict[str, object]:
    """What the run would do, without loading the model."""
    if not (args.diffusers / "model_index.json").is_file():
        raise FileNotFoundError(f"{args.diffusers}: not a diffusers pipeline folder (no model_index.json)")
    dataset = open_dataset(args.src, format="webdataset", annotations=args.annotations)
    levels = np.unique(dataset.sigma_min[dataset.sigma_min > 0])
    per_level = {}
    for level in levels:
        grid = latent_restoration_grid(
            torch.tensor([float(level)]), schedule=config.schedule, num_steps=config.num_steps,
            rho=config.rho, sigma_max=config.sigma_max, sigma_floor=config.sigma_floor,
        )[0]
        steps = int((grid[:-1] > grid[1:]).sum())
        evaluations = 2 * steps - 1 if config.method == "heun" else steps
        per_level[f"{float(level):g}"] = {"steps": steps, "network_evaluations": evaluations}
    return {
        "src": str(args.src),
        "dst": str(args.dst),
        "samples": len(dataset),
        "to_restore": int(np.count_nonzero(dataset.sigma_min > 0)),
        "levels": per_level,
        "cfg_rows_per_evaluation": 1 if config.guidance_scale == 1 else 2,
        "config": config.to_json(),
    }


def run_latent(args: argparse.Namespace) -> int:
    """Run latent restoration from parsed arguments; returns the exit code (0 on success)."""
    config = _config(args)
    if args.dry_run:
        print(json.dumps(_plan(args, config), indent=1))
        return 0

    def progress(done: int, total: int) -> None:
        print(f"restore: {done}/{total} samples", flush=True)

    components = load_components(
        args.diffusers,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        timestep_mapping=args.timestep_mapping,
        negative_caption=args.negative_caption,
    )
    out = restore_latent_shards(
        components,
        args.src,
        args.dst,
        config=config,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        keep_latents=args.store_latents,
        latent_dtype=args.latent_dtype,
        run_seed=args.seed,
        resume=args.resume,
        annotations=args.annotations,
        progress=progress,
    )
    print(f"restore: wrote {out}")
    return 0
