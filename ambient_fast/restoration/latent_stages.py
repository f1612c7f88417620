"""Latent text-to-image restoration as stages of the one engine (SPEC 5, ANCHORS 3.3).

The latent path is the pixel path's driver and :class:`~.sampler.RestorationSampler` --
the same captured K-step loop, per-sample grids and seeds, journal, ranks and writer --
with the :mod:`.stages` hooks filled in for a diffusers pipeline:

- host (:class:`LatentStages`, reader/writer threads): decode the image like the pixel
  path (uint8 ``(3, H, W)``, or ``(1, H, W)`` for a grayscale dataset); per batch, read and
  tokenise the rows' captions (``key.txt``; a sample to restore without one is refused by
  key); a restored row is written as PNG, plus ``latent.npy`` when latents are stored.
- device (:class:`LatentCodec`, outside the graph): ``stage`` (on CUDA the sampler's copy
  stream, into one of two staging slots, so it overlaps the previous batch's replay): VAE
  encode of the uint8 rows in the VAE's compute dtype (bf16 on GPU), batched -> scaled
  latents (grayscale rows enter as ``(g, g, g)``); the text encoder over the batch's tokens
  -> conditional rows. ``encode`` (compute stream): the slot -> the loop's static ``y0`` and
  the conditional rows of the static conditioning buffers (the unconditional rows beside them, negative caption, are
  encoded and written once per run). After the loop: VAE decode -> uint8 rows (and latents);
  a grayscale dataset gets the decoded image's luma (ITU-R BT.601, :data:`LUMA`), so
  every restored sample keeps its dataset's shape.
- in the graph (:meth:`LatentCodec.wrap_denoiser`): classifier-free guidance over the
  static buffers, which are laid out ``(B, 2, ...)`` = the network's ``2B`` interleaved
  rows ``[cond_0, uncond_0, ...]``: one network call per evaluation, the mix
  ``uncond + w (cond - uncond)`` inside the captured graph.

Each sample's caption is encoded once (in its batch), the negative caption once per run.
Levels and grids are the engine's (:class:`~.stages.GridSpec`; the anchors' truncated global
grid is ``schedule="global"``), in scaled-latent units; the new annotation is the engine's
``sigma_min / rho_ambient`` (anchors' text-to-image: ``rho_ambient = 2``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.noise import derive_seeds
from ..data import DatasetFormatError
from ..latent import DiffusersDenoiser, GuidedDenoiser, LatentComponents, Tokens
from ..latent.vae import to_uint8
from ..nn.checkpoint import file_sha256, module_fingerprint
from .io import RestoreSource
from .sampler import RestorationSampler, SamplerConfig
from .stages import DeviceCodec, Stages, npy_bytes

__all__ = [
    "LATENT_COMPONENT",
    "LATENT_DTYPES",
    "LatentBatch",
    "LatentCodec",
    "LatentSettings",
    "LatentStages",
    "latent_fingerprint",
    "latent_restoration",
    "latent_sampler",
]

LATENT_COMPONENT = "latent.npy"  # WebDataset component of a sample's stored (C, h, w) latents
LATENT_DTYPES = {"float16": np.float16, "float32": np.float32}  # anchors store float16
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B: a grayscale dataset's restored value


@dataclass(frozen=True)
class LatentBatch:
    """Host context of one batch (:meth:`LatentStages.prepare` -> :meth:`LatentCodec.stage`)."""

    tokens: Tokens  # the rows' tokenised captions (n <= B rows; padded on the device side)
    seeds: torch.Tensor  # int64 (n,): per-sample seeds of the VAE posterior sample (derive_seeds(id, run seed))


@dataclass(frozen=True)
class LatentSettings:
    """What a latent run adds to the engine's options (defaults: anchors' T2I restoration)."""

    guidance_scale: float = 3.5  # CFG w (ANCHORS 3.3); 1 = the conditional model alone
    encode_sample: bool = False  # VAE posterior sample (seeded per sample) instead of its mean
    store_latents: bool = False  # also write key.latent.npy (restored latents; anchors keep them)
    latent_dtype: str = "float16"  # dtype of stored latents

    def __post_init__(self) -> None:
        if not (isinstance(self.guidance_scale, (int, float)) and 0 <= self.guidance_scale < float("inf")):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        if self.latent_dtype not in LATENT_DTYPES:
            raise ValueError(f"latent_dtype must be one of {tuple(LATENT_DTYPES)}, got {self.latent_dtype!r}")


@dataclass
class _Staged:
    """One staging slot: what :meth:`LatentCodec.stage` prepared for :meth:`LatentCodec.encode`."""

    latents: torch.Tensor  # (B, C, h, w) float32 scaled latents
    cond: dict[str, torch.Tensor]  # conditional rows (B, ...) by flattened conditioning name


class LatentCodec(DeviceCodec):
    """Device hooks of a latent run (module docstring): uint8 images in and out, latents inside.

    Args:
        components: denoiser, VAE and caption encoder, all on one device.
        settings: guidance, VAE sampling, stored latents.
        image_size: ``(H, W)`` of every restored image (multiples of the VAE factor).
        channels: 3 (RGB) or 1 (grayscale: encoded as ``(g, g, g)``, restored as the luma).
    """

    storage_dtype = torch.uint8

    def __init__(
        self, components: LatentComponents, settings: LatentSettings, image_size: tuple[int, int], channels: int = 3
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"latent restoration takes RGB (3) or grayscale (1) images, got {channels} channels")
        self.components, self.settings, self.channels = components, settings, channels
        self.vae, self.text = components.codec, components.caption_encoder
        height, width = (int(s) for s in image_size)
        config = getattr(self.vae.vae, "config", None)
        blocks = getattr(config, "block_out_channels", None)
        self.factor = 2 ** (len(blocks) - 1) if blocks else 1
        if height % self.factor or width % self.factor:
            raise DatasetFormatError(
                f"images are {height}x{width}: latent restoration needs sides that are multiples of the VAE's "
                f"factor {self.factor} (--resize to the model's size)"
            )
        self.latent_channels = int(getattr(config, "latent_channels", 4))
        self.image_size = (height, width)
        self._sizes: dict[int, torch.Tensor] = {}  # (B, 2) image sizes on the device, per batch size
        self._slots: dict[tuple[int, int], _Staged] = {}  # (slot, B) -> the double-buffered staging slots
        self.rows = 1 if float(settings.guidance_scale) == 1.0 else 2
        sizes = torch.tensor([self.image_size])
        # One conditional and one unconditional row: the layout and dtypes of the static buffers.
        self._template = self.text(["x"], sizes).to(self.vae.device)
        self._uncond = self.text.unconditional(sizes).to(self.vae.device).flatten() if self.rows == 2 else {}

    def model_shape(self, storage_shape: tuple[int, ...]) -> tuple[int, ...]:
        _, height, width = storage_shape
        return (self.latent_channels, height // self.factor, width // self.factor)

    def conditioning(self, storage_shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {name: ((self.rows, *t.shape[1:]), t.dtype) for name, t in self._template.flatten().items()}

    def outputs(self, storage_shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        outputs = {"sample": (storage_shape, torch.uint8)}
        if self.settings.store_latents:
            outputs["latent"] = (self.model_shape(storage_shape), torch.float32)
        return outputs

    def stage(self, raw: torch.Tensor, context: Any, slot: int) -> _Staged:
        """VAE-encode ``raw`` uint8 ``(B, 3 or 1, H, W)`` and text-encode the rows' captions
        (``context``, a :class:`LatentBatch` of ``n <= B`` rows, padded with row 0) into staging
        slot ``slot`` (on CUDA: the sampler's copy stream, overlapping the previous replay)."""
        if not isinstance(context, LatentBatch):
            raise ValueError("latent restoration needs the batch's captions (a LatentBatch from LatentStages.prepare)")
        # Host data is pinned (LatentStages.prepare) and copied without blocking: a pageable copy
        # would make the host wait for the work queued before it on this stream.
        batch, device = raw.shape[0], raw.device
        if (slot, batch) not in self._slots:
            self._slots[slot, batch] = _Staged(
                torch.empty((batch, *self.model_shape(tuple(raw.shape[1:]))), dtype=torch.float32, device=device),
                {name: torch.empty((batch, *t.shape[1:]), dtype=t.dtype, device=device)
                 for name, t in self._template.flatten().items()},
            )
        staged = self._slots[slot, batch]
        seeds = None
        if self.settings.encode_sample:
            seeds = context.seeds.to(device, non_blocking=True)
            seeds = torch.cat([seeds, seeds[:1].expand(batch - len(seeds))])
        rgb = raw if self.channels == 3 else raw.expand(-1, 3, -1, -1)
        staged.latents.copy_(self.vae.encode(rgb, sample=self.settings.encode_sample, seeds=seeds))
        sizes = self._sizes.get(batch)
        if sizes is None:
            sizes = self._sizes[batch] = torch.tensor([self.image_size], device=device).expand(batch, 2)
        tokens = context.tokens.to(device, non_blocking=True).pad(batch)
        for name, rows in self.text.encode(tokens, sizes).flatten().items():
            staged.cond[name].copy_(rows)
        return staged

    def encode(self, raw: torch.Tensor, context: Any, y0: torch.Tensor, cond: dict[str, torch.Tensor]) -> None:
        """Copy the staged slot (``context``, from :meth:`stage`) into the loop's static inputs:
        latents -> ``y0``, conditional rows -> ``cond[name][:, 0]`` (the unconditional rows
        ``[:, 1]`` were written once, by :meth:`wrap_denoiser`)."""
        if not isinstance(context, _Staged):
            raise ValueError("LatentCodec.encode takes what LatentCodec.stage returned")
        y0.copy_(context.latents)
        for name, rows in context.cond.items():
            cond[name][:, 0].copy_(rows)

    def decode(self, x: torch.Tensor, outputs: dict[str, torch.Tensor]) -> None:
        images = self.vae.decode(x).to(torch.float32)
        if self.channels == 1:  # the luma of the RGB image as it would be stored (channels clamped first)
            images = torch.einsum("bchw,c->bhw", images.clamp(-1, 1), images.new_tensor(LUMA)).unsqueeze(1)
        outputs["sample"].copy_(to_uint8(images))
        if "latent" in outputs:
            outputs["latent"].copy_(x)

    def wrap_denoiser(self, denoiser: Any, cond: dict[str, torch.Tensor]) -> GuidedDenoiser:
        """CFG over the static buffers: ``(B, rows, ...)`` viewed as the network's ``rows * B`` rows.
        Called once per sampler: the unconditional rows (one image size per run) are written here."""
        for name, row in self._uncond.items():
            cond[name][:, 1].copy_(row.expand(cond[name].shape[0], *row.shape[1:]))
        flat = {name: buffer.flatten(0, 1) for name, buffer in cond.items()}  # views: no copy
        return GuidedDenoiser.over(denoiser, self._template.with_tensors(flat), self.settings.guidance_scale)


class LatentStages(Stages):
    """Host hooks of a latent run over ``source`` (module docstring).

    Args:
        source: the dataset (WebDataset shards with ``key.txt`` captions, or any image format
            whose samples carry captions).
        components: the loaded pipeline.
        settings: the latent options.
        pixels: the run's pixel stages (decode, size checks, resize, output codec), as the
            driver builds them from its options (:meth:`.io.RestoreSource.stages`).
        seed: the run seed (the VAE posterior sample's per-sample seeds derive from it).
    """

    def __init__(
        self,
        source: RestoreSource,
        components: LatentComponents,
        settings: LatentSettings,
        pixels: Stages,
        seed: int = 0,
    ) -> None:
        index = int(np.flatnonzero(np.asarray(source.sigma_min) > 0)[0])
        if len(pixels.storage_shape) != 3 or pixels.storage_shape[0] not in (1, 3):
            raise DatasetFormatError(
                f"{source.dataset.describe(index)}: latent restoration takes RGB or grayscale images, the restored "
                f"samples are {pixels.storage_shape}"
            )
        self.source, self.settings, self.seed, self._pixels = source, settings, seed, pixels
        codec = LatentCodec(components, settings, pixels.storage_shape[1:], pixels.storage_shape[0])
        description = {
            **pixels.description,
            "latent": {
                "guidance_scale": settings.guidance_scale,
                "encode_sample": settings.encode_sample,
                "store_latents": settings.store_latents,
                "latent_dtype": settings.latent_dtype,
                "model": components.describe(),
            },
        }
        # image: the pixel path's decode spec, so DALI decodes the latent path's batches too.
        super().__init__(
            codec, pixels.storage_shape, pixels.read_into, self._encode_output, description, image=pixels.image
        )

    def prepare(self, indices: np.ndarray) -> LatentBatch:
        """Tokenise the rows' captions (reader thread); a missing caption is refused by key."""
        captions = []
        for i in indices:
            caption = self.source.dataset.caption(int(i))
            if caption is None:
                raise DatasetFormatError(
                    f"{self.source.dataset.describe(int(i))}: sample to restore has no caption (key.txt); latent "
                    "restoration conditions every sample on its caption"
                )
            captions.append(caption)
        ids = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        tokens, seeds = self.device.text.tokenize(captions), derive_seeds(ids, self.seed)
        if self.device.vae.device.type == "cuda":
            tokens, seeds = tokens.pin_memory(), seeds.pin_memory()
        return LatentBatch(tokens, seeds)

    def _encode_output(
        self, index: int, outputs: dict[str, np.ndarray]
    ) -> tuple[bytes | None, np.ndarray | None, dict[str, bytes]]:
        data, array, extras = self._pixels.encode_output(index, outputs)
        if "latent" in outputs:
            dtype = LATENT_DTYPES[self.settings.latent_dtype]
            extras = {**extras, LATENT_COMPONENT: npy_bytes(outputs["latent"].astype(dtype))}
        return data, array, extras


def latent_sampler(
    components: LatentComponents,
    image_size: tuple[int, int],
    batch_size: int,
    config: SamplerConfig,
    settings: LatentSettings | None = None,
    channels: int = 3,
) -> RestorationSampler:
    """The engine's sampler for latent restoration of uint8 ``(channels, *image_size)`` images
    (tests, benchmarks; the dataset driver builds the same from :class:`LatentStages`)."""
    codec = LatentCodec(components, settings or LatentSettings(), image_size, channels)
    return RestorationSampler(
        components.denoiser, (channels, *image_size), batch_size, config, codec=codec, device=codec.vae.device
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



def latent_restoration(
    components: LatentComponents | str | os.PathLike[str],
    settings: LatentSettings | None = None,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    timestep_mapping: str = "interpolated",
    negative_caption: str = "",
) -> dict[str, Any]:
    """Keyword arguments of :func:`~.dataset.restore_dataset` for a latent run:
    ``{"denoiser", "stages", "model_fingerprint"}`` (pass ``seed`` equal to its ``seed``).

    Args:
        components: loaded components, or a local diffusers pipeline folder (loaded offline
            on ``device``, default ``cuda:LOCAL_RANK`` or CPU, with ``timestep_mapping`` and
            ``negative_caption``).
        settings: guidance and latent storage options (:class:`LatentSettings`).
        seed: the run seed (VAE posterior sample seeds).
    """
    settings = settings or LatentSettings()
    if not isinstance(components, LatentComponents):
        from ..latent import load_components
        from ..runtime import RankContext

        if device is None:
            rank = RankContext.current().local_rank
            device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
        components = load_components(
            components, device=device, timestep_mapping=timestep_mapping, negative_caption=negative_caption  # type: ignore[arg-type]
        )
    fingerprint = hashlib.sha256(
        f"{latent_fingerprint(components)}\0{sorted(components.describe().items())!r}".encode()
    ).hexdigest()

    def stages(source: RestoreSource, pixels: Stages) -> LatentStages:
        return LatentStages(source, components, settings, pixels, seed)

    return {"denoiser": components.denoiser, "stages": stages, "model_fingerprint": fingerprint}
