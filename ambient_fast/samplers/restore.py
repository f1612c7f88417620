"""Restoration = posterior sampling of each dataset sample (SPEC 5, Ambient Dataloops).

Sample i with ``sigma_min_i > 0`` starts at ``x = y0_i + sigma_min_i eps_i`` (eps from the
sample's own seed) and is integrated on its own grid from ``sigma_min_i`` down to
``sigma_out_i``. All grids have the same number of points, so a batch carries a
``(B, K+1)`` table. Samples with ``sigma_min == 0`` are returned unchanged, byte for byte.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..core.noise import STREAM_RESTORE, sample_normal
from ..core.schedules import karras_sigmas
from ..core.validation import active, check_finite, check_per_sample, check_tensor, first_bad_index
from .edm import Denoiser, sample
from .methods import RESTORE_ALIASES, RESTORE_METHODS, resolve_method

__all__ = ["restore", "restoration_grid", "RESTORE_SIGMA_FLOOR"]

RESTORE_SIGMA_FLOOR = 0.002  # anchors: grid from sigma_min down to EDM's 0.002, then 0


def restoration_grid(
    sigma_min: torch.Tensor,
    sigma_out: torch.Tensor,
    num_steps: int = 18,
    *,
    rho: float = 7.0,
    sigma_floor: float = RESTORE_SIGMA_FLOOR,
) -> torch.Tensor:
    """Per-sample restoration levels ``(B, num_steps + 1)`` float64 (SPEC 5 step 2).

    ``sigma_out == 0``: the rho grid of ``num_steps`` points from ``sigma_min`` down to
    ``min(sigma_floor, sigma_min)``, then 0 (anchor default; 2 N - 1 network evaluations
    with Heun). ``sigma_out > 0``: ``num_steps + 1`` points from ``sigma_min`` to
    ``sigma_out`` (the noisy state at ``sigma_out`` is the result).
    """
    sm = sigma_min.to(torch.float64)
    so = sigma_out.to(device=sm.device, dtype=torch.float64)
    to_zero = karras_sigmas(num_steps, torch.minimum(torch.full_like(sm, sigma_floor), sm), sm, rho)
    to_level = karras_sigmas(num_steps + 1, so, sm, rho)[:, :-1]
    return torch.where((so > 0).unsqueeze(1), to_level, to_zero)


@torch.no_grad()
def restore(
    denoiser: Denoiser,
    y0: torch.Tensor,
    sigma_min: torch.Tensor,
    sigma_out: torch.Tensor | float = 0.0,
    *,
    num_steps: int = 18,
    method: Literal["heun", "euler", "sde"] = "heun",
    seeds: torch.Tensor,
    start_noise: torch.Tensor | None = None,
    rho: float = 7.0,
    sigma_floor: float = RESTORE_SIGMA_FLOOR,
    state_dtype: torch.dtype = torch.float64,
    backend: str = "auto",
) -> torch.Tensor:
    """Restore a batch of dataset samples by posterior sampling (SPEC 5).

    Args:
        denoiser: EDM denoiser ``D(x, sigma) -> x0 estimate``, per-sample ``sigma (B,)``.
        y0: ``(B, ...)`` dataset samples (data units), finite. An empty batch returns a copy.
        sigma_min: ``(B,)`` per-sample level at which each sample is trusted (0 = clean).
        sigma_out: ``(B,)`` or scalar stop level, ``0 <= sigma_out <= sigma_min``
            (0 = integrate to the data, as the anchors do).
        num_steps: grid points per sample before the final 0 (anchor: 18, NFE 35 with Heun).
        method: ``"heun"`` (deterministic, anchor default; transports the noisy marginal to
            the data), ``"euler"``, or ``"sde"`` (ancestral reverse SDE: a true sample of
            ``p(x0 | x_sigma_min)``; use many steps). ``"stochastic"`` is a deprecated alias of
            ``"sde"`` (it warns).
        seeds: int ``(B,)`` per-sample seeds (start noise and step noise); a sample's output
            does not depend on the batch or rank it lands in.
        start_noise: ``(B, ...)`` standard normal (finite, ``y0``'s shape) to use instead of the
            seeded fresh noise (e.g. the training's frozen noise, SPEC 5 option).
        rho, sigma_floor: grid shape (EDM rho, lowest positive level).
        state_dtype: sampler state dtype (float64 as the anchors; float32 is faster).
        backend: fused-step backend.

    Returns:
        ``(B, ...)`` restored samples, dtype of ``y0``; rows with ``sigma_min == 0`` are ``y0``.
    """
    method = resolve_method(method, RESTORE_METHODS, RESTORE_ALIASES, "restore")
    check_tensor("y0", y0)
    check_tensor("sigma_min", sigma_min, "of shape (B,)")
    check_tensor("seeds", seeds, "of shape (B,)")
    if y0.dim() < 1:
        raise ValueError("y0: expected a batch (B, ...), got a 0-d tensor")
    batch = y0.shape[0]
    if start_noise is not None:
        check_tensor("start_noise", start_noise)
        if start_noise.shape != y0.shape:
            raise ValueError(f"start_noise: shape {tuple(start_noise.shape)} differs from y0's {tuple(y0.shape)}")
    if batch == 0:
        return y0.clone()
    sigma_out = torch.as_tensor(sigma_out, dtype=sigma_min.dtype, device=sigma_min.device)
    if sigma_out.dim() == 0:
        sigma_out = sigma_out.expand(batch)
    if active():
        check_per_sample("sigma_min", sigma_min, batch, y0.device)
        check_per_sample("sigma_out", sigma_out, batch, y0.device)
        check_finite("y0", y0)
        for name, bad_mask, rule in (
            ("sigma_min", sigma_min < 0, ">= 0"),
            ("sigma_out", sigma_out < 0, ">= 0"),
            ("sigma_out", sigma_out > sigma_min, "<= sigma_min (restoration lowers the level)"),
        ):
            bad = first_bad_index(bad_mask)
            if bad >= 0:
                raise ValueError(
                    f"{name}: must be {rule}; sample {bad} has sigma_min={float(sigma_min[bad])}, "
                    f"sigma_out={float(sigma_out[bad])}"
                )
        if seeds.shape != (batch,) or seeds.is_floating_point():
            raise ValueError(f"seeds: expected an integer tensor ({batch},), got {seeds.dtype} {tuple(seeds.shape)}")
        if start_noise is not None:
            check_finite("start_noise", start_noise)
    noisy = torch.nonzero(sigma_min > 0).flatten()
    out = y0.clone()
    if noisy.numel() == 0:
        return out
    sm, so = sigma_min[noisy], sigma_out[noisy]
    sub_seeds = seeds.to(y0.device)[noisy]
    if start_noise is not None:
        eps = start_noise[noisy].to(state_dtype)
    else:
        eps = sample_normal(sub_seeds, y0.shape[1:], stream=STREAM_RESTORE, dtype=state_dtype)
    view = (-1,) + (1,) * (y0.dim() - 1)
    start = y0[noisy].to(state_dtype) + sm.to(state_dtype).view(view) * eps
    grid = restoration_grid(sm, so, num_steps, rho=rho, sigma_floor=sigma_floor)
    restored = sample(
        denoiser,
        eps,
        grid,
        method=method,
        seeds=sub_seeds,
        start=start,
        backend=backend,
    )
    out[noisy] = restored.to(y0.dtype)
    return out
