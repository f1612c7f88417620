"""Restore a captioned WebDataset in latent space: shards in -> new dataset version out.

Reads the source with :func:`ambient_fast.data.dataset.open_dataset` (tar shards, captions in
``key.txt``, ``sigma_min`` from the ``annotations.jsonl`` sidecar, in scaled-latent units) and
writes a new version with :class:`ambient_fast.data.writer.DatasetWriter`: one output shard
per chunk of ``chunk_size`` source samples, in source order, each sample keeping its key and
every non-image component (caption, metadata, class, ...) byte for byte, plus the new
annotation in the version's sidecar. Restored images are PNG; clean samples
(``sigma_min == 0``) are copied byte for byte. With ``keep_latents`` every sample also gets
``key.latent.npy`` (``(C, h, w)``: restored latents, or the encoded image where clean; the
anchors store latents for the next training stage).

Seeds are ``derive_seeds(sample index, run_seed)``: a sample's output depends on its
position in the source and the run seed only, not on the batch it lands in. Within a chunk,
samples are batched by image size (any sizes divisible by the VAE factor work) and by level
(so a batch of the ``"global"`` grid carries few zero-length steps).

Resume: chunks are committed atomically by the writer; ``resume=True`` skips committed
chunks, and the writer refuses to continue if the run's settings (its ``params``: config,
model description, chunking, seed) differ from the interrupted run's.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..core.noise import derive_seeds
from ..data import DatasetWriter, Sample, open_dataset
from .components import LatentComponents, load_components
from .restore import LatentRestoreConfig, LatentRestorer

__all__ = ["LATENT_COMPONENT", "restore_latent_shards"]

LATENT_COMPONENT = "latent.npy"  # WebDataset component holding a sample's (C, h, w) latents
LATENT_DTYPES = {"float16": np.float16, "float32": np.float32}  # anchors store float16


def _image_tensor(sample: Sample) -> torch.Tensor:
    """uint8 ``(3, H, W)`` from the sample's decoded ``(H, W, C)`` array (gray -> RGB)."""
    array = sample.array
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _batches(samples: Sequence[Sample], rows: Sequence[int], batch_size: int) -> list[list[int]]:
    """Rows grouped by image size, sorted by level within a size, cut into batches."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for row in rows:
        groups.setdefault(tuple(samples[row].array.shape[:2]), []).append(row)
    batches = []
    for members in groups.values():
        members.sort(key=lambda row: (samples[row].sigma_min, row))
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    return batches


class _ChunkRestorer:
    """Restores one chunk of samples into the samples to write."""

    def __init__(
        self, restorer: LatentRestorer, batch_size: int, keep_latents: bool, latent_dtype: str, run_seed: int
    ) -> None:
        self.restorer = restorer
        self.batch_size = batch_size
        self.keep_latents = keep_latents
        self.latent_dtype = LATENT_DTYPES[latent_dtype]
        self.run_seed = run_seed

    def __call__(self, samples: Sequence[Sample], describe: Callable[[int], str]) -> list[Sample]:
        out = list(samples)
        rows = [r for r, s in enumerate(samples) if self.keep_latents or s.sigma_min > 0]
        for row in rows:
            if samples[row].sigma_min > 0 and samples[row].caption is None:
                raise ValueError(f"{describe(samples[row].index)}: sample to restore has no caption (key.txt)")
        for batch in _batches(samples, rows, self.batch_size):
            chosen = [samples[r] for r in batch]
            result = self.restorer.restore_batch(
                torch.stack([_image_tensor(s) for s in chosen]),
                [s.caption or "" for s in chosen],
                torch.tensor([s.sigma_min for s in chosen], dtype=torch.float64),
                derive_seeds(torch.tensor([s.index for s in chosen]), self.run_seed),
                keep_latents=self.keep_latents,
            )
            images = np.ascontiguousarray(result.images.permute(0, 2, 3, 1).cpu().numpy())
            for j, (row, sample) in enumerate(zip(batch, chosen, strict=True)):
                extras = dict(sample.extras)
                if result.latents is not None:
                    latent = result.latents[j].cpu().numpy().astype(self.latent_dtype)
                    extras[LATENT_COMPONENT] = _npy_bytes(latent)
                if bool(result.restored[j]):
                    out[row] = replace(
                        sample, array=images[j], data=None, sigma_min=float(result.sigma_min[j]), extras=extras
                    )
                else:
                    out[row] = replace(sample, extras=extras)
        return out


def restore_latent_shards(
    model: str | os.PathLike[str] | LatentComponents,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    config: LatentRestoreConfig | None = None,
    batch_size: int = 16,
    chunk_size: int = 1024,
    keep_latents: bool = False,
    latent_dtype: str = "float16",
    run_seed: int = 0,
    resume: bool = False,
    device: torch.device | str | None = None,
    annotations: str | os.PathLike[str] | None = None,
    num_threads: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Restore every annotated sample of WebDataset shards in a VAE's latent space (SPEC 5).

    Args:
        model: a local diffusers pipeline folder (loaded with :func:`load_components`'s
            defaults) or ready :class:`LatentComponents` (loader options, EDM-native models).
        src: WebDataset folder of ``*.tar`` shards (or one ``.tar``) with ``key.txt`` captions
            and an ``annotations.jsonl`` sidecar (``sigma_min`` in scaled-latent units).
        dst: the new version's folder (must be new, or an unfinished run with ``resume``).
        config: sampler, grid, guidance and annotation settings (anchors' defaults).
        batch_size: samples per restoration batch (2x rows per network call with CFG).
        chunk_size: samples per output shard (the unit of resume).
        keep_latents: store ``key.latent.npy`` for every sample.
        latent_dtype: ``"float16"`` (anchors) or ``"float32"``.
        run_seed: mixed into every sample's seed.
        resume: continue an interrupted run into ``dst``.
        device: where to load ``model`` (default CUDA if available); ignored for components.
        annotations: a sidecar to use instead of the source's own.
        num_threads: decode threads.
        progress: called as ``progress(samples_done, samples_total)`` after each chunk.

    Returns:
        ``dst``, a complete dataset version (``manifest.json`` written last).
    """
    config = config or LatentRestoreConfig()
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent_dtype must be one of {tuple(LATENT_DTYPES)}, got {latent_dtype!r}")
    if not isinstance(model, LatentComponents):
        model = load_components(model, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = open_dataset(src, format="webdataset", annotations=annotations)
    arguments = {
        "config": config.to_json(),
        "model": model.describe(),
        "chunk_size": chunk_size,
        "keep_latents": keep_latents,
        "latent_dtype": latent_dtype,
        "run_seed": run_seed,
    }
    writer = DatasetWriter(
        dst, "webdataset", parent=dataset, creator="ambient_fast.latent", params=arguments, resume=resume
    )
    restore_chunk = _ChunkRestorer(
        LatentRestorer(model.denoiser, model.codec, model.caption_encoder, config),
        batch_size,
        keep_latents,
        latent_dtype,
        run_seed,
    )
    total = len(dataset)
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        for start in range(0, total, chunk_size):
            indices = range(start, min(start + chunk_size, total))
            if writer.completed_keys.issuperset(dataset.keys[i] for i in indices):
                continue
            samples = list(pool.map(dataset.read, indices))
            writer.write_chunk(restore_chunk(samples, dataset.describe))
            if progress is not None:
                progress(indices.stop, total)
    restored = int(np.count_nonzero(dataset.sigma_min > 0))
    return writer.close(extra={"latent_restoration": {"restored": restored, "copied": total - restored}})
