"""A DDPM++-style UNet (Song et al. 2021), the CIFAR-10 network of EDM (Karras et al. 2022).

Topology (one "level" per entry of ``channel_mult``; level ``l`` works at ``H / 2^l``):

- noise embedding (positional or Fourier) + optional class embedding, then a 2-layer MLP
  with SiLU to the block-conditioning vector ``emb`` (width ``model_channels * emb_mult``);
- encoder: a 3x3 input conv, then per level an optional downsampling residual block
  followed by ``num_blocks`` residual blocks; every encoder output is kept as a skip;
- middle: two residual blocks at the coarsest level, the first with self-attention;
- decoder: per level (coarse to fine) an optional upsampling block, then
  ``num_blocks + 1`` residual blocks, each fed the concatenation with one skip;
- output: GroupNorm, SiLU, 3x3 conv.

Residual block: ``GroupNorm -> SiLU -> (resample) -> conv3x3 -> + emb (additive, or
scale/shift) -> GroupNorm -> SiLU -> dropout -> conv3x3``, summed with a (1x1-projected,
resampled) shortcut and scaled by ``1/sqrt(2)``; optional single- or multi-head
self-attention over the ``H*W`` positions follows, also residual and scaled by ``1/sqrt(2)``.
Resampling is a 2x2 average pool (ceil mode) down and nearest-neighbour up *to the size of
the matching skip*, so any ``H, W >= 1`` works, odd ones included. Branch outputs (second
conv, attention projection, output conv) start at 1e-5 of Xavier scale, so every block
starts close to the identity and the network close to zero output.

The default :class:`UNetConfig` is EDM's DDPM++ CIFAR-10 configuration (model_channels 128,
channel_mult (2, 2, 2), 4 blocks per level, attention at 16x16 = level 1, dropout 0.13,
positional embedding, additive conditioning). It has 55,732,739 parameters unconditional
(55,734,019 with 10 classes), exactly the count of EDM's ``SongUNet`` built with the same
arguments and no augmentation labels (counted by instantiating NVlabs/edm @ 008a4e5).
EDM's released CIFAR-10 models add a 9-dim augmentation-label mapping (1,152 parameters:
55,733,891) and a bias on the class mapping (+128); we have neither (no augmentation
pipeline here, and without the bias the all-zero "no label" vector adds exactly nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .embedding import EmbeddingKind, LabelEmbedding, NoiseEmbedding

__all__ = ["UNet", "UNetConfig", "UNET_PRESETS", "count_parameters"]

_SKIP_SCALE = 1 / math.sqrt(2)  # keeps the variance of "x + branch(x)" at that of x
_BRANCH_INIT = 1e-5  # near-zero branch outputs at init: every block starts as ~identity
_QKV_INIT = math.sqrt(0.2)  # DDPM++ attention input scale


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of :class:`UNet`; the defaults are EDM's DDPM++ CIFAR-10 network."""

    channels: int = 3  # image channels, in and out
    model_channels: int = 128  # base width; level l has model_channels * channel_mult[l]
    channel_mult: tuple[int, ...] = (2, 2, 2)  # one entry per resolution level
    num_blocks: int = 4  # residual blocks per level (encoder; the decoder has one more)
    attention_levels: tuple[int, ...] = (1,)  # levels with self-attention (0 = full res.)
    num_heads: int = 1  # attention heads; must divide the width of attended levels
    dropout: float = 0.13  # inside residual blocks
    embedding: EmbeddingKind = "positional"  # noise-label embedding
    noise_channels: int = 128  # width of the noise (and label) embedding
    emb_mult: int = 4  # conditioning vector width = model_channels * emb_mult
    conditioning: Literal["add", "scale_shift"] = "add"  # how emb enters a block
    num_classes: int = 0  # 0: unconditional
    label_dropout: float = 0.0  # classifier-free guidance training dropout
    fourier_scale: float = 16.0  # std of Fourier frequencies (embedding="fourier")

    def __post_init__(self) -> None:
        # Sequences may arrive as lists (JSON configs): store tuples, so configs compare equal.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        positive = ("channels", "model_channels", "num_blocks", "num_heads", "emb_mult")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be non-empty and positive: {self.channel_mult}")
        levels = len(self.channel_mult)
        if any(not 0 <= lv < levels for lv in self.attention_levels):
            raise ValueError(f"attention_levels must lie in [0, {levels}): {self.attention_levels}")
        attended = {self.model_channels * self.channel_mult[lv] for lv in self.attention_levels}
        attended.add(self.model_channels * self.channel_mult[-1])  # the middle block
        if any(width % self.num_heads for width in attended):
            raise ValueError(f"num_heads={self.num_heads} must divide the widths {sorted(attended)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.conditioning not in ("add", "scale_shift"):
            raise ValueError(f"conditioning must be 'add' or 'scale_shift': {self.conditioning!r}")


UNET_PRESETS: dict[str, UNetConfig] = {
    # CPU tests (11,673 parameters): two levels, attention at the coarse one.
    "unet-tiny": UNetConfig(
        channels=1,
        model_channels=4,
        channel_mult=(1, 2),
        num_blocks=1,
        attention_levels=(1,),
        dropout=0.0,
        noise_channels=8,
        emb_mult=2,
    ),
    # 8x8 / 16x16 grayscale digits demo (549,145 parameters; ~0.17 s per training step
    # at batch 256 on 8x8 on two CPU cores).
    "unet-digits": UNetConfig(
        channels=1,
        model_channels=24,
        channel_mult=(1, 2),
        num_blocks=2,
        attention_levels=(1,),
        dropout=0.1,
        noise_channels=32,
        emb_mult=2,
    ),
    # EDM DDPM++ CIFAR-10 (Karras et al. 2022): 55,732,739 parameters.
    "unet-cifar10": UNetConfig(),
}


def count_parameters(module: nn.Module) -> int:
    """Number of trainable scalar parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _num_groups(channels: int) -> int:
    """GroupNorm groups: at most 32, at least 4 channels each, dividing ``channels``."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_num_groups(channels), channels, eps=1e-6)


def _xavier(layer: nn.Conv2d | nn.Linear, scale: float = 1.0) -> nn.Conv2d | nn.Linear:
    nn.init.xavier_uniform_(layer.weight, gain=scale)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _conv(cin: int, cout: int, kernel: int, scale: float = 1.0) -> nn.Conv2d:
    return _xavier(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), scale)


class _SelfAttention(nn.Module):
    """Residual multi-head self-attention over the ``H*W`` positions of a feature map."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = _group_norm(channels)
        self.qkv = _conv(channels, 3 * channels, 1, _QKV_INIT)
        self.proj = _conv(channels, channels, 1, _BRANCH_INIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) * _SKIP_SCALE


class _ResBlock(nn.Module):
    """Conditioned residual block with optional 2x resampling and self-attention."""

    def __init__(
        self,
        cin: int,
        cout: int,
        emb_channels: int,
        *,
        resample: Literal["none", "down", "up"] = "none",
        attention: bool = False,
        num_heads: int = 1,
        dropout: float = 0.0,
        conditioning: Literal["add", "scale_shift"] = "add",
    ) -> None:
        super().__init__()
        self.resample = resample
        self.scale_shift = conditioning == "scale_shift"
        self.norm0 = _group_norm(cin)
        self.conv0 = _conv(cin, cout, 3)
        self.emb_proj = _xavier(nn.Linear(emb_channels, cout * (2 if self.scale_shift else 1)))
        self.norm1 = _group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _conv(cout, cout, 3, _BRANCH_INIT)
        self.shortcut = _conv(cin, cout, 1) if cin != cout or resample != "none" else None
        self.attention = _SelfAttention(cout, num_heads) if attention else None

    def _resample(self, x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
        if self.resample == "up":
            return F.interpolate(x, size=size, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``x`` ``(B, cin, H, W)``, ``emb`` ``(B, emb_channels)``; ``size``: output size of
        an upsampling block. Returns ``(B, cout, H', W')``."""
        h = self.conv0(self._resample(F.silu(self.norm0(x)), size))
        params = self.emb_proj(emb)[:, :, None, None].to(h.dtype)
        if self.scale_shift:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(self.dropout(h))
        skip = self._resample(x, size)
        if self.shortcut is not None:
            skip = self.shortcut(skip)
        x = (h + skip) * _SKIP_SCALE
        if self.attention is not None:
            x = self.attention(x)
        return x


class UNet(nn.Module):
    """DDPM++-style denoiser network ``F(x, noise_labels, class_labels)``.

    Args:
        config: the hyper-parameters (default: EDM's DDPM++ CIFAR-10 network).
        **overrides: fields of :class:`UNetConfig` replacing those of ``config``.

    ``forward(x, noise_labels, class_labels=None)``:
        x: ``(B, channels, H, W)`` float, any ``H, W >= 1`` (odd sizes included).
        noise_labels: ``(B,)`` float, e.g. ``c_noise = ln(sigma)/4`` from ``EDMPrecond``.
        class_labels: ``(B,)`` integer classes, ``(B, num_classes)`` one-hot or soft
            labels, or ``None`` (unconditional / the guidance "no label" token). Must be
            ``None`` when ``num_classes == 0``.
        Returns ``(B, channels, H, W)`` in ``x``'s dtype.
    """

    def __init__(self, config: UNetConfig = UNetConfig(), **overrides: Any) -> None:
        super().__init__()
        cfg = replace(config, **overrides) if overrides else config
        self.config = cfg
        emb_channels = cfg.model_channels * cfg.emb_mult
        block = dict(
            emb_channels=emb_channels,
            num_heads=cfg.num_heads,
            dropout=cfg.dropout,
            conditioning=cfg.conditioning,
        )

        # Conditioning.
        self.noise_embedding = NoiseEmbedding(cfg.noise_channels, cfg.embedding, fourier_scale=cfg.fourier_scale)
        self.label_embedding = (
            LabelEmbedding(cfg.num_classes, cfg.noise_channels, cfg.label_dropout) if cfg.num_classes else None
        )
        self.emb_layer0 = _xavier(nn.Linear(cfg.noise_channels, emb_channels))
        self.emb_layer1 = _xavier(nn.Linear(emb_channels, emb_channels))

        # Encoder.
        self.conv_in = _conv(cfg.channels, cfg.model_channels, 3)
        self.encoder = nn.ModuleList()
        skip_channels = [cfg.model_channels]
        width = cfg.model_channels
        for level, mult in enumerate(cfg.channel_mult):
            if level > 0:
                self.encoder.append(_ResBlock(width, width, resample="down", **block))
                skip_channels.append(width)
            for _ in range(cfg.num_blocks):
                cout = cfg.model_channels * mult
                attn = level in cfg.attention_levels
                self.encoder.append(_ResBlock(width, cout, attention=attn, **block))
                width = cout
                skip_channels.append(width)

        # Middle.
        self.middle = nn.ModuleList(
            [_ResBlock(width, width, attention=True, **block), _ResBlock(width, width, **block)]
        )

        # Decoder: per level, an optional "up" block then num_blocks + 1 skip-fed blocks.
        self.decoder = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            if level < len(cfg.channel_mult) - 1:
                self.decoder.append(_ResBlock(width, width, resample="up", **block))
            for idx in range(cfg.num_blocks + 1):
                cout = cfg.model_channels * cfg.channel_mult[level]
                attn = level in cfg.attention_levels and idx == cfg.num_blocks
                cin = width + skip_channels.pop()
                self.decoder.append(_ResBlock(cin, cout, attention=attn, **block))
                width = cout

        # Output.
        self.norm_out = _group_norm(width)
        self.conv_out = _conv(width, cfg.channels, 3, _BRANCH_INIT)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.config.channels:
            raise ValueError(f"x must be (B, {self.config.channels}, H, W), got {tuple(x.shape)}")
        emb = self.noise_embedding(noise_labels).to(x.dtype)
        if self.label_embedding is not None:
            emb = emb + self.label_embedding(class_labels, x.shape[0], x.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional UNet (num_classes=0)")
        emb = F.silu(self.emb_layer1(F.silu(self.emb_layer0(emb))))

        h = self.conv_in(x)
        skips = [h]
        for block in self.encoder:
            h = block(h, emb)
            skips.append(h)
        for block in self.middle:
            h = block(h, emb)
        for block in self.decoder:
            if block.resample == "up":
                h = block(h, emb, size=skips[-1].shape[-2:])
            else:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> UNet:
        """Build a preset of :data:`UNET_PRESETS` (``"unet-tiny"``, ``"unet-digits"``,
        ``"unet-cifar10"``) with optional field overrides."""
        if name not in UNET_PRESETS:
            raise KeyError(f"unknown UNet preset {name!r}; known: {sorted(UNET_PRESETS)}")
        return cls(UNET_PRESETS[name], **overrides)

    @classmethod
    def cifar10(cls, **overrides: Any) -> UNet:
        """EDM's DDPM++ CIFAR-10 network (55,732,739 parameters unconditional)."""
        return cls(UNET_PRESETS["unet-cifar10"], **overrides)
