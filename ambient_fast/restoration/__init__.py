"""Restoration engine: CUDA-graph batched posterior sampling over whole datasets (SPEC 5).

Public API:

- :func:`restore_dataset` -- restore every corrupt sample of a dataset version into a new
  version: resumable (journal + atomic renames), sharded across ``torchrun`` ranks,
  deterministic per sample (``ambient-fast restore`` is its CLI).
- :class:`RestorationSampler` -- the device engine: a fixed-shape batch, the whole K-step
  loop captured once as a CUDA graph and replayed per batch (eager on CPU).
- :func:`save_denoiser`, :func:`load_denoiser`, :func:`read_denoiser_config` -- the
  checkpoint format (safetensors weights + JSON config in its metadata).
- :class:`RestoreReport`, :class:`RestoreOptions`, :class:`SamplerConfig`,
  :class:`RestoreSource` (dataset IO over :func:`ambient_fast.data.open_dataset`), :class:`ArgumentsChanged`.
"""

from ..nn.checkpoint import DenoiserConfig, load_denoiser, read_denoiser_config, save_denoiser
from .dataset import RestoreOptions, RestorePlan, RestoreReport, restore_dataset, staging_folder
from .io import RestoreSource, open_source
from .journal import ArgumentsChanged
from .sampler import IMAGE_UINT8, Codec, HostBatch, RestorationSampler, SamplerConfig, float_codec

__all__ = [
    "ArgumentsChanged",
    "Codec",
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
