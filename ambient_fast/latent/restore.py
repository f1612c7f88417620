"""Latent text-to-image restoration: VAE -> posterior sampling with CFG -> VAE (SPEC 5).

Sample i with ``sigma_min_i > 0`` (in scaled-latent units) is encoded, noised to
``z + sigma_min_i eps_i`` (``eps_i`` from its own seed, ``STREAM_RESTORE``, as
:func:`ambient_fast.samplers.restore`), integrated to 0 with the caption-conditioned,
classifier-free-guided denoiser on one of two grids, and decoded:

- ``"global"`` (anchors' text-to-image restoration, ANCHORS 3.3): the global EDM grid
  (``sigma_max`` 80 -> ``sigma_floor`` 0.002, 30 points, rho 7, then 0), truncated at the
  sample's level: the last point with ``t >= sigma_min_i`` becomes ``sigma_min_i`` and the
  points before it are dropped (``sigma_min = 2.0``: 15 steps left). As a per-sample table
  this is ``min(sigma_min_i, t_k)`` over the whole global grid: the clipped points are
  zero-length steps, which leave the state unchanged, and the sampler skips every step
  that is zero-length for the whole batch, so a batch of equal levels costs exactly the
  anchors' evaluations. (Mixed levels in one batch pay the largest one's step count.)
- ``"per_sample"`` (our pixel default, SPEC 5): a rho grid of ``num_steps`` points from each
  ``sigma_min_i`` to 0.002, then 0 (:func:`ambient_fast.samplers.restoration_grid`).

Samples with ``sigma_min == 0`` are returned byte for byte; the restored ones get the new
annotation ``sigma_min / rho_ambient`` (improved data stays noisy at a lower level,
never clean; the anchors' text-to-image setting is ``2.0 -> 1.0``, i.e. ``rho_ambient = 2``,
their pixel setting 8).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from ..core.noise import STREAM_RESTORE, sample_normal
from ..core.schedules import karras_sigmas
from ..samplers.edm import Denoiser, sample
from ..samplers.restore import RESTORE_SIGMA_FLOOR, restoration_grid
from .conditioning import CaptionEncoder
from .guidance import ConditionedDenoiser, GuidedDenoiser
from .vae import LatentCodec, to_uint8

__all__ = [
    "GRID_SCHEDULES",
    "LatentRestoreConfig",
    "LatentRestoration",
    "LatentRestorer",
    "latent_restoration_grid",
    "restore_latents",
    "truncated_global_grid",
]

GRID_SCHEDULES = ("global", "per_sample")
_DEFAULT_STEPS = {"global": 30, "per_sample": 18}  # anchors: T2I global grid / pixel per-sample grid


def truncated_global_grid(
    sigma_min: torch.Tensor,
    num_steps: int = 30,
    *,
    sigma_max: float = 80.0,
    sigma_floor: float = RESTORE_SIGMA_FLOOR,
    rho: float = 7.0,
) -> torch.Tensor:
    """The anchors' text-to-image grid per sample: float64 ``(B, num_steps + 1)`` (ANCHORS 3.3).

    Row i is ``min(sigma_min_i, t_k)`` for the global rho grid ``t`` (``num_steps`` points from
    ``sigma_max`` down to ``sigma_floor``, then 0), with the first entry set to
    ``sigma_min_i`` (so a level above ``sigma_max`` starts there and steps to ``t_1``).
    """
    levels = sigma_min.to(torch.float64).reshape(-1, 1)
    table = torch.minimum(levels, karras_sigmas(num_steps, sigma_floor, sigma_max, rho).to(levels.device))
    table[:, 0] = levels[:, 0]
    return table


def latent_restoration_grid(
    sigma_min: torch.Tensor,
    *,
    schedule: Literal["global", "per_sample"] = "global",
    num_steps: int | None = None,
    rho: float = 7.0,
    sigma_max: float = 80.0,
    sigma_floor: float = RESTORE_SIGMA_FLOOR,
) -> torch.Tensor:
    """Per-sample levels float64 ``(B, K + 1)`` from ``sigma_min (B,)`` down to 0 (module docstring).

    ``num_steps`` defaults to 30 (``"global"``, anchors' text-to-image) or 18
    (``"per_sample"``, anchors' pixel restoration).
    """
    if schedule not in GRID_SCHEDULES:
        raise ValueError(f"schedule must be one of {GRID_SCHEDULES}, got {schedule!r}")
    steps = _DEFAULT_STEPS[schedule] if num_steps is None else num_steps
    if schedule == "global":
        return truncated_global_grid(sigma_min, steps, sigma_max=sigma_max, sigma_floor=sigma_floor, rho=rho)
    return restoration_grid(sigma_min, torch.zeros_like(sigma_min), steps, rho=rho, sigma_floor=sigma_floor)


@torch.no_grad()
def restore_latents(
    denoiser: Denoiser,
    latents: torch.Tensor,
    sigma_min: torch.Tensor,
    seeds: torch.Tensor,
    *,
    schedule: Literal["global", "per_sample"] = "global",
    num_steps: int | None = None,
    method: Literal["heun", "euler", "stochastic"] = "heun",
    rho: float = 7.0,
    sigma_max: float = 80.0,
    sigma_floor: float = RESTORE_SIGMA_FLOOR,
    state_dtype: torch.dtype = torch.float64,
    backend: str = "auto",
) -> torch.Tensor:
    """Posterior-sample latents of noisy samples down to 0 (SPEC 5, module docstring).

    Args:
        denoiser: ``D(x, sigma) -> x0`` over exactly these ``B`` rows (e.g. a
            :class:`GuidedDenoiser` holding their conditioning).
        latents: ``(B, C, h, w)`` scaled latents of the dataset samples.
        sigma_min: ``(B,)`` levels, all > 0 (scaled-latent units).
        seeds: int ``(B,)`` per-sample seeds: start noise (``STREAM_RESTORE``) and step noise.
        schedule, num_steps, rho, sigma_max, sigma_floor: the grid
            (:func:`latent_restoration_grid`).
        method: ``"heun"`` (deterministic, anchors), ``"euler"``, or ``"stochastic"``
            (ancestral reverse SDE).
        state_dtype: sampler state dtype (float64 as the anchors; float32 is faster).
        backend: fused-step backend of :func:`ambient_fast.sample`.

    Returns:
        ``(B, C, h, w)`` restored latents, dtype of ``latents``. With ``"per_sample"`` this is
        exactly :func:`ambient_fast.restore` with ``sigma_out = 0``.
    """
    if method not in ("heun", "euler", "stochastic"):
        raise ValueError(f"method must be 'heun', 'euler' or 'stochastic', got {method!r}")
    if sigma_min.shape != (latents.shape[0],) or bool((sigma_min <= 0).any()):
        raise ValueError(f"sigma_min: expected ({latents.shape[0]},) levels > 0 (filter clean samples out first)")
    if seeds.shape != (latents.shape[0],) or seeds.is_floating_point():
        raise ValueError(
            f"seeds: expected an integer tensor ({latents.shape[0]},), got {seeds.dtype} {tuple(seeds.shape)}"
        )
    seeds = seeds.to(latents.device)
    eps = sample_normal(seeds, latents.shape[1:], stream=STREAM_RESTORE, dtype=state_dtype)
    view = (-1,) + (1,) * (latents.dim() - 1)
    start = latents.to(state_dtype) + sigma_min.to(device=latents.device, dtype=state_dtype).view(view) * eps
    grid = latent_restoration_grid(
        sigma_min, schedule=schedule, num_steps=num_steps, rho=rho, sigma_max=sigma_max, sigma_floor=sigma_floor
    )
    restored = sample(
        denoiser,
        eps,
        grid,
        method="sde" if method == "stochastic" else method,
        seeds=seeds,
        start=start,
        backend=backend,
    )
    return restored.to(latents.dtype)


@dataclass(frozen=True)
class LatentRestoreConfig:
    """Settings of one latent restoration run (defaults: anchors' text-to-image restoration)."""

    guidance_scale: float = 3.5  # CFG scale w (ANCHORS 3.3); 1 = conditional model alone
    schedule: Literal["global", "per_sample"] = "global"  # truncated global grid, or rho grid per sample
    num_steps: int | None = None  # grid points: None = 30 (global) / 18 (per_sample)
    rho: float = 7.0  # grid curvature
    sigma_max: float = 80.0  # top of the global grid
    sigma_floor: float = RESTORE_SIGMA_FLOOR  # lowest positive level before the final 0
    method: Literal["heun", "euler", "stochastic"] = "heun"  # sampler (anchors: deterministic Heun)
    rho_ambient: float = 2.0  # new sigma_min = sigma_min / rho_ambient (anchors' T2I: 2.0 -> 1.0; pixel: 8)
    encode_sample: bool = False  # VAE posterior sample instead of its mean
    state_dtype: torch.dtype = torch.float64  # sampler state dtype
    backend: str = "auto"  # fused-step backend

    def __post_init__(self) -> None:
        if self.schedule not in GRID_SCHEDULES:
            raise ValueError(f"schedule must be one of {GRID_SCHEDULES}, got {self.schedule!r}")
        if self.method not in ("heun", "euler", "stochastic"):
            raise ValueError(f"method must be 'heun', 'euler' or 'stochastic', got {self.method!r}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.rho_ambient <= 1:
            raise ValueError(
                f"rho_ambient must be > 1 (restoration lowers the level), got {self.rho_ambient}"
            )
        if not 0 < self.sigma_floor < self.sigma_max:
            raise ValueError(f"need 0 < sigma_floor < sigma_max, got {self.sigma_floor}, {self.sigma_max}")

    def to_json(self) -> dict[str, object]:
        """JSON-serialisable form (for run records)."""
        record = asdict(self)
        record["state_dtype"] = str(self.state_dtype).removeprefix("torch.")
        return record


@dataclass(frozen=True)
class LatentRestoration:
    """One restored batch.

    ``images``: uint8 ``(B, 3, H, W)``, decoded restorations (input rows where clean);
    ``latents``: float32 ``(B, C, h, w)``, restored latents (encoded input where clean), or
    ``None`` when not requested; ``sigma_min``: float64 ``(B,)`` new annotations (0 stays 0);
    ``restored``: bool ``(B,)``.
    """

    images: torch.Tensor
    latents: torch.Tensor | None
    sigma_min: torch.Tensor
    restored: torch.Tensor


class LatentRestorer:
    """Restore batches of captioned images in a VAE's latent space (module docstring).

    Args:
        denoiser: conditional EDM denoiser ``D(z, sigma, cond)`` on the VAE's device, e.g. a
            :class:`~ambient_fast.latent.DiffusersDenoiser`; its conditioning comes from
            ``caption_encoder`` (run it in the denoiser's dtype).
        codec: the VAE.
        caption_encoder: captions -> conditioning.
        config: run settings.
    """

    def __init__(
        self,
        denoiser: ConditionedDenoiser,
        codec: LatentCodec,
        caption_encoder: CaptionEncoder,
        config: LatentRestoreConfig | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.codec = codec
        self.caption_encoder = caption_encoder
        self.config = config or LatentRestoreConfig()

    @torch.no_grad()
    def restore_batch(
        self,
        images: torch.Tensor,
        captions: Sequence[str],
        sigma_min: torch.Tensor,
        seeds: torch.Tensor,
        *,
        keep_latents: bool = False,
    ) -> LatentRestoration:
        """Restore one batch of same-size images.

        Args:
            images: uint8 ``(B, 3, H, W)``; ``H`` and ``W`` divisible by the VAE's factor.
            captions: ``B`` captions (only the restored rows' are encoded).
            sigma_min: ``(B,)`` levels in scaled-latent units (0 = clean).
            seeds: int ``(B,)`` per-sample seeds (e.g. ``derive_seeds(ids, run_seed)``).
            keep_latents: also return latents (then clean rows are encoded too).
        """
        cfg = self.config
        batch = images.shape[0]
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(captions) != batch or sigma_min.shape != (batch,) or seeds.shape != (batch,):
            raise ValueError(
                f"expected {batch} captions, sigma_min ({batch},) and seeds ({batch},); got {len(captions)}, "
                f"{tuple(sigma_min.shape)}, {tuple(seeds.shape)}"
            )
        sigma_min = sigma_min.to(torch.float64).cpu()
        noisy = torch.nonzero(sigma_min > 0).flatten()
        encode_rows = torch.arange(batch) if keep_latents else noisy
        latents = None
        if encode_rows.numel():
            latents = self.codec.encode(
                images[encode_rows], sample=cfg.encode_sample, seeds=seeds[encode_rows]
            )
        out_images = images.clone()
        out_latents = latents if keep_latents else None
        new_sigma = sigma_min.clone()
        restored_mask = sigma_min > 0
        if noisy.numel():
            z = latents if not keep_latents else latents[noisy.to(latents.device)]
            sizes = torch.tensor(images.shape[2:]).expand(noisy.numel(), 2)
            cond = self.caption_encoder([captions[i] for i in noisy.tolist()], sizes).to(z.device)
            uncond = cond if cfg.guidance_scale == 1.0 else self.caption_encoder.unconditional(sizes).to(z.device)
            guided = GuidedDenoiser(self.denoiser, cond, uncond, cfg.guidance_scale)
            restored = restore_latents(
                guided,
                z,
                sigma_min[noisy].to(z.device),
                seeds[noisy],
                schedule=cfg.schedule,
                num_steps=cfg.num_steps,
                method=cfg.method,
                rho=cfg.rho,
                sigma_max=cfg.sigma_max,
                sigma_floor=cfg.sigma_floor,
                state_dtype=cfg.state_dtype,
                backend=cfg.backend,
            )
            out_images[noisy] = to_uint8(self.codec.decode(restored)).to(images.device)
            if out_latents is not None:
                out_latents[noisy.to(out_latents.device)] = restored
            new_sigma[noisy] = sigma_min[noisy] / cfg.rho_ambient
        return LatentRestoration(out_images, out_latents, new_sigma, restored_mask)
