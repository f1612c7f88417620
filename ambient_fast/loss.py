"""The public ambient loss (SPEC 2): ``ambient_loss`` and the EDM-style ``AmbientLoss``.

This module sits above both halves of the loss: the plain-PyTorch reference and its options
(``core.loss``) and the fused op with its CUDA (Triton) and CPU (C++) kernels
(``kernels/ambient_loss.py``). It checks what costs no sync (types, shapes, dtypes, devices,
options), picks the kernel (``backend=``), and lets the fused pass check the values: NaN/Inf
in the data, invalid or overflowing levels, losses and gradients that overflow. With the
default ``validate=True`` that costs nothing extra on CPU (the C++ kernel returns its flags)
and one B-element reduction plus one host sync on CUDA; ``validate=False`` drops it, and
``torch.compile`` and CUDA-graph capture skip it. The reference backend (``backend="torch"``,
and inputs other than ``pred`` that need a gradient) runs the reference checks instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch

from .core.coefficients import eligibility_rule, eligible
from .core.loss import REDUCTIONS, per_sample_loss_reference, resolve_config
from .core.noise import noisy_pair
from .core.schedules import EDM_P_MEAN, EDM_P_STD, SIGMA_DATA, edm_training_sigmas
from .core.validation import (
    DATA_DTYPES,
    active,
    check_finite,
    check_per_sample,
    check_per_sample_layout,
    check_same_layout,
    check_sigma_pair,
    first_bad_index,
)
from .kernels.ambient_loss import fused_ambient_loss
from .kernels.dispatch import resolve_kernel

__all__ = ["AmbientLoss", "ambient_loss"]

Schedule = Literal["ve", "vp"]
Target = Literal["x0", "eps"]


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
            ``(B, T, D)`` trajectories); fp16/bf16/fp32/fp64; ``B >= 1``.
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
        validate: value checks, in the fused kernel's own pass (see the module docstring;
            skipped automatically under ``torch.compile`` and CUDA-graph capture). Each
            problem is one ``ValueError`` naming the argument and the first bad sample:
            NaN/Inf in ``pred``/``y_t``/``y_tmin``/levels/``weight``; ``sigma <= 0``,
            ``sigma_min < 0``, ``sigma_max < 0``, VP levels >= 1; levels whose coefficients
            overflow the compute dtype (float32 for every input dtype but float64: keep
            ``1e-15 < sigma < 1e15``; a float64 level that overflows on the cast to float32 is
            caught here); a loss that overflows; a gradient that overflows ``pred``'s dtype
            (float16 close to the ``sigma -> sigma_min`` pole with ``s_max=inf`` or
            ``buffer=0``). Types and shapes are checked always (no sync): a Python number where
            a tensor belongs is a ``TypeError`` naming the argument; an empty batch is a
            ``ValueError``. Rows that do not train get loss 0 and gradient 0 exactly.

    Returns:
        float32 scalar (float64 for float64 inputs), or ``(B,)`` for ``reduction="none"``.
        With the fused kernels and ``reduction`` "mean"/"sum", the forward pass already writes
        the gradient of the reduced loss: ``loss.backward()`` costs no second pass.
    """
    cfg = resolve_config(schedule, target, mode, s_max, buffer, weight, sigma_data)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum', 'none' or 'mean_trained', got {reduction!r}")
    tensor_weight = weight if isinstance(weight, torch.Tensor) else None
    _check_layout(pred, y_t, y_tmin, sigma, sigma_min, sigma_max, tensor_weight)
    batch, device = pred.shape[0], pred.device
    kernel = resolve_kernel(backend, device)
    checks = active(validate)
    if kernel != "torch" and not _other_inputs_need_grad(y_t, y_tmin, sigma, sigma_min, sigma_max, tensor_weight):
        return fused_ambient_loss(
            pred, y_t, y_tmin, sigma, sigma_min, sigma_max, tensor_weight, cfg,
            kernel=kernel, check=checks, reduction=reduction, operands_checked=True,
        )
    # Reference backend (also for gradients with respect to inputs other than pred).
    if sigma_max is None:
        sigma_max = torch.zeros(batch, dtype=sigma.dtype, device=device)
    if checks:
        check_sigma_pair(sigma, sigma_min, pred, schedule, sigma_max)
        for name, t in (("pred", pred), ("y_t", y_t), ("y_tmin", y_tmin)):
            check_finite(name, t)
        if tensor_weight is not None:
            check_per_sample("weight", tensor_weight, batch, device)
    per_sample = per_sample_loss_reference(pred, y_t, y_tmin, sigma, sigma_min, sigma_max, tensor_weight, cfg)
    if checks and not bool(torch.isfinite(per_sample).all()):
        i = first_bad_index(~torch.isfinite(per_sample))
        raise ValueError(
            f"sigma: the loss of sample {i} is not finite in {per_sample.dtype} (sigma={float(sigma[i]):.6g}, "
            f"sigma_min={float(sigma_min[i]):.6g}): the levels or the data overflow the compute dtype"
        )
    if reduction == "none":
        return per_sample
    if checks and not bool(eligible(sigma, sigma_min, sigma_max, s_max, buffer).any()):
        warnings.warn("ambient_loss: no sample in the batch is eligible at its sigma; the loss is 0", stacklevel=2)
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    trained = (per_sample != 0).sum().clamp(min=1)
    return per_sample.sum() / trained


def _check_layout(
    pred: object,
    y_t: object,
    y_tmin: object,
    sigma: object,
    sigma_min: object,
    sigma_max: object,
    weight: torch.Tensor | None,
) -> None:
    """Types, shapes, dtypes and devices of the operands (no sync; the values are checked later).

    The loss runs every training step, so the common case is one compound test; only when it
    fails do the detailed checks run to name the argument (``check_same_layout``,
    ``check_per_sample_layout``).
    """
    if (
        isinstance(pred, torch.Tensor)
        and isinstance(y_t, torch.Tensor)
        and isinstance(y_tmin, torch.Tensor)
        and isinstance(sigma, torch.Tensor)
        and isinstance(sigma_min, torch.Tensor)
        and sigma_max is None
        and weight is None
        and pred.dim() >= 1
    ):
        shape, dtype, device = pred.shape, pred.dtype, pred.device
        batch = shape[:1]
        if (
            shape[0] >= 1
            and dtype in DATA_DTYPES
            and y_t.shape == shape
            and y_tmin.shape == shape
            and y_t.dtype == dtype
            and y_tmin.dtype == dtype
            and y_t.device == device
            and y_tmin.device == device
            and sigma.shape == batch
            and sigma_min.shape == batch
            and sigma.is_floating_point()
            and sigma_min.is_floating_point()
            and sigma.device == device
            and sigma_min.device == device
        ):
            return
    # The detailed checks: each failure names its argument (these also cover sigma_max, weight).
    check_same_layout("pred", pred, y_t=y_t, y_tmin=y_tmin)
    batch, device = pred.shape[0], pred.device
    check_per_sample_layout("sigma", sigma, batch, device)
    check_per_sample_layout("sigma_min", sigma_min, batch, device)
    if sigma_max is not None:
        check_per_sample_layout("sigma_max", sigma_max, batch, device)
    if weight is not None:
        check_per_sample_layout("weight", weight, batch, device)


def _other_inputs_need_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd needs a gradient the fused op does not give (it differentiates pred only)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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
        # Rows below their own sigma_min do not train; their pair is formed at 0 (noisy_pair
        # refuses sigma < sigma_min).
        pair_sigma_min = torch.where(sigma < pair_sigma_min, torch.zeros_like(pair_sigma_min), pair_sigma_min)
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
