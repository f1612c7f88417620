"""Per-sample coefficients and eligibility of the ambient loss (SPEC 2).

Every variant is one affine residual per element j of sample i::

    r_ij = a_i * pred_ij + b_i * y_t_ij + c_i * y_tmin_ij

with ``(a, b, c)`` from the table below (s = sigma, sm = sigma_min, D = s^2 - sm^2)::

    VE x0 : 1,  sm^2 / D,                         -s^2 / D
    VP x0 : 1,  sm^2 sqrt(1-s^2) / D,             -s^2 sqrt(1-sm^2) / D
    VE eps: 1,  -s / D,                           +s / D
    VP eps: 1,  -s (1-sm^2) / D,                  +s sqrt(1-sm^2) sqrt(1-s^2) / D

Derivation (VP; VE is the case of unit scalings): with ``y_t = k y_tmin + v eta``,
``k = sqrt((1-s^2)/(1-sm^2))``, ``v^2 = (s^2 - sm^2)/(1 - sm^2)``, Tweedie applied twice gives
``E[y_tmin | y_t] = (y_t + (v^2/s^2)(sqrt(1-s^2) h - y_t)) / k`` with ``h = E[x0 | y_t]``;
normalising the coefficient of ``h`` to 1 gives the x0 rows, substituting
``h = (y_t - s eps_hat)/sqrt(1-s^2)`` and normalising ``eps_hat`` gives the eps rows.
With sm = 0 every row is the plain loss ``pred - x0`` or ``pred - eps``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ambient_coefficients", "eligible", "eligibility_rule"]


def eligibility_rule(s_max: float = 4.0, buffer: float | None = None) -> tuple[float, float]:
    """``(scale, shift)`` of the rule ``sigma > scale * sigma_min + shift`` (SPEC 2).

    Multiplicative (default): ``scale = sqrt(s_max / (s_max - 1))`` (1.1547 for s_max = 4),
    which caps the ambient factor ``s^2/(s^2 - sm^2)`` below ``s_max``; ``s_max = inf`` gives
    ``sigma > sigma_min``. Additive (when ``buffer`` is given): ``scale = 1, shift = buffer``.
    """
    if buffer is not None:
        if not (buffer >= 0 and math.isfinite(buffer)):
            raise ValueError(f"buffer must be a finite value >= 0, got {buffer}")
        return 1.0, float(buffer)
    if not s_max > 1:
        raise ValueError(f"s_max must be > 1 (it bounds s^2/(s^2 - sigma_min^2)), got {s_max}")
    return (1.0 if math.isinf(s_max) else math.sqrt(s_max / (s_max - 1.0))), 0.0


def eligible(
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    sigma_max: torch.Tensor | None = None,
    s_max: float = 4.0,
    buffer: float | None = None,
) -> torch.Tensor:
    """Which samples train at their ``sigma`` (SPEC 2): bool ``(B,)``.

    True when ``sigma_min == 0`` (clean), or ``sigma > scale * sigma_min + shift`` (see
    :func:`eligibility_rule`), or ``sigma < sigma_max`` (Ambient-o locality: trained as clean).
    """
    scale, shift = eligibility_rule(s_max, buffer)
    ok = (sigma_min == 0) | (sigma > scale * sigma_min + shift)
    if sigma_max is not None:
        ok = ok | (sigma < sigma_max)
    return ok


def ambient_coefficients(
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    schedule: str = "ve",
    target: str = "x0",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample ``(a, b, c)`` of the residual ``a pred + b y_t + c y_tmin`` (SPEC 2 table).

    Args:
        sigma: ``(B,)`` training level ``s`` (VE sigma, or VP noise std in (0, 1)).
        sigma_min: ``(B,)`` nature level ``sm`` with ``sm < s`` where the result is used.
        schedule: ``"ve"`` or ``"vp"``.  target: ``"x0"`` or ``"eps"``.

    Returns:
        Three tensors ``(B,)`` in the dtype of ``sigma``.
    """
    s, sm = sigma, sigma_min.to(sigma.dtype)
    denom = s * s - sm * sm
    one = torch.ones_like(s)
    if schedule == "ve" and target == "x0":
        return one, sm * sm / denom, -(s * s) / denom
    if schedule == "ve" and target == "eps":
        return one, -s / denom, s / denom
    if schedule == "vp" and target == "x0":
        return one, sm * sm * torch.sqrt(1 - s * s) / denom, -(s * s) * torch.sqrt(1 - sm * sm) / denom
    if schedule == "vp" and target == "eps":
        return one, -s * (1 - sm * sm) / denom, s * torch.sqrt(1 - sm * sm) * torch.sqrt(1 - s * s) / denom
    raise ValueError(f"unknown schedule/target {schedule!r}/{target!r}: use 've'|'vp' and 'x0'|'eps'")
