# Fused Euler step (SPEC 4; Karras et al. 2022, Algorithm 1):
#
#   x' = x + (sigma_next - sigma) (x - D) / sigma
#
# Contract: ``ambient_fast.core.solver_step.euler_step``. ONE op, ``ambient_fast::euler_step``,
# with a CUDA kernel (Triton, below), a CPU kernel (C++, csrc/solver_step.cpp) and a fake kernel;
# not differentiable (the samplers run under ``torch.no_grad``). Each kernel reads every input
# once and writes one output of x's dtype; levels are per sample (B,): Triton loads them in
# their own dtype and stride (a column of the sampler's float64 (B, K+1) table is read in
# place), C++ reads them as float64. Arithmetic is fp32 (fp64 for fp64 state) in the
# reference's operation order with IEEE division and square root.
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

__all__ = ["euler_step", "euler_step_fwd"]


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
    """``x' = x + (sigma_next - sigma) ((x - D) / sigma)`` (EDM's order: the slope first)."""
    rows, cols, row_ok, mask = tile_indices(n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS)
    s = load_rows(sigma_ptr, rows, stride_sigma, row_ok, FP64)[:, None]
    s_next = load_rows(sigma_next_ptr, rows, stride_sigma_next, row_ok, FP64)[:, None]
    x = load_tile(x_ptr, rows, cols, stride_x, mask, FP64)
    denoised = load_tile(denoised_ptr, rows, cols, stride_denoised, mask, FP64)
    store_tile(out_ptr, rows, cols, stride_out, mask, x + (s_next - s) * div_rn(x - denoised, s))


def euler_step_fwd(out, x, denoised, sigma, sigma_next, *, max_block: int = MAX_BLOCK) -> None:
    """Triton: write the step into ``out`` (an ``empty_rows_like(x)``)."""
    kernel = wrap_triton(_euler_step_fwd_kernel)
    launch_rows(kernel, out, x, (denoised,), (sigma, sigma_next), max_block)


def _run(
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    kernel: str,
) -> torch.Tensor:
    if kernel == "cpp":
        return _native.run_step("euler_step", x, (denoised,), (sigma, sigma_next))
    out = empty_rows_like(x)
    euler_step_fwd(out, x, denoised, sigma, sigma_next)
    return out


@torch.library.custom_op("ambient_fast::euler_step", mutates_args=(), device_types=("cpu", "cuda"))
def _euler_step_op(
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    kernel: str,
) -> torch.Tensor:
    """The fused euler step (see :func:`euler_step`)."""
    check_kernel(kernel, x.device)
    return _run(x, denoised, sigma, sigma_next, kernel)


@_euler_step_op.register_fake
def _(x, denoised, sigma, sigma_next, kernel):
    return fake_output(x, kernel)


def euler_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    kernel: str,
) -> torch.Tensor:
    """Euler update from ``sigma`` to ``sigma_next`` (SPEC 4), fused; contract of ``core.solver_step.euler_step``.

    Args:
        x, denoised: ``(B, ...)`` state and ``D(x, sigma)``, same shape (fp16/bf16/fp32/fp64).
        sigma, sigma_next: ``(B,)`` per-sample levels (VE units), ``sigma > 0``.
        kernel: ``"triton"`` (CUDA, or CPU tensors under TRITON_INTERPRET=1) or ``"cpp"`` (CPU).

    Returns:
        ``(B, ...)`` new state in ``x``'s dtype (Triton: ``x``'s memory layout; C++: contiguous).
    """
    if needs_op(x, denoised):
        return _euler_step_op(x, denoised, sigma, sigma_next, kernel)
    check_kernel(kernel, x.device)
    return _run(x, denoised, sigma, sigma_next, kernel)
