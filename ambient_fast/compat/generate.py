"""EDM's ``generate.py`` sampler, same signature and same bits, on the engine's step ops.

``edm_sampler`` is EDM's Algorithm 2 (Karras et al. 2022; ANCHORS 3.1, SPEC 4) with the
argument names and defaults of ``NVlabs/edm generate.py::edm_sampler`` (008a4e5): float64
state, ``t_0 = sigma_max`` ... ``t_{N-1} = sigma_min`` rho-grid then 0, levels clamped to the
net's ``sigma_min``/``sigma_max`` and passed through ``net.round_sigma`` when the net has
them, churn ``t_hat = t + gamma t`` with gamma in float64, Euler then Heun except on the last
step (NFE 2N - 1).

Kept from EDM (bit for bit with the default ``backend="torch"``, tests/test_compat.py):
- the arithmetic: levels, gamma and state in float64, and the update steps are
  :mod:`ambient_fast.core.solver_step` (the engine's reference ops), whose expression order
  is EDM's (``d = (x - D) / t`` then ``x + (t' - t) d``);
- the random stream: ``randn_like(x)`` is called once per step as EDM does (also when the
  step adds no noise, so ``torch.randn_like`` leaves the global RNG where EDM leaves it);
  ``exact_rng=False`` skips the unused draws (same images, faster);
- the net call ``net(x, t, class_labels)`` with a float64 ``x`` and a 0-dim float64 ``t``
  (per-sample ``(B,)`` levels for the restorer), its output cast to the state dtype.

Faster: ``backend="auto"`` runs the updates as the engine's fused churn / Euler / Heun ops
(Triton on CUDA, C++ on CPU), equal to EDM up to float64 rounding (FMA contraction, other
operation order). Either way the grid, churn factors and rounded levels are computed once
before the loop, and the loop never synchronises with the device.

Why a loop of its own rather than :func:`ambient_fast.sample`: EDM's contract differs in
ways that change bits (a caller-supplied ``randn_like`` consumed every step,
``round_sigma``, ``t + gamma t`` rather than ``t (1 + gamma)``, no Heun correction on the
last step even when it ends above 0, as the restorer's ``sigma_end > 0`` grids do); the two
loops share the step ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core.schedules import karras_sigmas
from ..kernels.dispatch import step_backend

__all__ = ["StackedRandomGenerator", "edm_sampler", "heun_loop"]

RandnLike = Callable[[torch.Tensor], torch.Tensor]


class StackedRandomGenerator:
    """One ``torch.Generator`` per sample, as EDM's ``generate.py`` (batch-independent noise).

    Row i of every draw comes from ``torch.Generator(device).manual_seed(seeds[i] % 2**32)``,
    so a seed gives the same image whatever batch it lands in. Methods mirror ``torch``'s.
    """

    def __init__(self, device: torch.device | str, seeds: Sequence[int] | torch.Tensor) -> None:
        self.generators = [
            torch.Generator(device).manual_seed(int(seed) % (1 << 32))
            for seed in torch.as_tensor(seeds).reshape(-1).tolist()
        ]

    def _check(self, size: Sequence[int]) -> None:
        if size[0] != len(self.generators):
            raise ValueError(f"first dimension {size[0]} != number of seeds {len(self.generators)}")

    def randn(self, size: Sequence[int], **kwargs: Any) -> torch.Tensor:
        """``(B, ...)`` standard normal, row i from generator i."""
        self._check(size)
        return torch.stack([torch.randn(tuple(size[1:]), generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's name)
        """``randn`` with ``input``'s shape, dtype, layout and device."""
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args: Any, size: Sequence[int], **kwargs: Any) -> torch.Tensor:
        """``(B, ...)`` integers, row i from generator i (``torch.randint`` arguments)."""
        self._check(size)
        return torch.stack(
            [torch.randint(*args, size=tuple(size[1:]), generator=gen, **kwargs) for gen in self.generators]
        )


def _round_sigma(net: Any, levels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``net.round_sigma`` (EDM preconditioners) applied to a host table; identity without it."""
    round_sigma = getattr(net, "round_sigma", None)
    if round_sigma is None:
        return levels
    rounded = torch.as_tensor(round_sigma(levels.to(device)))
    return rounded.to(device="cpu", dtype=torch.float64).reshape(levels.shape)


def _churn_levels(
    t_cur: torch.Tensor,
    num_steps: int,
    S_churn: float,
    S_min: float,
    S_max: float,
    *,
    gamma_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Churned levels ``t_hat = t + gamma t`` (float64), ``gamma = min(S_churn/N, sqrt(2)-1)`` in ``[S_min, S_max]``.

    ``gamma_dtype=float64`` is EDM's ``generate.py`` (a Python float times a float64 level);
    ``float32`` is Dataloops' ``restore.py``, whose ``torch.where(..., gamma, 0.0)`` rounds
    gamma to float32 before the float64 product. Same expression order as both.
    """
    gamma = torch.tensor(min(S_churn / num_steps, math.sqrt(2) - 1), dtype=gamma_dtype, device=t_cur.device)
    in_range = (S_min <= t_cur) & (t_cur <= S_max)
    gamma = torch.where(in_range, gamma, torch.zeros_like(gamma)).to(torch.float64)
    return t_cur + gamma * t_cur


@torch.no_grad()
def heun_loop(
    net: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t_steps: torch.Tensor,
    t_hat: torch.Tensor,
    *,
    class_labels: Any = None,
    randn_like: RandnLike = torch.randn_like,
    S_noise: float = 1.0,
    per_sample_levels: bool = False,
    exact_rng: bool = True,
    backend: str = "torch",
) -> torch.Tensor:
    """EDM's stochastic Heun loop over host tables of levels (SPEC 4).

    Args:
        net: ``net(x, t, class_labels) -> D``.
        x: ``(B, ...)`` start state (its dtype is the state dtype).
        t_steps: host float64 ``(B, N + 1)`` levels (rows equal for a shared grid).
        t_hat: host float64 ``(B, N)`` churned levels (``t_hat == t_steps[:, :-1]`` = no churn).
        class_labels: passed to ``net``.
        randn_like: noise source, called once per step (or only on churn steps when
            ``exact_rng`` is False).
        S_noise: churn noise inflation.
        per_sample_levels: pass ``(B,)`` levels to ``net``; otherwise a 0-dim level (row 0).
        backend: step ops: ``"torch"`` (reference, EDM's bits) or a fused backend.

    Returns:
        ``(B, ...)`` final state. Heun's correction runs on every step but the last, as EDM.
    """
    num_steps = t_steps.shape[1] - 1
    ops = step_backend(backend, x.device)
    churns = (t_hat > t_steps[:, :-1]).any(dim=0).tolist()
    # Device tables (step, sample), contiguous rows; 0-dim net levels for a shared grid.
    t_dev = t_steps.T.contiguous().to(x.device)
    t_hat_dev = t_hat.T.contiguous().to(x.device)
    net_t = t_dev if per_sample_levels else t_dev[:, 0]
    net_t_hat = t_hat_dev if per_sample_levels else t_hat_dev[:, 0]
    state_dtype = x.dtype
    for i in range(num_steps):
        t_cur, t_next, t_h = t_dev[i], t_dev[i + 1], t_hat_dev[i]
        # Increase noise temporarily.
        if churns[i] or exact_rng:
            eps = randn_like(x)
        x_hat = ops.churn_step(x, eps, t_cur, t_h, S_noise) if churns[i] else x
        # Euler step.
        denoised = net(x_hat, net_t_hat[i], class_labels).to(state_dtype)
        x_next = ops.euler_step(x_hat, denoised, t_h, t_next)
        # Apply 2nd order correction.
        if i < num_steps - 1:
            denoised_next = net(x_next, net_t[i + 1], class_labels).to(state_dtype)
            x_next = ops.heun_step(x_hat, denoised, denoised_next, t_h, t_next)
        x = x_next
    return x


@torch.no_grad()
def edm_sampler(
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
    *,
    state_dtype: torch.dtype = torch.float64,
    exact_rng: bool = True,
    backend: str = "torch",
) -> torch.Tensor:
    """EDM ``generate.py::edm_sampler`` (Algorithm 2), same arguments and defaults.

    Args:
        net: EDM denoiser ``net(x, sigma, class_labels)``; its ``sigma_min``/``sigma_max``
            clamp the grid and its ``round_sigma`` rounds the levels, when present.
        latents: ``(B, ...)`` standard normal; the start is ``latents * t_0``.
        class_labels: passed to ``net``.
        randn_like: churn noise source (EDM: ``StackedRandomGenerator.randn_like``).
        num_steps, sigma_min, sigma_max, rho: the rho-grid of ``num_steps`` levels, then 0.
        S_churn, S_min, S_max, S_noise: EDM churn (``S_churn = 0``: deterministic Heun).
        state_dtype: sampler state dtype; float64 as EDM (float32 is faster, not EDM's numbers).
        exact_rng: draw ``randn_like`` on every step as EDM does (see module docstring).
        backend: step ops: ``"torch"`` (the reference ops, EDM's bits), or the fused
            ``"auto"``, ``"triton"``, ``"cpp"`` (equal up to float64 rounding, faster).

    Returns:
        ``(B, ...)`` samples in ``state_dtype`` (EDM returns float64).
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (EDM divides by num_steps - 1), got {num_steps}")
    # Adjust noise levels based on what's supported by the network.
    sigma_min = max(sigma_min, float(getattr(net, "sigma_min", 0.0)))
    sigma_max = min(sigma_max, float(getattr(net, "sigma_max", math.inf)))
    if not 0 < sigma_min <= sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got {sigma_min}, {sigma_max}")
    # Time step discretization.
    grid = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    levels = torch.cat([_round_sigma(net, grid[:-1], latents.device), grid[-1:]])
    t_hat = _round_sigma(net, _churn_levels(levels[:-1], num_steps, S_churn, S_min, S_max), latents.device)
    batch = latents.shape[0]
    x = latents.to(state_dtype) * levels[0].item()
    return heun_loop(
        net,
        x,
        levels.expand(batch, -1),
        t_hat.expand(batch, -1),
        class_labels=class_labels,
        randn_like=randn_like,
        S_noise=S_noise,
        exact_rng=exact_rng,
        backend=backend,
    )
