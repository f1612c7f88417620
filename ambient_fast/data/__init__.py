"""Datasets with per-sample ``sigma_min``, corruptions, and input pipelines (DALI and torch).

Public API (SPEC sections in brackets; formats, sidecar and manifest are described in the
module docstrings of ``dataset``, ``annotations`` and ``writer``):

Reading [2]
    ``open_dataset(path, *, format=None, annotations=None, default_sigma_min=None,
    default_sigma_max=0.0) -> Dataset``
        Auto-detects ``"folder"`` (EDM/StyleGAN images + ``dataset.json``), ``"zip"``,
        ``"webdataset"`` (``*.tar`` shards: ``key.png|jpg``, ``key.txt``, ``key.json``,
        ``key.cls``), ``"tensors"`` (``.npy`` / ``.safetensors``, e.g. ``(N, L, 3)``) and
        ``"npy"`` (the anchors' stored-noise ``.../npy`` folders: one float CHW ``.npy`` per
        sample, already noisy at its sigma_min, ``dataset.stored_noisy``).
        ``Dataset``: ``len``, ``keys`` (stable), ``sigma_min`` / ``sigma_max`` (float64
        ``(N,)``), ``labels``, ``format``, ``read(i) -> Sample``, ``describe(i)``; image
        datasets add ``read_bytes(i)``, ``decode(i)``, ``sample_shape``, ``channels`` and
        ``scan(level="quick"|"decode", resolution=None) -> {index: BadSampleError}``.
    ``Sample``: ``index, key, array, sigma_min, sigma_max, label, caption, metadata,
        extras, data``.
    ``load_dataset_tensors(path) -> DatasetTensors(images float32 (N, C, H, W) in [-1, 1],
        sigma_min float64 (N,), sigma_max float64 (N,), ids int64 (N,), labels)``

Annotations (``annotations.jsonl``, anchors' format) [2]
    ``read_annotations(path) -> {filename: (sigma_min, sigma_max)}``,
    ``write_annotations(path, keys, sigma_min, sigma_max=None)``,
    ``parse_annotations(text, where)``, ``join_annotations(keys, entries, default=, where=)``

Writing versions [5, 6]
    ``DatasetWriter(root, format, *, parent=None, creator=, params=None, image_ext=".png",
    jpeg_quality=95, tensor_container="safetensors", resume=False)``:
        ``write_chunk(samples, *, chunk=None, note=None) -> int`` (atomic, resumable; explicit
        chunk numbers let several processes write one version), ``completed_keys``,
        ``committed``, ``reload()``, ``DatasetWriter.stored_params(root)``,
        ``close(extra=None, info=None, timestamp=True, extra_files=None) -> Path`` (sidecar,
        ``dataset.json``, manifest last).
    ``write_dataset(root, format, samples, *, chunk_size=1024, **writer_kwargs) -> Path``
    ``verify_version(path, *, check_images=True) -> manifest`` (checksums; every image's
    header and end marker)
    ``to_uint8_image(x (C, H, W) in [-1, 1]) -> uint8 (H, W, C)``
    ``probe_image(bytes, where) -> ImageInfo(codec, width, height, channels)`` (PNG, JPEG,
    WebP headers and end markers, no decode), ``decode_image(bytes, where, channels)``,
    ``encode_image(uint8 (H, W, C), ".png"|".jpg"|".webp", jpeg_quality=, webp_quality=)``

Corruptions
    ``corrupt_dataset(source, dest, corruption, *, fraction, seed=0, sigma_min=None,
    selection="per_sample", format=None, chunk_size=1024, **params) -> Path``
    ``gaussian_blur(x, sigma_blur)``, ``jpeg_compress(u8, quality)``,
    ``add_gaussian_noise(x, std, rng)``, ``random_mask(x, rng, ...)``,
    ``downsample_upsample(x, factor)``, ``apply_corruption(kind, u8, params, rng)``,
    ``select_corrupted(keys, fraction, seed, selection)``,
    ``corruption_sigma_min(kind, params, sigma_min=None)``, ``PRESET_SIGMA_MIN``

Demo data
    ``demo_dataset(root, corruption="blur"|"noise"|None, clean_fraction=0.03, seed=0, *,
    sigma_blur=0.6, noise_std=0.2, sigma_min=None, resolution=8) -> Path``
    ``export_digits(root, *, resolution=8) -> Path``

Input pipelines [3] — both yield ``Batch(images, sigma_min, sigma_max, sigma, sample_ids,
labels, captions)`` (see ``batch.Batch`` for dtypes):
    ``build_dali_pipeline(dataset, *, batch_size=None, batch_sampler=None, resolution=None,
    device="cpu"|"mixed", crop="center"|"random"|None, flip=False, shuffle=False,
    drop_last=False, rank=0, world_size=1, seed=0, num_threads=2, prefetch_queue_depth=2,
    reader="auto", on_bad_sample="skip"|"raise", scan="auto") -> DALIBatchLoader``
    ``make_torch_loader(dataset, *, batch_size=None, batch_sampler=None, resolution=None,
    crop="center", flip=False, shuffle=False, drop_last=False, rank=0, world_size=1,
    seed=0, num_workers=0, on_bad_sample="skip", scan="auto", multiprocessing_context=None)
    -> TorchBatchLoader``
    Both loaders: iterate once per epoch, ``set_epoch(e)`` (forwarded to the sampler),
    ``bad_samples`` (``{index: "path: reason"}``), ``len``.
    ``make_noise_first_sampler(dataset, batch_size, **kwargs)``: a
    ``NoiseFirstBatchSampler`` over the dataset's annotation (``batch_sampler=`` above).
    ``dali_available() -> bool``

Errors (all ``DatasetError``, a ``ValueError``): ``UnsafePathError``,
``DatasetFormatError``, ``AnnotationError``, ``BadSampleError(where, reason)``.
"""

from ._io import ImageInfo, decode_image, encode_image, probe_image, to_uint8_image
from .annotations import (
    SIDECAR_NAME,
    format_annotations,
    join_annotations,
    parse_annotations,
    read_annotations,
    write_annotations,
)
from .batch import Batch
from .corrupt import (
    CORRUPTIONS,
    PRESET_SIGMA_MIN,
    add_gaussian_noise,
    apply_corruption,
    corrupt_dataset,
    corruption_sigma_min,
    downsample_upsample,
    gaussian_blur,
    jpeg_compress,
    random_mask,
    select_corrupted,
)
from .dali_pipeline import DALIBatchLoader, build_dali_pipeline, dali_available
from .dataset import Dataset, Sample, open_dataset
from .demo import DatasetTensors, demo_dataset, export_digits, load_dataset_tensors
from .errors import AnnotationError, BadSampleError, DatasetError, DatasetFormatError, UnsafePathError
from .torch_loader import TorchBatchLoader, make_torch_loader
from .writer import DatasetWriter, verify_version, write_dataset


def make_noise_first_sampler(dataset: Dataset, batch_size: int, **kwargs):
    """``NoiseFirstBatchSampler(dataset.sigma_min, batch_size, sigma_max=dataset.sigma_max,
    **kwargs)``: draws sigma first, then a sample eligible at it (SPEC 3); pass it as
    ``batch_sampler=`` to either pipeline."""
    from .sampler import NoiseFirstBatchSampler

    return NoiseFirstBatchSampler(dataset.sigma_min, batch_size, sigma_max=dataset.sigma_max, **kwargs)


__all__ = [
    "CORRUPTIONS",
    "PRESET_SIGMA_MIN",
    "SIDECAR_NAME",
    "AnnotationError",
    "BadSampleError",
    "Batch",
    "DALIBatchLoader",
    "Dataset",
    "DatasetError",
    "DatasetFormatError",
    "DatasetTensors",
    "DatasetWriter",
    "ImageInfo",
    "Sample",
    "TorchBatchLoader",
    "UnsafePathError",
    "add_gaussian_noise",
    "apply_corruption",
    "build_dali_pipeline",
    "corrupt_dataset",
    "corruption_sigma_min",
    "dali_available",
    "decode_image",
    "demo_dataset",
    "encode_image",
    "downsample_upsample",
    "export_digits",
    "format_annotations",
    "gaussian_blur",
    "jpeg_compress",
    "join_annotations",
    "load_dataset_tensors",
    "make_noise_first_sampler",
    "make_torch_loader",
    "open_dataset",
    "parse_annotations",
    "probe_image",
    "random_mask",
    "read_annotations",
    "select_corrupted",
    "to_uint8_image",
    "verify_version",
    "write_annotations",
    "write_dataset",
]
