"""Backend selection for the fused ops: CUDA -> Triton, CPU -> C++, anything else -> reference.

A backend is a :class:`Backend` bundle of five functions with the contracts of
``core.loss.per_sample_loss_reference`` and ``core.solver_step``. ``backend="auto"`` picks by
device; ``"torch"``, ``"triton"`` and ``"cpp"`` force one (forcing Triton on CPU tensors
works under ``TRITON_INTERPRET=1``, which is how CI tests the kernels).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core import solver_step as _ref_step
from ..core.loss import per_sample_loss_reference

__all__ = ["Backend", "get_backend", "loss_backend", "step_backend", "BACKENDS"]

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


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


# Resolved backends by name. A plain dict rather than functools.cache: torch.compile traces
# through get_backend (it runs inside ambient_loss) and guards on dict entries, while it
# warns about and bypasses cache wrappers.
_RESOLVED: dict[str, Backend | None] = {}


def _triton_backend() -> Backend | None:
    if "triton" not in _RESOLVED:
        _RESOLVED["triton"] = _load_triton_backend()
    return _RESOLVED["triton"]


def _cpp_backend() -> Backend | None:
    if "cpp" not in _RESOLVED:
        _RESOLVED["cpp"] = _load_cpp_backend()
    return _RESOLVED["cpp"]


def _load_triton_backend() -> Backend | None:
    if not (_module_exists("triton") and _module_exists("ambient_fast.kernels.ambient_loss")):
        return None
    from . import ambient_loss as loss_mod
    from . import solver_step as step_mod

    return Backend(
        "triton",
        loss_mod.ambient_loss_triton,
        step_mod.euler_step_triton,
        step_mod.heun_step_triton,
        step_mod.churn_step_triton,
        step_mod.ancestral_step_triton,
    )


def _load_cpp_backend() -> Backend | None:
    if not _module_exists("ambient_fast.kernels.cpu_ops"):
        return None
    from . import cpu_ops

    if not cpu_ops.available():
        warnings.warn(
            "ambient_fast: the native CPU extension (ambient_fast._C) is not built; CPU ops fall "
            f"back to the plain-PyTorch reference ({cpu_ops.load_error()}). Reinstall with a C++17 "
            "compiler to get the fused CPU kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return Backend(
        "cpp",
        cpu_ops.ambient_loss_cpp,
        cpu_ops.euler_step_cpp,
        cpu_ops.heun_step_cpp,
        cpu_ops.churn_step_cpp,
        cpu_ops.ancestral_step_cpp,
    )


def get_backend(name: str, device: torch.device) -> Backend:
    """Resolve ``name`` (``auto``/``torch``/``triton``/``cpp``) for tensors on ``device``."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "torch":
        return REFERENCE
    if name == "triton":
        backend = _triton_backend()
        if backend is None:
            raise RuntimeError("backend='triton' requested but the Triton kernels are not available")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
                "before importing to run the kernels on CPU in Triton's interpreter"
            )
        return backend
    if name == "cpp":
        backend = _cpp_backend()
        if backend is None:
            raise RuntimeError("backend='cpp' requested but the native extension ambient_fast._C is not built")
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpp' needs CPU tensors, got {device.type}")
        return backend
    if device.type == "cuda":
        return _triton_backend() or REFERENCE
    if device.type == "cpu":
        return _cpp_backend() or REFERENCE
    return REFERENCE


def loss_backend(name: str, device: torch.device) -> Callable[..., torch.Tensor]:
    """The per-sample ambient loss function of the resolved backend."""
    return get_backend(name, device).ambient_loss


def step_backend(name: str, device: torch.device) -> Backend:
    """The solver-step bundle of the resolved backend."""
    return get_backend(name, device)
