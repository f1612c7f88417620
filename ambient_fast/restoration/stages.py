"""The stage/codec interface of the one restoration engine (SPEC 5; ANCHORS 3.2, 3.3).

Pixel images, float tensors and latent text-to-image datasets run through the same driver
(:mod:`.pipeline`) and the same captured sampler (:class:`~.sampler.RestorationSampler`);
they differ only in the :class:`Stages` object that the driver is given:

**Host hooks** (IO threads of the driver; numpy, no device work):

- :attr:`Stages.read_into` ``(raw, out)`` decodes one source sample (a
  :class:`~.io.RawSample`: its bytes, read once by the driver and hashed for the resume
  check) into one row of the pinned host batch (storage dtype, :attr:`Stages.storage_shape`).
  For images with a :attr:`Stages.image` spec the driver may instead decode whole batches
  with DALI (``reader="dali"``), straight into the device staging buffer on CUDA.
- :meth:`Stages.prepare` returns per-batch host context (e.g. the captions of the rows)
  for :meth:`DeviceCodec.encode`; it runs on the reader thread, so tokenisation overlaps
  the device.
- :meth:`Stages.to_sample` turns the restored outputs of one row (numpy, one array per
  name in :attr:`DeviceCodec.outputs`) into the :class:`~ambient_fast.data.Sample` the
  version writer stores (encoded bytes, extras such as ``latent.npy``).

**Device hooks** (:class:`DeviceCodec`, main thread, batched, *outside* the captured graph,
in this order for every batch; :meth:`DeviceCodec.stage` first, optionally, on the copy
stream into double-buffered slots so it overlaps the previous replay; then on the compute
stream):

1. :meth:`DeviceCodec.encode` ``(raw, context, y0, cond)``: raw storage rows on the device
   ``(B, *storage_shape)`` -> the sampler's static ``y0 (B, *model_shape)`` (state dtype) and
   the static conditioning buffers ``cond[name] (B, *shape)`` declared by
   :attr:`DeviceCodec.conditioning` (pixel: ``u8 / 127.5 - 1``, no conditioning; latent:
   VAE encode in bf16 + caption embeddings, conditional and unconditional rows).
2. the captured K-step loop: ``x = y0 + sigma_min eps`` then the solver steps, calling the
   network through :meth:`DeviceCodec.wrap_denoiser` ``(denoiser, cond)`` (built once, at
   capture time: it closes over the *static* ``cond`` buffers, so each replay sees the
   batch's conditioning; classifier-free guidance stacks the cond/uncond rows into one
   network call and mixes them with the guidance scale inside the graph).
3. :meth:`DeviceCodec.decode` ``(x, outputs)``: the final state ``(B, *model_shape)`` ->
   the static device outputs ``outputs[name]`` declared by :attr:`DeviceCodec.outputs`
   (``"sample"`` is required: the storage rows; latent: VAE decode -> uint8 images, plus
   ``"latent"`` when latents are stored). Each output is copied to the host batch after.

**The grid** (:class:`GridSpec`) is an option of the engine, not of a path: ``"per_sample"``
(SPEC 5, anchors' pixel restoration: a rho grid of ``num_steps`` points from each
``sigma_min_i`` to ``sigma_floor``, then 0 or ``sigma_out``) or ``"global"`` (ANCHORS 3.3,
the text-to-image restorer: the global EDM grid ``sigma_max -> sigma_floor`` of
``num_steps`` points, truncated at each sample's level: the last point ``t >= sigma_min_i``
becomes ``sigma_min_i``). The captured loop needs one step count per run: a global-grid run
uses ``K = max_i (active steps of sample i)`` and left-pads shorter rows with zero-length
steps at ``sigma_min_i`` (they leave the state unchanged), so a run whose samples share one
level costs exactly the anchors' evaluations.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ..core.schedules import karras_sigmas
from ..samplers.restore import RESTORE_SIGMA_FLOOR, restoration_grid

__all__ = [
    "GRID_SCHEDULES",
    "GridSpec",
    "DeviceCodec",
    "Uint8ImageCodec",
    "FloatCodec",
    "IMAGE_UINT8",
    "float_codec",
    "Stages",
]

GRID_SCHEDULES: tuple[str, ...] = ("per_sample", "global")
Denoiser = Callable[..., torch.Tensor]


# ---------------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class GridSpec:
    """Per-sample level tables of a run (see the module docstring).

    Attributes:
        schedule: ``"per_sample"`` (SPEC 5) or ``"global"`` (ANCHORS 3.3).
        num_steps: per_sample: grid points before the final level (anchors 18);
            global: points of the global grid before the final 0 (anchors 30).
        sigma_out: common stop level (0: integrate to the data); per_sample only.
        rho, sigma_floor: grid curvature and lowest positive level (EDM 7, 0.002).
        sigma_max: top of the global grid (EDM 80).
    """

    schedule: Literal["per_sample", "global"] = "per_sample"
    num_steps: int = 18
    sigma_out: float = 0.0
    rho: float = 7.0
    sigma_floor: float = RESTORE_SIGMA_FLOOR
    sigma_max: float = 80.0

    def __post_init__(self) -> None:
        if self.schedule not in GRID_SCHEDULES:
            raise ValueError(f"grid schedule must be one of {GRID_SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "global" and self.sigma_out != 0:
            raise ValueError("the global grid integrates to 0; sigma_out > 0 needs the per_sample grid")
        if self.schedule == "global" and not 0 < self.sigma_floor < self.sigma_max:
            raise ValueError(f"need 0 < sigma_floor < sigma_max, got {self.sigma_floor}, {self.sigma_max}")

    def _global(self) -> torch.Tensor:
        return karras_sigmas(self.num_steps, self.sigma_floor, self.sigma_max, self.rho)  # (N + 1,) ends in 0

    def steps(self, sigma_min: np.ndarray) -> int:
        """K, the step count of the captured loop for a run restoring samples at ``sigma_min``."""
        if self.schedule == "per_sample" or len(sigma_min) == 0:
            return self.num_steps
        grid = self._global().numpy()
        # Row i keeps the points t_k < sigma_min_i plus its own start: (#points below) steps.
        below = (grid[None, :] < np.asarray(sigma_min, dtype=np.float64)[:, None]).sum(axis=1)
        return int(max(1, below.max()))

    def table(self, sigma_min: torch.Tensor, steps: int) -> torch.Tensor:
        """float64 ``(B, steps + 1)`` levels from ``sigma_min`` ``(B,)`` down to the final level."""
        sm = sigma_min.to(torch.float64)
        if self.schedule == "per_sample":
            if steps != self.num_steps:
                raise ValueError(f"per_sample grid has {self.num_steps} steps, asked for {steps}")
            return restoration_grid(
                sm, torch.full_like(sm, self.sigma_out), steps, rho=self.rho, sigma_floor=self.sigma_floor
            )
        grid = self._global().to(sm.device)
        # min(sigma_min_i, t_k) over the global grid's last `steps + 1` points, first entry sigma_min_i:
        # the clipped points are zero-length steps at sigma_min_i (the state does not move).
        tail = (
            grid[-(steps + 1) :]
            if steps + 1 <= grid.numel()
            else torch.cat([grid[:1].expand(steps + 1 - grid.numel()), grid])
        )
        table = torch.minimum(sm.reshape(-1, 1), tail.reshape(1, -1)).clone()
        table[:, 0] = sm
        return table

    def to_json(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule,
            "num_steps": self.num_steps,
            "sigma_out": self.sigma_out,
            "rho": self.rho,
            "sigma_floor": self.sigma_floor,
            "sigma_max": self.sigma_max,
        }


# ---------------------------------------------------------------------------- device side
class DeviceCodec:
    """Device hooks around the captured loop (module docstring). Subclass and override.

    Attributes:
        storage_dtype: dtype of the raw rows the reader decodes and of the ``"sample"`` output.
    """

    storage_dtype: torch.dtype

    def model_shape(self, storage_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample shape of ``y0`` and of the sampler state."""
        return storage_shape

    def conditioning(self, storage_shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Static conditioning buffers ``{name: (per-row shape, dtype)}`` (``B`` rows each)."""
        return {}

    def outputs(self, storage_shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Device outputs ``{name: (per-row shape, dtype)}``; ``"sample"`` = the storage rows."""
        return {"sample": (storage_shape, self.storage_dtype)}

    def stage(self, raw: torch.Tensor, context: Any, slot: int) -> Any:
        """Optional per-batch device work that may overlap the previous batch's replay: on CUDA
        it runs on the sampler's copy stream right after the H2D copy of ``raw`` into staging
        slot ``slot`` (0 or 1: double-buffered; slot ``k`` is restaged only after the batch
        that used it has run :meth:`encode`); on CPU inline. Its return value replaces the
        context :meth:`encode` gets. Default: no work, the context unchanged."""
        return context

    def encode(self, raw: torch.Tensor, context: Any, y0: torch.Tensor, cond: dict[str, torch.Tensor]) -> None:
        """Fill ``y0`` (state dtype, ``(B, *model_shape)``) and ``cond`` from ``raw`` (or from
        what :meth:`stage` prepared), on the compute stream before the replay."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor, outputs: dict[str, torch.Tensor]) -> None:
        """Fill ``outputs`` from the final state ``x`` (``(B, *model_shape)``, state dtype)."""
        raise NotImplementedError

    def wrap_denoiser(
        self, denoiser: Denoiser, cond: dict[str, torch.Tensor]
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The function ``D(x, sigma)`` the captured loop calls (reads the static ``cond``)."""
        return denoiser


@dataclass(frozen=True)
class Uint8ImageCodec(DeviceCodec):
    """uint8 images ``(C, H, W)``: ``y0 = u8 / 127.5 - 1``; out ``clip(round(x * 127.5 + 127.5))``
    (the project's convention, :func:`ambient_fast.data.to_uint8_image`)."""

    storage_dtype: torch.dtype = torch.uint8

    def encode(self, raw: torch.Tensor, context: Any, y0: torch.Tensor, cond: dict[str, torch.Tensor]) -> None:
        y0.copy_(raw.to(y0.dtype) / 127.5 - 1)

    def decode(self, x: torch.Tensor, outputs: dict[str, torch.Tensor]) -> None:
        outputs["sample"].copy_((x * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8))


@dataclass(frozen=True)
class FloatCodec(DeviceCodec):
    """Float tensors in model units, stored as ``storage_dtype`` (identity)."""

    storage_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.storage_dtype not in (torch.float16, torch.float32, torch.float64):
            raise ValueError(f"float storage must be float16, float32 or float64, got {self.storage_dtype}")

    def encode(self, raw: torch.Tensor, context: Any, y0: torch.Tensor, cond: dict[str, torch.Tensor]) -> None:
        y0.copy_(raw)

    def decode(self, x: torch.Tensor, outputs: dict[str, torch.Tensor]) -> None:
        outputs["sample"].copy_(x)


IMAGE_UINT8 = Uint8ImageCodec()


def float_codec(dtype: torch.dtype) -> FloatCodec:
    """Identity codec for tensors stored as ``dtype`` (float16/32/64) in model units."""
    return FloatCodec(dtype)


# ------------------------------------------------------------------------------ host side
@dataclass
class Stages:
    """Everything path-specific of one restoration run (module docstring).

    The pixel/tensor stages are built by :func:`.io.RestoreSource.stages`; a latent run
    subclasses this (``restoration/latent_stages.py``) and overrides :attr:`device` and the
    hooks it needs.

    Attributes:
        device: the device hooks.
        storage_shape: per-sample shape of the decoded raw rows (images ``(C, H, W)``).
        read_into: ``(index, out row) -> None`` decode sample ``index`` into ``out`` (raises
            :class:`~ambient_fast.data.BadSampleError` for an undecodable sample).
        encode_output: ``(index, outputs) -> (data bytes | None, array | None, extras)``
            the stored form of a restored row (see :meth:`to_sample`).
        description: recorded in the run arguments and the manifest (``{"codec": ..., ...}``).
        image: for uint8 image storage: the :class:`~.io.ImageSpec` (size, resize, max_pixels)
            that lets the driver decode whole batches with DALI instead of ``read_into``
            (None: always ``read_into``).
    """

    device: DeviceCodec
    storage_shape: tuple[int, ...]
    read_into: Callable[[Any, np.ndarray], None]  # (RawSample, out row)
    encode_output: Callable[[int, dict[str, np.ndarray]], tuple[bytes | None, np.ndarray | None, dict[str, bytes]]]
    description: dict[str, Any] = field(default_factory=dict)
    image: Any = None

    def prepare(self, indices: np.ndarray) -> Any:
        """Per-batch host context for :meth:`DeviceCodec.encode` (reader thread); default None."""
        return None


def npy_bytes(array: np.ndarray) -> bytes:
    """``.npy`` bytes of one array (no pickle), for tensor rows and stored latents."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()
