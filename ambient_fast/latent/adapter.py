"""Diffusers VP/DDPM networks as EDM denoisers ``D(x, sigma, cond)`` (SPEC 1).

A DDPM-family network (``UNet2DConditionModel``, ``PixArtTransformer2DModel``, ...) is trained
on ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps`` at integer timesteps ``t = 0 .. T-1``, with
``ab`` its scheduler's ``alphas_cumprod``. That is the VP form of SPEC 1 with
``s_t = sqrt(1 - ab_t)``, i.e. the VE level ``sigma_t = sqrt((1 - ab_t) / ab_t)``. An EDM state
``x`` at level ``sigma`` is shown to the network as ``x / sqrt(1 + sigma^2)`` and its output
(eps, v or sample) is turned into ``D(x, sigma)`` with the *true* sigma, by
:class:`~ambient_fast.core.precond.VPToEDM`. What is left is the timestep to show for a sigma
that is generally not on the model's grid:

- ``"interpolated"`` (default): a fractional ``t``, piecewise linear in ``log sigma`` between the
  two neighbouring grid levels (k-diffusion's ``sigma_to_t``). Exact on the grid, continuous
  and monotone in between; the network's sinusoidal timestep embedding is defined for any
  real ``t``. ``log sigma`` is the natural axis: it is ``-log(SNR)/2``, along which DDPM
  schedules are smooth, so neighbouring timesteps differ by nearly equal steps.
- ``"nearest"``: the grid timestep nearest in ``log sigma`` (an integer, what the network saw
  in training). Exact on the grid; off the grid the network is told a level up to half a grid
  step away in ``log sigma`` (about 0.3% of sigma for Stable Diffusion's 1000 steps).

Levels outside the model's grid ``[sigma_0, sigma_{T-1}]`` use ``t = 0`` or ``T - 1`` (the
restoration floor 0.002 lies below Stable Diffusion's ``sigma_0 = 0.029``; there
``D(x) ~ x`` anyway). A zero-terminal-SNR schedule (``ab_{T-1} = 0``) has its last
``ab`` clamped to ``2^-24``, as diffusers' Euler scheduler does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from ..core.precond import VPToEDM
from ..core.schedules import vp_to_ve_sigma
from .conditioning import Conditioning

__all__ = [
    "DiffusersDenoiser",
    "PREDICTION_TYPES",
    "TIMESTEP_MAPPINGS",
    "scheduler_alphas_cumprod",
    "sigma_to_timestep",
    "vp_log_sigmas",
]

TIMESTEP_MAPPINGS = ("interpolated", "nearest")
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}  # diffusers -> VPToEDM
_MIN_ALPHA_CUMPROD = 2.0**-24  # zero-terminal-SNR clamp (diffusers EulerDiscreteScheduler)


def vp_log_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``log sigma_t = (log(1 - ab_t) - log(ab_t)) / 2``: float64 ``(T,)``, strictly increasing.

    Raises ``ValueError`` if ``alphas_cumprod`` is not strictly decreasing inside (0, 1).
    """
    ab = alphas_cumprod.detach().to(device="cpu", dtype=torch.float64).clamp(min=_MIN_ALPHA_CUMPROD)
    if ab.dim() != 1 or ab.numel() < 2:
        raise ValueError(f"alphas_cumprod: expected (T,) with T >= 2, got {tuple(ab.shape)}")
    if bool((ab >= 1).any()) or bool((ab[1:] >= ab[:-1]).any()):
        raise ValueError(
            "alphas_cumprod must be strictly decreasing inside (0, 1) (an entry of 1 is sigma = 0)"
        )
    return 0.5 * (torch.log1p(-ab) - torch.log(ab))


def sigma_to_timestep(
    sigma: torch.Tensor,
    log_sigmas: torch.Tensor,
    mapping: Literal["interpolated", "nearest"] = "interpolated",
) -> torch.Tensor:
    """Timestep of the model grid for VE levels ``sigma (B,)`` > 0 (module docstring).

    Args:
        sigma: ``(B,)`` levels, float32 or float64.
        log_sigmas: ``(T,)`` strictly increasing, from :func:`vp_log_sigmas`.
        mapping: ``"interpolated"`` (fractional, linear in log sigma) or ``"nearest"``.

    Returns:
        ``(B,)`` timesteps in ``[0, T-1]``, dtype of ``sigma`` (integral values for
        ``"nearest"``). No host sync: safe under ``torch.compile`` and CUDA graphs.
    """
    if mapping not in TIMESTEP_MAPPINGS:
        raise ValueError(f"mapping must be one of {TIMESTEP_MAPPINGS}, got {mapping!r}")
    grid = log_sigmas.to(device=sigma.device, dtype=sigma.dtype)
    log_sigma = torch.log(sigma).contiguous()
    hi = torch.searchsorted(grid, log_sigma).clamp(1, grid.numel() - 1)
    lo = hi - 1
    frac = ((log_sigma - grid[lo]) / (grid[hi] - grid[lo])).clamp(0, 1)
    if mapping == "nearest":
        frac = torch.round(frac)
    return lo.to(sigma.dtype) + frac


def scheduler_alphas_cumprod(scheduler: Any) -> tuple[torch.Tensor, str]:
    """``(alphas_cumprod (T,), prediction_type)`` of a diffusers scheduler or its config.

    ``scheduler`` is a scheduler object, or a config mapping (``scheduler_config.json``): the
    class named by ``_class_name`` (default ``DDPMScheduler``) is built from it, so every
    ``beta_schedule``, ``trained_betas`` and ``rescale_betas_zero_snr`` is computed exactly as
    diffusers computes it for the model. Flow-matching schedulers are refused (not VP).
    """
    if isinstance(scheduler, Mapping):
        import diffusers

        cls = getattr(diffusers, str(scheduler.get("_class_name", "DDPMScheduler")), None)
        if cls is None:
            raise ValueError(f"unknown scheduler class {scheduler.get('_class_name')!r}")
        scheduler = cls.from_config(dict(scheduler))
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ValueError(
            f"{type(scheduler).__name__} has no alphas_cumprod: only VP/DDPM-family models can be "
            "wrapped (flow-matching models are not VP)"
        )
    return torch.as_tensor(alphas_cumprod), str(scheduler.config.prediction_type)


class _TimestepNet(nn.Module):
    """``f(x_vp, s, cond)`` of :class:`VPToEDM`: the diffusers call at the mapped timestep.

    The sigma table is a buffer on the model's device (no host copy per call, so the call
    can be captured in a CUDA graph) that stays float64 when the module is cast.
    """

    def __init__(self, model: nn.Module, log_sigmas: torch.Tensor, mapping: str) -> None:
        super().__init__()
        self.model = model
        self.mapping = mapping
        self._log_sigmas64 = log_sigmas
        device = next(model.parameters()).device
        self.register_buffer("log_sigmas", log_sigmas.to(device), persistent=False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> _TimestepNet:
        super()._apply(fn, recurse)
        self.log_sigmas = self._log_sigmas64.to(self.log_sigmas.device)
        return self

    def forward(self, x_vp: torch.Tensor, s: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        timestep = sigma_to_timestep(vp_to_ve_sigma(s), self.log_sigmas, self.mapping)
        param = next(self.model.parameters())
        out = self.model(x_vp.to(param.dtype), timestep=timestep.to(torch.float32), **cond.kwargs).sample
        channels = x_vp.shape[1]
        # Learned-variance models (DiT, PixArt) append the variance channels: keep the mean.
        return out[:, :channels] if out.shape[1] == 2 * channels else out


class DiffusersDenoiser(nn.Module):
    """A diffusers VP network as an EDM denoiser ``D(x, sigma, cond) -> x0`` (SPEC 1).

    Args:
        model: called as ``model(x_vp, timestep=t, **cond.kwargs).sample`` (UNet or
            transformer); its parameters' dtype is the compute dtype (autocast applies).
        alphas_cumprod: the scheduler's ``(T,)`` cumulative alphas (the training schedule).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"`` (diffusers names).
        timestep_mapping: ``"interpolated"`` (default) or ``"nearest"`` (module docstring).

    ``forward(x, sigma, cond)``: ``x`` ``(B, C, h, w)`` EDM state (float32/float64; the
    conversion runs in that precision), ``sigma`` ``(B,)`` > 0, ``cond`` a
    :class:`Conditioning` with ``B`` rows. Returns ``(B, C, h, w)`` in ``x``'s dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        *,
        timestep_mapping: Literal["interpolated", "nearest"] = "interpolated",
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {tuple(PREDICTION_TYPES)}, got {prediction_type!r}")
        if timestep_mapping not in TIMESTEP_MAPPINGS:
            raise ValueError(f"timestep_mapping must be one of {TIMESTEP_MAPPINGS}, got {timestep_mapping!r}")
        log_sigmas = vp_log_sigmas(alphas_cumprod)
        self.prediction_type = prediction_type
        self.timestep_mapping = timestep_mapping
        self.sigma_min = float(log_sigmas[0].exp())
        self.sigma_max = float(log_sigmas[-1].exp())
        self.edm = VPToEDM(_TimestepNet(model, log_sigmas, timestep_mapping), PREDICTION_TYPES[prediction_type])
        self.eval()  # an inference adapter: the wrapped network runs in eval mode (dropout off)

    @classmethod
    def from_scheduler(
        cls,
        model: nn.Module,
        scheduler: Any,
        *,
        timestep_mapping: Literal["interpolated", "nearest"] = "interpolated",
    ) -> DiffusersDenoiser:
        """Build from a diffusers scheduler object or config (see :func:`scheduler_alphas_cumprod`)."""
        alphas_cumprod, prediction_type = scheduler_alphas_cumprod(scheduler)
        return cls(model, alphas_cumprod, prediction_type, timestep_mapping=timestep_mapping)

    @property
    def model(self) -> nn.Module:
        return self.edm.vp_net.model

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.edm(x, sigma, cond)
