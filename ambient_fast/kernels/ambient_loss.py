# Fused ambient loss, forward and gradient in one pass, input checks in the same pass (SPEC 2).
#
#   loss_i = m_i * w_i * mean_j r_ij^2,   r_ij = a_i pred_ij + b_i y_t_ij + c_i y_tmin_ij
#
# Contract: ``ambient_fast.core.loss.per_sample_loss_reference`` (same inputs, same LossConfig,
# (B,) float32 loss, float64 for float64 inputs). ONE op, ``ambient_fast::ambient_loss``, with a
# CUDA kernel (Triton, below) and a CPU kernel (C++, csrc/ambient_loss.cpp), a fake kernel and
# autograd. One pass reads pred, y_t and y_tmin once, derives the per-sample mask m_i,
# coefficients (a_i, b_i, c_i) and weight w_i from sigma / sigma_min / sigma_max / weight
# (schedule and target are constexprs; a_i is 1 in every row of the table, so it is folded
# away), accumulates sum_j r_ij^2 in fp32 (fp64 for fp64 inputs) and, when pred needs a
# gradient, writes d loss_i / d pred_ij = 2 m_i w_i r_ij / (N * grad_count) in pred's dtype
# during the same pass (Liger-style): with grad_count = B that is already the gradient of the
# batch mean, and the backward of a mean/sum whose upstream gradient is 1 returns it as is.
# On CPU the same kernel call also reduces the batch (float64, row order), so the public
# mean/sum is one C++ call with no reduction op after it.
#
# Checks (``check=True``, eager only): the same pass writes per-sample flags (FLAG_* below, the
# bits of csrc/ops.h LossFlag): NaN/Inf in pred, y_t or y_tmin, invalid levels (sigma <= 0,
# sigma_min < 0, sigma_max < 0, VP levels >= 1, non-finite), non-finite coefficients or weight
# in the compute dtype (extreme levels), a loss that overflows, a gradient that overflows pred's
# dtype (fp16 near the sigma -> sigma_min pole). The C++ kernel returns the largest flag and
# the first bad row; on CUDA the caller reduces the B flags once (one sync). Only then, on the
# error path, are the reference checks run to name the argument and sample (raise_for_flags).
# With checks, rows that do not train are read too (so a NaN anywhere is reported); without,
# they are not read at all. Either way they get loss 0 and gradient 0 exactly.
#
# Tiling: each program owns a [BLOCK_ROWS, BLOCK_COLS] tile of the (B, N) row view. Short rows
# pack several rows per program; rows longer than MAX_BLOCK are split over programs, each
# writing a partial sum of squares to a (B, chunks) workspace that a second kernel reduces in
# a fixed order: no float atomics, bitwise reproducible run to run (flags of split rows are
# combined with an integer atomic OR).
#
# Layout: rows are read in the memory order of pred's trailing dims, so contiguous and
# channels_last tensors (and batch slices with any row stride) are read in place; the gradient
# is written in pred's layout. A contiguous copy is made only for an input whose trailing dims
# are not dense in pred's memory order. The C++ kernel reads each sample as one contiguous run
# with any batch stride (other layouts get one copy) and converts mixed dtypes to the compute
# dtype first.
#
# Limits: differentiable in pred only (the public entry point routes inputs that need other
# gradients to the reference). Row length <= 65535 * MAX_BLOCK on CUDA. The float options
# (eligibility scale/shift, sigma_data) are constexprs: each distinct value compiles its own
# kernel, and they are exact in fp64. Under torch.compile the op is opaque (it is one fused
# pass already) and runs without checks. The Triton kernels also run on CPU tensors in
# Triton's interpreter (TRITON_INTERPRET=1, ``kernel="triton"``), which is how CI tests them.
#
# The row-layout and tiling helpers live in ``_layout.py``, the C++ glue in ``_native.py``.

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..core.loss import LossConfig
from ..core.validation import check_finite, check_per_sample, check_sigma_pair
from . import _native
from ._layout import (
    MAX_BLOCK,
    as_rows,
    check_kernel,
    div_rn,
    empty_rows_like,
    fake_output,
    load_rows,
    load_tile,
    memory_order,
    num_warps,
    sqrt_rn,
    store_tile,
    tile_indices,
    tile_shape,
)

__all__ = [
    "FLAG_TRAINED",
    "MAX_BLOCK",
    "ambient_loss_bwd",
    "ambient_loss_cpp_fwd",
    "ambient_loss_fwd",
    "check_operands",
    "fused_ambient_loss",
    "raise_for_flags",
]

# Per-sample check flags (csrc/ops.h LossFlag): 1 = the row trains, every larger bit an error.
FLAG_TRAINED = tl.constexpr(1)
FLAG_PRED = tl.constexpr(2)
FLAG_Y_T = tl.constexpr(4)
FLAG_Y_TMIN = tl.constexpr(8)
FLAG_SIGMA = tl.constexpr(16)
FLAG_SIGMA_MIN = tl.constexpr(32)
FLAG_SIGMA_MAX = tl.constexpr(64)
FLAG_WEIGHT = tl.constexpr(128)
FLAG_COEFF = tl.constexpr(256)
FLAG_LOSS = tl.constexpr(512)
FLAG_GRAD = tl.constexpr(1024)
_LEVEL_FLAGS = 16 | 32 | 64 | 128 | 256

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
def _finite(x):
    """Elementwise: x is neither NaN nor +-Inf."""
    d = x - x
    return d == 0


@triton.jit
def _row_nonfinite(tile):
    """Per row of a tile: whether any element is NaN or Inf (masked elements are loaded as 0)."""
    return tl.max((~_finite(tile)).to(tl.int32), axis=1) > 0


@triton.jit
def _level_flags(sigma, sigma_min, sigma_max, weight, trained, b, c, w, VP: tl.constexpr, WEIGHT_MODE: tl.constexpr):
    """FLAG_* bits of the per-sample levels and coefficients (see the header)."""
    sigma_ok = _finite(sigma) & (sigma > 0)
    sigma_min_ok = _finite(sigma_min) & (sigma_min >= 0)
    if VP:
        sigma_ok = sigma_ok & (sigma < 1)
        sigma_min_ok = sigma_min_ok & (sigma_min < 1)
    flags = tl.where(trained, FLAG_TRAINED, 0)
    flags |= tl.where(sigma_ok, 0, FLAG_SIGMA)
    flags |= tl.where(sigma_min_ok, 0, FLAG_SIGMA_MIN)
    flags |= tl.where(_finite(sigma_max) & (sigma_max >= 0), 0, FLAG_SIGMA_MAX)
    if WEIGHT_MODE == 1:
        flags |= tl.where(_finite(weight), 0, FLAG_WEIGHT)
    coeff_ok = _finite(b) & _finite(c) & _finite(w)
    flags |= tl.where(trained & (~coeff_ok), FLAG_COEFF, 0)
    return flags


@triton.jit
def _ambient_loss_fwd_kernel(
    loss_ptr,
    partial_ptr,
    grad_ptr,
    flags_ptr,
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
    grad_count,
    ELIG_SCALE: tl.constexpr,
    ELIG_SHIFT: tl.constexpr,
    SIGMA_DATA: tl.constexpr,
    VP: tl.constexpr,
    EPS: tl.constexpr,
    CONTRACTION: tl.constexpr,
    WEIGHT_MODE: tl.constexpr,
    FP64: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    CHECK: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """One tile: residual, per-row sum of squares (loss or partial), d loss / d pred, flags."""
    rows, cols, row_ok, mask = tile_indices(n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS)
    sigma = load_rows(sigma_ptr, rows, stride_sigma, row_ok, FP64)
    sigma_min = load_rows(sigma_min_ptr, rows, stride_sigma_min, row_ok, FP64)
    sigma_max = load_rows(sigma_max_ptr, rows, stride_sigma_max, row_ok, FP64)
    weight = load_rows(weight_ptr, rows, stride_weight, row_ok & (WEIGHT_MODE == 1), FP64)
    trained, b, c, w = _row_terms(
        sigma, sigma_min, sigma_max, weight,
        ELIG_SCALE, ELIG_SHIFT, SIGMA_DATA, VP, EPS, CONTRACTION, WEIGHT_MODE,
    )
    n = tl.cast(n_cols, b.dtype)
    # Residual. Without checks rows that do not train are never read (r = 0 there); with
    # checks every row is read for the NaN/Inf scan and r is zeroed where the row does not train.
    if CHECK:
        live = mask
    else:
        live = mask & trained[:, None]
    pred = load_tile(pred_ptr, rows, cols, stride_pred, live, FP64)
    y_t = load_tile(y_t_ptr, rows, cols, stride_y_t, live, FP64)
    y_tmin = load_tile(y_tmin_ptr, rows, cols, stride_y_tmin, live, FP64)
    r = pred + b[:, None] * y_t + c[:, None] * y_tmin
    if CHECK:
        r = tl.where(trained[:, None], r, 0.0)
        flags = _level_flags(sigma, sigma_min, sigma_max, weight, trained, b, c, w, VP, WEIGHT_MODE)
        flags |= tl.where(_row_nonfinite(pred), FLAG_PRED, 0)
        flags |= tl.where(_row_nonfinite(y_t), FLAG_Y_T, 0)
        flags |= tl.where(_row_nonfinite(y_tmin), FLAG_Y_TMIN, 0)
    # Gradient of this sample's loss: 2 m w r / (N grad_count), in pred's dtype.
    if WRITE_GRAD:
        grad_scale = tl.where(trained, div_rn(2 * w, n * tl.cast(grad_count, b.dtype)), 0.0)
        grad = (r * grad_scale[:, None]).to(grad_ptr.dtype.element_ty)
        store_tile(grad_ptr, rows, cols, stride_grad, mask, grad)
        if CHECK:
            grad_bad = _row_nonfinite(tl.where(mask, grad.to(r.dtype), 0.0))
            flags |= tl.where(grad_bad & (flags <= FLAG_TRAINED), FLAG_GRAD, 0)
    row_sum = tl.sum(r * r, axis=1)
    if SPLIT:
        tl.store(partial_ptr + rows * tl.num_programs(1) + tl.program_id(1), row_sum, mask=row_ok)
        if CHECK:
            tl.atomic_or(flags_ptr + rows, flags, mask=row_ok)
    else:
        loss = tl.where(trained, w * div_rn(row_sum, n), 0.0)
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        if CHECK:
            flags |= tl.where(trained & (~_finite(loss)) & (flags <= FLAG_TRAINED), FLAG_LOSS, 0)
            tl.store(flags_ptr + rows, flags, mask=row_ok)


@triton.jit
def _ambient_loss_fwd_reduce_kernel(
    loss_ptr,
    flags_ptr,
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
    CHECK: tl.constexpr,
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
    loss = tl.where(trained, w * div_rn(row_sum, n), 0.0)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    if CHECK:
        flags = tl.load(flags_ptr + rows, mask=row_ok, other=0)
        flags |= tl.where(trained & (~_finite(loss)) & (flags <= FLAG_TRAINED), FLAG_LOSS, 0)
        tl.store(flags_ptr + rows, flags, mask=row_ok)


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
# Launchers: Triton (CUDA, or CPU tensors under TRITON_INTERPRET=1) and C++ (CPU)
# ----------------------------------------------------------------------------------------------


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
    flags: torch.Tensor | None = None,
    grad_count: int = 1,
    max_block: int = MAX_BLOCK,
) -> None:
    """Triton: write the per-sample loss into ``loss`` and, if given, the gradient into ``grad``.

    Args:
        loss: ``(B,)`` output, float32 (float64 for fp64 ``pred``).
        grad: output of ``pred``'s shape and dtype, dense in ``pred``'s memory order (see
            :func:`empty_rows_like`), or None to skip the gradient.
        pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg: as
            ``per_sample_loss_reference``.
        flags: ``(B,)`` int32 zeros to receive the check flags (FLAG_*), or None: no checks.
        grad_count: the gradient is divided by it (B: gradient of the batch mean).
        max_block: elements per program (a power of two); tests lower it to split short rows.
    """
    n_rows = pred.shape[0]
    if n_rows == 0:
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
    flags_arg = flags if flags is not None else sigma
    options = dict(
        ELIG_SCALE=cfg.elig_scale,
        ELIG_SHIFT=cfg.elig_shift,
        SIGMA_DATA=cfg.sigma_data,
        VP=cfg.schedule == "vp",
        EPS=cfg.target == "eps",
        CONTRACTION=cfg.contraction,
        WEIGHT_MODE=weight_mode,
        FP64=loss.dtype == torch.float64,
        CHECK=flags is not None,
    )
    wrap_triton(_ambient_loss_fwd_kernel)[(triton.cdiv(n_rows, block_rows), chunks)](
        loss, partial, grad_rows, flags_arg,
        pred_rows, y_t_rows, y_tmin_rows, sigma, sigma_min, sigma_max, weight_arg,
        grad_rows.stride(0), pred_rows.stride(0), y_t_rows.stride(0), y_tmin_rows.stride(0),
        sigma.stride(0), sigma_min.stride(0), sigma_max.stride(0), weight_arg.stride(0),
        n_rows, n_cols, grad_count,
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
            loss, flags_arg, partial, sigma, sigma_min, sigma_max, weight_arg,
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
    """Triton: ``grad_pred = grad_loss[:, None...] * grad_unit``; both dense in ``grad_unit``'s order.

    Args:
        grad_pred: output, shape/dtype/layout of ``grad_unit`` (see :func:`empty_rows_like`).
        grad_unit: d loss_i / d pred written by the forward.
        grad_loss: ``(B,)`` upstream gradient of the per-sample loss (any stride, e.g. the
            stride-0 expansion that ``.mean()`` produces).
    """
    n_rows = grad_unit.shape[0]
    n_cols = grad_unit.numel() // n_rows if n_rows else 0
    if n_rows == 0 or n_cols == 0:
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


def ambient_loss_cpp_fwd(
    loss: torch.Tensor | None,
    grad: torch.Tensor | None,
    pred: torch.Tensor,
    y_t: torch.Tensor,
    y_tmin: torch.Tensor,
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    sigma_max: torch.Tensor | None,
    weight: torch.Tensor | None,
    cfg: LossConfig,
    *,
    check: bool = False,
    flags: torch.Tensor | None = None,
    grad_count: int = 1,
    reduced: torch.Tensor | None = None,
) -> tuple[int, int]:
    """C++: the contract of :func:`ambient_loss_fwd` on CPU tensors (``sigma_max`` may be None: zeros).

    ``check``: compute the check flags; they are written into ``flags`` (``(B,)`` int32) when
    given, else only summarised in the return value.

    ``grad``: contiguous, in ``pred``'s dtype (in the compute dtype when the inputs' dtypes
    differ: they are converted to it first). ``reduced``: a 0-d tensor of the loss dtype
    that receives ``loss.sum() / grad_count`` (the batch mean with ``grad_count = B``), added
    in float64 in row order; ``loss`` may then be None (the per-sample values are not kept).
    Returns ``(largest flag, first row with an error flag or -1)``; ``(0, -1)`` without ``check``.
    """
    ext = _native.extension()
    batch = pred.shape[0]
    numel = pred.numel() // batch if batch else 0
    if numel == 0:
        raise ValueError(f"ambient loss: samples of shape {tuple(pred.shape[1:])} have no elements to average")
    dtype = pred.dtype
    if y_t.dtype != dtype or y_tmin.dtype != dtype:
        pred, y_t, y_tmin = _native.same_dtype([pred, y_t, y_tmin], pred)
    # Each (tensor, argument) pair keeps its tensor referenced until the call returns.
    p, p_arg = _native.rows(pred)
    yt, yt_arg = _native.rows(y_t)
    ytm, ytm_arg = _native.rows(y_tmin)
    s, s_arg = _native.levels(sigma)
    sm, sm_arg = _native.levels(sigma_min)
    smax, smax_arg = _native.levels(sigma_max) if sigma_max is not None else (None, None)
    w, w_arg = _native.levels(weight) if weight is not None else (None, None)
    # Positional, in _C.ambient_loss's order (matching ~20 keywords costs microseconds per call).
    return ext.ambient_loss(
        _native.DTYPE_NAMES[p.dtype], batch, numel, loss.data_ptr() if loss is not None else 0,
        (grad.data_ptr(), numel) if grad is not None else None,
        p_arg, yt_arg, ytm_arg, s_arg, sm_arg, smax_arg, w_arg,
        check, flags.data_ptr() if flags is not None else 0, grad_count,
        *_native_options(cfg),
        reduced.data_ptr() if reduced is not None else 0,
    )


_NATIVE_OPTIONS: dict[LossConfig, tuple] = {}


def _native_options(cfg: LossConfig) -> tuple:
    """``cfg`` as _C.ambient_loss's trailing option arguments (memoised: a training run uses one)."""
    options = _NATIVE_OPTIONS.get(cfg)
    if options is None:
        options = (
            cfg.schedule, cfg.target, bool(cfg.contraction), float(cfg.elig_scale), float(cfg.elig_shift),
            bool(cfg.edm_weight), float(cfg.sigma_data),
        )
        _NATIVE_OPTIONS[cfg] = options
    return options


def check_operands(
    pred: torch.Tensor,
    y_t: torch.Tensor,
    y_tmin: torch.Tensor,
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    sigma_max: torch.Tensor,
    weight: torch.Tensor | None,
) -> None:
    """Shapes and devices the kernels rely on (no sync): one ``(B, N >= 1)`` shape, ``(B,)`` levels."""
    if pred.dim() < 1:
        raise ValueError("ambient loss: pred must be batched (B, ...), got a 0-d tensor")
    for name, t in (("y_t", y_t), ("y_tmin", y_tmin)):
        if t.shape != pred.shape:
            raise ValueError(f"ambient loss: {name} shape {tuple(t.shape)} differs from pred's {tuple(pred.shape)}")
        if t.device != pred.device:
            raise ValueError(f"ambient loss: {name} is on {t.device}, pred on {pred.device}")
    batch = pred.shape[0]
    _check_nonempty_samples(pred)
    for name, t in (("sigma", sigma), ("sigma_min", sigma_min), ("sigma_max", sigma_max), ("weight", weight)):
        if t is None:
            continue
        if t.shape != (batch,):
            raise ValueError(f"ambient loss: {name} must have shape ({batch},), got {tuple(t.shape)}")
        if t.device != pred.device or not t.is_floating_point():
            raise ValueError(
                f"ambient loss: {name} must be a floating tensor on {pred.device}, got {t.dtype} on {t.device}"
            )


def _check_nonempty_samples(pred: torch.Tensor) -> None:
    if pred.shape[0] and pred.numel() == 0:
        raise ValueError(
            f"ambient loss: samples of shape {tuple(pred.shape[1:])} have no elements to average "
            "(each sample needs at least one element)"
        )


def _forward(
    pred: torch.Tensor,
    y_t: torch.Tensor,
    y_tmin: torch.Tensor,
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    sigma_max: torch.Tensor,
    weight: torch.Tensor | None,
    cfg: LossConfig,
    need_grad: bool,
    kernel: str,
    check: bool,
    grad_count: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int | None]:
    """The one implementation behind the op and the eager path.

    ``sigma_max`` may be None (zeros). Returns ``(loss (B,), gradient or None, flags (B,) int32
    or None, largest flag)``: C++ returns the largest flag without a sync (and every row's flags
    only when one is an error); Triton gives the flags, which the caller reduces (one sync).
    """
    if kernel == "cpp":
        loss, _, grad, flags, largest = _cpp_forward(
            pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg, need_grad, check, grad_count, False
        )
        return loss, grad, flags, largest
    batch = pred.shape[0]
    compute = _native.compute_dtype(pred.dtype)
    loss = torch.empty(batch, dtype=compute, device=pred.device)
    if sigma_max is None:
        sigma_max = torch.zeros(batch, dtype=sigma.dtype, device=sigma.device)
    flags = torch.zeros(batch, dtype=torch.int32, device=pred.device) if check else None
    grad = empty_rows_like(pred) if need_grad else None
    ambient_loss_fwd(
        loss, grad, pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg, flags=flags, grad_count=grad_count
    )
    return loss, grad, flags, None


def _cpp_forward(
    pred: torch.Tensor,
    y_t: torch.Tensor,
    y_tmin: torch.Tensor,
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    sigma_max: torch.Tensor | None,
    weight: torch.Tensor | None,
    cfg: LossConfig,
    need_grad: bool,
    check: bool,
    grad_count: int,
    reduce: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, int | None]:
    """The C++ kernel: ``(loss (B,) or None, reduced 0-d or None, gradient or None, flags or None, largest flag)``.

    ``reduce``: the kernel writes only ``loss.sum() / grad_count`` (no per-sample buffer, no
    separate reduction op). The largest flag comes back without a sync; every row's flags only
    when one is an error.
    """
    compute = torch.float64 if pred.dtype is torch.float64 else torch.float32
    loss = None if reduce else torch.empty(pred.shape[0], dtype=compute)
    reduced = torch.empty((), dtype=compute) if reduce else None
    grad = None
    if need_grad:
        mixed = y_t.dtype is not pred.dtype or y_tmin.dtype is not pred.dtype
        grad = torch.empty_like(pred, dtype=compute if mixed else pred.dtype, memory_format=torch.contiguous_format)
    args = (loss, grad, pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg)
    largest, _ = ambient_loss_cpp_fwd(*args, check=check, grad_count=grad_count, reduced=reduced)
    flags = None
    if largest >= 2:  # error path: run again to get every row's flags
        flags = torch.zeros(pred.shape[0], dtype=torch.int32)
        ambient_loss_cpp_fwd(*args, check=True, flags=flags, grad_count=grad_count, reduced=reduced)
    if grad is not None and grad.dtype is not pred.dtype:
        grad = grad.to(pred.dtype)
    return loss, reduced, grad, flags, largest if check else None


# ----------------------------------------------------------------------------------------------
# The op: CPU (C++) and CUDA (Triton) kernels, fake kernel, autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("ambient_fast::ambient_loss", mutates_args=(), device_types=("cpu", "cuda"))
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
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss (B,), d loss_i / d pred)``; the second output is empty when ``need_grad`` is False.

    ``kernel``: ``"triton"`` (CUDA, or CPU tensors under TRITON_INTERPRET=1) or ``"cpp"`` (CPU).
    """
    check_kernel(kernel, pred.device)
    check_operands(pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight)
    cfg = LossConfig(
        schedule=schedule,  # type: ignore[arg-type]
        target=target,  # type: ignore[arg-type]
        contraction=contraction,
        elig_scale=elig_scale,
        elig_shift=elig_shift,
        edm_weight=edm_weight,
        sigma_data=sigma_data,
    )
    loss, grad, _, _ = _forward(
        pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg, need_grad, kernel, False, 1
    )
    return loss, grad if grad is not None else pred.new_empty(0)


@_ambient_loss_op.register_fake
def _(pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, *options):
    need_grad, kernel = options[-2], options[-1]
    loss = pred.new_empty((pred.shape[0],), dtype=_native.compute_dtype(pred.dtype))
    if not need_grad:
        return loss, pred.new_empty(0)
    return loss, fake_output(pred, kernel)


def _setup_context(ctx, inputs, output) -> None:
    ctx.wrote_grad = inputs[-2]  # need_grad
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss: torch.Tensor, _grad_unit_grad: torch.Tensor):
    if any(ctx.needs_input_grad[1:7]) or torch.is_grad_enabled():
        raise NotImplementedError(
            "ambient_fast::ambient_loss gives first derivatives with respect to pred only; "
            "use ambient_loss(..., backend='torch') for other inputs or create_graph=True"
        )
    if not ctx.needs_input_grad[0]:
        return (None,) * 16
    if not ctx.wrote_grad:
        raise RuntimeError("ambient_fast::ambient_loss: pred needs a gradient but need_grad was False")
    (grad_unit,) = ctx.saved_tensors
    return (_scale_rows(grad_unit, grad_loss),) + (None,) * 15


_ambient_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _scale_rows(grad_unit: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """``grad_loss_i * grad_unit_i...`` computed in fp32 (fp64) and rounded once to the unit's dtype."""
    if grad_unit.is_cuda and not torch.compiler.is_compiling():
        out = empty_rows_like(grad_unit)
        ambient_loss_bwd(out, grad_unit, grad_loss)
        return out
    scale = grad_loss.reshape((-1,) + (1,) * (grad_unit.dim() - 1))
    return torch.mul(grad_unit, scale, out=torch.empty_like(grad_unit))


# ----------------------------------------------------------------------------------------------
# Eager path: the same kernels without the dispatcher, with checks, and Liger's backward
# ----------------------------------------------------------------------------------------------


def _eager_forward(
    pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg, kernel, check, reduction, need_grad, stacklevel
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The eager forward with its checks: ``(loss, gradient of it or None)``.

    For ``reduction`` "mean"/"sum" the loss is reduced here and the gradient is that of the
    reduced loss; for "none"/"mean_trained" the loss is ``(B,)`` (the caller reduces).
    """
    reduce = reduction == "mean" or reduction == "sum"
    count = pred.shape[0] if reduction == "mean" else 1
    if kernel == "cpp":
        loss, reduced, grad, flags, largest = _cpp_forward(
            pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg, need_grad, check, count, reduce
        )
    else:
        loss, grad, flags, largest = _forward(
            pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg, need_grad, kernel, check, count
        )
        reduced = None
    if check:
        if largest is None:
            largest = int(flags.max())  # Triton: one B-element reduction and one sync
        if largest >= 2:
            raise_for_flags(flags, pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg)
        if largest == 0 and reduction != "none":
            warnings.warn(
                "ambient_loss: no sample in the batch is eligible at its sigma; the loss is 0", stacklevel=stacklevel
            )
    if reduced is not None:
        return reduced, grad
    if reduction == "mean":
        return loss.mean(), grad
    if reduction == "sum":
        return loss.sum(), grad
    return loss, grad


class _FusedLoss(torch.autograd.Function):
    """Eager autograd of the op's kernels (one call, no dispatcher), reductions folded in.

    For ``reduction`` "mean"/"sum" the forward already wrote the gradient of the reduced loss
    (``grad_count = B`` for the mean), so a backward whose upstream gradient is 1 (what
    ``loss.backward()`` passes) returns it without another pass (Liger's trick; on CUDA the
    test ``upstream == 1`` is one host sync in the backward). Used only when ``pred`` needs a
    gradient (without one the eager forward runs without an autograd node).
    """

    @staticmethod
    def forward(ctx, pred, operands):
        # ``operands``: (y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg, kernel, check,
        # reduction), one non-tensor argument: autograd tracks pred only (the caller has checked
        # that nothing else requires grad), which keeps apply and the backward short.
        # Frames up to the caller of ambient_fast.ambient_loss: _eager_forward, forward, apply,
        # fused_ambient_loss, ambient_loss.
        loss, grad = _eager_forward(pred, *operands, True, 6)
        ctx.reduced = operands[-1] in ("mean", "sum")
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, upstream):
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "the fused ambient loss gives first derivatives only; use ambient_loss(..., backend='torch') "
                "for create_graph=True"
            )
        (grad,) = ctx.saved_tensors
        if ctx.reduced:
            capturing = upstream.is_cuda and torch.cuda.is_current_stream_capturing()
            if not capturing and float(upstream) == 1.0:
                return grad, None
            return torch.mul(grad, upstream, out=torch.empty_like(grad)), None
        return _scale_rows(grad, upstream), None


def fused_ambient_loss(
    pred: torch.Tensor,
    y_t: torch.Tensor,
    y_tmin: torch.Tensor,
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    sigma_max: torch.Tensor | None,
    weight: torch.Tensor | None,
    cfg: LossConfig,
    *,
    kernel: str,
    check: bool = False,
    reduction: str = "none",
    operands_checked: bool = False,
) -> torch.Tensor:
    """Fused per-sample ambient loss (SPEC 2): the op's kernels, in eager without the dispatcher.

    Args:
        pred, y_t, y_tmin: ``(B, ...)`` same shape (fp16/bf16/fp32/fp64), any layout.
        sigma, sigma_min, sigma_max: ``(B,)`` levels, any floating dtype and stride
            (``sigma_max`` None: zeros, no locality rule).
        weight: ``(B,)`` per-sample weight replacing the default, or None.
        cfg: resolved options (:class:`~ambient_fast.core.loss.LossConfig`).
        kernel: ``"triton"`` or ``"cpp"`` (see the op).
        check: eager input checks in the kernel pass (ignored under torch.compile): raises the
            reference's ValueError naming the argument and the first bad sample.
        reduction: ``"none"`` (``(B,)``), ``"mean"``, ``"sum"`` or ``"mean_trained"`` over the
            batch (see ``ambient_fast.ambient_loss``).
        operands_checked: the caller has already checked what :func:`check_operands` checks
            (one shape and device for the data, ``(B,)`` floating levels on that device) and
            that no input but ``pred`` requires grad, as ``ambient_fast.ambient_loss`` does;
            those checks are then not repeated (samples without elements are still refused).

    Returns:
        float32 (float64 for fp64 inputs) loss, differentiable in ``pred``: when ``pred``
        requires grad, d loss / d pred is written during this forward pass.
    """
    grad_enabled = torch.is_grad_enabled()
    if operands_checked:
        _check_nonempty_samples(pred)
    else:
        if grad_enabled:
            data = dict(y_t=y_t, y_tmin=y_tmin, sigma=sigma, sigma_min=sigma_min, sigma_max=sigma_max, weight=weight)
            for name, t in data.items():
                if t is not None and t.requires_grad:
                    raise ValueError(
                        f"the fused ambient loss differentiates pred only, but {name} requires grad; "
                        "detach it or use backend='torch'"
                    )
        check_operands(pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight)
    need_grad = grad_enabled and pred.requires_grad
    if torch.compiler.is_compiling():
        if sigma_max is None:
            sigma_max = torch.zeros_like(sigma)
        loss, _ = _ambient_loss_op(
            pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight,
            cfg.schedule, cfg.target, cfg.contraction, cfg.elig_scale, cfg.elig_shift,
            cfg.edm_weight, cfg.sigma_data, need_grad, kernel,
        )
    else:
        check_kernel(kernel, pred.device)
        if need_grad:
            operands = (y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg, kernel, check, reduction)
            loss = _FusedLoss.apply(pred, operands)
        else:
            # No autograd node: frames up to the caller of ambient_fast.ambient_loss.
            loss, _ = _eager_forward(
                pred, y_t, y_tmin, sigma, sigma_min, sigma_max, weight, cfg, kernel, check, reduction, False, 4
            )
        if reduction in ("mean", "sum"):
            return loss  # reduced inside, with the gradient of the reduced loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean_trained":
        return loss.sum() / (loss != 0).sum().clamp(min=1)
    return loss


def raise_for_flags(
    flags: torch.Tensor,
    pred: torch.Tensor,
    y_t: torch.Tensor,
    y_tmin: torch.Tensor,
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    sigma_max: torch.Tensor,
    weight: torch.Tensor | None,
    cfg: LossConfig,
) -> None:
    """Error path of the in-kernel checks: raise the ValueError that names the argument and sample.

    Bad inputs get exactly the reference checks' messages (run here, once something is known
    to be wrong); what is left are overflows of finite inputs in the compute dtype.
    """
    batch, device = pred.shape[0], pred.device
    check_sigma_pair(sigma, sigma_min, pred, cfg.schedule, sigma_max)
    if weight is not None:
        check_per_sample("weight", weight, batch, device)
    for name, t in (("pred", pred), ("y_t", y_t), ("y_tmin", y_tmin)):
        check_finite(name, t)
    compute = _native.compute_dtype(pred.dtype)
    for bits, message in (
        (
            _LEVEL_FLAGS,
            "sigma: the loss coefficients of sample {i} (sigma={s:.6g}, sigma_min={sm:.6g}) are not finite in "
            f"{compute}; levels this extreme overflow its arithmetic (keep 1e-15 < sigma < 1e15 for float32)",
        ),
        (
            FLAG_LOSS.value,
            "pred: the loss of sample {i} overflows " + str(compute) + " (sigma={s:.6g}, sigma_min={sm:.6g}): the "
            "residual or the weight is too large",
        ),
        (
            FLAG_GRAD.value,
            "pred: d loss / d pred of sample {i} overflows " + str(pred.dtype) + " (sigma={s:.6g} is too close to "
            "sigma_min={sm:.6g}, where the coefficients diverge): train with float32 predictions, or keep sigma "
            "away from sigma_min (s_max < inf, buffer > 0)",
        ),
    ):
        rows = torch.nonzero(flags & bits).flatten()
        if rows.numel():
            i = int(rows[0])
            raise ValueError(message.format(i=i, s=float(sigma[i]), sm=float(sigma_min[i])))
    raise AssertionError(f"ambient_loss: unexplained check flags {flags.tolist()}")  # pragma: no cover
