"""Fused CPU ops (SPEC 2 and 4) backed by the native extension ``ambient_fast._C`` (csrc/).

The extension is plain pybind11 with no torch headers (see csrc/ARCHITECTURE.md): it takes
data pointers, row strides and dtype names. This module is its only caller. It validates
every operand, keeps the tensors alive for the call, and registers the kernels as torch
custom ops for CPU, each with a fake (meta) implementation so that ``torch.compile`` and
``torch.export`` treat them as opaque nodes:

- ``ambient_fast::ambient_loss_cpp``: per-sample loss ``(B,)`` (no gradient).
- ``ambient_fast::ambient_loss_fused_cpp``: ``(loss (B,), grad (B, ...))``, where ``grad`` is
  ``d sum_i loss_i / d pred``, written in the same pass. Its autograd formula scales ``grad``
  by the upstream gradient, so training costs one pass over the data plus one multiply.
- ``ambient_fast::{euler,heun,churn,ancestral}_step_cpp``: one fused solver update each.

The functions the dispatcher uses (``ambient_loss_cpp`` and the ``*_step_cpp`` functions) have
exactly the signatures of ``core.loss.per_sample_loss_reference`` and ``core.solver_step``.

Limits: the kernels read each sample as one contiguous run of elements with any batch
stride (batch slices and expanded rows need no copy); other layouts get one contiguous copy.
Operands of different dtypes are first converted to the compute dtype (one copy each), which
is exactly what the reference computes in. The fused loss differentiates with respect to
``pred`` only; when any other input requires grad, ``ambient_loss_cpp`` uses the reference.
The step ops are not differentiable (the samplers run under ``torch.no_grad``).
"""

import math

import torch

from ..core.loss import LossConfig, per_sample_loss_reference

try:
    from .. import _C
except ImportError as exc:  # built with AMBIENT_FAST_NO_EXT=1, or no compiler at install time
    _C = None
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
else:
    _LOAD_ERROR = ""

__all__ = [
    "available",
    "load_error",
    "ambient_loss_cpp",
    "euler_step_cpp",
    "heun_step_cpp",
    "churn_step_cpp",
    "ancestral_step_cpp",
]

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


def available() -> bool:
    """Whether the native extension ``ambient_fast._C`` imported."""
    return _C is not None


def load_error() -> str:
    """Why ``ambient_fast._C`` did not import ("" when it did)."""
    return _LOAD_ERROR


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_batch(name: str, tensors: dict) -> tuple[int, int]:
    """Same shape ``(B, ...)``, floating dtype, CPU; returns ``(B, elements per sample)``."""
    first_name, first = next(iter(tensors.items()))
    if first.dim() < 1:
        raise ValueError(f"{name}: {first_name} must be batched (B, ...), got a 0-d tensor")
    for arg, t in tensors.items():
        if not t.is_cpu:
            raise ValueError(f"{name}: {arg} must be a CPU tensor, got {t.device}")
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: {arg} has unsupported dtype {t.dtype} (use fp16/bf16/fp32/fp64)")
        if t.shape != first.shape:
            raise ValueError(f"{name}: {arg} shape {tuple(t.shape)} differs from {first_name}'s {tuple(first.shape)}")
    return first.shape[0], math.prod(first.shape[1:])


def _levels(name: str, arg: str, t: torch.Tensor, batch: int) -> torch.Tensor:
    """A ``(B,)`` level vector as contiguous float64 (what the kernels read)."""
    if t.shape != (batch,):
        raise ValueError(f"{name}: {arg} must have shape ({batch},), got {tuple(t.shape)}")
    if not (t.is_cpu and t.is_floating_point()):
        raise ValueError(f"{name}: {arg} must be a floating CPU tensor, got {t.dtype} on {t.device}")
    return t.to(torch.float64).contiguous()


def _same_dtype(tensors: list[torch.Tensor], reference: torch.Tensor) -> list[torch.Tensor]:
    """All of ``tensors`` in one storage dtype: unchanged when they share the reference's
    dtype, else converted to its compute dtype (the dtype the reference computes in)."""
    if all(t.dtype == reference.dtype for t in tensors):
        return tensors
    compute = _compute_dtype(reference.dtype)
    return [t.to(compute) for t in tensors]


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(tensor, (data pointer, row stride))`` with each sample's elements contiguous.

    Any batch stride is kept (slices, expanded rows); other layouts get a contiguous copy.
    The returned tensor must stay referenced until the kernel returns.
    """
    if not t.is_contiguous() and t.dim() > 1 and t.shape[0] > 0 and not t[0].is_contiguous():
        t = t.contiguous()
    return t, (t.data_ptr(), t.stride(0))


def _run_loss(
    pred: torch.Tensor,
    y_t: torch.Tensor,
    y_tmin: torch.Tensor,
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    sigma_max: torch.Tensor,
    weight: torch.Tensor | None,
    schedule: str,
    target: str,
    contraction: bool,
    elig_scale: float,
    elig_shift: float,
    edm_weight: bool,
    sigma_data: float,
    with_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launcher of both loss ops: validates, lays out, calls ``_C.ambient_loss``.

    Returns ``(loss (B,), grad (B, ...) in pred's dtype, or None without with_grad)``.
    """
    name = "ambient_loss_cpp"
    batch, numel = _check_batch(name, {"pred": pred, "y_t": y_t, "y_tmin": y_tmin})
    levels = [
        _levels(name, arg, t, batch)
        for arg, t in (("sigma", sigma), ("sigma_min", sigma_min), ("sigma_max", sigma_max))
    ]
    w = _levels(name, "weight", weight, batch) if weight is not None else None
    operands = _same_dtype([pred, y_t, y_tmin], pred)
    storage = operands[0].dtype
    (p, p_rows), (yt, yt_rows), (ytm, ytm_rows) = (_rows(t) for t in operands)
    loss = torch.empty(batch, dtype=_compute_dtype(pred.dtype))
    grad = torch.empty(pred.shape, dtype=storage) if with_grad else None
    _C.ambient_loss(
        dtype=_DTYPE_NAMES[storage],
        batch=batch,
        numel=numel,
        loss=loss.data_ptr(),
        grad=(grad.data_ptr(), numel) if grad is not None else None,
        pred=p_rows,
        y_t=yt_rows,
        y_tmin=ytm_rows,
        sigma=levels[0].data_ptr(),
        sigma_min=levels[1].data_ptr(),
        sigma_max=levels[2].data_ptr(),
        weight=w.data_ptr() if w is not None else 0,
        schedule=schedule,
        target=target,
        contraction=contraction,
        elig_scale=elig_scale,
        elig_shift=elig_shift,
        edm_weight=edm_weight,
        sigma_data=sigma_data,
    )
    if grad is not None and grad.dtype != pred.dtype:
        grad = grad.to(pred.dtype)
    return loss, grad


def _run_step(name: str, kernel_args: dict, x: torch.Tensor, inputs: dict, levels: dict) -> torch.Tensor:
    """Shared launcher of the step ops: validates, lays out, calls ``_C.<name>``."""
    batch, numel = _check_batch(name, {"x": x, **inputs})
    level_tensors = {arg: _levels(name, arg, t, batch) for arg, t in levels.items()}
    operands = _same_dtype([x, *inputs.values()], x)
    storage = operands[0].dtype
    laid_out = [_rows(t) for t in operands]
    out = torch.empty(x.shape, dtype=storage)
    getattr(_C, name)(
        dtype=_DTYPE_NAMES[storage],
        batch=batch,
        numel=numel,
        out=(out.data_ptr(), numel),
        x=laid_out[0][1],
        **{arg: rows for arg, (_, rows) in zip(inputs, laid_out[1:], strict=True)},
        **{arg: t.data_ptr() for arg, t in level_tensors.items()},
        **kernel_args,
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)


if _C is not None:

    @torch.library.custom_op("ambient_fast::ambient_loss_cpp", mutates_args=(), device_types="cpu")
    def _ambient_loss_op(
        pred: torch.Tensor,
        y_t: torch.Tensor,
        y_tmin: torch.Tensor,
        sigma: torch.Tensor,
        sigma_min: torch.Tensor,
        sigma_max: torch.Tensor,
        weight: torch.Tensor | None,
        schedule: str,
        target: str,
        contraction: bool,
        elig_scale: float,
        elig_shift: float,
        edm_weight: bool,
        sigma_data: float,
    ) -> torch.Tensor:
        """Per-sample ambient loss ``(B,)`` float32 (float64 for float64 input), SPEC 2."""
        loss, _ = _run_loss(
            pred,
            y_t,
            y_tmin,
            sigma,
            sigma_min,
            sigma_max,
            weight,
            schedule,
            target,
            contraction,
            elig_scale,
            elig_shift,
            edm_weight,
            sigma_data,
            with_grad=False,
        )
        return loss

    @_ambient_loss_op.register_fake
    def _(pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, *options):
        return pred.new_empty((pred.shape[0],), dtype=_compute_dtype(pred.dtype))

    @torch.library.custom_op("ambient_fast::ambient_loss_fused_cpp", mutates_args=(), device_types="cpu")
    def _ambient_loss_fused_op(
        pred: torch.Tensor,
        y_t: torch.Tensor,
        y_tmin: torch.Tensor,
        sigma: torch.Tensor,
        sigma_min: torch.Tensor,
        sigma_max: torch.Tensor,
        weight: torch.Tensor | None,
        schedule: str,
        target: str,
        contraction: bool,
        elig_scale: float,
        elig_shift: float,
        edm_weight: bool,
        sigma_data: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss (B,), d sum_i loss_i / d pred (B, ...) in pred's dtype)`` in one pass, SPEC 2."""
        return _run_loss(
            pred,
            y_t,
            y_tmin,
            sigma,
            sigma_min,
            sigma_max,
            weight,
            schedule,
            target,
            contraction,
            elig_scale,
            elig_shift,
            edm_weight,
            sigma_data,
            with_grad=True,
        )

    @_ambient_loss_fused_op.register_fake
    def _(pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, *options):
        loss = pred.new_empty((pred.shape[0],), dtype=_compute_dtype(pred.dtype))
        return loss, torch.empty_like(pred, memory_format=torch.contiguous_format)

    def _fused_setup_context(ctx, inputs, output):
        _, grad = output
        ctx.mark_non_differentiable(grad)
        ctx.save_for_backward(grad)

    def _fused_backward(ctx, grad_loss, _grad_of_grad):
        if any(ctx.needs_input_grad[1:7]) or torch.is_grad_enabled():
            raise NotImplementedError(
                "ambient_fast::ambient_loss_fused_cpp gives first derivatives with respect to pred only; "
                "use ambient_loss(..., backend='torch') for other inputs or create_graph=True"
            )
        (grad,) = ctx.saved_tensors
        scale = grad_loss.reshape((-1,) + (1,) * (grad.dim() - 1))
        # One pass: the product is computed in float32 (float64) and rounded once to pred's dtype.
        return torch.mul(grad, scale, out=torch.empty_like(grad)), *([None] * 13)

    torch.library.register_autograd(
        "ambient_fast::ambient_loss_fused_cpp", _fused_backward, setup_context=_fused_setup_context
    )

    @torch.library.custom_op("ambient_fast::euler_step_cpp", mutates_args=(), device_types="cpu")
    def _euler_step_op(
        x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
    ) -> torch.Tensor:
        """Fused Euler update (SPEC 4), ``x``'s shape and dtype."""
        return _run_step("euler_step", {}, x, {"denoised": denoised}, {"sigma": sigma, "sigma_next": sigma_next})

    @torch.library.custom_op("ambient_fast::heun_step_cpp", mutates_args=(), device_types="cpu")
    def _heun_step_op(
        x: torch.Tensor,
        denoised: torch.Tensor,
        denoised_next: torch.Tensor,
        sigma: torch.Tensor,
        sigma_next: torch.Tensor,
    ) -> torch.Tensor:
        """Fused Heun second stage (SPEC 4), ``x``'s shape and dtype."""
        return _run_step(
            "heun_step",
            {},
            x,
            {"denoised": denoised, "denoised_next": denoised_next},
            {"sigma": sigma, "sigma_next": sigma_next},
        )

    @torch.library.custom_op("ambient_fast::churn_step_cpp", mutates_args=(), device_types="cpu")
    def _churn_step_op(
        x: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, sigma_hat: torch.Tensor, S_noise: float
    ) -> torch.Tensor:
        """Fused churn noise add (SPEC 4), ``x``'s shape and dtype."""
        return _run_step(
            "churn_step", {"S_noise": S_noise}, x, {"noise": noise}, {"sigma": sigma, "sigma_hat": sigma_hat}
        )

    @torch.library.custom_op("ambient_fast::ancestral_step_cpp", mutates_args=(), device_types="cpu")
    def _ancestral_step_op(
        x: torch.Tensor, denoised: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
    ) -> torch.Tensor:
        """Fused ancestral reverse-SDE step (SPEC 5), ``x``'s shape and dtype."""
        return _run_step(
            "ancestral_step",
            {},
            x,
            {"denoised": denoised, "noise": noise},
            {"sigma": sigma, "sigma_next": sigma_next},
        )

    for _op in (_euler_step_op, _heun_step_op, _churn_step_op, _ancestral_step_op):
        _op.register_fake(lambda x, *rest: torch.empty_like(x, memory_format=torch.contiguous_format))


def _require_extension() -> None:
    if _C is None:
        raise RuntimeError(f"ambient_fast._C is not built ({_LOAD_ERROR}); use backend='torch'")


def ambient_loss_cpp(
    pred: torch.Tensor,
    y_t: torch.Tensor,
    y_tmin: torch.Tensor,
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    sigma_max: torch.Tensor,
    weight: torch.Tensor | None,
    cfg: LossConfig,
) -> torch.Tensor:
    """Per-sample ambient loss on CPU; contract of ``per_sample_loss_reference`` (SPEC 2).

    Args:
        pred, y_t, y_tmin: ``(B, ...)`` same shape, fp16/bf16/fp32/fp64.
        sigma, sigma_min, sigma_max: ``(B,)`` levels (any floating dtype).
        weight: ``(B,)`` per-sample weight replacing the default, or None.
        cfg: resolved options.

    Returns:
        ``(B,)`` float32 (float64 for float64 input); rows that do not train are exactly 0.
        Differentiable in ``pred``: with grad enabled and ``pred.requires_grad`` the gradient
        is written during the forward pass (fused op).
    """
    _require_extension()
    args = (
        pred,
        y_t,
        y_tmin,
        sigma,
        sigma_min,
        sigma_max,
        weight,
        cfg.schedule,
        cfg.target,
        bool(cfg.contraction),
        float(cfg.elig_scale),
        float(cfg.elig_shift),
        bool(cfg.edm_weight),
        float(cfg.sigma_data),
    )
    if torch.is_grad_enabled():
        others = (y_t, y_tmin, sigma, sigma_min, sigma_max, weight)
        if any(t is not None and t.requires_grad for t in others):
            return per_sample_loss_reference(pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg)
        if pred.requires_grad:
            return torch.ops.ambient_fast.ambient_loss_fused_cpp(*args)[0]
    return torch.ops.ambient_fast.ambient_loss_cpp(*args)


def euler_step_cpp(
    x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """Fused Euler update; contract of ``core.solver_step.euler_step`` (SPEC 4).

    ``x``, ``denoised``: ``(B, ...)``; ``sigma > 0``, ``sigma_next``: ``(B,)``. Returns ``x``'s dtype.
    """
    _require_extension()
    return torch.ops.ambient_fast.euler_step_cpp(x, denoised, sigma, sigma_next)


def heun_step_cpp(
    x: torch.Tensor,
    denoised: torch.Tensor,
    denoised_next: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
) -> torch.Tensor:
    """Fused Heun second stage; contract of ``core.solver_step.heun_step`` (SPEC 4).

    Rows with ``sigma_next == 0`` return the Euler point and never read ``denoised_next``.
    """
    _require_extension()
    return torch.ops.ambient_fast.heun_step_cpp(x, denoised, denoised_next, sigma, sigma_next)


def churn_step_cpp(
    x: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, sigma_hat: torch.Tensor, S_noise: float = 1.0
) -> torch.Tensor:
    """Fused churn ``x + sqrt(sigma_hat^2 - sigma^2) S_noise noise``; contract of
    ``core.solver_step.churn_step`` (SPEC 4)."""
    _require_extension()
    return torch.ops.ambient_fast.churn_step_cpp(x, noise, sigma, sigma_hat, float(S_noise))


def ancestral_step_cpp(
    x: torch.Tensor,
    denoised: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
) -> torch.Tensor:
    """Fused ancestral reverse-SDE step; contract of ``core.solver_step.ancestral_step`` (SPEC 5)."""
    _require_extension()
    return torch.ops.ambient_fast.ancestral_step_cpp(x, denoised, noise, sigma, sigma_next)
