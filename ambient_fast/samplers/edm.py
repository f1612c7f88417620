"""EDM samplers with per-sample grids (Karras et al. 2022, Algorithms 1 and 2; SPEC 4).

One loop serves every method; the elementwise updates are the fused ops of the selected
backend (``core.solver_step`` is their reference). The grid is a ``(K+1,)`` table shared by
the batch or a ``(B, K+1)`` per-sample table (restoration); it is copied to the host once
before the loop, so the loop itself never syncs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from ..core.noise import STREAM_STEP, sample_normal
from ..core.schedules import churn_gamma
from ..core.validation import active, check_finite, check_tensor
from ..kernels.dispatch import step_backend
from .methods import SAMPLE_ALIASES, SAMPLE_METHODS, resolve_method

__all__ = ["sample", "Denoiser", "METHODS"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = SAMPLE_METHODS


def _sigma_table(sigmas: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    if sigmas.dim() == 1:
        sigmas = sigmas.unsqueeze(0).expand(batch, -1)
    if sigmas.dim() != 2 or sigmas.shape[0] != batch or sigmas.shape[1] < 2:
        raise ValueError(f"sigmas: expected (K+1,) or ({batch}, K+1) with K >= 1, got {tuple(sigmas.shape)}")
    table = sigmas.to(device=device, dtype=torch.float64)
    if active():
        check_finite("sigmas", table)
        if bool((table[:, :-1] <= 0).any()):
            bad = int(torch.nonzero((table[:, :-1] <= 0).any(dim=1))[0, 0])
            raise ValueError(f"sigmas: every level before the last must be > 0 (sample {bad})")
        if bool((table[:, 1:] > table[:, :-1]).any()):
            bad = int(torch.nonzero((table[:, 1:] > table[:, :-1]).any(dim=1))[0, 0])
            raise ValueError(f"sigmas: the grid must be non-increasing (sample {bad})")
    return table


def _noise(
    like: torch.Tensor, step: int, seeds: torch.Tensor | None, generator: torch.Generator | None
) -> torch.Tensor:
    if seeds is not None:
        return sample_normal(seeds, like.shape[1:], stream=STREAM_STEP + step, dtype=like.dtype, device=like.device)
    return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    method: Literal["euler", "heun", "churn", "sde"] = "heun",
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = math.inf,
    S_noise: float = 1.0,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Integrate from ``sigmas[:, 0]`` to ``sigmas[:, -1]`` with an EDM denoiser (SPEC 4).

    Args:
        denoiser: ``D(x, sigma) -> x0 estimate`` with ``x`` ``(B, ...)`` and ``sigma`` ``(B,)``.
        noise: standard normal ``(B, ...)``, finite; the start is ``noise * sigmas[:, 0]``
            (EDM's ``latents * t_0``). Its dtype is the state dtype (float64 = EDM's). An empty
            batch (``B = 0``) returns an empty state.
        sigmas: ``(K+1,)`` or ``(B, K+1)`` non-increasing levels, e.g. from
            :func:`~ambient_fast.karras_sigmas` (last entry 0 integrates to the data).
        method: ``"euler"``, ``"heun"`` (EDM Alg. 1), ``"churn"`` (EDM Alg. 2: churn +
            Heun), or ``"sde"`` (ancestral reverse-SDE steps; samples the posterior).
            ``"stochastic"`` is a deprecated alias of ``"churn"`` (it warns).
        S_churn, S_tmin, S_tmax, S_noise: EDM churn settings (``"churn"`` only).
        generator: for the stochastic noise when ``seeds`` is None.
        seeds: int ``(B,)``: per-sample step noise (independent of batch composition).
        start: ``(B, ...)`` explicit start state instead of ``noise * sigmas[:, 0]`` (finite,
            ``noise``'s shape).
        backend: fused-step backend (``"auto"``, ``"torch"``, ``"triton"``, ``"cpp"``).

    Returns:
        ``(B, ...)`` final state, dtype of ``noise``.
    """
    method = resolve_method(method, SAMPLE_METHODS, SAMPLE_ALIASES, "sample")
    check_tensor("noise", noise)
    check_tensor("sigmas", sigmas, "(K+1,) or (B, K+1)")
    if noise.dim() < 1:
        raise ValueError("noise: expected a batch (B, ...), got a 0-d tensor")
    if start is not None:
        check_tensor("start", start)
        if start.shape != noise.shape:
            raise ValueError(f"start: shape {tuple(start.shape)} differs from noise's {tuple(noise.shape)}")
    if seeds is not None:
        check_tensor("seeds", seeds, f"of shape ({noise.shape[0]},)")
        if seeds.shape != (noise.shape[0],) or seeds.is_floating_point():
            raise ValueError(
                f"seeds: expected integers of shape ({noise.shape[0]},), got {seeds.dtype} {tuple(seeds.shape)}"
            )
    batch = noise.shape[0]
    if batch == 0:
        return (start if start is not None else noise).clone()
    if active():
        check_finite("noise", noise)
        if start is not None:
            check_finite("start", start)
    table = _sigma_table(sigmas, batch, noise.device)
    num_steps = table.shape[1] - 1
    host = table.cpu()
    ops = step_backend(backend, noise.device)
    view = (-1,) + (1,) * (noise.dim() - 1)
    x = start.to(noise.dtype) if start is not None else noise * table[:, 0].to(noise.dtype).view(view)
    gamma = churn_gamma(num_steps, S_churn) if method == "churn" else 0.0
    for i in range(num_steps):
        t_cur, t_next = table[:, i], table[:, i + 1]
        if not bool((host[:, i] > host[:, i + 1]).any()):
            continue  # a zero-length step leaves the state unchanged
        if gamma > 0:
            in_range = (t_cur >= S_tmin) & (t_cur <= S_tmax)
            t_hat = torch.where(in_range, t_cur * (1 + gamma), t_cur)
            x = ops.churn_step(x, _noise(x, i, seeds, generator), t_cur, t_hat, S_noise)
        else:
            t_hat = t_cur
        denoised = denoiser(x, t_hat)
        if method == "sde":
            x = ops.ancestral_step(x, denoised, _noise(x, i, seeds, generator), t_hat, t_next)
            continue
        x_next = ops.euler_step(x, denoised, t_hat, t_next)
        if method == "euler" or not bool((host[:, i + 1] > 0).any()):
            x = x_next
            continue
        t_eval = torch.where(t_next > 0, t_next, torch.ones_like(t_next))
        x = ops.heun_step(x, denoised, denoiser(x_next, t_eval), t_hat, t_next)
    return x
