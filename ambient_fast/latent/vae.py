"""Images <-> diffusion latents with a diffusers VAE (``AutoencoderKL`` and kin).

Latent convention (diffusers): ``z = (mean_or_sample - shift_factor) * scaling_factor`` on
encode and ``(z / scaling_factor + shift_factor)`` on decode, with both factors read from the
VAE config (``shift_factor`` is ``None`` -> 0 for Stable Diffusion, set for SD3/Flux VAEs).
The diffusion model, the sigma_min annotations and the restoration levels all live in this
scaled space (the anchors' text-to-image ``sigma_tn = 2.0`` is in SDXL-VAE latent units).

Images are uint8 ``(B, 3, H, W)`` (0..255) or float in [-1, 1]; the VAE runs batched in its own
parameters' dtype (the loader's policy: bf16 on GPU, fp32 on CPU); latents are returned as
float32. ``encode(..., sample=True)`` draws the posterior sample with the package's
counter-based per-sample noise (``STREAM_VAE_POSTERIOR``), so it too is independent of the
batch a sample lands in; the default is the posterior mean (deterministic).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.noise import sample_normal

__all__ = ["LatentCodec", "STREAM_VAE_POSTERIOR", "to_model_range", "to_uint8"]

STREAM_VAE_POSTERIOR = 12  # core.noise stream of the VAE posterior sample (apart from 0, 1, 8-10, 16+)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1]; floating input is taken as already in [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 127.5 - 1.0
    return images.to(torch.float32)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 0..255 (clamped, rounded to nearest)."""
    return ((images.to(torch.float32).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class LatentCodec:
    """Batched VAE encode/decode in the scaled latent space (module docstring).

    Args:
        vae: a diffusers autoencoder with ``encode(x).latent_dist`` and ``decode(z).sample``
            (already on its device and dtype).
        scaling_factor: overrides ``vae.config.scaling_factor``.
        shift_factor: overrides ``vae.config.shift_factor`` (``None`` in the config -> 0).
        batch_size: images per VAE call.
    """

    def __init__(
        self,
        vae: nn.Module,
        *,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        batch_size: int = 16,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        config = getattr(vae, "config", None)
        self.vae = vae
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else config.scaling_factor)
        configured_shift = getattr(config, "shift_factor", None)
        self.shift_factor = float(shift_factor if shift_factor is not None else configured_shift or 0.0)
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, *, sample: bool = False, seeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scaled latents float32 ``(B, C, H/f, W/f)`` of images ``(B, 3, H, W)``.

        Args:
            images: uint8 0..255 or float in [-1, 1].
            sample: draw from the posterior instead of taking its mean; needs ``seeds``
                (int ``(B,)``) for the per-sample noise.
        """
        if sample and seeds is None:
            raise ValueError("encode(sample=True) needs per-sample seeds")
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            x = to_model_range(images[start : start + self.batch_size]).to(self.device, self.dtype)
            dist = self.vae.encode(x).latent_dist
            z = dist.mean.to(torch.float32)
            if sample:
                noise = sample_normal(
                    seeds[start : start + self.batch_size].to(self.device),
                    z.shape[1:],
                    stream=STREAM_VAE_POSTERIOR,
                )
                z = z + dist.std.to(torch.float32) * noise
            chunks.append((z - self.shift_factor) * self.scaling_factor)
        return torch.cat(chunks)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images float32 in [-1, 1] (unclamped VAE output) ``(B, 3, H, W)`` of scaled latents."""
        chunks = []
        for start in range(0, latents.shape[0], self.batch_size):
            z = latents[start : start + self.batch_size].to(self.device, torch.float32)
            z = z / self.scaling_factor + self.shift_factor
            chunks.append(self.vae.decode(z.to(self.dtype)).sample.to(torch.float32))
        return torch.cat(chunks)
