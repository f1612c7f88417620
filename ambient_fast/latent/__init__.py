"""The pieces of latent text-to-image restoration (Ambient Dataloops' text-to-image setting; SPEC 1, 5).

Restoration of a captioned image dataset in a VAE's latent space, conditioned on each
image's caption with classifier-free guidance (ANCHORS 3.3)::

    images -> VAE encode (scaling, shift) -> z + sigma_min eps -> guided Heun to 0 -> VAE decode

This package holds the parts; the loop, the dataset driver, sharding and resume are the
one restoration engine's (:mod:`ambient_fast.restoration.latent_stages` runs these parts as
stages around its captured sampler; ``ambient-fast restore --diffusers DIR`` is the CLI).

Public API:

- :class:`DiffusersDenoiser`: a diffusers VP/DDPM network (``UNet2DConditionModel``,
  ``PixArtTransformer2DModel``; eps, v or sample prediction) as an EDM denoiser
  ``D(x, sigma, cond)``, with its own ``alphas_cumprod`` mapped to sigma and the timestep
  chosen by ``"interpolated"`` or ``"nearest"`` mapping (:mod:`.adapter`). EDM-native
  conditional denoisers need no adapter.
- :class:`Conditioning`, :class:`CaptionEncoder`, :class:`Tokens`: batch-first conditioning
  pytrees; captions -> tokens (host) -> conditioning with any pipeline's ``transformers``
  text encoder(s).
- :class:`GuidedDenoiser`: classifier-free guidance as a plain ``D(x, sigma)`` closure, one
  network call of 2B interleaved rows, static conditioning buffers (CUDA-graph friendly).
- :class:`LatentCodec`: batched VAE encode/decode in scaled latents.
- :func:`load_components`, :class:`LatentComponents`: a local pipeline folder, offline.
"""

from .adapter import DiffusersDenoiser, scheduler_alphas_cumprod, sigma_to_timestep, vp_log_sigmas
from .components import LatentComponents, default_dtype, load_components
from .conditioning import CaptionEncoder, Conditioning, Tokens
from .guidance import ConditionedDenoiser, GuidedDenoiser
from .vae import LatentCodec

__all__ = [
    "CaptionEncoder",
    "ConditionedDenoiser",
    "Conditioning",
    "DiffusersDenoiser",
    "GuidedDenoiser",
    "LatentCodec",
    "LatentComponents",
    "Tokens",
    "default_dtype",
    "load_components",
    "scheduler_alphas_cumprod",
    "sigma_to_timestep",
    "vp_log_sigmas",
]
