# C++ binding glue shared by the fused ops (``ambient_loss.py`` and the ``*_step.py`` files).
#
# ``ambient_fast._C`` is plain pybind11 with no torch headers (csrc/ARCHITECTURE.md): it takes
# data pointers, row strides and dtype names. The op files are its only callers; these helpers
# lay the tensors out for it (each sample's elements contiguous, any batch stride; levels as
# contiguous float64) and keep them referenced for the call.

from __future__ import annotations

import torch

try:
    from .. import _C
except ImportError as exc:  # built with AMBIENT_FAST_NO_EXT=1, or no compiler at install time
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
else:
    LOAD_ERROR = ""

__all__ = [
    "DTYPE_NAMES",
    "LOAD_ERROR",
    "available",
    "compute_dtype",
    "extension",
    "levels",
    "rows",
    "run_step",
    "same_dtype",
    "STEP_ARGUMENTS",
]

DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


def available() -> bool:
    """Whether the native extension ``ambient_fast._C`` imported."""
    return _C is not None


def extension():
    """The ``ambient_fast._C`` module (RuntimeError naming the import failure when not built)."""
    if _C is None:
        raise RuntimeError(f"ambient_fast._C is not built ({LOAD_ERROR}); use backend='torch'")
    return _C


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 storage, float32 for every other dtype (what the kernels compute in)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(tensor, (data pointer, row stride))`` with each sample's elements contiguous.

    Any batch stride is kept (slices, expanded rows); other layouts get a contiguous copy.
    The returned tensor must stay referenced until the kernel returns.
    """
    if not t.is_contiguous() and t.dim() > 1 and t.shape[0] > 0 and not t[0].is_contiguous():
        t = t.contiguous()
    return t, (t.data_ptr(), t.stride(0))


def levels(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, bool]]:
    """``(tensor, (data pointer, element stride, is float64))`` of a ``(B,)`` level vector.

    float32 and float64 levels are read in place with any stride (a column of the sampler's
    ``(B, K+1)`` table, a stride-0 expansion); other dtypes are converted to float32 (exactly).
    The returned tensor must stay referenced until the kernel returns.
    """
    dtype = t.dtype
    if dtype is not torch.float32 and dtype is not torch.float64:
        t, dtype = t.to(torch.float32), torch.float32
    return t, (t.data_ptr(), t.stride(0), dtype is torch.float64)


def same_dtype(tensors: list[torch.Tensor], reference: torch.Tensor) -> list[torch.Tensor]:
    """``tensors`` in one storage dtype: unchanged when they share the reference's dtype, else
    converted to its compute dtype (the dtype the reference computes in)."""
    if all(t.dtype == reference.dtype for t in tensors):
        return tensors
    compute = compute_dtype(reference.dtype)
    return [t.to(compute) for t in tensors]


# The (B, ...) inputs after x and the (B,) levels of each C++ step, in _C's argument order
# (out, x, *inputs, *levels, *scalars); the names are for error messages.
STEP_ARGUMENTS = {
    "euler_step": (("denoised",), ("sigma", "sigma_next")),
    "heun_step": (("denoised", "denoised_next"), ("sigma", "sigma_next")),
    "churn_step": (("noise",), ("sigma", "sigma_hat")),
    "ancestral_step": (("denoised", "noise"), ("sigma", "sigma_next")),
}


def run_step(name: str, x: torch.Tensor, inputs: tuple, level_args: tuple, *scalars: float) -> torch.Tensor:
    """Run the C++ step ``name`` (``_C.<name>``): ``x`` and ``inputs`` ``(B, ...)`` of one shape,
    ``level_args`` ``(B,)``, both in the order of :data:`STEP_ARGUMENTS`, then the op's
    scalars; returns a new contiguous tensor of ``x``'s shape and dtype.

    This is the sampler's per-step path, so it does the least Python that keeps every check:
    one pass over the operands, positional arguments to ``_C``.
    """
    kernel = getattr(extension(), name)
    if x.dim() < 1:
        raise ValueError(f"{name}: x must be batched (B, ...), got a 0-d tensor")
    shape, dtype = x.shape, x.dtype
    batch = shape[0]
    mixed = False
    for i, t in enumerate(inputs):
        if t.shape != shape:
            arg = STEP_ARGUMENTS[name][0][i]
            raise ValueError(f"{name}: {arg} shape {tuple(t.shape)} differs from x's {tuple(shape)}")
        mixed = mixed or t.dtype != dtype
    for i, t in enumerate(level_args):
        if t.shape != (batch,):
            arg = STEP_ARGUMENTS[name][1][i]
            raise ValueError(f"{name}: {arg} must have shape ({batch},), got {tuple(t.shape)}")
    storage = compute_dtype(dtype) if mixed else dtype
    # Every converted or copied tensor stays referenced (in these lists) until the call returns.
    level_tensors = [levels(t) for t in level_args]
    row_tensors = [rows(t if not mixed else t.to(storage)) for t in (x, *inputs)]
    numel = x.numel() // batch if batch else 0
    out = torch.empty_like(x, dtype=storage, memory_format=torch.contiguous_format)
    kernel(
        DTYPE_NAMES[storage],
        batch,
        numel,
        (out.data_ptr(), numel),
        *[r for _, r in row_tensors],
        *[triple for _, triple in level_tensors],
        *scalars,
    )
    return out if storage == dtype else out.to(dtype)
