"""Classifier-free guidance as a plain EDM denoiser ``D(x, sigma)`` (Ho & Salimans 2022).

``D_w(x, sigma) = D(x, sigma, uncond) + w (D(x, sigma, cond) - D(x, sigma, uncond))``.
Since ``D = x - sigma eps`` (or ``alpha x_vp - s v``) is affine in the network output with the
same ``x``, guiding the x0 estimate is exactly the usual guidance of eps (or v): the
sampler sees the same trajectory as a diffusers pipeline at the same scale.

The conditional and unconditional passes are one network call of ``2B`` rows (``x`` and
``sigma`` repeated; conditioning rows interleaved ``[cond_0, uncond_0, cond_1, ...]``, laid
out once per batch, so static ``(B, 2, ...)`` buffers are the network's ``2B`` rows as they are).
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

    The network sees the rows interleaved, ``[cond_0, uncond_0, cond_1, uncond_1, ...]``
    (``2B`` rows; ``B`` when unguided), held in :attr:`conditioning`; :meth:`over` wraps
    static tensors already in that layout without copying them (the restoration engine's
    captured loop). ``__call__(x, sigma)``: ``x`` ``(B, ...)``, ``sigma`` ``(B,)``; returns
    ``(B, ...)``.
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
        unguided = float(guidance_scale) == 1.0
        both = Conditioning.interleave([cond] if unguided else [cond, uncond])
        self._init(denoiser, both, guidance_scale, cond.batch_size)

    @classmethod
    def over(cls, denoiser: ConditionedDenoiser, conditioning: Conditioning, guidance_scale: float) -> GuidedDenoiser:
        """Guide over ``conditioning`` as it is (interleaved rows, shared, not copied)."""
        guided = cls.__new__(cls)
        rows = 1 if float(guidance_scale) == 1.0 else 2
        if conditioning.batch_size % rows:
            raise ValueError(f"guided conditioning needs a multiple of {rows} rows, got {conditioning.batch_size}")
        guided._init(denoiser, conditioning, guidance_scale, conditioning.batch_size // rows)
        return guided

    def _init(self, denoiser: ConditionedDenoiser, both: Conditioning, guidance_scale: float, batch: int) -> None:
        self.denoiser = denoiser
        self.guidance_scale = float(guidance_scale)
        self.batch_size = batch
        self.conditioning = both

    @property
    def unguided(self) -> bool:
        """``w == 1``: the conditional model alone."""
        return self.guidance_scale == 1.0

    @property
    def rows_per_sample(self) -> int:
        """Network rows per sample: 2 with guidance, 1 without."""
        return 1 if self.unguided else 2

    def update(self, cond: Conditioning, uncond: Conditioning | None = None) -> None:
        """Copy the next batch's conditioning into the static tensors in place (same shapes);
        ``uncond=None`` keeps the unconditional rows."""
        parts = [cond] if uncond is None or self.unguided else [cond, uncond]
        if any(p.batch_size != self.batch_size for p in parts):
            raise ValueError(
                f"update: the closure holds {self.batch_size} rows, got {[p.batch_size for p in parts]}"
            )
        for offset, part in enumerate(parts):
            self.conditioning.copy_rows_(part, offset, self.rows_per_sample)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.unguided:
            return self.denoiser(x, sigma, self.conditioning)
        both = self.denoiser(x.repeat_interleave(2, dim=0), sigma.repeat_interleave(2), self.conditioning)
        pairs = both.unflatten(0, (x.shape[0], 2))
        cond, uncond = pairs[:, 0], pairs[:, 1]
        return uncond + self.guidance_scale * (cond - uncond)
