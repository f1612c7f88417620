"""Denoiser networks ``F(x, noise_labels, class_labels) -> x``-shaped output.

Every network takes ``x`` ``(B, ...)``, ``noise_labels`` ``(B,)`` (``c_noise`` from
:class:`~ambient_fast.core.precond.EDMPrecond`) and ``class_labels`` (``(B,)`` int,
``(B, num_classes)`` one-hot or ``None``), so ``EDMPrecond(build_network(...))`` is a
denoiser ``D(x, sigma, labels)``.

Presets (parameter counts; MLPs at ``data_dim=64``):

==================  ===========  ==============================================
name                parameters   use
==================  ===========  ==============================================
``unet-tiny``            11,673  CPU tests, ``torch.compile`` smoke tests
``unet-digits``         549,145  8x8 / 16x16 grayscale digits demo
``unet-cifar10``     55,732,739  EDM DDPM++ CIFAR-10 (same count as EDM's SongUNet)
``mlp-small``           169,984  flattened small data (digits, proteins, trajectories)
``mlp-base``            425,664  same, wider
==================  ===========  ==============================================
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .checkpoint import (
    DenoiserConfig,
    load_denoiser,
    load_training_state,
    read_denoiser_config,
    save_denoiser,
    save_training_state,
)
from .embedding import LabelEmbedding, NoiseEmbedding
from .mlp import MLP_PRESETS, MLPConfig, MLPDenoiser
from .unet import UNET_PRESETS, UNet, UNetConfig, count_parameters

__all__ = [
    "DenoiserConfig",
    "LabelEmbedding",
    "MLPConfig",
    "MLPDenoiser",
    "MLP_PRESETS",
    "NETWORK_PRESETS",
    "NoiseEmbedding",
    "UNET_PRESETS",
    "UNet",
    "UNetConfig",
    "build_network",
    "count_parameters",
    "load_denoiser",
    "load_training_state",
    "read_denoiser_config",
    "save_denoiser",
    "save_training_state",
]

NETWORK_PRESETS: tuple[str, ...] = (*UNET_PRESETS, *MLP_PRESETS)


def build_network(name: str, **kwargs: Any) -> nn.Module:
    """Build a denoiser network by preset or family name.

    Args:
        name: a preset of :data:`NETWORK_PRESETS` (``"unet-tiny"``, ``"unet-digits"``,
            ``"unet-cifar10"``, ``"mlp-small"``, ``"mlp-base"``), or a family, ``"unet"``
            (the default :class:`UNetConfig`, i.e. DDPM++ CIFAR-10) or ``"mlp"`` (the default
            :class:`MLPConfig`).
        **kwargs: config fields overriding the preset, e.g. ``num_classes=10``,
            ``channels=1``, ``data_dim=128``.

    Raises:
        KeyError: unknown name. TypeError: unknown config field. ValueError: invalid value.
    """
    if name == "unet":
        return UNet(**kwargs)
    if name == "mlp":
        return MLPDenoiser(**kwargs)
    if name in UNET_PRESETS:
        return UNet.from_preset(name, **kwargs)
    if name in MLP_PRESETS:
        return MLPDenoiser.from_preset(name, **kwargs)
    raise KeyError(f"unknown network {name!r}; known: unet, mlp, {', '.join(NETWORK_PRESETS)}")
