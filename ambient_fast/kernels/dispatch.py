"""Backend selection for the fused ops: which kernel of the one op runs, or the reference.

Each fused op (``kernels/ambient_loss.py``, ``kernels/<step>_step.py``) is ONE ``torch.library``
op with a CUDA (Triton) and a CPU (C++) kernel; a backend name only picks the kernel, or the
plain-PyTorch reference of ``core`` as the fallback:

- ``"auto"``: ``"triton"`` for CUDA tensors, ``"cpp"`` for CPU tensors when the extension
  ``ambient_fast._C`` is built (else the reference, with one warning), the reference elsewhere;
- ``"torch"``: the reference;
- ``"triton"`` / ``"cpp"``: force one kernel (``"triton"`` runs CPU tensors in Triton's
  interpreter under ``TRITON_INTERPRET=1``, which is how CI tests the kernels).

A :class:`Backend` is a bundle of five functions with the contracts of
``core.loss.per_sample_loss_reference`` and ``core.solver_step``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from ..core import solver_step as _ref_step
from ..core.loss import per_sample_loss_reference
from . import _native
from ._layout import INTERPRETED

__all__ = ["BACKENDS", "REFERENCE", "Backend", "get_backend", "loss_backend", "resolve_kernel", "step_backend"]

BACKENDS = ("auto", "torch", "triton", "cpp")


@dataclass(frozen=True)
class Backend:
    """The fused ops of one implementation (see ``core.loss`` and ``core.solver_step``)."""

    name: str
    ambient_loss: Callable[..., torch.Tensor]
    euler_step: Callable[..., torch.Tensor]
    heun_step: Callable[..., torch.Tensor]
    churn_step: Callable[..., torch.Tensor]
    ancestral_step: Callable[..., torch.Tensor]


REFERENCE = Backend(
    "torch",
    per_sample_loss_reference,
    _ref_step.euler_step,
    _ref_step.heun_step,
    _ref_step.churn_step,
    _ref_step.ancestral_step,
)

# Bundles by kernel name. A plain dict rather than functools.cache: torch.compile traces
# through get_backend and guards on dict entries, while it warns about and bypasses caches.
_FUSED: dict[str, Backend] = {}
_WARNED: list[bool] = []


def _fused(kernel: str) -> Backend:
    if kernel not in _FUSED:
        from .ambient_loss import fused_ambient_loss
        from .ancestral_step import ancestral_step
        from .churn_step import churn_step
        from .euler_step import euler_step
        from .heun_step import heun_step

        _FUSED[kernel] = Backend(
            kernel,
            partial(fused_ambient_loss, kernel=kernel),
            partial(euler_step, kernel=kernel),
            partial(heun_step, kernel=kernel),
            partial(churn_step, kernel=kernel),
            partial(ancestral_step, kernel=kernel),
        )
    return _FUSED[kernel]


def resolve_kernel(name: str, device: torch.device) -> str:
    """``"torch"`` (the reference), ``"triton"`` or ``"cpp"`` for backend ``name`` on ``device``.

    Memoised on ``(name, device type)``: the answer depends only on them and on what is
    installed, and the loss asks it every training step (refusals are not memoised).
    """
    key = (name, device.type)
    kernel = _RESOLVED.get(key)
    if kernel is None:
        kernel = _resolve_kernel(name, device)
        _RESOLVED[key] = kernel
    return kernel


_RESOLVED: dict[tuple[str, str], str] = {}


def _resolve_kernel(name: str, device: torch.device) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "torch":
        return "torch"
    if name == "triton":
        if device.type != "cuda" and not INTERPRETED:
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
                "before importing to run the kernels on CPU in Triton's interpreter"
            )
        return "triton"
    if name == "cpp":
        if not _native.available():
            raise RuntimeError("backend='cpp' requested but the native extension ambient_fast._C is not built")
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpp' needs CPU tensors, got {device.type}")
        return "cpp"
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        if _native.available():
            return "cpp"
        if not _WARNED:
            _WARNED.append(True)
            warnings.warn(
                "ambient_fast: the native CPU extension (ambient_fast._C) is not built; CPU ops fall "
                f"back to the plain-PyTorch reference ({_native.LOAD_ERROR}). Reinstall with a C++17 "
                "compiler to get the fused CPU kernels.",
                RuntimeWarning,
                stacklevel=3,
            )
    return "torch"


def get_backend(name: str, device: torch.device) -> Backend:
    """The bundle of backend ``name`` (``auto``/``torch``/``triton``/``cpp``) for tensors on ``device``."""
    kernel = resolve_kernel(name, device)
    return REFERENCE if kernel == "torch" else _fused(kernel)


def loss_backend(name: str, device: torch.device) -> Callable[..., torch.Tensor]:
    """The per-sample ambient loss function of the resolved backend."""
    return get_backend(name, device).ambient_loss


def step_backend(name: str, device: torch.device) -> Backend:
    """The solver-step bundle of the resolved backend."""
    return get_backend(name, device)
