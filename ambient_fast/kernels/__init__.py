"""Fused ops: one ``torch.library`` op per function with its CUDA (Triton) and CPU (C++)
kernels side by side (``ambient_loss``, ``euler_step``, ``heun_step``, ``churn_step``,
``ancestral_step``), and the backend choice (``dispatch``) with the reference fallback."""

from .dispatch import BACKENDS, REFERENCE, Backend, get_backend, resolve_kernel

__all__ = ["BACKENDS", "REFERENCE", "Backend", "get_backend", "resolve_kernel"]
