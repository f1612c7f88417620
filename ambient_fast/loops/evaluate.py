"""Evaluate a trained denoiser: generate samples, score them against a clean reference.

Generation is EDM's deterministic Heun sampler (SPEC 4; anchors: 18 steps, NFE 35, sigma
from 80 down to 0.002, then 0) from per-sample seeded noise, so sample ``k`` of seed ``s`` is
the same whatever the batch. Metrics (through :mod:`ambient_fast.eval`):

- ``"fd_digits"``: Frechet distance in the bundled digits feature space (the demo's metric);
- ``"fid"``: FID with the Inception network (local weights);
- optionally the memorisation rate: the share of samples within ``threshold`` of a
  training image.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch

from ..core.noise import STREAM_GENERATE, sample_normal
from ..core.precond import EDMPrecond
from ..core.schedules import karras_sigmas
from ..samplers import sample

__all__ = ["METRICS", "generate", "evaluate_denoiser"]

METRICS = ("fd_digits", "fid")


@torch.no_grad()
def generate(
    denoiser: EDMPrecond,
    num_samples: int,
    sample_shape: tuple[int, ...],
    *,
    steps: int = 18,  # grid points (Heun: 2 * steps - 1 network evaluations)
    sigma_lo: float = 0.002,  # lowest positive level (EDM)
    sigma_hi: float = 80.0,  # start level (EDM)
    seed: int = 0,  # sample k uses seed * 2^32 + k
    batch_size: int = 2048,  # samples per sampler call
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``num_samples`` samples ``(N, *sample_shape)`` float32 on the CPU (EDM Heun, SPEC 4)."""
    device = torch.device(device)
    grid = karras_sigmas(steps, sigma_lo, sigma_hi).to(device)
    out = []
    for start in range(0, num_samples, batch_size):
        ids = torch.arange(start, min(start + batch_size, num_samples), device=device, dtype=torch.int64) + (seed << 32)
        noise = sample_normal(ids, sample_shape, stream=STREAM_GENERATE, dtype=torch.float64, device=device)
        x = sample(denoiser, noise, grid, method="heun", seeds=ids)
        out.append(x.float().cpu())
    return torch.cat(out)


def evaluate_denoiser(
    denoiser: EDMPrecond | str | Path,
    reference: torch.Tensor,
    *,
    metric: Literal["fd_digits", "fid"] = "fd_digits",  # which Frechet distance
    num_samples: int = 2000,  # generated samples
    steps: int = 18,  # sampler grid points
    seed: int = 0,  # generation seed
    train_images: torch.Tensor | None = None,  # for the memorisation rate (e.g. the clean training images)
    memorisation_threshold: float | None = None,  # distance under which a sample is a copy (eval default if None)
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Generate and score; returns ``{"metric", "value", "num_samples", "memorisation"?}``.

    Args:
        denoiser: an EDM denoiser or a checkpoint path (``restoration.save_denoiser`` format).
        reference: ``(M, C, H, W)`` clean reference images in [-1, 1].
    """
    from .. import eval as ev

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not isinstance(denoiser, EDMPrecond):
        from ..restoration import load_denoiser

        denoiser = load_denoiser(denoiser, device=device)
    samples = generate(denoiser, num_samples, tuple(reference.shape[1:]), steps=steps, seed=seed, device=device)
    samples = samples.clamp(-1, 1)
    if metric == "fd_digits":
        value = ev.fd_digits(samples, reference)
    else:
        value = ev.fid_from_batches([samples], reference, device=device)
    result: dict[str, Any] = {"metric": metric, "value": float(value), "num_samples": num_samples}
    if train_images is not None and len(train_images):
        kwargs = {} if memorisation_threshold is None else {"threshold": memorisation_threshold}
        result["memorisation"] = float(ev.memorisation_rate(samples, train_images, **kwargs))
    if not math.isfinite(result["value"]):
        raise FloatingPointError(f"{metric} is not finite ({result['value']}): the model diverged?")
    return result
