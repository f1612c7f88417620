"""Latent text-to-image restoration (Ambient Dataloops' text-to-image setting; SPEC 1, 5).

Restoration of a captioned image dataset in a VAE's latent space, conditioned on each
image's caption with classifier-free guidance (ANCHORS 3.3):

    images -> VAE encode (scaling, shift) -> z + sigma_min eps -> guided Heun to 0 -> VAE decode

Public API:

- :class:`DiffusersDenoiser`: a diffusers VP/DDPM network (``UNet2DConditionModel``,
  ``PixArtTransformer2DModel``; eps, v or sample prediction) as an EDM denoiser
  ``D(x, sigma, cond)``, with its own ``alphas_cumprod`` mapped to sigma and the timestep
  chosen by ``"interpolated"`` or ``"nearest"`` mapping (:mod:`.adapter`). EDM-native
  conditional denoisers need no adapter.
- :class:`Conditioning`, :class:`CaptionEncoder`: batch-first conditioning pytrees and
  captions -> conditioning with any pipeline's ``transformers`` text encoder(s).
- :class:`GuidedDenoiser`: classifier-free guidance as a plain ``D(x, sigma)`` closure, one
  network call of 2B rows, static conditioning buffers (CUDA-graph friendly).
- :class:`LatentCodec`: batched VAE encode/decode in scaled latents.
- :func:`truncated_global_grid`, :func:`latent_restoration_grid`, :func:`restore_latents`,
  :class:`LatentRestorer`, :class:`LatentRestoreConfig`: the restoration itself.
- :func:`load_components`, :class:`LatentComponents`: a local pipeline folder, offline.
- :func:`restore_latent_shards`: WebDataset shards in, restored shards out.
- :mod:`.cli`: ``add_latent_arguments(parser)``, ``run_latent(args)``.
"""

from .adapter import DiffusersDenoiser, scheduler_alphas_cumprod, sigma_to_timestep, vp_log_sigmas
from .components import LatentComponents, default_dtype, load_components
from .conditioning import CaptionEncoder, Conditioning
from .guidance import ConditionedDenoiser, GuidedDenoiser
from .restore import (
    LatentRestoration,
    LatentRestoreConfig,
    LatentRestorer,
    latent_restoration_grid,
    restore_latents,
    truncated_global_grid,
)
from .shards import restore_latent_shards
from .vae import LatentCodec

__all__ = [
    "CaptionEncoder",
    "ConditionedDenoiser",
    "Conditioning",
    "DiffusersDenoiser",
    "GuidedDenoiser",
    "LatentCodec",
    "LatentComponents",
    "LatentRestoration",
    "LatentRestoreConfig",
    "LatentRestorer",
    "default_dtype",
    "latent_restoration_grid",
    "load_components",
    "restore_latent_shards",
    "restore_latents",
    "scheduler_alphas_cumprod",
    "sigma_to_timestep",
    "truncated_global_grid",
    "vp_log_sigmas",
]
