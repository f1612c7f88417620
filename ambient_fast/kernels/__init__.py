"""Fused kernels (Triton for CUDA, C++ for CPU) and the backend dispatch that picks them."""

from .dispatch import BACKENDS, Backend, get_backend

__all__ = ["BACKENDS", "Backend", "get_backend"]
