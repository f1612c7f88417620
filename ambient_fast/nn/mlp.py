"""A residual MLP denoiser for small data of any shape (8x8 digits, protein or trajectory
tensors): the sample is flattened, processed by pre-norm residual blocks conditioned on the
noise (and optional class) embedding, and reshaped back.

Block: ``x + W2 dropout(SiLU(W1 SiLU(LayerNorm(x) (1 + scale) + shift)))`` with
``(scale, shift)`` a linear function of the conditioning vector (FiLM, Perez et al. 2018).
``W2`` and the output layer start at 1e-5 of Xavier scale, so the network starts close to
zero output, like :class:`~ambient_fast.nn.unet.UNet`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .embedding import EmbeddingKind, LabelEmbedding, NoiseEmbedding

__all__ = ["MLPDenoiser", "MLPConfig", "MLP_PRESETS"]

_BRANCH_INIT = 1e-5  # near-zero branch outputs at init: every block starts as ~identity


@dataclass(frozen=True)
class MLPConfig:
    """Hyper-parameters of :class:`MLPDenoiser`."""

    data_dim: int = 64  # elements per sample (product of the trailing shape)
    hidden: int = 256  # residual stream width
    num_blocks: int = 3  # residual blocks
    emb_channels: int = 64  # width of the noise / label embedding and conditioning vector
    dropout: float = 0.0  # inside residual blocks
    embedding: EmbeddingKind = "positional"  # noise-label embedding
    num_classes: int = 0  # 0: unconditional
    label_dropout: float = 0.0  # classifier-free guidance training dropout
    fourier_scale: float = 16.0  # std of Fourier frequencies (embedding="fourier")

    def __post_init__(self) -> None:
        for name in ("data_dim", "hidden", "num_blocks", "emb_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")


MLP_PRESETS: dict[str, MLPConfig] = {
    # 169,984 parameters at data_dim=64 (8x8 digits).
    "mlp-small": MLPConfig(hidden=128, num_blocks=3, emb_channels=64),
    # 425,664 parameters at data_dim=64.
    "mlp-base": MLPConfig(hidden=192, num_blocks=4, emb_channels=64),
}


def _xavier(layer: nn.Linear, scale: float = 1.0) -> nn.Linear:
    nn.init.xavier_uniform_(layer.weight, gain=scale)
    nn.init.zeros_(layer.bias)
    return layer


class _ResidualBlock(nn.Module):
    def __init__(self, hidden: int, emb_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.film = _xavier(nn.Linear(emb_channels, 2 * hidden))
        self.fc1 = _xavier(nn.Linear(hidden, hidden))
        self.dropout = nn.Dropout(dropout)
        self.fc2 = _xavier(nn.Linear(hidden, hidden), _BRANCH_INIT)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb).chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm(x), scale + 1))
        h = self.fc2(self.dropout(F.silu(self.fc1(h))))
        return x + h


class MLPDenoiser(nn.Module):
    """Residual-MLP denoiser network ``F(x, noise_labels, class_labels)``.

    Args:
        config: the hyper-parameters.
        **overrides: fields of :class:`MLPConfig` replacing those of ``config``.

    ``forward(x, noise_labels, class_labels=None)``:
        x: ``(B, *shape)`` float with ``prod(shape) == data_dim`` (any trailing shape).
        noise_labels: ``(B,)`` float, e.g. ``c_noise = ln(sigma)/4`` from ``EDMPrecond``.
        class_labels: ``(B,)`` integer classes, ``(B, num_classes)`` one-hot or soft
            labels, or ``None`` (must be ``None`` when ``num_classes == 0``).
        Returns ``(B, *shape)`` in ``x``'s dtype.
    """

    def __init__(self, config: MLPConfig = MLPConfig(), **overrides: Any) -> None:
        super().__init__()
        cfg = replace(config, **overrides) if overrides else config
        self.config = cfg
        self.noise_embedding = NoiseEmbedding(cfg.emb_channels, cfg.embedding, fourier_scale=cfg.fourier_scale)
        self.label_embedding = (
            LabelEmbedding(cfg.num_classes, cfg.emb_channels, cfg.label_dropout) if cfg.num_classes else None
        )
        self.emb_layer = _xavier(nn.Linear(cfg.emb_channels, cfg.emb_channels))
        self.proj_in = _xavier(nn.Linear(cfg.data_dim, cfg.hidden))
        self.blocks = nn.ModuleList(
            _ResidualBlock(cfg.hidden, cfg.emb_channels, cfg.dropout) for _ in range(cfg.num_blocks)
        )
        self.norm_out = nn.LayerNorm(cfg.hidden)
        self.proj_out = _xavier(nn.Linear(cfg.hidden, cfg.data_dim), _BRANCH_INIT)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.config.data_dim:
            raise ValueError(
                f"x must be (B, ...) with {self.config.data_dim} elements per sample, got {tuple(x.shape)}"
            )
        emb = self.noise_embedding(noise_labels).to(x.dtype)
        if self.label_embedding is not None:
            emb = emb + self.label_embedding(class_labels, x.shape[0], x.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional MLPDenoiser (num_classes=0)")
        emb = F.silu(self.emb_layer(emb))
        h = self.proj_in(x.reshape(x.shape[0], -1))
        for block in self.blocks:
            h = block(h, emb)
        return self.proj_out(F.silu(self.norm_out(h))).reshape(x.shape)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MLPDenoiser:
        """Build a preset of :data:`MLP_PRESETS` (``"mlp-small"``, ``"mlp-base"``) with
        optional field overrides (typically ``data_dim``)."""
        if name not in MLP_PRESETS:
            raise KeyError(f"unknown MLP preset {name!r}; known: {sorted(MLP_PRESETS)}")
        return cls(MLP_PRESETS[name], **overrides)
