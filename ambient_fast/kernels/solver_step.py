# Fused sampler update steps with per-sample levels (SPEC 4; Karras et al. 2022, Alg. 1 and 2).
#
# Contract: ``ambient_fast.core.solver_step`` (euler_step, heun_step, churn_step,
# ancestral_step). Each kernel reads every input once and writes one output of x's dtype and
# layout; levels are per sample (B,) (heterogeneous grids are the normal case: restoration
# runs every sample on its own grid) and are loaded in their own dtype and stride, so a column
# of the sampler's float64 (B, K+1) table is read in place. Arithmetic is fp32 (fp64 for fp64
# state) and follows the reference operation for operation, with IEEE division and square
# root, so results differ from it only by the GPU's fused multiply-adds.
#
# Heun recomputes the Euler point from (x, D) rather than reading it back: three reads, one
# write. Rows with sigma_next == 0 keep the Euler point and do not read D(x_euler) at all.
#
# Tiling and layout as in ambient_loss.py (whose helpers this file uses): [BLOCK_ROWS,
# BLOCK_COLS] tiles of the (B, N) row view in x's memory order; inputs whose trailing dims are
# not dense in that order are copied first. S_noise is a constexpr (exact in fp64; each
# distinct value compiles its own churn kernel).

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

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

__all__ = ["euler_step_triton", "heun_step_triton", "churn_step_triton", "ancestral_step_triton"]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _euler_step_fwd_kernel(
    out_ptr,
    x_ptr,
    denoised_ptr,
    sigma_ptr,
    sigma_next_ptr,
    stride_out,
    stride_x,
    stride_denoised,
    stride_sigma,
    stride_sigma_next,
    n_rows,
    n_cols,
    FP64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """``x' = x + (sigma_next - sigma) ((x - D) / sigma)`` (EDM's order)."""
    rows, cols, row_ok, mask = tile_indices(n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS)
    s = load_rows(sigma_ptr, rows, stride_sigma, row_ok, FP64)[:, None]
    s_next = load_rows(sigma_next_ptr, rows, stride_sigma_next, row_ok, FP64)[:, None]
    x = load_tile(x_ptr, rows, cols, stride_x, mask, FP64)
    denoised = load_tile(denoised_ptr, rows, cols, stride_denoised, mask, FP64)
    store_tile(out_ptr, rows, cols, stride_out, mask, x + (s_next - s) * div_rn(x - denoised, s))


@triton.jit
def _heun_step_fwd_kernel(
    out_ptr,
    x_ptr,
    denoised_ptr,
    denoised_next_ptr,
    sigma_ptr,
    sigma_next_ptr,
    stride_out,
    stride_x,
    stride_denoised,
    stride_denoised_next,
    stride_sigma,
    stride_sigma_next,
    n_rows,
    n_cols,
    FP64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """Heun's second stage; rows with ``sigma_next == 0`` return the Euler point."""
    rows, cols, row_ok, mask = tile_indices(n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS)
    s = load_rows(sigma_ptr, rows, stride_sigma, row_ok, FP64)[:, None]
    s_next = load_rows(sigma_next_ptr, rows, stride_sigma_next, row_ok, FP64)[:, None]
    corrects = s_next > 0
    x = load_tile(x_ptr, rows, cols, stride_x, mask, FP64)
    denoised = load_tile(denoised_ptr, rows, cols, stride_denoised, mask, FP64)
    denoised_next = load_tile(denoised_next_ptr, rows, cols, stride_denoised_next, mask & corrects, FP64)
    # Euler step.
    slope = div_rn(x - denoised, s)
    x_euler = x + (s_next - s) * slope
    # Apply 2nd order correction.
    slope_next = div_rn(x_euler - denoised_next, tl.where(corrects, s_next, 1.0))
    corrected = x + (s_next - s) * 0.5 * (slope + slope_next)
    store_tile(out_ptr, rows, cols, stride_out, mask, tl.where(corrects, corrected, x_euler))


@triton.jit
def _churn_step_fwd_kernel(
    out_ptr,
    x_ptr,
    noise_ptr,
    sigma_ptr,
    sigma_hat_ptr,
    stride_out,
    stride_x,
    stride_noise,
    stride_sigma,
    stride_sigma_hat,
    n_rows,
    n_cols,
    S_NOISE: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """Increase noise temporarily: ``x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise eps``."""
    rows, cols, row_ok, mask = tile_indices(n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS)
    s = load_rows(sigma_ptr, rows, stride_sigma, row_ok, FP64)
    s_hat = load_rows(sigma_hat_ptr, rows, stride_sigma_hat, row_ok, FP64)
    std = sqrt_rn(tl.maximum(s_hat * s_hat - s * s, 0.0)) * S_NOISE
    x = load_tile(x_ptr, rows, cols, stride_x, mask, FP64)
    noise = load_tile(noise_ptr, rows, cols, stride_noise, mask, FP64)
    store_tile(out_ptr, rows, cols, stride_out, mask, x + std[:, None] * noise)


@triton.jit
def _ancestral_step_fwd_kernel(
    out_ptr,
    x_ptr,
    denoised_ptr,
    noise_ptr,
    sigma_ptr,
    sigma_next_ptr,
    stride_out,
    stride_x,
    stride_denoised,
    stride_noise,
    stride_sigma,
    stride_sigma_next,
    n_rows,
    n_cols,
    FP64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """Exact-Gaussian reverse step: ``x' = D + r^2 (x - D) + sigma_next sqrt(1 - r^2) eps``."""
    rows, cols, row_ok, mask = tile_indices(n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS)
    s = load_rows(sigma_ptr, rows, stride_sigma, row_ok, FP64)
    s_next = load_rows(sigma_next_ptr, rows, stride_sigma_next, row_ok, FP64)
    ratio = div_rn(s_next, s)
    ratio2 = ratio * ratio
    std = s_next * sqrt_rn(tl.maximum(1 - ratio2, 0.0))
    x = load_tile(x_ptr, rows, cols, stride_x, mask, FP64)
    denoised = load_tile(denoised_ptr, rows, cols, stride_denoised, mask, FP64)
    noise = load_tile(noise_ptr, rows, cols, stride_noise, mask, FP64)
    out = denoised + ratio2[:, None] * (x - denoised) + std[:, None] * noise
    store_tile(out_ptr, rows, cols, stride_out, mask, out)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _launch(
    kernel,
    out: torch.Tensor,
    x: torch.Tensor,
    others: Sequence[torch.Tensor],
    levels: Sequence[torch.Tensor],
    max_block: int,
    **constexprs,
) -> None:
    """Launch a step kernel with arguments (out, x, *others, *levels, strides, sizes, constexprs)."""
    n_rows = x.shape[0]
    n_cols = x.numel() // n_rows if n_rows else 0
    if n_rows == 0 or n_cols == 0 or shapes_only(out):
        return
    order = memory_order(x)
    out_rows = as_rows(out, order, copy=False)
    in_rows = [as_rows(t, order) for t in (x, *others)]
    block_rows, block_cols, chunks = tile_shape(n_rows, n_cols, max_block)
    kernel[(triton.cdiv(n_rows, block_rows), chunks)](
        out_rows, *in_rows, *levels,
        out_rows.stride(0), *(t.stride(0) for t in in_rows), *(lv.stride(0) for lv in levels),
        n_rows, n_cols,
        **constexprs,
        FP64=x.dtype == torch.float64,
        BLOCK_ROWS=block_rows,
        BLOCK_COLS=block_cols,
        num_warps=num_warps(block_rows * block_cols),
    )


def euler_step_fwd(out, x, denoised, sigma, sigma_next, *, max_block: int = MAX_BLOCK) -> None:
    """Write :func:`euler_step_triton` into ``out`` (from :func:`empty_rows_like` of ``x``)."""
    kernel = wrap_triton(_euler_step_fwd_kernel)
    _launch(kernel, out, x, (denoised,), (sigma, sigma_next), max_block)


def heun_step_fwd(out, x, denoised, denoised_next, sigma, sigma_next, *, max_block: int = MAX_BLOCK) -> None:
    """Write :func:`heun_step_triton` into ``out`` (from :func:`empty_rows_like` of ``x``)."""
    kernel = wrap_triton(_heun_step_fwd_kernel)
    _launch(kernel, out, x, (denoised, denoised_next), (sigma, sigma_next), max_block)


def churn_step_fwd(out, x, noise, sigma, sigma_hat, S_noise: float, *, max_block: int = MAX_BLOCK) -> None:
    """Write :func:`churn_step_triton` into ``out`` (from :func:`empty_rows_like` of ``x``)."""
    kernel = wrap_triton(_churn_step_fwd_kernel)
    _launch(kernel, out, x, (noise,), (sigma, sigma_hat), max_block, S_NOISE=S_noise)


def ancestral_step_fwd(out, x, denoised, noise, sigma, sigma_next, *, max_block: int = MAX_BLOCK) -> None:
    """Write :func:`ancestral_step_triton` into ``out`` (from :func:`empty_rows_like` of ``x``)."""
    kernel = wrap_triton(_ancestral_step_fwd_kernel)
    _launch(kernel, out, x, (denoised, noise), (sigma, sigma_next), max_block)


# ----------------------------------------------------------------------------------------------
# Custom ops and public entry points
# ----------------------------------------------------------------------------------------------


@register_op("ambient_fast::euler_step")
def _euler_step_op(
    x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    out = empty_rows_like(x)
    euler_step_fwd(out, x, denoised, sigma, sigma_next)
    return out


@register_op("ambient_fast::heun_step")
def _heun_step_op(
    x: torch.Tensor,
    denoised: torch.Tensor,
    denoised_next: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
) -> torch.Tensor:
    out = empty_rows_like(x)
    heun_step_fwd(out, x, denoised, denoised_next, sigma, sigma_next)
    return out


@register_op("ambient_fast::churn_step")
def _churn_step_op(
    x: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, sigma_hat: torch.Tensor, S_noise: float
) -> torch.Tensor:
    out = empty_rows_like(x)
    churn_step_fwd(out, x, noise, sigma, sigma_hat, S_noise)
    return out


@register_op("ambient_fast::ancestral_step")
def _ancestral_step_op(
    x: torch.Tensor,
    denoised: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
) -> torch.Tensor:
    out = empty_rows_like(x)
    ancestral_step_fwd(out, x, denoised, noise, sigma, sigma_next)
    return out


def euler_step_triton(
    x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """Euler update from ``sigma`` to ``sigma_next`` (SPEC 4), fused.

    Args:
        x, denoised: ``(B, ...)`` state and ``D(x, sigma)``, same shape (fp16/bf16/fp32/fp64).
        sigma, sigma_next: ``(B,)`` per-sample levels (VE units), ``sigma > 0``.

    Returns:
        ``(B, ...)`` new state in ``x``'s dtype and memory layout.
    """
    return _euler_step_op(x, denoised, sigma, sigma_next)


def heun_step_triton(
    x: torch.Tensor,
    denoised: torch.Tensor,
    denoised_next: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
) -> torch.Tensor:
    """Heun's second stage (SPEC 4), fused: recomputes the Euler point, 3 reads and 1 write.

    Args:
        x, denoised: ``(B, ...)`` state at ``sigma`` and ``D(x, sigma)``.
        denoised_next: ``(B, ...)`` ``D(x_euler, sigma_next)``; not read in rows with
            ``sigma_next == 0``, which return the Euler point.
        sigma, sigma_next: ``(B,)`` per-sample levels, ``sigma > 0``, ``sigma_next >= 0``.

    Returns:
        ``(B, ...)`` new state in ``x``'s dtype and memory layout.
    """
    return _heun_step_op(x, denoised, denoised_next, sigma, sigma_next)


def churn_step_triton(
    x: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    sigma_hat: torch.Tensor,
    S_noise: float = 1.0,
) -> torch.Tensor:
    """Raise the level from ``sigma`` to ``sigma_hat >= sigma`` with ``noise`` (SPEC 4), fused.

    Args:
        x, noise: ``(B, ...)`` state and standard normal noise.
        sigma, sigma_hat: ``(B,)`` per-sample levels.
        S_noise: EDM's noise inflation (a kernel constant: each value compiles once).

    Returns:
        ``(B, ...)`` ``x + sqrt(sigma_hat^2 - sigma^2) S_noise noise`` in ``x``'s dtype and layout.
    """
    return _churn_step_op(x, noise, sigma, sigma_hat, float(S_noise))


def ancestral_step_triton(
    x: torch.Tensor,
    denoised: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
) -> torch.Tensor:
    """One exact-Gaussian reverse-SDE step from ``sigma`` to ``sigma_next < sigma`` (SPEC 5), fused.

    Args:
        x, denoised, noise: ``(B, ...)`` state, ``D(x, sigma)`` and standard normal noise.
        sigma, sigma_next: ``(B,)`` per-sample levels, ``sigma > 0``.

    Returns:
        ``(B, ...)`` ``D + r^2 (x - D) + sigma_next sqrt(1 - r^2) noise``, ``r = sigma_next /
        sigma``, in ``x``'s dtype and memory layout.
    """
    return _ancestral_step_op(x, denoised, noise, sigma, sigma_next)
