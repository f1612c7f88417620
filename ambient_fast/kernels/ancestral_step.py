# Fused ancestral (exact-Gaussian reverse-SDE) step (SPEC 5):
#
#   x' = D + r^2 (x - D) + sigma_next sqrt(1 - r^2) eps, r = sigma_next / sigma
#
# Contract: ``ambient_fast.core.solver_step.ancestral_step``. ONE op, ``ambient_fast::ancestral_step``,
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
    sqrt_rn,
    store_tile,
    tile_indices,
)

__all__ = ["ancestral_step", "ancestral_step_fwd"]


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


def ancestral_step_fwd(out, x, denoised, noise, sigma, sigma_next, *, max_block: int = MAX_BLOCK) -> None:
    """Triton: write the step into ``out`` (an ``empty_rows_like(x)``)."""
    kernel = wrap_triton(_ancestral_step_fwd_kernel)
    launch_rows(kernel, out, x, (denoised, noise), (sigma, sigma_next), max_block)


def _run(
    x: torch.Tensor,
    denoised: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    kernel: str,
) -> torch.Tensor:
    if kernel == "cpp":
        return _native.run_step("ancestral_step", x, (denoised, noise), (sigma, sigma_next))
    out = empty_rows_like(x)
    ancestral_step_fwd(out, x, denoised, noise, sigma, sigma_next)
    return out


@torch.library.custom_op("ambient_fast::ancestral_step", mutates_args=(), device_types=("cpu", "cuda"))
def _ancestral_step_op(
    x: torch.Tensor,
    denoised: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    kernel: str,
) -> torch.Tensor:
    """The fused ancestral step (see :func:`ancestral_step`)."""
    check_kernel(kernel, x.device)
    return _run(x, denoised, noise, sigma, sigma_next, kernel)


@_ancestral_step_op.register_fake
def _(x, denoised, noise, sigma, sigma_next, kernel):
    return fake_output(x, kernel)


def ancestral_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    kernel: str,
) -> torch.Tensor:
    """One exact-Gaussian reverse-SDE step from ``sigma`` to ``sigma_next < sigma`` (SPEC 5), fused;
    contract of ``core.solver_step.ancestral_step``.

    Args:
        x, denoised, noise: ``(B, ...)`` state, ``D(x, sigma)`` and standard normal noise.
        sigma, sigma_next: ``(B,)`` per-sample levels, ``sigma > 0``.
        kernel: ``"triton"`` or ``"cpp"`` (see :func:`~ambient_fast.kernels.euler_step.euler_step`).

    Returns:
        ``(B, ...)`` ``D + r^2 (x - D) + sigma_next sqrt(1 - r^2) noise`` in ``x``'s dtype.
    """
    if needs_op(x, denoised, noise):
        return _ancestral_step_op(x, denoised, noise, sigma, sigma_next, kernel)
    check_kernel(kernel, x.device)
    return _run(x, denoised, noise, sigma, sigma_next, kernel)
