"""Conditioning embeddings shared by the denoisers: noise level and class label.

The noise label is whatever the preconditioner passes as ``c_noise`` (``ln(sigma)/4`` under
:class:`~ambient_fast.core.precond.EDMPrecond`, SPEC 1): a real number per sample, embedded
either with fixed sinusoids (DDPM++, "positional") or with fixed random Gaussian frequencies
(NCSN++, "fourier"). The class label is a one-hot (or soft) vector mapped linearly to the
same width and added, so the all-zero vector is the "no label" token used for
classifier-free guidance; label dropout zeroes it for a random share of training samples.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

__all__ = ["NoiseEmbedding", "LabelEmbedding", "EmbeddingKind"]

EmbeddingKind = Literal["positional", "fourier"]


class NoiseEmbedding(nn.Module):
    """Embed a per-sample noise label ``(B,)`` into ``(B, channels)`` features in [-1, 1].

    Args:
        channels: output width, even and >= 4.
        kind: ``"positional"``: ``[cos(c w_k), sin(c w_k)]`` with ``w_k`` geometric from 1
            down to ``1/max_positions`` (Vaswani et al. 2017, as in DDPM++);
            ``"fourier"``: the same with ``w_k = 2 pi scale z_k``, ``z_k ~ N(0, 1)`` drawn once
            at construction and saved with the weights (Tancik et al. 2020, as in NCSN++).
        max_positions: longest period of the positional embedding.
        fourier_scale: standard deviation of the Fourier frequencies (16 in NCSN++).
    """

    def __init__(
        self,
        channels: int,
        kind: EmbeddingKind = "positional",
        *,
        max_positions: float = 10_000.0,
        fourier_scale: float = 16.0,
    ) -> None:
        super().__init__()
        if channels < 4 or channels % 2:
            raise ValueError(f"noise embedding channels must be even and >= 4, got {channels}")
        half = channels // 2
        if kind == "positional":
            exponents = torch.arange(half, dtype=torch.float32) / (half - 1)
            # Deterministic from the arguments: not saved in the state dict.
            self.register_buffer("freqs", max_positions ** (-exponents), persistent=False)
        elif kind == "fourier":
            # Random: part of the state dict, so a checkpoint reproduces the embedding.
            self.register_buffer("freqs", 2 * math.pi * fourier_scale * torch.randn(half))
        else:
            raise ValueError(f"kind must be 'positional' or 'fourier', got {kind!r}")
        self.kind = kind

    def forward(self, noise_labels: torch.Tensor) -> torch.Tensor:
        """``noise_labels`` ``(B,)`` float -> ``(B, channels)`` in ``freqs``' dtype."""
        angles = noise_labels.to(self.freqs.dtype).reshape(-1, 1) * self.freqs
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class LabelEmbedding(nn.Module):
    """Map class labels to ``(B, channels)``; ``None`` or an all-zero row means "no label".

    Args:
        num_classes: number of classes (> 0).
        channels: output width.
        dropout: probability, during training, of replacing a sample's label by the
            "no label" token (classifier-free guidance, Ho & Salimans 2022).

    Each class gets a learned vector initialised ``N(0, 1)``, the scale of the noise
    embedding's features.
    """

    def __init__(self, num_classes: int, channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"label dropout must be in [0, 1), got {dropout}")
        self.num_classes = num_classes
        self.dropout = dropout
        self.weight = nn.Parameter(torch.randn(num_classes, channels))

    def forward(self, class_labels: torch.Tensor | None, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """Labels ``(B,)`` int, ``(B, num_classes)`` float (one-hot or soft) or ``None``.

        Returns ``(B, channels)`` of ``dtype`` (zeros for ``None``).
        """
        if class_labels is None:
            return self.weight.new_zeros(batch_size, self.weight.shape[1], dtype=dtype)
        floating = class_labels.is_floating_point()
        expected = (batch_size, self.num_classes) if floating else (batch_size,)
        if class_labels.shape != expected:
            raise ValueError(
                f"class_labels must be ({batch_size},) int or ({batch_size}, {self.num_classes}) float, "
                f"got {tuple(class_labels.shape)} {class_labels.dtype}"
            )
        if floating:
            one_hot = class_labels.to(dtype)
        else:
            one_hot = nn.functional.one_hot(class_labels.long(), self.num_classes).to(dtype)
        if self.training and self.dropout > 0:
            keep = torch.rand(one_hot.shape[0], 1, device=one_hot.device) >= self.dropout
            one_hot = one_hot * keep.to(dtype)
        return one_hot @ self.weight.to(dtype)
