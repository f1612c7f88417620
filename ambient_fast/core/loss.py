"""The ambient loss (SPEC 2): plain-PyTorch reference, public entry point, EDM-style callable.

Backends (Triton on CUDA, C++ on CPU) implement :func:`per_sample_loss_reference`'s contract
exactly: same inputs, same :class:`LossConfig`, per-sample float32 loss ``(B,)`` (float64 for
float64 inputs), differentiable in ``pred``. The public :func:`ambient_loss` validates,
resolves the options into a :class:`LossConfig`, picks the backend and reduces.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .coefficients import ambient_coefficients, eligibility_rule
from .noise import noisy_pair
from .schedules import EDM_P_MEAN, EDM_P_STD, SIGMA_DATA, edm_training_sigmas, vp_to_ve_sigma
from .validation import active, check_finite, check_same_layout, check_sigma_pair

__all__ = ["LossConfig", "per_sample_loss_reference", "ambient_loss", "AmbientLoss"]

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
    """Validate the scalar options and build the :class:`LossConfig` (SPEC 2 defaults)."""
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


def ambient_loss(
    pred: torch.Tensor,
    y_t: torch.Tensor,
    y_tmin: torch.Tensor,
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    *,
    schedule: Schedule = "ve",
    target: Target = "x0",
    sigma_max: torch.Tensor | None = None,
    s_max: float = 4.0,
    buffer: float | None = None,
    mode: Literal["ambient", "contraction"] = "ambient",
    weight: Literal["edm"] | None | torch.Tensor = "edm",
    sigma_data: float = SIGMA_DATA,
    reduction: Literal["mean", "sum", "none", "mean_trained"] = "mean",
    backend: Literal["auto", "torch", "triton", "cpp"] = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Ambient diffusion loss with per-sample ``sigma_min`` (SPEC 2).

    ``loss_i = m_i * w_i * mean_j (a_i pred_ij + b_i y_t_ij + c_i y_tmin_ij)^2``.

    Args:
        pred: ``(B, ...)`` network prediction (x0 estimate, or eps estimate for
            ``target="eps"``); any trailing shape (images, ``(B, N, 3)`` coordinates,
            ``(B, T, D)`` trajectories); fp16/bf16/fp32/fp64.
        y_t: ``(B, ...)`` network input, noisy at ``sigma``.
        y_tmin: ``(B, ...)`` the sample at its own level ``sigma_min`` (see :func:`noisy_pair`).
        sigma: ``(B,)`` training level (VE sigma, or VP noise std in (0, 1)).
        sigma_min: ``(B,)`` nature level per sample, >= 0 (0 = clean).
        schedule: ``"ve"`` or ``"vp"``.  target: ``"x0"`` or ``"eps"``.
        sigma_max: ``(B,)`` locality level: a sample also trains at ``sigma < sigma_max``
            as if clean. None = 0 (never).
        s_max: multiplicative eligibility ``sigma > sqrt(s_max/(s_max-1)) sigma_min``.
        buffer: additive eligibility ``sigma > sigma_min + buffer`` instead, when given.
        mode: ``"ambient"``, or ``"contraction"`` (eligible rows trained with the plain loss).
        weight: ``"edm"`` = ``lambda_EDM(sigma)`` for x0 targets and 1 for eps; None = 1
            (exactly ``mean_j r_ij^2``); or a ``(B,)`` tensor that replaces it.
        sigma_data: EDM sigma_data for ``lambda_EDM``.
        reduction: ``"mean"`` over all rows (non-training rows count as 0), ``"sum"``,
            ``"none"`` (per-sample ``(B,)``), or ``"mean_trained"`` (mean over training rows).
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU when built, else reference),
            or force ``"torch"`` (reference), ``"triton"``, ``"cpp"``.
        validate: eager input checks (skipped automatically under ``torch.compile``).

    Returns:
        float32 scalar (float64 for float64 inputs), or ``(B,)`` for ``reduction="none"``.
    """
    cfg = resolve_config(schedule, target, mode, s_max, buffer, weight, sigma_data)
    if reduction not in ("mean", "sum", "none", "mean_trained"):
        raise ValueError(f"reduction must be 'mean', 'sum', 'none' or 'mean_trained', got {reduction!r}")
    batch = pred.shape[0] if pred.dim() else 0
    if sigma_max is None:
        sigma_max = torch.zeros(batch, dtype=sigma.dtype, device=sigma.device)
    tensor_weight = weight if isinstance(weight, torch.Tensor) else None
    if active(validate):
        check_same_layout("pred", pred, y_t=y_t, y_tmin=y_tmin)
        check_sigma_pair(sigma, sigma_min, pred, schedule, sigma_max)
        for name, t in (("pred", pred), ("y_t", y_t), ("y_tmin", y_tmin)):
            check_finite(name, t)
        if tensor_weight is not None:
            from .validation import check_per_sample

            check_per_sample("weight", tensor_weight, batch, pred.device)
    from ..kernels.dispatch import loss_backend

    per_sample = loss_backend(backend, pred.device)(
        pred, y_t, y_tmin, sigma, sigma_min, sigma_max, tensor_weight, cfg
    )
    if reduction == "none":
        return per_sample
    if active(validate) and not bool((per_sample != 0).any()) and batch > 0:
        from .coefficients import eligible as _eligible

        if not bool(_eligible(sigma, sigma_min, sigma_max, s_max, buffer).any()):
            warnings.warn(
                "ambient_loss: no sample in the batch is eligible at its sigma; the loss is 0",
                stacklevel=2,
            )
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    trained = (per_sample != 0).sum().clamp(min=1)
    return per_sample.sum() / trained


class AmbientLoss:
    """Training-step ambient loss in EDM's style (SPEC 2, anchors ANCHORS.md 1.1).

    ``loss_fn(net, images, sigma_min, labels=None, ...) -> (B,)`` draws ``sigma`` from the
    EDM log-normal (unless the noise-level-first sampler provides it), forms the noisy pair
    with the fixed per-sample noise, runs ``net(y_t, sigma, labels)`` (an EDM denoiser
    returning the x0 estimate) and returns the per-sample loss. The training loop reduces.

    The anchors' per-element loss summed over elements equals ``numel_per_sample`` times
    this per-sample mean.
    """

    def __init__(
        self,
        P_mean: float = EDM_P_MEAN,  # log-normal mean of sigma (EDM CIFAR-10)
        P_std: float = EDM_P_STD,  # log-normal std of sigma
        sigma_data: float = SIGMA_DATA,  # EDM sigma_data
        s_max: float = 4.0,  # eligibility sigma > sqrt(s_max/(s_max-1)) sigma_min
        buffer: float | None = None,  # additive eligibility instead, when given
        mode: Literal["ambient", "contraction"] = "ambient",
        fixed_noise: bool = True,  # frozen per-sample nature noise (needs sample_ids)
        noise_seed: int = 0,  # run seed mixed into the frozen noise
        stored: bool = False,  # the data is stored noisy at sigma_min (no nature noise added)
        backend: Literal["auto", "torch", "triton", "cpp"] = "auto",
        validate: bool = True,  # eager input checks; False drops their host syncs per step
    ) -> None:
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self.validate = validate
        self.s_max, self.buffer, self.mode = s_max, buffer, mode
        self.fixed_noise, self.noise_seed, self.backend = fixed_noise, noise_seed, backend
        self.stored = stored
        eligibility_rule(s_max, buffer)

    def __call__(
        self,
        net: Callable[..., torch.Tensor],
        images: torch.Tensor,
        sigma_min: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        sigma: torch.Tensor | None = None,
        sigma_max: torch.Tensor | None = None,
        sample_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        eta_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample loss ``(B,)`` for one batch.

        Args:
            net: EDM denoiser ``net(x, sigma, labels) -> x0 estimate``.
            images: ``(B, ...)`` dataset samples (clean or corrupt) in data units.
            sigma_min: ``(B,)`` per-sample nature level.
            labels: optional conditioning passed to ``net``.
            sigma: ``(B,)`` training levels (from the noise-level-first sampler); drawn
                from the EDM log-normal when None.
            sigma_max: ``(B,)`` locality levels (None = 0).
            sample_ids: ``(B,)`` ids for the frozen per-sample noise.
            generator: for sigma and the fresh noise.
            eta_seeds: int ``(B,)`` seeds of the fresh noise instead of ``generator`` (e.g.
                one per global batch slot, so a slot's noise does not depend on its rank).
        """
        batch = images.shape[0]
        if sigma is None:
            sigma = edm_training_sigmas(
                batch, P_mean=self.P_mean, P_std=self.P_std, device=images.device, generator=generator
            )
        if self.fixed_noise and not self.stored and sample_ids is None:
            raise ValueError("AmbientLoss(fixed_noise=True) needs sample_ids (one id per image)")
        # The pair is formed at the level the coefficients use: 0 for contraction (the corrupt
        # sample itself is the plain target, as in Ambient-o's released code; data stored noisy
        # is already at sigma_min) and for rows trained as clean under the locality rule;
        # sigma_min otherwise.
        contraction_as_clean = self.mode == "contraction" and not self.stored
        pair_sigma_min = torch.zeros_like(sigma_min) if contraction_as_clean else sigma_min
        if sigma_max is not None:
            pair_sigma_min = torch.where(sigma < sigma_max, torch.zeros_like(pair_sigma_min), pair_sigma_min)
        y_t, y_tmin = noisy_pair(
            images,
            sigma,
            pair_sigma_min,
            "ve",
            sample_ids=sample_ids if self.fixed_noise else None,
            noise_seed=self.noise_seed,
            generator=generator,
            eta_seeds=eta_seeds,
            stored=self.stored,
            validate=self.validate,
        )
        pred = net(y_t, sigma, labels)
        return ambient_loss(
            pred,
            y_t.to(pred.dtype),
            y_tmin.to(pred.dtype),
            sigma,
            sigma_min,
            sigma_max=sigma_max,
            s_max=self.s_max,
            buffer=self.buffer,
            mode=self.mode,
            weight="edm",
            sigma_data=self.sigma_data,
            reduction="none",
            backend=self.backend,
            validate=self.validate,
        )
