"""Latent text-to-image restoration as device stages of the one engine (SPEC 5, ANCHORS 3.3).

The latent path is the pixel path's :class:`~.sampler.RestorationSampler` -- the same
captured K-step loop, per-sample grids and seeds, journal, ranks and writer -- with
:class:`LatentStages` around the loop (the sampler's :class:`~.sampler.DeviceStages` hook)::

    uint8 pixels (B, 3, H, W), captions (host)
      -> prepare (copy stream, staging slot k of 2): VAE encode, compute dtype, batched
         -> latents (B, C, h, w); the B captions -> text encoder -> conditional rows
      -> load (compute stream): latents -> the loop's static x0; conditional rows -> the
         guided denoiser's static conditioning (its unconditional rows are encoded once per
         run and never change: one image size per run)
      -> the captured loop: x0 + sigma_min eps, K guided steps; each network call is the
         conditional and unconditional rows together (2B rows), the guidance combination
         ``uncond + w (cond - uncond)`` inside the graph
      -> finish (compute stream): VAE decode, quantise -> uint8 pixels -> PNG, written by the
         driver like any restored image

Each sample's caption is encoded once (in its batch's prepare), the negative caption once
per run. Levels, the new annotation and the grids are the engine's (:mod:`.grid`: the
anchors' truncated global grid is ``grid="global"``); sigma_min is in scaled-latent units.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..latent import Conditioning, GuidedDenoiser, LatentComponents
from ..latent.adapter import DiffusersDenoiser
from ..latent.vae import to_uint8
from .checkpoint import file_sha256, module_fingerprint
from .sampler import IMAGE_UINT8, RestorationSampler, SamplerConfig

__all__ = ["LatentStages", "latent_fingerprint", "latent_sampler"]


@dataclass
class _Slot:
    latents: torch.Tensor  # (B, C, h, w) float32
    cond: Conditioning  # B conditional rows


class LatentStages:
    """VAE and caption encoding around the captured loop (module docstring).

    Args:
        components: denoiser, VAE codec and caption encoder, on one device.
        image_shape: ``(3, H, W)`` of every restored image (H, W divisible by the VAE's factor).
        batch_size: ``B``, the sampler's static batch.
        guidance_scale: classifier-free guidance ``w`` (anchors' T2I restoration: 3.5; 1 = the
            conditional model alone, B rows per call).
        encode_sample: VAE posterior sample (per-sample seeded) instead of its mean.

    ``denoiser`` is the guided ``D(x, sigma)`` closure to give the sampler; ``model_shape``
    the latent shape ``(C, h, w)``.
    """

    def __init__(
        self,
        components: LatentComponents,
        image_shape: tuple[int, int, int],
        batch_size: int,
        *,
        guidance_scale: float = 3.5,
        encode_sample: bool = False,
    ) -> None:
        channels, height, width = (int(s) for s in image_shape)
        if channels != 3:
            raise ValueError(f"latent restoration takes RGB images (3, H, W), got {tuple(image_shape)}")
        self.codec, self.caption_encoder = components.codec, components.caption_encoder
        self.batch_size, self.encode_sample = batch_size, encode_sample
        self.device = self.codec.device
        factor = _vae_factor(self.codec.vae)
        if height % factor or width % factor:
            raise ValueError(
                f"images are {height}x{width}: both sides must be multiples of the VAE's factor {factor} "
                "(--resize to a model size)"
            )
        probe = self.codec.encode(torch.zeros(1, 3, height, width, dtype=torch.uint8, device=self.device))
        self.model_shape = tuple(int(s) for s in probe.shape[1:])
        self.sizes = torch.tensor([[height, width]]).expand(batch_size, 2)
        cond = self._static_rows(self.caption_encoder([""], self.sizes[:1]))
        uncond = cond if guidance_scale == 1.0 else self.caption_encoder.unconditional(self.sizes).to(self.device)
        self.denoiser = GuidedDenoiser(components.denoiser, cond, uncond, guidance_scale)

    def _static_rows(self, one: Conditioning) -> Conditioning:
        """``B`` owned rows shaped like the one-row ``one`` (a static buffer)."""
        return Conditioning.cat([one] * self.batch_size).to(self.device)

    def new_slot(self) -> _Slot:
        latents = torch.zeros((self.batch_size, *self.model_shape), dtype=torch.float32, device=self.device)
        return _Slot(latents, self._static_rows(self.caption_encoder([""], self.sizes[:1])))

    def prepare(self, raw: torch.Tensor, seeds: torch.Tensor, context: Any, slot: _Slot) -> None:
        """VAE-encode ``raw`` uint8 ``(B, 3, H, W)``; encode ``context`` (``n <= B`` captions,
        padding rows take the first) into ``slot``."""
        captions = _captions(context, self.batch_size)
        slot.latents.copy_(self.codec.encode(raw, sample=self.encode_sample, seeds=seeds))
        slot.cond.copy_(self.caption_encoder(captions, self.sizes).to(self.device))

    def load(self, slot: _Slot, x0: torch.Tensor) -> None:
        x0.copy_(slot.latents)
        self.denoiser.update(slot.cond)

    def finish(self, x: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(to_uint8(self.codec.decode(x)))


def _captions(context: Any, batch_size: int) -> list[str]:
    if not isinstance(context, Sequence) or isinstance(context, str) or not context:
        raise ValueError("latent restoration needs the batch's captions (HostBatch.context: a list of str)")
    captions = [str(c) for c in context]
    if len(captions) > batch_size:
        raise ValueError(f"{len(captions)} captions for a batch of {batch_size}")
    return captions + [captions[0]] * (batch_size - len(captions))


def _vae_factor(vae: torch.nn.Module) -> int:
    """Spatial downsampling of a diffusers VAE (``2 ** (len(block_out_channels) - 1)``; SD: 8)."""
    blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
    return 2 ** (len(blocks) - 1) if blocks else 1


def latent_sampler(
    components: LatentComponents,
    image_shape: tuple[int, int, int],
    batch_size: int,
    config: SamplerConfig,
    *,
    guidance_scale: float = 3.5,
    encode_sample: bool = False,
) -> RestorationSampler:
    """The engine's :class:`~.sampler.RestorationSampler` for latent restoration of
    ``image_shape`` uint8 images (storage and output: uint8 pixels; state: latents)."""
    stages = LatentStages(
        components, image_shape, batch_size, guidance_scale=guidance_scale, encode_sample=encode_sample
    )
    return RestorationSampler(
        stages.denoiser,
        tuple(image_shape),
        batch_size,
        config,
        codec=IMAGE_UINT8,
        device=stages.device,
        stages=stages,
    )


def latent_fingerprint(components: LatentComponents) -> str:
    """Identifies the model for the resume check: SHA-256 over the pipeline folder's files
    (relative names and contents) when loaded from one, else over the parts' weights."""
    digest = hashlib.sha256(b"latent\0")
    if components.source is not None and Path(components.source).is_dir():
        root = Path(components.source)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                digest.update(f"{path.relative_to(root).as_posix()}\0{file_sha256(path)}\0".encode())
        return digest.hexdigest()
    denoiser = components.denoiser
    parts = [components.codec.vae, *components.caption_encoder.text_encoders]
    if isinstance(denoiser, torch.nn.Module):
        parts.insert(0, denoiser.model if isinstance(denoiser, DiffusersDenoiser) else denoiser)
    for part in parts:
        digest.update(module_fingerprint(part).encode())
    return digest.hexdigest()
