"""Restoration engine: CUDA-graph batched posterior sampling over whole datasets (SPEC 5).

Public API:

- :func:`restore_dataset` -- the one dataset driver: restore every corrupt sample of a
  dataset version (pixel images, JPEG/PNG/WebP or tensors; latent text-to-image via its
  ``stages``) straight into a new version through the data package's writer: resumable
  (the writer's chunk records, content-checked), locked (``.DST.lock``), sharded across
  ``torchrun`` ranks, deterministic per sample (``ambient-fast restore`` is its CLI).
- :mod:`.stages` -- the stage/codec interface every path implements (:class:`Stages`,
  :class:`DeviceCodec`) and the grid option (:class:`GridSpec`: per-sample or the
  anchors' truncated global grid).
- :class:`RestorationSampler` -- the device engine: a fixed-shape batch, the whole K-step
  loop captured once as a CUDA graph and replayed per batch (eager on CPU).
- :func:`save_denoiser`, :func:`load_denoiser`, :func:`read_denoiser_config` -- the
  checkpoint format (safetensors weights + JSON config in its metadata).
- :class:`RestoreReport`, :class:`RestoreOptions`, :class:`SamplerConfig`,
  :class:`RestoreSource` (dataset IO over :func:`ambient_fast.data.open_dataset`), :class:`ArgumentsChanged`.
"""

from ..nn.checkpoint import DenoiserConfig, load_denoiser, read_denoiser_config, save_denoiser
from ..runtime import ArgumentsChanged
from .dataset import RestoreOptions, RestorePlan, RestoreReport, restore_dataset, staging_folder
from .io import OutputCodec, RawSample, RestoreSource, SizeMismatch, open_source, parse_output_codec
from .lock import DestinationLocked
from .resume import SourceChanged
from .sampler import HostBatch, RestorationSampler, SamplerConfig
from .stages import IMAGE_UINT8, DeviceCodec, GridSpec, Stages, float_codec

__all__ = [
    "ArgumentsChanged",
    "DestinationLocked",
    "OutputCodec",
    "RawSample",
    "SizeMismatch",
    "SourceChanged",
    "parse_output_codec",
    "DeviceCodec",
    "GridSpec",
    "Stages",
    "DenoiserConfig",
    "HostBatch",
    "IMAGE_UINT8",
    "RestorationSampler",
    "RestoreOptions",
    "RestorePlan",
    "RestoreReport",
    "RestoreSource",
    "SamplerConfig",
    "float_codec",
    "load_denoiser",
    "open_source",
    "read_denoiser_config",
    "restore_dataset",
    "save_denoiser",
    "staging_folder",
]
