"""Input checks shared by every public entry point.

Each failure is one ``ValueError`` (``TypeError`` for a non-tensor) naming the argument and
the first bad sample index, so a bad batch is found before it becomes a silent NaN. Checks of
values need a host sync; they are skipped while ``torch.compile`` traces
(``torch.compiler.is_compiling()``), during CUDA-graph capture and when the caller passes
``validate=False``. Checks of types and shapes (``check_tensor``, ``check_per_sample_layout``,
``check_same_layout``) cost no sync and always run. The fused loss folds its value checks into
the kernel pass (``kernels/ambient_loss.py``); these functions are its reference and its
error path.
"""

from __future__ import annotations

import torch

__all__ = [
    "DATA_DTYPES",
    "active",
    "check_finite",
    "check_per_sample",
    "check_per_sample_layout",
    "check_same_layout",
    "check_tensor",
    "check_sigma_pair",
    "first_bad_index",
]


# The storage dtypes the losses and steps accept for data (they compute in fp32, fp64 for fp64).
DATA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def active(validate: bool = True) -> bool:
    """Whether eager checks should run now (never while compiling or capturing a CUDA graph)."""
    if not validate or torch.compiler.is_compiling():
        return False
    return not (_cuda_available() and torch.cuda.is_current_stream_capturing())


_CUDA: list[bool] = []


def _cuda_available() -> bool:
    """``torch.cuda.is_available()``, asked once (it costs microseconds per call)."""
    if not _CUDA:
        _CUDA.append(torch.cuda.is_available())
    return _CUDA[0]


def first_bad_index(bad: torch.Tensor) -> int:
    """Index along dim 0 of the first row with any True in ``bad`` (-1 if none)."""
    rows = bad.reshape(bad.shape[0], -1).any(dim=1) if bad.dim() > 1 else bad
    idx = torch.nonzero(rows)
    return int(idx[0, 0]) if idx.numel() else -1


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise if ``t`` holds NaN or Inf, naming the first bad sample (one reduction, one sync)."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = first_bad_index(~torch.isfinite(t))
        raise ValueError(f"{name}: non-finite value (NaN or Inf) in sample {bad}")


def check_tensor(name: str, t: object, expected: str = "(B, ...)") -> None:
    """``t`` must be a tensor (a Python number where a tensor belongs is a TypeError naming it)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor {expected}, got {type(t).__name__} {t!r:.40}")


def check_per_sample_layout(name: str, t: object, batch: int, device: torch.device) -> None:
    """``t`` must be a floating ``(batch,)`` tensor on ``device`` (no sync)."""
    if not isinstance(t, torch.Tensor):
        check_tensor(name, t, f"of shape ({batch},)")
    if t.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},) (one value per sample), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on device {t.device}, but the batch is on {device}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {t.dtype}")


def check_per_sample(name: str, t: torch.Tensor, batch: int, device: torch.device) -> None:
    """``t`` must be a floating ``(batch,)`` tensor on ``device`` with finite values."""
    check_per_sample_layout(name, t, batch, device)
    check_finite(name, t)


def check_same_layout(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    """Every tensor in ``others`` has the shape, dtype and device of ``reference``; ``B >= 1``."""
    check_tensor(reference_name, reference)
    for name, t in others.items():
        if not isinstance(t, torch.Tensor):
            check_tensor(name, t)
    shape, dtype, device = reference.shape, reference.dtype, reference.device
    if len(shape) < 1 or shape[0] < 1:
        raise ValueError(f"{reference_name}: expected a batch (B, ...) with B >= 1, got {tuple(shape)}")
    for name, t in others.items():
        if t.shape != shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} differs from {reference_name}'s {tuple(shape)}")
        if t.dtype != dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from {reference_name}'s {dtype}")
        if t.device != device:
            raise ValueError(f"{name}: device {t.device} differs from {reference_name}'s {device}")
    if dtype not in DATA_DTYPES:
        raise ValueError(f"{reference_name}: unsupported dtype {reference.dtype} (use fp16/bf16/fp32/fp64)")


def check_sigma_pair(
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    batch: torch.Tensor,
    schedule: str,
    sigma_max: torch.Tensor | None = None,
) -> None:
    """Per-sample levels: ``sigma > 0``, ``sigma_min >= 0``, ``sigma_max >= 0``; VP levels < 1."""
    if not active():
        return
    n, device = batch.shape[0], batch.device
    check_per_sample("sigma", sigma, n, device)
    check_per_sample("sigma_min", sigma_min, n, device)
    bad = first_bad_index(sigma <= 0)
    if bad >= 0:
        raise ValueError(f"sigma: must be > 0, sample {bad} has {float(sigma[bad])}")
    bad = first_bad_index(sigma_min < 0)
    if bad >= 0:
        raise ValueError(f"sigma_min: must be >= 0, sample {bad} has {float(sigma_min[bad])}")
    if sigma_max is not None:
        check_per_sample("sigma_max", sigma_max, n, device)
        bad = first_bad_index(sigma_max < 0)
        if bad >= 0:
            raise ValueError(f"sigma_max: must be >= 0, sample {bad} has {float(sigma_max[bad])}")
    if schedule == "vp":
        for name, t in (("sigma", sigma), ("sigma_min", sigma_min)):
            bad = first_bad_index(t >= 1)
            if bad >= 0:
                raise ValueError(f"{name}: VP noise std must be < 1, sample {bad} has {float(t[bad])}")
