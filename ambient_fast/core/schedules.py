"""Noise schedules: VE <-> VP conversion, the EDM training distribution, the rho grid.

SPEC sections 1 and 4. VE (EDM) is canonical inside the samplers: ``x = x0 + sigma * eps``.
VP writes ``x = sqrt(1 - s^2) x0 + s eps`` with ``s`` in (0, 1).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ve_to_vp_sigma",
    "vp_to_ve_sigma",
    "edm_training_sigmas",
    "karras_sigmas",
    "EDM_P_MEAN",
    "EDM_P_STD",
    "SIGMA_DATA",
]

EDM_P_MEAN = -1.2  # EDM CIFAR-10 training log-normal mean (Karras et al. 2022, Table 1)
EDM_P_STD = 1.2  # EDM CIFAR-10 training log-normal std
SIGMA_DATA = 0.5  # EDM sigma_data for images in [-1, 1]


def ve_to_vp_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """VP noise std ``s = sigma / sqrt(1 + sigma^2)`` of a VE level ``sigma`` (SPEC 1)."""
    return sigma / torch.sqrt(1 + sigma * sigma)


def vp_to_ve_sigma(s: torch.Tensor) -> torch.Tensor:
    """VE level ``sigma = s / sqrt(1 - s^2)`` of a VP noise std ``s`` in [0, 1) (SPEC 1)."""
    return s / torch.sqrt(1 - s * s)


def edm_training_sigmas(
    batch_size: int,
    *,
    P_mean: float = EDM_P_MEAN,
    P_std: float = EDM_P_STD,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``ln sigma ~ N(P_mean, P_std^2)``: float32 ``(batch_size,)`` (SPEC 1)."""
    normal = torch.randn(batch_size, device=device, generator=generator)
    return torch.exp(P_mean + P_std * normal)


def karras_sigmas(
    num_steps: int,
    sigma_lo: float | torch.Tensor,
    sigma_hi: float | torch.Tensor,
    rho: float = 7.0,
) -> torch.Tensor:
    """The EDM rho grid from ``sigma_hi`` down to ``sigma_lo``, then a final 0 (SPEC 4).

    ``sigma_k = (hi^(1/rho) + k/(N-1) (lo^(1/rho) - hi^(1/rho)))^rho`` for k = 0..N-1.

    Args:
        num_steps: N >= 1 grid points before the final zero (N = 1 gives ``[hi, 0]``).
        sigma_lo, sigma_hi: floats, or per-sample tensors ``(B,)`` for per-sample grids.
        rho: grid curvature (EDM: 7).

    Returns:
        float64 ``(N + 1,)`` for scalar bounds, ``(B, N + 1)`` for tensor bounds.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    per_sample = isinstance(sigma_lo, torch.Tensor) or isinstance(sigma_hi, torch.Tensor)
    device = next(
        (t.device for t in (sigma_lo, sigma_hi) if isinstance(t, torch.Tensor)), torch.device("cpu")
    )
    lo = torch.as_tensor(sigma_lo, dtype=torch.float64, device=device)
    hi = torch.as_tensor(sigma_hi, dtype=torch.float64, device=device)
    lo, hi = torch.broadcast_tensors(lo.reshape(-1, 1), hi.reshape(-1, 1))
    if bool((lo < 0).any()) or bool((hi < lo).any()):
        bad = int(torch.nonzero((lo < 0) | (hi < lo))[0, 0])
        raise ValueError(
            f"karras_sigmas needs 0 <= sigma_lo <= sigma_hi; sample {bad} has "
            f"sigma_lo={float(lo[bad, 0])}, sigma_hi={float(hi[bad, 0])}"
        )
    if num_steps == 1:
        grid = hi
    else:
        frac = torch.arange(num_steps, dtype=torch.float64, device=device) / (num_steps - 1)
        inv = 1.0 / rho
        grid = (hi**inv + frac * (lo**inv - hi**inv)) ** rho
    out = torch.cat([grid, torch.zeros_like(grid[:, :1])], dim=1)
    return out if per_sample else out[0]


def lambda_edm(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM loss weight ``(sigma^2 + sd^2) / (sigma sd)^2`` (SPEC 2)."""
    return (sigma * sigma + sigma_data**2) / (sigma * sigma_data) ** 2


def churn_gamma(num_steps: int, S_churn: float) -> float:
    """EDM per-step churn ``min(S_churn / N, sqrt(2) - 1)`` (SPEC 4)."""
    return min(S_churn / num_steps, math.sqrt(2.0) - 1.0) if S_churn > 0 else 0.0
