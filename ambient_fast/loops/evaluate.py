"""Evaluate a trained denoiser: generate samples, score them against a clean reference.

Generation is EDM's deterministic Heun sampler (SPEC 4; anchors: 18 steps, NFE 35, sigma
from 80 down to 0.002, then 0) from per-sample seeded noise, so sample ``k`` of seed ``s`` is
the same whatever the batch. Metrics (through :mod:`ambient_fast.eval`):

- ``"fd_digits"``: Frechet distance in the bundled digits feature space (the demo's metric);
- ``"fid"``: FID with the Inception network (local weights);
- optionally the memorisation rate: the share of samples within ``threshold`` of a
  training image.

The reference (:func:`clean_reference`): where the clean dataset holds the *clean versions of
the corrupted samples* (same keys; the demo's data and any ``corrupt_dataset`` output against
its parent), models and restored data are scored against exactly those, which no model saw;
otherwise against the whole clean dataset. ``loop`` and the demo share this rule.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..core.noise import STREAM_GENERATE, sample_normal
from ..core.precond import EDMPrecond
from ..core.schedules import karras_sigmas
from ..samplers import sample

__all__ = ["METRICS", "CleanReference", "clean_reference", "data_scores", "evaluate_denoiser", "generate"]

METRICS = ("fd_digits", "fid")


@dataclass
class CleanReference:
    """What a dataset is scored against (see :func:`clean_reference`)."""

    images: torch.Tensor  # float32 (M, C, H, W) in [-1, 1]: the reference of the metric
    corrupt: torch.Tensor  # bool (N,): the data's samples with sigma_min > 0
    clean_versions: torch.Tensor | None  # (corrupt.sum(), C, H, W) aligned with them, or None
    description: str  # names the reference, e.g. "clean versions of the 1,743 corrupted samples in D"


def clean_reference(
    data: str | os.PathLike, reference: str | os.PathLike, *, data_tensors: Any | None = None
) -> CleanReference:
    """The reference for scoring models trained on ``data`` and its restored versions.

    When every corrupt sample of ``data`` (``sigma_min > 0``) has a sample with the same key
    in ``reference``, the reference is those samples: the clean versions of the corrupted
    ones (the demo's FD_digits). Otherwise it is the whole ``reference`` and
    ``clean_versions`` is None.

    Args:
        data: the (original, annotated) dataset version.
        reference: a clean dataset version of the same sample shape.
        data_tensors: ``load_dataset_tensors(data)`` if already loaded.
    """
    from ..data import load_dataset_tensors, open_dataset

    original = data_tensors if data_tensors is not None else load_dataset_tensors(data)
    ref = load_dataset_tensors(reference)
    corrupt = original.sigma_min > 0
    data_keys = open_dataset(data).keys
    ref_keys = open_dataset(reference).keys
    ref_row = {ref_keys[int(i)]: row for row, i in enumerate(ref.ids)}
    wanted = [data_keys[int(i)] for i in original.ids[corrupt]]
    if wanted and all(k in ref_row for k in wanted) and ref.images.shape[1:] == original.images.shape[1:]:
        versions = ref.images[torch.tensor([ref_row[k] for k in wanted], dtype=torch.int64)]
        return CleanReference(
            versions, corrupt, versions, f"clean versions of the {len(wanted):,} corrupted samples in {reference}"
        )
    return CleanReference(ref.images, corrupt, None, f"all {len(ref.images):,} samples of {reference}")


def data_scores(
    images: torch.Tensor, clean_versions: torch.Tensor, *, metric: str = "fd_digits", device: str | torch.device = "cpu"
) -> dict[str, float]:
    """How close restored samples are to their clean versions: ``{"fd", "mse"}``.

    Args:
        images: ``(n, C, H, W)`` restored samples in [-1, 1] (float32).
        clean_versions: ``(n, C, H, W)``, row i the clean version of ``images[i]``.
        metric: the Frechet distance used (``"fd_digits"`` or ``"fid"``).

    Returns:
        ``fd``: Frechet distance between the two sets; ``mse``: mean squared error per
        element (data units).
    """
    from .. import eval as ev

    if images.shape != clean_versions.shape:
        raise ValueError(f"images {tuple(images.shape)} and clean_versions {tuple(clean_versions.shape)} differ")
    images = images.float().clamp(-1, 1)
    if metric == "fd_digits":
        fd = ev.fd_digits(images, clean_versions)
    else:
        fd = ev.fid_from_batches([images], clean_versions, device=device)
    return {"fd": float(fd), "mse": float((images - clean_versions.float()).square().mean())}


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
