"""Reference of the sampler's elementwise update steps (SPEC 4); the fused kernels' contract.

All levels are per sample ``(B,)``; ``x`` and the denoiser outputs are ``(B, ...)``. Each
function reads each input once and writes one output, which is what the fused kernels do
in one pass. Arithmetic runs in float64 for float64 state and float32 otherwise, and the
result has ``x``'s dtype.

- :func:`euler_step`: ``x' = x + (sigma_next - sigma) (x - D) / sigma``.
- :func:`heun_step`: recomputes the Euler point from ``(x, D)`` instead of reading it back
  (three reads, one write), then ``x' = x + (sigma_next - sigma) (d + d') / 2`` with
  ``d' = (x_euler - D') / sigma_next``; rows with ``sigma_next == 0`` keep the Euler point.
- :func:`churn_step`: ``x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise eps``.
- :func:`ancestral_step`: one exact-Gaussian reverse-SDE step (the stochastic restoration
  sampler): ``x' = D + r^2 (x - D) + sigma_next sqrt(1 - r^2) eps``, ``r = sigma_next/sigma``.
  To first order in the step it is Euler-Maruyama of the reverse SDE
  ``dx = -2 sigma score dsigma + sqrt(2 sigma) dw``; it never overshoots and lands on ``D`` at 0.
"""

from __future__ import annotations

import torch

__all__ = ["euler_step", "heun_step", "churn_step", "ancestral_step"]


def _prep(x: torch.Tensor, *levels: torch.Tensor) -> tuple[torch.dtype, list[torch.Tensor]]:
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    view = (-1,) + (1,) * (x.dim() - 1)
    return dt, [lv.to(dt).reshape(view) for lv in levels]


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """Euler update from ``sigma`` to ``sigma_next`` (SPEC 4); ``sigma > 0``. Returns ``x``'s dtype."""
    dt, (s, sn) = _prep(x, sigma, sigma_next)
    xf = x.to(dt)
    return (xf + (sn - s) * ((xf - denoised.to(dt)) / s)).to(x.dtype)  # EDM's order: d = (x - D)/sigma first


def heun_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    denoised_next: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
) -> torch.Tensor:
    """Heun's second stage (SPEC 4), given ``D(x, sigma)`` and ``D(x_euler, sigma_next)``.

    Rows with ``sigma_next == 0`` return the Euler point (``denoised_next`` is ignored there).
    """
    dt, (s, sn) = _prep(x, sigma, sigma_next)
    xf, d0 = x.to(dt), denoised.to(dt)
    slope = (xf - d0) / s
    x_euler = xf + (sn - s) * slope
    safe_sn = torch.where(sn > 0, sn, torch.ones_like(sn))
    slope_next = (x_euler - denoised_next.to(dt)) / safe_sn
    corrected = xf + (sn - s) * 0.5 * (slope + slope_next)
    return torch.where(sn > 0, corrected, x_euler).to(x.dtype)


def churn_step(
    x: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    sigma_hat: torch.Tensor,
    S_noise: float = 1.0,
) -> torch.Tensor:
    """Raise the level from ``sigma`` to ``sigma_hat >= sigma`` with fresh noise (SPEC 4)."""
    dt, (s, sh) = _prep(x, sigma, sigma_hat)
    std = torch.sqrt(torch.clamp(sh * sh - s * s, min=0)) * S_noise
    return (x.to(dt) + std * noise.to(dt)).to(x.dtype)


def ancestral_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
) -> torch.Tensor:
    """One reverse-SDE (ancestral) step from ``sigma`` to ``sigma_next < sigma`` (SPEC 5)."""
    dt, (s, sn) = _prep(x, sigma, sigma_next)
    d0 = denoised.to(dt)
    ratio2 = (sn / s) ** 2
    std = sn * torch.sqrt(torch.clamp(1 - ratio2, min=0))
    return (d0 + ratio2 * (x.to(dt) - d0) + std * noise.to(dt)).to(x.dtype)
