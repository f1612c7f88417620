# Row layout, tiling and registration helpers shared by the fused Triton ops
# (``ambient_loss.py``, ``solver_step.py``).
#
# Every op views its ``(B, ...)`` tensors as ``(B, N)`` rows taken in the memory order of the
# leading operand's trailing dims (so contiguous, channels_last and batch-sliced tensors are
# read in place), tiles the rows as [BLOCK_ROWS, BLOCK_COLS] programs, loads in the storage
# dtype and computes in fp32 (fp64 for fp64 tensors). ``launch_rows`` is the launcher shared by
# the elementwise step kernels (one output, inputs, per-sample levels).

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = [
    "MAX_BLOCK",
    "MAX_GRID_Y",
    "INTERPRETED",
    "as_rows",
    "div_rn",
    "empty_rows_like",
    "load_rows",
    "load_tile",
    "memory_order",
    "check_kernel",
    "fake_output",
    "needs_op",
    "launch_rows",
    "num_warps",
    "sqrt_rn",
    "store_tile",
    "tile_indices",
    "tile_shape",
    "upcast",
]

MAX_BLOCK = 4096  # elements per program: 3 x 16 KiB fp32 loads in flight, and ~2 programs per
#                   H100 SM at B=64x4x64x64 (not yet swept on a GPU: see benchmarks/bench_kernels.py)
WARP_ELEMENTS = 512  # elements per warp: 16 per thread, four 16-byte fp32 vectors, at MAX_BLOCK
MAX_WARPS = 8  # reached at MAX_BLOCK; more warps only add scheduling overhead for a streaming op
MAX_GRID_Y = 65535  # CUDA limit on grid dimension 1, which indexes the chunks of one row


# ----------------------------------------------------------------------------------------------
# Triton helpers (shared with solver_step.py)
# ----------------------------------------------------------------------------------------------


@triton.jit
def upcast(x, FP64: tl.constexpr):
    """Storage dtype -> compute dtype (fp64 for fp64 tensors, fp32 otherwise)."""
    if FP64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def div_rn(x, y):
    """IEEE round-to-nearest division (Triton's ``/`` on fp32 is an approximation)."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def sqrt_rn(x):
    """IEEE round-to-nearest square root (``tl.sqrt`` on fp32 is an approximation)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def tile_indices(n_rows, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Row and column indices of this program's tile, the row mask and the element mask."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_ok = rows < n_rows
    return rows, cols, row_ok, row_ok[:, None] & (cols < n_cols)[None, :]


@triton.jit
def load_rows(ptr, rows, stride, row_ok, FP64: tl.constexpr):
    """Per-sample values ``(BLOCK_ROWS,)`` in the compute dtype.

    Masked-off rows read 0.5, a level valid in every formula (VP included), so padding lanes
    stay finite.
    """
    return upcast(tl.load(ptr + rows * stride, mask=row_ok, other=0.5), FP64)


@triton.jit
def load_tile(ptr, rows, cols, stride, mask, FP64: tl.constexpr):
    """A ``(BLOCK_ROWS, BLOCK_COLS)`` tile of a row view in the compute dtype (0 where masked)."""
    return upcast(tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0), FP64)


@triton.jit
def store_tile(ptr, rows, cols, stride, mask, value):
    """Store a tile into a row view in the pointer's dtype."""
    tl.store(ptr + rows[:, None] * stride + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Python helpers (shared with solver_step.py): row views, tiles, registration
# ----------------------------------------------------------------------------------------------

INTERPRETED = isinstance(upcast, InterpretedFunction)


def check_kernel(kernel: str, device: torch.device) -> None:
    """``kernel`` ("triton" or "cpp") can run on tensors of ``device``, else a clear error."""
    if kernel == "triton":
        if device.type != "cuda" and not INTERPRETED:
            raise RuntimeError(
                f"kernel 'triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
                "before importing to run the kernels on CPU in Triton's interpreter"
            )
    elif kernel == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"kernel 'cpp' needs CPU tensors, got {device.type}")
    else:
        raise ValueError(f"kernel must be 'triton' or 'cpp', got {kernel!r}")


def needs_op(*tensors: torch.Tensor) -> bool:
    """Whether a step must go through its registered op rather than straight to the kernel:
    under torch.compile (the op is opaque to it), or when an input requires grad (the op then
    refuses the backward with "no autograd formula" instead of a silently detached result)."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def fake_output(x: torch.Tensor, kernel: str) -> torch.Tensor:
    """The output a kernel allocates for ``x``: Triton keeps x's layout, C++ is contiguous."""
    return empty_rows_like(x) if kernel == "triton" else torch.empty_like(x, memory_format=torch.contiguous_format)


def memory_order(t: torch.Tensor) -> list[int]:
    """``t``'s trailing dims from outermost to innermost in memory (stable in dim order)."""
    return sorted(range(1, t.dim()), key=lambda d: -t.stride(d))


def _dense(t: torch.Tensor) -> bool:
    """Whether the trailing dims of ``t`` (in their current order) are one dense block."""
    expected = 1
    for d in range(t.dim() - 1, 0, -1):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def as_rows(t: torch.Tensor, order: list[int], *, copy: bool = True) -> torch.Tensor:
    """``(B, N)`` view of ``t`` with its trailing dims taken in ``order``.

    The row stride is free (batch slices stay views); the trailing dims must be dense in
    ``order``, else the input is copied (``copy=True``) or, for an output, it is an error.
    """
    permuted = t.permute(0, *order)
    if not _dense(permuted):
        if not copy:
            raise ValueError(f"output of shape {tuple(t.shape)} and strides {t.stride()} is not dense")
        permuted = permuted.contiguous()
    return permuted.reshape(t.shape[0], -1)


def empty_rows_like(t: torch.Tensor) -> torch.Tensor:
    """Uninitialised tensor of ``t``'s shape and dtype, dense in ``t``'s memory order (row stride N)."""
    order = memory_order(t)
    strides = [0] * t.dim()
    step = 1
    for d in reversed([0, *order]):
        strides[d] = step
        step *= t.shape[d]
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device)


def tile_shape(n_rows: int, n_cols: int, max_block: int) -> tuple[int, int, int]:
    """``(BLOCK_ROWS, BLOCK_COLS, chunks per row)`` for a ``(n_rows, n_cols)`` row view."""
    block_cols = min(triton.next_power_of_2(n_cols), max_block)
    block_rows = max(1, min(max_block // block_cols, triton.next_power_of_2(n_rows)))
    chunks = triton.cdiv(n_cols, block_cols)
    if chunks > MAX_GRID_Y:
        raise ValueError(f"rows of {n_cols} elements exceed {MAX_GRID_Y} blocks of {block_cols}")
    return block_rows, block_cols, chunks


def num_warps(tile_elements: int) -> int:
    """Warps for a tile of ``tile_elements`` (see WARP_ELEMENTS)."""
    return max(1, min(MAX_WARPS, tile_elements // WARP_ELEMENTS))


def launch_rows(kernel, out: torch.Tensor, x: torch.Tensor, others, levels, max_block: int, **constexprs) -> None:
    """Launch a step kernel with arguments (out, x, *others, *levels, strides, sizes, constexprs).

    ``out`` comes from :func:`empty_rows_like` of ``x``; ``others`` are ``(B, ...)`` like ``x``
    (copied only if not dense in ``x``'s memory order); ``levels`` are ``(B,)`` of any stride.
    """
    n_rows = x.shape[0]
    n_cols = x.numel() // n_rows if n_rows else 0
    if n_rows == 0 or n_cols == 0:
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
