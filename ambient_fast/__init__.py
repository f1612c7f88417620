"""ambient_fast: a custom-kernel engine for ambient diffusion.

Public API (SPEC.md sections in brackets):

- :func:`ambient_loss`, :class:`AmbientLoss`, :func:`ambient_coefficients`, :func:`eligible`,
  :func:`noisy_pair` [2]
- :class:`EDMPrecond`, :class:`VPToEDM` [1]
- :func:`karras_sigmas`, :func:`sample` [4]
- :func:`restore` [5]
"""

from .core import (
    AmbientLoss,
    EDMPrecond,
    VPToEDM,
    ambient_coefficients,
    ambient_loss,
    edm_training_sigmas,
    eligible,
    karras_sigmas,
    noisy_pair,
    sample_normal,
)
from .samplers import restore, sample

__version__ = "0.1.0"

__all__ = [
    "AmbientLoss",
    "EDMPrecond",
    "VPToEDM",
    "__version__",
    "ambient_coefficients",
    "ambient_loss",
    "edm_training_sigmas",
    "eligible",
    "karras_sigmas",
    "noisy_pair",
    "restore",
    "sample",
    "sample_normal",
]
