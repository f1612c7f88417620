"""The ambient loss (SPEC 2): the plain-PyTorch reference and its resolved options.

The fused op (``kernels/ambient_loss.py``, Triton on CUDA, C++ on CPU) implements
:func:`per_sample_loss_reference`'s contract exactly: same inputs, same :class:`LossConfig`,
per-sample float32 loss ``(B,)`` (float64 for float64 inputs), differentiable in ``pred``.
The public entry points (``ambient_fast.ambient_loss``, ``ambient_fast.AmbientLoss``) live in
``ambient_fast/loss.py``, above both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .coefficients import ambient_coefficients, eligibility_rule
from .schedules import SIGMA_DATA, vp_to_ve_sigma

__all__ = ["LossConfig", "REDUCTIONS", "per_sample_loss_reference", "resolve_config"]

REDUCTIONS = ("mean", "sum", "none", "mean_trained")

Schedule = Literal["ve", "vp"]
Target = Literal["x0", "eps"]


@dataclass(frozen=True)
class LossConfig:
    """Resolved scalar options of the fused loss; what every backend receives.

    Attributes:
        schedule: "ve" or "vp".  target: "x0" or "eps".
        contraction: train eligible corrupt rows with the plain loss (sm = 0 in coefficients).
        elig_scale, elig_shift: eligibility ``sigma_min == 0 or sigma > scale*sm + shift
            or sigma < sigma_max``.
        edm_weight: multiply by ``lambda_EDM`` (at the VE-equivalent sigma for VP) — only
            when no per-sample weight tensor is given.
        sigma_data: EDM sigma_data for ``lambda_EDM``.
    """

    schedule: Schedule = "ve"
    target: Target = "x0"
    contraction: bool = False
    elig_scale: float = math.sqrt(4.0 / 3.0)
    elig_shift: float = 0.0
    edm_weight: bool = True
    sigma_data: float = SIGMA_DATA


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def per_sample_loss_reference(
    pred: torch.Tensor,
    y_t: torch.Tensor,
    y_tmin: torch.Tensor,
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    sigma_max: torch.Tensor,
    weight: torch.Tensor | None,
    cfg: LossConfig,
) -> torch.Tensor:
    """Reference ``loss_i = m_i w_i mean_j r_ij^2`` (SPEC 2), float32 (float64 for fp64 input).

    Args:
        pred, y_t, y_tmin: ``(B, ...)`` same shape and dtype.
        sigma, sigma_min, sigma_max: ``(B,)`` levels (``sigma_max`` zeros = no locality rule).
        weight: ``(B,)`` per-sample weight replacing the default, or None.
        cfg: resolved options.

    Returns:
        ``(B,)`` per-sample loss; rows that do not train are exactly 0.
    """
    dt = _compute_dtype(pred)
    s, sm, smax = sigma.to(dt), sigma_min.to(dt), sigma_max.to(dt)
    clean_rule = s < smax
    mask = (sm == 0) | (s > cfg.elig_scale * sm + cfg.elig_shift) | clean_rule
    # sm used in the coefficients: 0 for contraction, locality rows and rows that do not train
    # (the last keeps their coefficients finite; they are zeroed by the mask anyway).
    sm_eff = torch.where(mask & ~clean_rule, sm, torch.zeros_like(sm))
    if cfg.contraction:
        sm_eff = torch.zeros_like(sm)
    a, b, c = ambient_coefficients(s, sm_eff, cfg.schedule, cfg.target)
    view = (-1,) + (1,) * (pred.dim() - 1)
    r = a.view(view) * pred.to(dt) + b.view(view) * y_t.to(dt) + c.view(view) * y_tmin.to(dt)
    per_sample = r.square().reshape(r.shape[0], -1).mean(dim=1)
    if weight is not None:
        w = weight.to(dt)
    elif cfg.edm_weight:
        s_ve = s if cfg.schedule == "ve" else vp_to_ve_sigma(s)
        w = (s_ve * s_ve + cfg.sigma_data**2) / (s_ve * cfg.sigma_data) ** 2
    else:
        w = torch.ones_like(s)
    return torch.where(mask, w * per_sample, torch.zeros_like(per_sample))


def resolve_config(
    schedule: str,
    target: str,
    mode: str,
    s_max: float,
    buffer: float | None,
    weight: object,
    sigma_data: float,
) -> LossConfig:
    """Validate the scalar options and build the :class:`LossConfig` (SPEC 2 defaults).

    Memoised on the options (a training step resolves the same ones every call); a weight
    tensor only counts as "a tensor".
    """
    key = (schedule, target, mode, s_max, buffer, _TENSOR if isinstance(weight, torch.Tensor) else weight, sigma_data)
    try:
        return _CONFIGS[key]
    except (KeyError, TypeError):
        pass
    cfg = _resolve_config(schedule, target, mode, s_max, buffer, weight, sigma_data)
    try:
        _CONFIGS[key] = cfg
    except TypeError:  # an unhashable option value: not memoised
        pass
    return cfg


_CONFIGS: dict[tuple, LossConfig] = {}
_TENSOR = object()  # stands for "a weight tensor" in the memo keys


def _resolve_config(
    schedule: str,
    target: str,
    mode: str,
    s_max: float,
    buffer: float | None,
    weight: object,
    sigma_data: float,
) -> LossConfig:
    if schedule not in ("ve", "vp"):
        raise ValueError(f"schedule must be 've' or 'vp', got {schedule!r}")
    if target not in ("x0", "eps"):
        raise ValueError(f"target must be 'x0' or 'eps', got {target!r}")
    if mode not in ("ambient", "contraction"):
        raise ValueError(f"mode must be 'ambient' or 'contraction', got {mode!r}")
    if not (isinstance(weight, torch.Tensor) or weight in ("edm", None)):
        raise ValueError(f"weight must be 'edm', None or a (B,) tensor, got {weight!r}")
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
    scale, shift = eligibility_rule(s_max, buffer)
    return LossConfig(
        schedule=schedule,  # type: ignore[arg-type]
        target=target,  # type: ignore[arg-type]
        contraction=mode == "contraction",
        elig_scale=scale,
        elig_shift=shift,
        edm_weight=weight == "edm" and target == "x0",
        sigma_data=float(sigma_data),
    )
