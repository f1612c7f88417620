# Fused churn noise add (SPEC 4; Karras et al. 2022, Algorithm 2):
#
#   x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise eps
#
# Contract: ``ambient_fast.core.solver_step.churn_step``. ONE op, ``ambient_fast::churn_step``,
# with a CUDA kernel (Triton, below), a CPU kernel (C++, csrc/solver_step.cpp) and a fake kernel;
# not differentiable (the samplers run under ``torch.no_grad``). Each kernel reads every input
# once and writes one output of x's dtype; levels are per sample (B,): Triton loads them in
# their own dtype and stride (a column of the sampler's float64 (B, K+1) table is read in
# place), C++ reads them as float64. Arithmetic is fp32 (fp64 for fp64 state) in the
# reference's operation order with IEEE division and square root.
#
# S_noise is a Triton constexpr (exact in fp64; each distinct value compiles its own kernel).
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

__all__ = ["churn_step", "churn_step_fwd"]


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


def churn_step_fwd(out, x, noise, sigma, sigma_hat, S_noise, *, max_block: int = MAX_BLOCK) -> None:
    """Triton: write the step into ``out`` (an ``empty_rows_like(x)``)."""
    kernel = wrap_triton(_churn_step_fwd_kernel)
    launch_rows(kernel, out, x, (noise,), (sigma, sigma_hat), max_block, S_NOISE=float(S_noise))


def _run(
    x: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    sigma_hat: torch.Tensor,
    S_noise: float,
    kernel: str,
) -> torch.Tensor:
    if kernel == "cpp":
        return _native.run_step("churn_step", x, (noise,), (sigma, sigma_hat), float(S_noise))
    out = empty_rows_like(x)
    churn_step_fwd(out, x, noise, sigma, sigma_hat, S_noise)
    return out


@torch.library.custom_op("ambient_fast::churn_step", mutates_args=(), device_types=("cpu", "cuda"))
def _churn_step_op(
    x: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    sigma_hat: torch.Tensor,
    S_noise: float,
    kernel: str,
) -> torch.Tensor:
    """The fused churn step (see :func:`churn_step`)."""
    check_kernel(kernel, x.device)
    return _run(x, noise, sigma, sigma_hat, S_noise, kernel)


@_churn_step_op.register_fake
def _(x, noise, sigma, sigma_hat, S_noise, kernel):
    return fake_output(x, kernel)


def churn_step(
    x: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    sigma_hat: torch.Tensor,
    S_noise: float = 1.0,
    *,
    kernel: str,
) -> torch.Tensor:
    """Raise the level from ``sigma`` to ``sigma_hat >= sigma`` with ``noise`` (SPEC 4), fused;
    contract of ``core.solver_step.churn_step``.

    Args:
        x, noise: ``(B, ...)`` state and standard normal noise.
        sigma, sigma_hat: ``(B,)`` per-sample levels.
        S_noise: EDM's noise inflation.
        kernel: ``"triton"`` or ``"cpp"`` (see :func:`~ambient_fast.kernels.euler_step.euler_step`).

    Returns:
        ``(B, ...)`` ``x + sqrt(sigma_hat^2 - sigma^2) S_noise noise`` in ``x``'s dtype.
    """
    if needs_op(x, noise):
        return _churn_step_op(x, noise, sigma, sigma_hat, float(S_noise), kernel)
    check_kernel(kernel, x.device)
    return _run(x, noise, sigma, sigma_hat, S_noise, kernel)
