"""EDM-convention ambient losses: drop-in for EDM / Ambient-o / Ambient Dataloops training loops.

ANCHORS 1.1-1.4, SPEC 2. Per sample i with nature level ``sigma_tn`` and training level ``sigma``:

    x_tn   = x0 + sigma_tn * n_i                       (n_i: frozen per-image noise)
    x_t    = x_tn + sqrt(sigma^2 - sigma_tn^2) * z     (z: fresh)
    D      = net(x_t, sigma)
    loss   = lambda_EDM * sigma^4/(sigma^2 - sigma_tn^2)^2 * |(1 - r^2) D + r^2 x_t - x_tn|^2,
             r = sigma_tn / sigma,  lambda_EDM = (sigma^2 + sd^2) / (sigma sd)^2

which is exactly ``lambda_EDM * (D + b x_t + c x_tn)^2`` with the VE-x0 coefficients
``b = sm^2/(s^2-sm^2)``, ``c = -s^2/(s^2-sm^2)`` of :func:`ambient_fast.ambient_coefficients`
(multiply the anchors' bracket by ``s^2/(s^2-sm^2)``). We evaluate that factored form.

Two reductions, both summing to the same number under the EDM loop's ``loss.sum()``:

- ``reduction="none"`` (EDM convention): the per-element loss ``(B, C, H, W)``. The fused op
  of the engine reduces inside the kernel, so it cannot give this; instead one autograd
  function computes the residual from the same coefficients and stores only ``2 w r`` for
  the backward (one saved tensor, no graph of intermediates; ``torch.compile`` fuses it).
- ``reduction="per_sample"``: ``(B,)`` per-sample *sums* through the fused
  :func:`ambient_fast.ambient_loss` kernel (per-sample mean times the element count), so
  ``loss.sum().mul(loss_scaling / batch_gpu_total).backward()`` is unchanged.

Rows whose ``sigma <= sigma_tn`` (with ``sigma_tn > 0``) cannot be trained: the anchors give
NaN/Inf there (their sampler never produces such rows); here they are exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from ..core.coefficients import ambient_coefficients
from ..core.noise import STREAM_NATURE, derive_seeds, sample_normal
from ..core.schedules import EDM_P_MEAN, EDM_P_STD, SIGMA_DATA, lambda_edm
from ..loss import ambient_loss

__all__ = [
    "SIGMA_TN_RULES",
    "nature_sigma",
    "ambient_elementwise_loss",
    "SigmaLogVariance",
    "EDMAmbientLoss",
    "AmbientEDMLoss",
    "LossTerms",
]

SigmaTnRule = Literal["dataloops", "omni", "edm2"]
SIGMA_TN_RULES: tuple[str, ...] = ("dataloops", "omni", "edm2")
Reduction = Literal["none", "per_sample"]


def nature_sigma(
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    sigma_max: torch.Tensor | None = None,
    rule: SigmaTnRule = "dataloops",
) -> torch.Tensor:
    """The nature level ``sigma_tn`` the anchors train each sample at (ANCHORS 1.2, 1.3).

    Args:
        sigma: ``(B,)`` training level drawn by the sampler.
        sigma_min, sigma_max: ``(B,)`` the sample's annotation (``sigma_max`` None = 0).
        rule: ``"dataloops"`` (Ambient Dataloops pixel): ``0 if sigma < sigma_max else
            sigma_min``; ``"omni"`` (Ambient-o pixel as released):
            ``m = min(sigma_min, sigma_max)``, ``0 if m > sigma else m`` (fixed and classifier
            annotations store ``sigma_max = 0``, so this is the contraction-only loss);
            ``"edm2"`` (Ambient-o ImageNet latents): ``0 if sigma <= sigma_min else sigma_min``.

    Returns:
        ``(B,)`` in ``sigma``'s dtype.
    """
    sm = sigma_min.to(sigma.dtype)
    smax = torch.zeros_like(sm) if sigma_max is None else sigma_max.to(sigma.dtype)
    zero = torch.zeros_like(sm)
    if rule == "dataloops":
        return torch.where(sigma < smax, zero, sm)
    if rule == "omni":
        m = torch.minimum(sm, smax)
        return torch.where(m > sigma, zero, m)
    if rule == "edm2":
        return torch.where(sigma <= sm, zero, sm)
    raise ValueError(f"sigma_tn rule must be one of {SIGMA_TN_RULES}, got {rule!r}")


def _per_sample(name: str, levels: torch.Tensor, batch: int) -> torch.Tensor:
    """``levels`` as a flat ``(batch,)`` tensor; refuses any other element count (no broadcasting)."""
    if levels.numel() != batch:
        raise ValueError(f"{name}: expected one level per sample ({batch}), got shape {tuple(levels.shape)}")
    return levels.reshape(batch)


class _SquaredResidual(torch.autograd.Function):
    """``w (D + b x_t + c x_tn)^2`` per element; saves ``2 w r`` for the backward only."""

    @staticmethod
    def forward(ctx: Any, denoised, x_t, x_tn, b, c, weight):  # type: ignore[override]
        dt = b.dtype
        residual = torch.addcmul(denoised.to(dt), b, x_t.to(dt))
        residual.addcmul_(c, x_tn.to(dt))
        grad_denoised = residual * (2 * weight)
        ctx.save_for_backward(grad_denoised, b, c)
        ctx.in_dtypes = (denoised.dtype, x_t.dtype, x_tn.dtype)
        return residual.square_().mul_(weight)

    @staticmethod
    def backward(ctx: Any, grad_out):  # type: ignore[override]
        grad_denoised, b, c = ctx.saved_tensors
        g = grad_out.to(grad_denoised.dtype) * grad_denoised
        d_dtype, t_dtype, tn_dtype = ctx.in_dtypes
        need = ctx.needs_input_grad
        return (
            g.to(d_dtype) if need[0] else None,
            (g * b).to(t_dtype) if need[1] else None,
            (g * c).to(tn_dtype) if need[2] else None,
            None,
            None,
            None,
        )


def ambient_elementwise_loss(
    denoised: torch.Tensor,
    x_t: torch.Tensor,
    x_tn: torch.Tensor,
    sigma: torch.Tensor,
    sigma_tn: torch.Tensor,
    *,
    sigma_data: float = SIGMA_DATA,
) -> torch.Tensor:
    """The anchors' per-element ambient loss (ANCHORS 1.1) from our coefficients (SPEC 2).

    Args:
        denoised: ``(B, ...)`` x0 estimate ``D(x_t, sigma)``; gradients flow to it (and to
            ``x_t``/``x_tn`` if they require grad).
        x_t: ``(B, ...)`` network input at ``sigma``.  x_tn: ``(B, ...)`` the sample at
            ``sigma_tn``.
        sigma, sigma_tn: ``(B,)`` (or any shape with B elements) levels; ``sigma > 0``.
        sigma_data: EDM sigma_data of ``lambda_EDM``.

    Returns:
        ``(B, ...)`` float32 (float64 for float64 ``denoised``):
        ``lambda_EDM (D + b x_t + c x_tn)^2``; rows with ``0 < sigma_tn`` and
        ``sigma <= sigma_tn`` are 0.
    """
    dt = torch.float64 if denoised.dtype == torch.float64 else torch.float32
    batch = denoised.shape[0]
    view = (-1,) + (1,) * (denoised.dim() - 1)
    s = _per_sample("sigma", sigma, batch).to(dt).reshape(view)
    sm = _per_sample("sigma_tn", sigma_tn, batch).to(dt).reshape(view)
    trained = (sm == 0) | (s > sm)
    sm_eff = torch.where(trained, sm, torch.zeros_like(sm))
    _, b, c = ambient_coefficients(s, sm_eff, "ve", "x0")
    weight = torch.where(trained, lambda_edm(s, sigma_data), torch.zeros_like(s))
    return _SquaredResidual.apply(denoised, x_t, x_tn, b, c, weight)


class SigmaLogVariance(nn.Module):
    """EDM2-style learned log-variance ``u(sigma)`` for uncertainty weighting (Karras et al. 2024).

    ``u(sigma) = head(sqrt(2) cos(2 pi (f c_noise + p)))`` with ``c_noise = ln(sigma)/4``,
    fixed random frequencies ``f ~ N(0, bandwidth^2)`` and phases ``p ~ U(0, 1)`` drawn from
    a private generator (``seed``), and ``head`` a linear layer (EDM2) or, with
    ``hidden_channels > 0``, a one-hidden-layer SiLU MLP. The last layer starts at zero, so
    at initialisation ``u = 0`` and the weighted loss equals the plain one.

    ``forward(sigma)``: ``sigma`` with B elements (any shape) -> ``(B,)`` float32.
    Its parameters must be given to the optimiser (they live in the loss, not the net).
    """

    def __init__(
        self,
        fourier_channels: int = 128,  # number of Fourier features (EDM2: 128)
        hidden_channels: int = 0,  # 0 = linear head as EDM2; > 0 = one SiLU hidden layer
        bandwidth: float = 1.0,  # std of the frequencies
        seed: int = 0,  # seed of the fixed frequencies and phases
    ) -> None:
        super().__init__()
        if fourier_channels < 1 or hidden_channels < 0:
            raise ValueError(
                f"fourier_channels must be >= 1 and hidden_channels >= 0, got {fourier_channels}, {hidden_channels}"
            )
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(fourier_channels, generator=gen) * bandwidth)
        self.register_buffer("phases", torch.rand(fourier_channels, generator=gen))
        if hidden_channels > 0:
            last = nn.Linear(hidden_channels, 1)
            self.head: nn.Module = nn.Sequential(nn.Linear(fourier_channels, hidden_channels), nn.SiLU(), last)
        else:
            last = nn.Linear(fourier_channels, 1)
            self.head = last
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        c_noise = torch.log(sigma.reshape(-1).to(torch.float32)) / 4
        angle = 2 * math.pi * (torch.outer(c_noise, self.freqs.float()) + self.phases.float())
        return self.head(torch.cos(angle) * math.sqrt(2.0)).reshape(-1)


class LossTerms(NamedTuple):
    """One batch's loss and the tensors the anchors' training loop keeps for its logs.

    ``loss``: ``(B, ...)`` per element or ``(B,)`` per sample; ``x0_pred``: ``(B, ...)`` the
    network's x0 estimate; ``sigma``: ``(B, 1, ..., 1)`` training levels; ``x_t``: ``(B, ...)``
    the network input (the anchors' ``noisy_input``); ``x_tn``: ``(B, ...)`` the sample at its
    nature level.
    """

    loss: torch.Tensor
    x0_pred: torch.Tensor
    sigma: torch.Tensor
    x_t: torch.Tensor
    x_tn: torch.Tensor


class _AmbientLossBase(nn.Module):
    """Shared evaluation: net call, loss reduction, uncertainty weighting."""

    def __init__(
        self,
        sigma_data: float,
        reduction: Reduction,
        uncertainty: SigmaLogVariance | Literal["net"] | None,
        backend: str,
        validate: bool,
    ) -> None:
        super().__init__()
        if reduction not in ("none", "per_sample"):
            raise ValueError(f"reduction must be 'none' or 'per_sample', got {reduction!r}")
        if not (uncertainty is None or uncertainty == "net" or isinstance(uncertainty, SigmaLogVariance)):
            raise ValueError(f"uncertainty must be None, 'net' or a SigmaLogVariance, got {uncertainty!r}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = float(sigma_data)
        self.reduction: Reduction = reduction
        self.logvar = uncertainty if isinstance(uncertainty, SigmaLogVariance) else None
        self.logvar_from_net = uncertainty == "net"
        self.backend = backend
        self.validate = validate

    def _evaluate(
        self,
        net: Callable[..., Any],
        x_t: torch.Tensor,
        x_tn: torch.Tensor,
        sigma: torch.Tensor,
        sigma_tn: torch.Tensor,
        labels: Any,
        augment_labels: Any,
    ) -> LossTerms:
        view = (-1,) + (1,) * (x_t.dim() - 1)
        sigma_net = sigma.reshape(view)
        kwargs: dict[str, Any] = {} if augment_labels is None else {"augment_labels": augment_labels}
        if self.logvar_from_net:
            denoised, logvar = net(x_t, sigma_net, labels, return_logvar=True, **kwargs)
            logvar = logvar.reshape(-1)
        else:
            denoised = net(x_t, sigma_net, labels, **kwargs)
            logvar = self.logvar(sigma) if self.logvar is not None else None
        if self.reduction == "none":
            loss = ambient_elementwise_loss(denoised, x_t, x_tn, sigma, sigma_tn, sigma_data=self.sigma_data)
            if logvar is not None:
                lv = logvar.to(loss.dtype).reshape(view)
                loss = loss / lv.exp() + lv
        else:
            numel = math.prod(x_t.shape[1:])
            flat = sigma.reshape(-1)
            per_sample = ambient_loss(
                denoised,
                x_t.to(denoised.dtype),
                x_tn.to(denoised.dtype),
                flat,
                sigma_tn.reshape(-1).to(flat.dtype),
                s_max=math.inf,  # the anchors' loss trains every row with sigma > sigma_tn
                weight="edm",
                sigma_data=self.sigma_data,
                reduction="none",
                backend=self.backend,  # type: ignore[arg-type]
                validate=self.validate,
            )
            if logvar is not None:
                lv = logvar.to(per_sample.dtype)
                per_sample = per_sample / lv.exp() + lv
            loss = per_sample * numel
        return LossTerms(loss, denoised, sigma_net, x_t, x_tn)


def _fresh_normal(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``torch.randn_like(like)`` (the anchors' draw), from ``generator`` when given."""
    return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)


class EDMAmbientLoss(_AmbientLossBase):
    """EDM's loss calling convention with the anchors' ambient loss (ANCHORS 1.1-1.4, SPEC 2).

    ``loss = loss_fn(net=net, images=images, labels=labels, augment_pipe=augment_pipe, ...)``
    then, unchanged, ``loss.sum().mul(loss_scaling / batch_gpu_total).backward()``.

    Without ``sigma_min`` this is exactly EDM's ``EDMLoss`` (same random draws in the same
    order: ``ln sigma ~ N(P_mean, P_std^2)`` as a ``(B,1,1,1)`` draw, then the noise), so a
    seed gives the same numbers. With annotations it is the anchors' ambient loss:
    ``sigma_tn`` from ``(sigma, sigma_min, sigma_max)`` by ``sigma_tn_rule``, augmentation
    before the nature noise, ``x_tn = augment(images) + sigma_tn * noise``.

    ``net(x, sigma, labels[, augment_labels=...])`` is called as EDM does: ``sigma`` shaped
    ``(B, 1, ..., 1)``; ``augment_labels`` only when an ``augment_pipe`` gives them; with
    ``uncertainty="net"`` the net is called with ``return_logvar=True`` (EDM2) and returns
    ``(D, logvar)``. ``stored_noisy=True`` is the anchors' ``/npy`` case (``add_noise=False``):
    the images already are ``x_tn``, so no nature noise is added (``noise``/``sample_ids``
    are not needed) while ``sigma_tn`` still follows the rule.
    """

    def __init__(
        self,
        P_mean: float = EDM_P_MEAN,  # ln sigma mean when the sampler gives no sigma
        P_std: float = EDM_P_STD,  # ln sigma std
        sigma_data: float = SIGMA_DATA,  # EDM sigma_data
        *,
        sigma_tn_rule: SigmaTnRule = "dataloops",  # see nature_sigma()
        reduction: Reduction = "none",  # "none" = (B,C,H,W) EDM; "per_sample" = (B,) fused
        uncertainty: SigmaLogVariance | Literal["net"] | None = None,  # EDM2 weighting
        noise_seed: int = 0,  # run seed of the frozen noise when sample_ids are given
        stored_noisy: bool = False,  # images are already x_tn (the anchors' /npy datasets): add no nature noise
        backend: str = "auto",  # fused-op backend of reduction="per_sample"
        validate: bool = True,  # eager input checks of the fused op (host sync)
    ) -> None:
        super().__init__(sigma_data, reduction, uncertainty, backend, validate)
        if sigma_tn_rule not in SIGMA_TN_RULES:
            raise ValueError(f"sigma_tn_rule must be one of {SIGMA_TN_RULES}, got {sigma_tn_rule!r}")
        if not P_std > 0:
            raise ValueError(f"P_std must be > 0, got {P_std}")
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.sigma_tn_rule: SigmaTnRule = sigma_tn_rule
        self.noise_seed = int(noise_seed)
        self.stored_noisy = bool(stored_noisy)

    def forward(
        self,
        net: Callable[..., Any],
        images: torch.Tensor,
        labels: Any = None,
        augment_pipe: Callable[[torch.Tensor], tuple[torch.Tensor, Any]] | None = None,
        *,
        sigma: torch.Tensor | None = None,
        sigma_min: torch.Tensor | None = None,
        sigma_max: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        sample_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Loss of one batch: ``(B, ...)`` per element, or ``(B,)`` per-sample sums.

        Args:
            net: EDM denoiser (``EDMPrecond``-like), possibly wrapped in DDP.
            images: ``(B, ...)`` dataset images in data units (EDM: [-1, 1]).
            labels: conditioning passed to ``net`` unchanged.
            augment_pipe: EDM ``AugmentPipe``: ``images -> (augmented, augment_labels)``.
            sigma: ``(B,)`` training levels from the noise-level-first sampler; None draws
                the EDM log-normal.
            sigma_min, sigma_max: ``(B,)`` per-image annotations (None = clean, plain EDM).
            noise: ``(B, ...)`` frozen per-image noise ``n_i`` (the anchors' dataset item
                ``"noise"``), or
            sample_ids: ``(B,)`` int image ids: ``n_i`` from the engine's counter-based
                generator (the same noise as ``ambient_fast.noisy_pair``). One of the two is
                required with ``sigma_min``.
            generator: for the sigma draw and the fresh noise ``z`` (None = global RNG, as EDM).
        """
        return self.terms(
            net,
            images,
            labels,
            augment_pipe,
            sigma=sigma,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            noise=noise,
            sample_ids=sample_ids,
            generator=generator,
        ).loss

    def terms(
        self,
        net: Callable[..., Any],
        images: torch.Tensor,
        labels: Any = None,
        augment_pipe: Callable[[torch.Tensor], tuple[torch.Tensor, Any]] | None = None,
        *,
        sigma: torch.Tensor | None = None,
        sigma_min: torch.Tensor | None = None,
        sigma_max: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        sample_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossTerms:
        """:meth:`forward`'s loss with the loop's logged tensors: ``(loss, x0_pred, sigma, x_t, x_tn)``.

        Same arguments as :meth:`forward`. The anchors' loop body becomes
        ``loss, x0_pred, sigma, noisy_input, x_tn = loss_fn.terms(...)``, so its image logs
        and per-bucket statistics keep their inputs (see ``docs/switching_from_edm.md``).
        """
        batch = images.shape[0]
        view = (-1,) + (1,) * (images.dim() - 1)
        # Draw the noise level (EDM: a (B,1,1,1) normal before anything else).
        if sigma is None:
            rnd_normal = torch.randn((batch,) + (1,) * (images.dim() - 1), device=images.device, generator=generator)
            sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        sigma = _per_sample("sigma", sigma, batch).to(device=images.device)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        sigma = sigma.to(y.dtype)
        # Nature noise at the sample's own level (ANCHORS 1.4), then fresh noise up to sigma.
        if sigma_min is None:
            sigma_tn = torch.zeros_like(sigma)
            x_tn = y
            x_t = y + _fresh_normal(y, generator) * sigma.reshape(view)
        else:
            sigma_tn = nature_sigma(
                sigma, sigma_min.to(y.device), None if sigma_max is None else sigma_max.to(y.device), self.sigma_tn_rule
            )
            if self.stored_noisy:  # the anchors' add_noise=False: the stored sample is x_tn
                nature = torch.zeros_like(y)
            elif noise is not None:
                nature = noise.to(device=y.device, dtype=y.dtype)
            elif sample_ids is not None:
                seeds = derive_seeds(sample_ids.to(y.device), self.noise_seed)
                nature = sample_normal(seeds, y.shape[1:], stream=STREAM_NATURE, dtype=y.dtype)
            else:
                raise ValueError(
                    "EDMAmbientLoss: with sigma_min, pass the frozen per-image noise (noise=) or "
                    "image ids (sample_ids=) so that x_tn is the same every epoch (ANCHORS 1.4)"
                )
            x_tn = y + nature * sigma_tn.reshape(view)
            extra = torch.sqrt(torch.clamp(sigma * sigma - sigma_tn * sigma_tn, min=0))
            x_t = x_tn + _fresh_normal(x_tn, generator) * extra.reshape(view)
        return self._evaluate(net, x_t, x_tn, sigma, sigma_tn, labels, augment_labels)


class AmbientEDMLoss(_AmbientLossBase):
    """Drop-in for the anchors' ``training.loss.AmbientEDMLoss`` (same call, same returns).

    ``loss, x0_pred, sigma_t, x_t = loss_fn(net=ddp, x0=x0, x_tn=x_tn, sigma_tn=sigma_tn,
    sigma_t=sigma_t, labels=labels, augment_labels=augment_labels, cls_labels=...)`` as in
    the Ambient-o / Dataloops ``training_loop.py``; ``x_tn`` is formed by the loop.
    ``sigma_t`` is returned as ``(B, 1, 1, 1)``; ``loss`` is ``(B, ...)`` per element (or
    ``(B,)`` per-sample sums with ``reduction="per_sample"``). Unused keywords (``x0``,
    ``cls_labels``) are accepted and ignored, as the anchors do. Rows with
    ``sigma_t <= sigma_tn > 0`` give 0 instead of the anchors' NaN.
    """

    def __init__(
        self,
        P_mean: float = EDM_P_MEAN,  # accepted for signature compatibility (sigma comes from the loop)
        P_std: float = EDM_P_STD,  # idem
        sigma_data: float = SIGMA_DATA,  # EDM sigma_data
        *,
        reduction: Reduction = "none",
        uncertainty: SigmaLogVariance | Literal["net"] | None = None,
        backend: str = "auto",
        validate: bool = True,
    ) -> None:
        super().__init__(sigma_data, reduction, uncertainty, backend, validate)
        self.P_mean, self.P_std = float(P_mean), float(P_std)

    def forward(
        self,
        net: Callable[..., Any],
        x_tn: torch.Tensor,
        sigma_tn: torch.Tensor,
        sigma_t: torch.Tensor,
        labels: Any = None,
        augment_labels: Any = None,
        *args: Any,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, x0_pred, sigma_t (B,1,..,1), x_t)`` for ``x_tn (B, ...)``, levels ``(B,)``."""
        view = (-1,) + (1,) * (x_tn.dim() - 1)
        batch = x_tn.shape[0]
        s = _per_sample("sigma_t", sigma_t, batch).to(device=x_tn.device, dtype=x_tn.dtype)
        sm = _per_sample("sigma_tn", sigma_tn, batch).to(device=x_tn.device, dtype=x_tn.dtype)
        extra = torch.sqrt(torch.clamp(s * s - sm * sm, min=0))
        x_t = x_tn + _fresh_normal(x_tn, generator) * extra.reshape(view)
        return tuple(self._evaluate(net, x_t, x_tn, s, sm, labels, augment_labels)[:4])  # type: ignore[return-value]
