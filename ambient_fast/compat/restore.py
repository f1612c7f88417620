"""Ambient Dataloops' ``restore.py``: per-sample-grid posterior sampling of training images.

``edm_restorer`` has the signature, defaults and numbers of
``ambient_dataloops/pixel-diffusion/restore.py::edm_restorer`` (f687223; ANCHORS 3.2, SPEC 5):
image i starts at ``x_i + latents_i * t_0,i`` and is integrated on its own rho-grid of
``num_steps`` levels from ``max(sigma_start_i, sigma_min)`` to ``max(sigma_end_i,
sigma_min)``, then ``sigma_end_i`` (the anchors' script passes ``sigma_end = 0``: integrate
to the data); images with ``sigma_start = 0`` are returned unchanged.

It is a thin adapter: it builds the ``(B, N + 1)`` level tables and the start state, and the
integration is the one EDM loop of :func:`~ambient_fast.compat.edm_sampler` on the engine's
step ops (``core.solver_step`` by default). Two arithmetics for the tables:

- ``arithmetic="anchor"`` (default): the anchors' dtypes step for step. ``restore.py`` clamps
  the bounds to ``sigma_min`` in sigma's dtype and casts them to the images' dtype (float32
  for PNG datasets), so the rho-root terms ``sigma^(1/rho)`` and their difference are float32
  while the step fractions, the power ``rho`` and the state are float64; its churn gamma
  comes from ``torch.where`` on Python scalars (float32). Same inputs, same bits (with the
  default ``backend="torch"``, on the same device).
- ``arithmetic="float64"``: the exact grid, bounds and gamma in float64 (differs from the
  anchors by up to ~4e-7 relative in the levels for float32 images).

``restore_with_annotations`` is the body of the anchors' restore script for one batch: fresh
seed-indexed latents (one generator per image, so the result does not depend on the batch
size; the anchors run batch 1), restoration to 0, and the new annotation
``{"sigma_min": sigma_tn / rho_ambient, "sigma_max": 0}`` per image, computed as the script
does (``"anchor"``: the annotation read into a float32 tensor, divided in float32, so 0.002/8
is written as 0.0002500000118743628).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from ..core.schedules import karras_sigmas
from .annotations import Annotation
from .generate import RandnLike, StackedRandomGenerator, _churn_levels, _round_sigma, heun_loop

__all__ = ["ARITHMETICS", "edm_restorer", "restore_with_annotations"]

Arithmetic = Literal["anchor", "float64"]
ARITHMETICS: tuple[str, ...] = ("anchor", "float64")


def _level_tables(
    x: torch.Tensor,
    sigma_start: torch.Tensor,
    sigma_end: torch.Tensor,
    net: Any,
    num_steps: int,
    sigma_min: float,
    rho: float,
    churn: tuple[float, float, float],
    arithmetic: Arithmetic,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host float64 ``(B, N + 1)`` levels and ``(B, N)`` churned levels, built on ``x``'s device."""
    device = x.device
    start, end = sigma_start.to(device), sigma_end.to(device)
    if arithmetic == "anchor":
        # restore.py: clamp in sigma's dtype, then cast to the images' dtype.
        hi = torch.max(start, torch.full_like(start, sigma_min)).to(x.dtype)
        lo = torch.max(end, torch.full_like(end, sigma_min)).to(x.dtype)
        frac = torch.arange(num_steps, dtype=torch.float64, device=device)[:, None] / (num_steps - 1)
        grid = (hi[None, :] ** (1 / rho) + frac * (lo[None, :] ** (1 / rho) - hi[None, :] ** (1 / rho))) ** rho
        grid, final, gamma_dtype = grid.T, end.to(x.dtype), torch.float32
    else:
        start64, end64 = start.to(torch.float64), end.to(torch.float64)
        floor = torch.full_like(start64, sigma_min)
        grid = karras_sigmas(num_steps, torch.maximum(end64, floor), torch.maximum(start64, floor), rho)[:, :-1]
        final, gamma_dtype = end64, torch.float64
    levels = torch.cat([_round_sigma(net, grid.cpu(), device), final.to(torch.float64).cpu()[:, None]], dim=1)
    t_hat = _round_sigma(net, _churn_levels(levels[:, :-1], num_steps, *churn, gamma_dtype=gamma_dtype), device)
    return levels, t_hat


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
    arithmetic: Arithmetic = "anchor",
    exact_rng: bool = True,
    backend: str = "torch",
) -> torch.Tensor:
    """Restore a batch on per-sample grids (Dataloops ``edm_restorer``, same arguments).

    Args:
        x: ``(B, ...)`` dataset images (data units; float32 for the anchors' PNG datasets,
            the stored dtype for ``/npy`` ones).
        sigma_start: ``(B,)`` per-image nature level (annotation ``sigma_min``; 0 = clean).
        sigma_end: ``(B,)`` per-image final level (the anchors pass zeros).
        net: EDM denoiser ``net(x, sigma (B,), class_labels)``.
        latents: ``(B, ...)`` standard normal start noise (fresh, seed-indexed); finite.
        class_labels, randn_like, num_steps, sigma_min, rho, S_churn, S_min, S_max, S_noise:
            as :func:`~ambient_fast.compat.edm_sampler` (``sigma_min`` is the grid's floor).
        sigma_max: accepted for signature compatibility; unused, as in the anchors (each
            grid starts at its image's own level).
        add_noise: start from ``x + latents * t_0`` (False: ``x`` is already noisy at its
            level, the anchors' ``/npy`` datasets; the start is ``x + latents * t_0 * 0``).
        arithmetic: ``"anchor"`` (the anchors' dtypes, their bits) or ``"float64"`` (exact
            levels); see the module docstring.
        exact_rng, backend: as :func:`~ambient_fast.compat.edm_sampler`.

    Returns:
        ``(B, ...)`` float64; rows with ``sigma_start == 0`` equal ``x``.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
    batch = x.shape[0]
    if sigma_start.numel() != batch or sigma_end.numel() != batch:
        raise ValueError(
            f"sigma_start, sigma_end: expected ({batch},), got {tuple(sigma_start.shape)}, {tuple(sigma_end.shape)}"
        )
    sigma_start, sigma_end = sigma_start.reshape(batch), sigma_end.reshape(batch)
    if not (bool(torch.isfinite(sigma_start).all()) and bool(torch.isfinite(sigma_end).all())) or bool(
        (sigma_end < 0).any()
    ):
        raise ValueError("sigma_start, sigma_end: must be finite, and sigma_end >= 0")
    # Adjust noise levels based on what's supported by the network.
    sigma_min = max(sigma_min, float(getattr(net, "sigma_min", 0.0)))
    levels, t_hat = _level_tables(
        x, sigma_start, sigma_end, net, num_steps, sigma_min, rho, (S_churn, S_min, S_max), arithmetic
    )
    view = (-1,) + (1,) * (x.dim() - 1)
    t_0 = levels[:, 0].to(x.device).view(view)
    state = x + latents.to(torch.float64) * t_0 * float(add_noise)
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
    clean = (sigma_start == 0).to(x.device).view(view)
    return torch.where(clean, x.to(torch.float64), out)


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
    arithmetic: Arithmetic = "anchor",
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
        arithmetic: ``"anchor"``: ``sigma_tn`` is taken as the script's float32 tensor
            (``torch.Tensor([...])`` of the annotations), and the new level is its float32
            quotient, as the script writes it; ``"float64"``: both in float64.
        sampler_kwargs: :func:`edm_restorer` options (``num_steps``, ``S_churn``, ``backend``...).

    Returns:
        ``(restored (B, ...) in images' dtype, {filename: Annotation(sigma_min, 0.0)})``.
    """
    if len(filenames) != images.shape[0]:
        raise ValueError(f"filenames: expected {images.shape[0]} names, got {len(filenames)}")
    if rho_ambient is not None and not (rho_ambient > 0 and math.isfinite(rho_ambient)):
        raise ValueError(f"rho_ambient must be a finite value > 0 or None, got {rho_ambient}")
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
    rnd = StackedRandomGenerator(images.device, seeds)
    latents = rnd.randn(images.shape, device=images.device)
    sigma_tn = sigma_tn.reshape(-1).to(torch.float32 if arithmetic == "anchor" else torch.float64)
    restored = edm_restorer(
        images,
        sigma_tn,
        torch.zeros_like(sigma_tn),
        net,
        latents,
        class_labels,
        randn_like=rnd.randn_like,
        add_noise=add_noise,
        arithmetic=arithmetic,
        **sampler_kwargs,
    )
    new_levels = sigma_tn / rho_ambient if rho_ambient is not None else torch.zeros_like(sigma_tn)
    annotations = {
        name: Annotation(float(level), 0.0) for name, level in zip(filenames, new_levels.tolist(), strict=True)
    }
    return restored.to(images.dtype), annotations
