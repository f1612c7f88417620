"""Ambient Dataloops' ``restore.py``: per-sample-grid posterior sampling of training images.

``edm_restorer`` has the signature, defaults and numbers of
``ambient_dataloops/pixel-diffusion/restore.py::edm_restorer`` (ANCHORS 3.2, SPEC 5): image i
starts at ``x_i + latents_i * t_0,i`` and is integrated on its own rho-grid of ``num_steps``
levels from ``max(sigma_start_i, sigma_min)`` to ``max(sigma_end_i, sigma_min)``, then
``sigma_end_i`` (the anchors' scripts pass ``sigma_end = 0``: integrate to the data); images
with ``sigma_start = 0`` are returned unchanged. It runs on the same fused Heun loop as
:func:`~ambient_fast.compat.edm_sampler`.

``restore_with_annotations`` is the body of the anchors' restore script for one batch: fresh
seed-indexed latents (one generator per image, so the result does not depend on the batch
size; the anchors run batch 1), restoration to 0, and the new annotation
``{"sigma_min": sigma_tn / rho_ambient, "sigma_max": 0}`` per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core.schedules import karras_sigmas
from .annotations import Annotation
from .generate import RandnLike, StackedRandomGenerator, _churn_levels, _round_sigma, heun_loop

__all__ = ["edm_restorer", "restore_with_annotations"]


@torch.no_grad()
def edm_restorer(
    x: torch.Tensor,
    sigma_start: torch.Tensor,
    sigma_end: torch.Tensor,
    net: Callable[..., torch.Tensor],
    latents: torch.Tensor,
    class_labels: Any = None,
    randn_like: RandnLike = torch.randn_like,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = float("inf"),
    S_noise: float = 1,
    add_noise: bool = True,
    *,
    state_dtype: torch.dtype = torch.float64,
    exact_rng: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Restore a batch on per-sample grids (Dataloops ``edm_restorer``, same arguments).

    Args:
        x: ``(B, ...)`` dataset images (data units).
        sigma_start: ``(B,)`` per-image nature level (annotation ``sigma_min``; 0 = clean).
        sigma_end: ``(B,)`` per-image final level (the anchors pass zeros).
        net: EDM denoiser ``net(x, sigma (B,), class_labels)``.
        latents: ``(B, ...)`` standard normal start noise (fresh, seed-indexed).
        class_labels, randn_like, num_steps, sigma_min, rho, S_churn, S_min, S_max, S_noise:
            as :func:`~ambient_fast.compat.edm_sampler` (``sigma_min`` is the grid's floor).
        sigma_max: accepted for signature compatibility; unused, as in the anchors (each
            grid starts at its image's own level).
        add_noise: start from ``x + latents * t_0`` (False: ``x`` is already noisy, the
            anchors' ``/npy`` datasets).
        state_dtype, exact_rng, backend: as :func:`~ambient_fast.compat.edm_sampler`.

    Returns:
        ``(B, ...)`` in ``state_dtype``; rows with ``sigma_start == 0`` equal ``x``.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    batch = x.shape[0]
    # Adjust noise levels based on what's supported by the network.
    sigma_min = max(sigma_min, float(getattr(net, "sigma_min", 0.0)))
    start = sigma_start.detach().to("cpu", torch.float64).reshape(-1)
    end = sigma_end.detach().to("cpu", torch.float64).reshape(-1)
    if start.shape != (batch,) or end.shape != (batch,):
        raise ValueError(f"sigma_start, sigma_end: expected ({batch},), got {tuple(start.shape)}, {tuple(end.shape)}")
    if not (bool(torch.isfinite(start).all()) and bool(torch.isfinite(end).all()) and bool((end >= 0).all())):
        raise ValueError("sigma_start, sigma_end: must be finite, and sigma_end >= 0")
    clean = start == 0
    # Per-sample time step discretization: (B, N) rho-grids, then sigma_end.
    floor = torch.full_like(start, sigma_min)
    grid = karras_sigmas(num_steps, torch.maximum(end, floor), torch.maximum(start, floor), rho)[:, :-1]
    levels = torch.cat([_round_sigma(net, grid, x.device), end[:, None]], dim=1)
    t_hat = _round_sigma(net, _churn_levels(levels[:, :-1], num_steps, S_churn, S_min, S_max), x.device)
    view = (-1,) + (1,) * (x.dim() - 1)
    state = x.to(state_dtype)
    if add_noise:
        state = state + latents.to(state_dtype) * levels[:, 0].to(device=x.device, dtype=state_dtype).view(view)
    out = heun_loop(
        net,
        state,
        levels,
        t_hat,
        class_labels=class_labels,
        randn_like=randn_like,
        S_noise=S_noise,
        per_sample_levels=True,
        exact_rng=exact_rng,
        backend=backend,
    )
    keep = clean.to(x.device).view(view)
    return torch.where(keep, x.to(state_dtype), out)


@torch.no_grad()
def restore_with_annotations(
    net: Callable[..., torch.Tensor],
    images: torch.Tensor,
    sigma_tn: torch.Tensor,
    filenames: Sequence[str],
    seeds: Sequence[int] | torch.Tensor,
    *,
    rho_ambient: float | None = 8.0,
    class_labels: Any = None,
    add_noise: bool = True,
    **sampler_kwargs: Any,
) -> tuple[torch.Tensor, dict[str, Annotation]]:
    """One batch of the anchors' restore script: restored images and their new annotations.

    Args:
        net: EDM denoiser.
        images: ``(B, ...)`` dataset images (data units).
        sigma_tn: ``(B,)`` their annotated nature levels (0 = clean: passed through).
        filenames: B names, the keys of the new annotations (the anchors use the basename).
        seeds: B ints (the anchors: the image's position in the dataset); the start latents
            and any churn noise come from one generator per image.
        rho_ambient: new ``sigma_min = sigma_tn / rho_ambient`` (anchors' scripts: 8;
            None = 0, the anchors' default without ``--rho_ambient``).
        class_labels: passed to ``net``.
        add_noise: False for datasets stored already noisy (the anchors' ``/npy``).
        sampler_kwargs: :func:`edm_restorer` options (``num_steps``, ``S_churn``, ``backend``...).

    Returns:
        ``(restored (B, ...) in images' dtype, {filename: Annotation(sigma_min, 0.0)})``.
    """
    if len(filenames) != images.shape[0]:
        raise ValueError(f"filenames: expected {images.shape[0]} names, got {len(filenames)}")
    if rho_ambient is not None and not (rho_ambient > 0 and math.isfinite(rho_ambient)):
        raise ValueError(f"rho_ambient must be a finite value > 0 or None, got {rho_ambient}")
    rnd = StackedRandomGenerator(images.device, seeds)
    latents = rnd.randn(images.shape, device=images.device)
    sigma_tn = sigma_tn.reshape(-1)
    restored = edm_restorer(
        images,
        sigma_tn,
        torch.zeros_like(sigma_tn),
        net,
        latents,
        class_labels,
        randn_like=rnd.randn_like,
        add_noise=add_noise,
        **sampler_kwargs,
    )
    new_levels = (
        (sigma_tn.to(torch.float64) / rho_ambient)
        if rho_ambient is not None
        else torch.zeros_like(sigma_tn, dtype=torch.float64)
    )
    annotations = {
        name: Annotation(float(level), 0.0) for name, level in zip(filenames, new_levels.tolist(), strict=True)
    }
    return restored.to(images.dtype), annotations
