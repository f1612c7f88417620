# Fused Heun second stage (SPEC 4; Karras et al. 2022, Algorithm 1):
#
#   x' = x + (sigma_next - sigma) (d + d') / 2, d = (x - D) / sigma, d' = (x_euler - D') / sigma_next
#
# Contract: ``ambient_fast.core.solver_step.heun_step``. ONE op, ``ambient_fast::heun_step``,
# with a CUDA kernel (Triton, below), a CPU kernel (C++, csrc/solver_step.cpp) and a fake kernel;
# not differentiable (the samplers run under ``torch.no_grad``). Each kernel reads every input
# once and writes one output of x's dtype; levels are per sample (B,): Triton loads them in
# their own dtype and stride (a column of the sampler's float64 (B, K+1) table is read in
# place), C++ reads them as float64. Arithmetic is fp32 (fp64 for fp64 state) in the
# reference's operation order with IEEE division and square root.
#
# Heun recomputes the Euler point from (x, D) rather than reading it back: three reads, one
# write. Rows with sigma_next == 0 keep the Euler point and do not read D(x_euler) at all.
#
# Layout: Triton tiles the (B, N) row view in x's memory order and keeps x's layout for the
# output; C++ reads each sample as one contiguous run (any batch stride) and writes a
# contiguous output. Inputs in other layouts are copied once. ``kernel="triton"`` also runs
# on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1), which is how CI tests it.
# In eager the public function calls the kernels directly (no dispatcher); under
# torch.compile (and for inputs that require grad) it calls the op, which stays opaque.

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from . import _native
from ._layout import (
    MAX_BLOCK,
    check_kernel,
    div_rn,
    empty_rows_like,
    fake_output,
    launch_rows,
    load_rows,
    load_tile,
    needs_op,
    store_tile,
    tile_indices,
)

__all__ = ["heun_step", "heun_step_fwd"]


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


def heun_step_fwd(out, x, denoised, denoised_next, sigma, sigma_next, *, max_block: int = MAX_BLOCK) -> None:
    """Triton: write the step into ``out`` (an ``empty_rows_like(x)``)."""
    kernel = wrap_triton(_heun_step_fwd_kernel)
    launch_rows(kernel, out, x, (denoised, denoised_next), (sigma, sigma_next), max_block)


def _run(
    x: torch.Tensor,
    denoised: torch.Tensor,
    denoised_next: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    kernel: str,
) -> torch.Tensor:
    if kernel == "cpp":
        return _native.run_step("heun_step", x, (denoised, denoised_next), (sigma, sigma_next))
    out = empty_rows_like(x)
    heun_step_fwd(out, x, denoised, denoised_next, sigma, sigma_next)
    return out


@torch.library.custom_op("ambient_fast::heun_step", mutates_args=(), device_types=("cpu", "cuda"))
def _heun_step_op(
    x: torch.Tensor,
    denoised: torch.Tensor,
    denoised_next: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    kernel: str,
) -> torch.Tensor:
    """The fused heun step (see :func:`heun_step`)."""
    check_kernel(kernel, x.device)
    return _run(x, denoised, denoised_next, sigma, sigma_next, kernel)


@_heun_step_op.register_fake
def _(x, denoised, denoised_next, sigma, sigma_next, kernel):
    return fake_output(x, kernel)


def heun_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    denoised_next: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    kernel: str,
) -> torch.Tensor:
    """Heun's second stage (SPEC 4), fused; contract of ``core.solver_step.heun_step``.

    Args:
        x, denoised: ``(B, ...)`` state at ``sigma`` and ``D(x, sigma)``.
        denoised_next: ``(B, ...)`` ``D(x_euler, sigma_next)``; not read in rows with
            ``sigma_next == 0``, which return the Euler point.
        sigma, sigma_next: ``(B,)`` per-sample levels, ``sigma > 0``, ``sigma_next >= 0``.
        kernel: ``"triton"`` or ``"cpp"`` (see :func:`~ambient_fast.kernels.euler_step.euler_step`).

    Returns:
        ``(B, ...)`` new state in ``x``'s dtype.
    """
    if needs_op(x, denoised, denoised_next):
        return _heun_step_op(x, denoised, denoised_next, sigma, sigma_next, kernel)
    check_kernel(kernel, x.device)
    return _run(x, denoised, denoised_next, sigma, sigma_next, kernel)
