"""Classifier-free guidance as a plain EDM denoiser ``D(x, sigma)`` (Ho & Salimans 2022).

``D_w(x, sigma) = D(x, sigma, uncond) + w (D(x, sigma, cond) - D(x, sigma, uncond))``.
Since ``D = x - sigma eps`` (or ``alpha x_vp - s v``) is affine in the network output with the
same ``x``, guiding the x0 estimate is exactly the usual guidance of eps (or v): the
sampler sees the same trajectory as a diffusers pipeline at the same scale.

The conditional and unconditional passes are one network call of ``2B`` rows (``x`` and
``sigma`` repeated; conditioning rows ``[cond; uncond]``, concatenated once per batch).
``w = 1`` skips the unconditional half (the conditional model alone, ``B`` rows).

The closure holds its conditioning in static tensors: :meth:`GuidedDenoiser.update` copies
the next batch's conditioning into them in place, so a CUDA graph or ``torch.compile``
capture of ``guided(x, sigma)`` stays valid from one batch to the next (same batch size).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .conditioning import Conditioning

__all__ = ["ConditionedDenoiser", "GuidedDenoiser"]

# D(x, sigma, cond) -> x0 estimate: a DiffusersDenoiser, or any EDM-native conditional
# denoiser (e.g. EDMPrecond(net, sigma_data=0.9) whose net takes the Conditioning as labels).
ConditionedDenoiser = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


class GuidedDenoiser:
    """``D_w(x, sigma)`` over one batch's conditioning (module docstring).

    Args:
        denoiser: conditional EDM denoiser ``D(x, sigma, cond)``.
        cond: ``B`` conditional rows.
        uncond: ``B`` unconditional rows (ignored when ``guidance_scale == 1``).
        guidance_scale: ``w`` (anchors' text-to-image restoration: 3.5).

    ``__call__(x, sigma)``: ``x`` ``(B, ...)``, ``sigma`` ``(B,)``; returns ``(B, ...)``.
    """

    def __init__(
        self,
        denoiser: ConditionedDenoiser,
        cond: Conditioning,
        uncond: Conditioning,
        guidance_scale: float,
    ) -> None:
        if cond.batch_size != uncond.batch_size:
            raise ValueError(f"cond has {cond.batch_size} rows, uncond {uncond.batch_size}")
        self.denoiser = denoiser
        self.guidance_scale = float(guidance_scale)
        self.batch_size = cond.batch_size
        self.conditioning = cond if self.unguided else Conditioning.cat([cond, uncond])

    @property
    def unguided(self) -> bool:
        """``w == 1``: the conditional model alone."""
        return self.guidance_scale == 1.0

    def update(self, cond: Conditioning, uncond: Conditioning | None = None) -> None:
        """Copy the next batch's conditioning into the static tensors (same shapes).

        ``uncond=None`` replaces the conditional rows only (the unconditional rows stay: the
        restoration engine's batches share one image size, so those rows never change).
        """
        rows = [cond.batch_size] + ([] if uncond is None else [uncond.batch_size])
        if any(n != self.batch_size for n in rows):
            raise ValueError(f"update: the closure holds {self.batch_size} rows, got {rows}")
        if uncond is None or self.unguided:
            self.conditioning.copy_rows_(cond, 0)
        else:
            self.conditioning.copy_(Conditioning.cat([cond, uncond]))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.unguided:
            return self.denoiser(x, sigma, self.conditioning)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), self.conditioning)
        cond, uncond = both.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)
