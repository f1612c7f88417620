"""ambient_fast: a custom-kernel engine for ambient diffusion.

Public API (SPEC.md sections in brackets):

- :func:`ambient_loss`, :class:`AmbientLoss`, :func:`ambient_coefficients`, :func:`eligible`,
  :func:`noisy_pair` [2]
- :class:`EDMPrecond`, :class:`VPToEDM` [1]
- :func:`karras_sigmas`, :func:`sample` [4]
- :func:`restore` [5]; :func:`restore_dataset` (whole datasets: CUDA graphs, resume,
  torch.distributed), :func:`save_denoiser` / :func:`load_denoiser` (safetensors checkpoints)

Subpackages: ``data`` (formats, sidecars, pipelines), ``nn`` (networks), ``eval`` (FID),
``loops`` (training, annotation, dataloops), ``compat`` (EDM / Ambient-o drop-in),
``latent`` (text-to-image restoration), ``kernels`` (the fused ops: one ``torch.library`` op per
function with its CUDA (Triton) and CPU (C++) kernels).
"""

from .core import (
    EDMPrecond,
    VPToEDM,
    ambient_coefficients,
    edm_training_sigmas,
    eligible,
    karras_sigmas,
    noisy_pair,
    sample_normal,
)
from .loss import AmbientLoss, ambient_loss
from .restoration import load_denoiser, restore_dataset, save_denoiser
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
    "load_denoiser",
    "noisy_pair",
    "restore",
    "restore_dataset",
    "sample",
    "sample_normal",
    "save_denoiser",
]
