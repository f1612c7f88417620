# Fused ambient loss, forward and backward in one pass (SPEC 2).
#
#   loss_i = m_i * w_i * mean_j r_ij^2,   r_ij = a_i pred_ij + b_i y_t_ij + c_i y_tmin_ij
#
# Contract: ``ambient_fast.core.loss.per_sample_loss_reference`` (same inputs, same LossConfig,
# (B,) float32 loss, float64 for float64 inputs). One kernel pass reads pred, y_t and y_tmin
# once, derives the per-sample mask m_i, coefficients (a_i, b_i, c_i) and weight w_i from
# sigma / sigma_min / sigma_max / weight in-kernel (schedule and target are constexprs; a_i is
# 1 in every row of the table, so it is folded away), accumulates sum_j r_ij^2 in fp32 (fp64 for
# fp64 inputs) and, when pred needs a gradient, writes d loss_i / d pred_ij = 2 m_i w_i r_ij / N
# in pred's dtype during the same pass (Liger-style). The backward is then a per-row scale by the
# upstream gradient (``ambient_fast::ambient_loss_backward``); no residual is ever materialised.
#
# Tiling: each program owns a [BLOCK_ROWS, BLOCK_COLS] tile of the (B, N) row view. Short rows
# pack several rows per program; rows longer than MAX_BLOCK are split over programs, each
# writing a partial sum of squares to a (B, chunks) workspace that a second kernel reduces in
# a fixed order: no float atomics, bitwise reproducible run to run.
#
# Layout: rows are read in the memory order of pred's trailing dims, so contiguous and
# channels_last tensors (and batch slices with any row stride) are read in place; the gradient
# is written in pred's layout. A contiguous copy is made only for an input whose trailing dims
# are not dense in pred's memory order (e.g. a strided slice, or y_t in a different layout than
# pred). Rows that do not train are not read at all and get loss 0 and gradient 0 exactly (no
# NaN, even when sigma <= sigma_min).
#
# Limits: differentiable in pred only (y_t, y_tmin, weight and the levels are data; the public
# entry point refuses inputs that would need their gradient). Row length <= 65535 * MAX_BLOCK.
# The float options (eligibility scale/shift, sigma_data) are constexprs: each distinct value
# compiles its own kernel, and they are exact in fp64 (a float kernel argument would be fp32).
#
# The row-layout, tiling and registration helpers live in ``_layout.py`` (shared with ``solver_step.py``).

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..core.loss import LossConfig
from ._layout import (
    MAX_BLOCK,
    as_rows,
    div_rn,
    empty_rows_like,
    load_rows,
    load_tile,
    memory_order,
    num_warps,
    register_op,
    shapes_only,
    sqrt_rn,
    store_tile,
    tile_indices,
    tile_shape,
)

__all__ = ["ambient_loss_triton", "MAX_BLOCK"]

# ----------------------------------------------------------------------------------------------
# Loss kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_terms(
    sigma,
    sigma_min,
    sigma_max,
    weight,
    ELIG_SCALE: tl.constexpr,
    ELIG_SHIFT: tl.constexpr,
    SIGMA_DATA: tl.constexpr,
    VP: tl.constexpr,
    EPS: tl.constexpr,
    CONTRACTION: tl.constexpr,
    WEIGHT_MODE: tl.constexpr,
):
    """Per-sample ``(trained, b, c, w)`` of SPEC 2, operation for operation as the reference."""
    # Eligibility: clean, above the buffered sigma_min, or below sigma_max (locality).
    local = sigma < sigma_max
    trained = (sigma_min == 0) | (sigma > ELIG_SCALE * sigma_min + ELIG_SHIFT) | local
    # sm in the coefficients: 0 for contraction, locality rows and rows that do not train.
    if CONTRACTION:
        sm = tl.zeros_like(sigma_min)
    else:
        sm = tl.where(trained & (~local), sigma_min, 0.0)
    s = sigma
    denom = s * s - sm * sm
    # Coefficient table (a = 1 in every row).
    if VP:
        if EPS:
            b = div_rn(-s * (1 - sm * sm), denom)
            c = div_rn(s * sqrt_rn(1 - sm * sm) * sqrt_rn(1 - s * s), denom)
        else:
            b = div_rn(sm * sm * sqrt_rn(1 - s * s), denom)
            c = div_rn(-(s * s) * sqrt_rn(1 - sm * sm), denom)
    else:
        if EPS:
            b = div_rn(-s, denom)
            c = div_rn(s, denom)
        else:
            b = div_rn(sm * sm, denom)
            c = div_rn(-(s * s), denom)
    # Weight: a per-sample tensor, lambda_EDM at the VE-equivalent sigma, or 1.
    if WEIGHT_MODE == 1:
        w = weight
    elif WEIGHT_MODE == 2:
        if VP:
            s_ve = div_rn(s, sqrt_rn(1 - s * s))
        else:
            s_ve = s
        scaled = s_ve * SIGMA_DATA
        w = div_rn(s_ve * s_ve + SIGMA_DATA * SIGMA_DATA, scaled * scaled)
    else:
        w = tl.full(s.shape, 1.0, s.dtype)
    return trained, b, c, w


@triton.jit
def _ambient_loss_fwd_kernel(
    loss_ptr,
    partial_ptr,
    grad_ptr,
    pred_ptr,
    y_t_ptr,
    y_tmin_ptr,
    sigma_ptr,
    sigma_min_ptr,
    sigma_max_ptr,
    weight_ptr,
    stride_grad,
    stride_pred,
    stride_y_t,
    stride_y_tmin,
    stride_sigma,
    stride_sigma_min,
    stride_sigma_max,
    stride_weight,
    n_rows,
    n_cols,
    ELIG_SCALE: tl.constexpr,
    ELIG_SHIFT: tl.constexpr,
    SIGMA_DATA: tl.constexpr,
    VP: tl.constexpr,
    EPS: tl.constexpr,
    CONTRACTION: tl.constexpr,
    WEIGHT_MODE: tl.constexpr,
    FP64: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """One tile: residual, per-row sum of squares (loss or partial), and d loss / d pred."""
    rows, cols, row_ok, mask = tile_indices(n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS)
    trained, b, c, w = _row_terms(
        load_rows(sigma_ptr, rows, stride_sigma, row_ok, FP64),
        load_rows(sigma_min_ptr, rows, stride_sigma_min, row_ok, FP64),
        load_rows(sigma_max_ptr, rows, stride_sigma_max, row_ok, FP64),
        load_rows(weight_ptr, rows, stride_weight, row_ok & (WEIGHT_MODE == 1), FP64),
        ELIG_SCALE, ELIG_SHIFT, SIGMA_DATA, VP, EPS, CONTRACTION, WEIGHT_MODE,
    )
    n = tl.cast(n_cols, b.dtype)
    # Residual (rows that do not train are never read: r = 0 there).
    live = mask & trained[:, None]
    pred = load_tile(pred_ptr, rows, cols, stride_pred, live, FP64)
    y_t = load_tile(y_t_ptr, rows, cols, stride_y_t, live, FP64)
    y_tmin = load_tile(y_tmin_ptr, rows, cols, stride_y_tmin, live, FP64)
    r = pred + b[:, None] * y_t + c[:, None] * y_tmin
    # Gradient of this sample's loss: 2 m w r / N, in pred's dtype.
    if WRITE_GRAD:
        grad_scale = tl.where(trained, div_rn(2 * w, n), 0.0)
        store_tile(grad_ptr, rows, cols, stride_grad, mask, r * grad_scale[:, None])
    row_sum = tl.sum(r * r, axis=1)
    if SPLIT:
        tl.store(partial_ptr + rows * tl.num_programs(1) + tl.program_id(1), row_sum, mask=row_ok)
    else:
        tl.store(loss_ptr + rows, tl.where(trained, w * div_rn(row_sum, n), 0.0), mask=row_ok)


@triton.jit
def _ambient_loss_fwd_reduce_kernel(
    loss_ptr,
    partial_ptr,
    sigma_ptr,
    sigma_min_ptr,
    sigma_max_ptr,
    weight_ptr,
    stride_sigma,
    stride_sigma_min,
    stride_sigma_max,
    stride_weight,
    n_rows,
    n_cols,
    n_chunks,
    ELIG_SCALE: tl.constexpr,
    ELIG_SHIFT: tl.constexpr,
    SIGMA_DATA: tl.constexpr,
    VP: tl.constexpr,
    EPS: tl.constexpr,
    CONTRACTION: tl.constexpr,
    WEIGHT_MODE: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_CHUNKS: tl.constexpr,
):
    """Second stage for split rows: sum the (B, n_chunks) partials in a fixed order."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    acc = tl.zeros([BLOCK_ROWS, BLOCK_CHUNKS], dtype=loss_ptr.dtype.element_ty)
    for start in range(0, n_chunks, BLOCK_CHUNKS):
        chunk = start + tl.arange(0, BLOCK_CHUNKS)
        ok = row_ok[:, None] & (chunk < n_chunks)[None, :]
        acc += tl.load(partial_ptr + rows[:, None] * n_chunks + chunk[None, :], mask=ok, other=0.0)
    row_sum = tl.sum(acc, axis=1)
    trained, b, c, w = _row_terms(
        load_rows(sigma_ptr, rows, stride_sigma, row_ok, FP64),
        load_rows(sigma_min_ptr, rows, stride_sigma_min, row_ok, FP64),
        load_rows(sigma_max_ptr, rows, stride_sigma_max, row_ok, FP64),
        load_rows(weight_ptr, rows, stride_weight, row_ok & (WEIGHT_MODE == 1), FP64),
        ELIG_SCALE, ELIG_SHIFT, SIGMA_DATA, VP, EPS, CONTRACTION, WEIGHT_MODE,
    )
    n = tl.cast(n_cols, row_sum.dtype)
    tl.store(loss_ptr + rows, tl.where(trained, w * div_rn(row_sum, n), 0.0), mask=row_ok)


@triton.jit
def _ambient_loss_bwd_kernel(
    grad_pred_ptr,
    grad_unit_ptr,
    grad_loss_ptr,
    stride_grad_pred,
    stride_grad_unit,
    stride_grad_loss,
    n_rows,
    n_cols,
    FP64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """``grad_pred_ij = grad_loss_i * (d loss_i / d pred_ij)``, computed in fp32 (fp64)."""
    rows, cols, row_ok, mask = tile_indices(n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS)
    scale = load_rows(grad_loss_ptr, rows, stride_grad_loss, row_ok, FP64)
    unit = load_tile(grad_unit_ptr, rows, cols, stride_grad_unit, mask, FP64)
    store_tile(grad_pred_ptr, rows, cols, stride_grad_pred, mask, unit * scale[:, None])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def ambient_loss_fwd(
    loss: torch.Tensor,
    grad: torch.Tensor | None,
    pred: torch.Tensor,
    y_t: torch.Tensor,
    y_tmin: torch.Tensor,
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    sigma_max: torch.Tensor,
    weight: torch.Tensor | None,
    cfg: LossConfig,
    *,
    max_block: int = MAX_BLOCK,
) -> None:
    """Write the per-sample loss into ``loss`` and, if given, d loss_i / d pred into ``grad``.

    Args:
        loss: ``(B,)`` output, float32 (float64 for fp64 ``pred``).
        grad: output of ``pred``'s shape and dtype, dense in ``pred``'s memory order (see
            :func:`empty_rows_like`), or None to skip the gradient.
        pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg: as
            ``per_sample_loss_reference``.
        max_block: elements per program (a power of two); tests lower it to split short rows.
    """
    n_rows = pred.shape[0]
    if n_rows == 0 or shapes_only(loss):
        return
    n_cols = pred.numel() // n_rows
    if n_cols == 0:
        raise ValueError(f"ambient loss: samples of shape {tuple(pred.shape[1:])} have no elements to average")
    order = memory_order(pred)
    pred_rows, y_t_rows, y_tmin_rows = (as_rows(t, order) for t in (pred, y_t, y_tmin))
    block_rows, block_cols, chunks = tile_shape(n_rows, n_cols, max_block)
    split = chunks > 1
    # Unused pointer slots get a read-only input (never dereferenced: their constexpr branch is
    # compiled out), so that no output appears twice in one launch.
    grad_rows = as_rows(grad, order, copy=False) if grad is not None else pred_rows
    partial = torch.empty((n_rows, chunks), dtype=loss.dtype, device=loss.device) if split else sigma
    weight_mode = 1 if weight is not None else (2 if cfg.edm_weight else 0)
    weight_arg = weight if weight is not None else sigma
    options = dict(
        ELIG_SCALE=cfg.elig_scale,
        ELIG_SHIFT=cfg.elig_shift,
        SIGMA_DATA=cfg.sigma_data,
        VP=cfg.schedule == "vp",
        EPS=cfg.target == "eps",
        CONTRACTION=cfg.contraction,
        WEIGHT_MODE=weight_mode,
        FP64=loss.dtype == torch.float64,
    )
    wrap_triton(_ambient_loss_fwd_kernel)[(triton.cdiv(n_rows, block_rows), chunks)](
        loss, partial, grad_rows,
        pred_rows, y_t_rows, y_tmin_rows, sigma, sigma_min, sigma_max, weight_arg,
        grad_rows.stride(0), pred_rows.stride(0), y_t_rows.stride(0), y_tmin_rows.stride(0),
        sigma.stride(0), sigma_min.stride(0), sigma_max.stride(0), weight_arg.stride(0),
        n_rows, n_cols,
        **options,
        WRITE_GRAD=grad is not None,
        SPLIT=split,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=num_warps(block_rows * block_cols),
    )
    if split:
        block_chunks = min(triton.next_power_of_2(chunks), max_block)
        reduce_rows = max(1, min(max_block // block_chunks, triton.next_power_of_2(n_rows)))
        wrap_triton(_ambient_loss_fwd_reduce_kernel)[(triton.cdiv(n_rows, reduce_rows),)](
            loss, partial, sigma, sigma_min, sigma_max, weight_arg,
            sigma.stride(0), sigma_min.stride(0), sigma_max.stride(0), weight_arg.stride(0),
            n_rows, n_cols, chunks,
            **options,
            BLOCK_ROWS=reduce_rows,
            BLOCK_CHUNKS=block_chunks,
            num_warps=num_warps(reduce_rows * block_chunks),
        )


def ambient_loss_bwd(
    grad_pred: torch.Tensor,
    grad_unit: torch.Tensor,
    grad_loss: torch.Tensor,
    *,
    max_block: int = MAX_BLOCK,
) -> None:
    """``grad_pred = grad_loss[:, None...] * grad_unit``; both dense in ``grad_unit``'s order.

    Args:
        grad_pred: output, shape/dtype/layout of ``grad_unit`` (see :func:`empty_rows_like`).
        grad_unit: d loss_i / d pred written by the forward.
        grad_loss: ``(B,)`` upstream gradient of the per-sample loss (any stride, e.g. the
            stride-0 expansion that ``.mean()`` produces).
    """
    n_rows = grad_unit.shape[0]
    n_cols = grad_unit.numel() // n_rows if n_rows else 0
    if n_rows == 0 or n_cols == 0 or shapes_only(grad_pred):
        return
    order = memory_order(grad_unit)
    out_rows = as_rows(grad_pred, order, copy=False)
    unit_rows = as_rows(grad_unit, order)
    block_rows, block_cols, chunks = tile_shape(n_rows, n_cols, max_block)
    wrap_triton(_ambient_loss_bwd_kernel)[(triton.cdiv(n_rows, block_rows), chunks)](
        out_rows, unit_rows, grad_loss,
        out_rows.stride(0), unit_rows.stride(0), grad_loss.stride(0),
        n_rows, n_cols,
        FP64=grad_unit.dtype == torch.float64,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=num_warps(block_rows * block_cols),
    )


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


@register_op("ambient_fast::ambient_loss")
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
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss (B,), d loss_i / d pred)``; the second output is empty when ``need_grad`` is False."""
    cfg = LossConfig(
        schedule=schedule,  # type: ignore[arg-type]
        target=target,  # type: ignore[arg-type]
        contraction=contraction,
        elig_scale=elig_scale,
        elig_shift=elig_shift,
        edm_weight=edm_weight,
        sigma_data=sigma_data,
    )
    loss = torch.empty(pred.shape[0], dtype=_compute_dtype(pred), device=pred.device)
    grad = empty_rows_like(pred) if need_grad else pred.new_empty(0)
    ambient_loss_fwd(loss, grad if need_grad else None, pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg)
    return loss, grad


@register_op("ambient_fast::ambient_loss_backward")
def _ambient_loss_backward_op(grad_unit: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """``grad_loss_i * grad_unit_i...``: the backward of ``ambient_fast::ambient_loss``."""
    grad_pred = empty_rows_like(grad_unit)
    ambient_loss_bwd(grad_pred, grad_unit, grad_loss)
    return grad_pred


def _setup_context(ctx, inputs, output) -> None:
    ctx.wrote_grad = inputs[-1]  # need_grad
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss: torch.Tensor, _grad_unit_grad: torch.Tensor):
    if not ctx.needs_input_grad[0]:
        return (None,) * 15
    if not ctx.wrote_grad:
        raise RuntimeError("ambient_fast::ambient_loss: pred needs a gradient but need_grad was False")
    (grad_unit,) = ctx.saved_tensors
    return (torch.ops.ambient_fast.ambient_loss_backward(grad_unit, grad_loss),) + (None,) * 14


_ambient_loss_op.register_autograd(_backward, setup_context=_setup_context)


def ambient_loss_triton(
    pred: torch.Tensor,
    y_t: torch.Tensor,
    y_tmin: torch.Tensor,
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    sigma_max: torch.Tensor,
    weight: torch.Tensor | None,
    cfg: LossConfig,
) -> torch.Tensor:
    """Fused per-sample ambient loss (SPEC 2); the Triton backend of ``per_sample_loss_reference``.

    Args:
        pred, y_t, y_tmin: ``(B, ...)`` same shape and dtype (fp16/bf16/fp32/fp64), any layout.
        sigma, sigma_min, sigma_max: ``(B,)`` levels, any floating dtype and stride.
        weight: ``(B,)`` per-sample weight replacing the default, or None.
        cfg: resolved options (:class:`~ambient_fast.core.loss.LossConfig`).

    Returns:
        ``(B,)`` float32 loss (float64 for fp64 inputs), differentiable in ``pred``: when
        ``pred`` requires grad, d loss / d pred is written during this forward pass and the
        backward only scales it by the upstream gradient.
    """
    grad_enabled = torch.is_grad_enabled()
    if grad_enabled:
        data = dict(y_t=y_t, y_tmin=y_tmin, sigma=sigma, sigma_min=sigma_min, sigma_max=sigma_max, weight=weight)
        for name, t in data.items():
            if t is not None and t.requires_grad:
                raise ValueError(
                    f"ambient_loss_triton differentiates pred only, but {name} requires grad; "
                    "detach it or use backend='torch'"
                )
    loss, _ = _ambient_loss_op(
        pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight,
        cfg.schedule, cfg.target, cfg.contraction, cfg.elig_scale, cfg.elig_shift,
        cfg.edm_weight, cfg.sigma_data, grad_enabled and pred.requires_grad,
    )
    return loss
