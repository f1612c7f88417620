"""Streamed or cached reading: one rank's noise-level-first training batches (SPEC 3), and
a dataset's images in file order for evaluation.

:func:`open_training_input` is the one way training (``train``, ``loop``) and the classifier
annotation (``annotate --classifier``) read data. Whatever the backend, a batch sampler
chooses the order (for training the noise-level-first sampler: sigma first, then a sample
eligible at it; for the annotation its ``ClassifierPlan``), and every
:class:`~ambient_fast.data.Batch` carries its samples' ids (and training sigmas), so the same
seed gives the same batches on every backend:

- ``"cache"``: EDM's in-memory mode (``--cache``): the decoded dataset is held once, as
  uint8 images (float32 for tensor datasets) on the training device, and batches are
  gathered from it. The default (``cache="auto"``) when the decoded set fits in
  ``cache_budget_bytes``.
- ``"dali"``: streaming through :class:`~ambient_fast.data.DALIBatchLoader` (CPU decode, or
  GPU decode with ``device="mixed"`` on CUDA): the sampler's batches are fed by an external
  source, so memory stays bounded by the prefetch queue whatever the dataset's size.
- ``"torch"``: the same stream through :class:`~ambient_fast.data.TorchBatchLoader`, where
  DALI is missing (and for tensor datasets, which have nothing to decode).

Images come out as float32 ``(u8 - 127.5) / 127.5`` in [-1, 1] on every backend.

:func:`iter_images` streams a whole dataset in file order (``fid``), through DALI where
installed, else the torch loader.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch

from .batch import Batch, LookupTables, advance_epoch, iterate_plan
from .dataset import Dataset, ImageDataset, TensorDataset
from .errors import BadSampleError

__all__ = [
    "CACHE_BUDGET_BYTES",
    "CachedBatchLoader",
    "IndexedBatchSampler",
    "cache_bytes",
    "choose_backend",
    "iter_images",
    "open_training_input",
]

CACHE_BUDGET_BYTES = 4 << 30  # 4 GiB: EDM caches whole sets; CIFAR-10 (150 MB) and FFHQ-64 (860 MB) fit
Backend = Literal["cache", "dali", "torch"]


def cache_bytes(dataset: Dataset) -> int:
    """Bytes the in-memory cache of ``dataset`` takes: uint8 pixels for images, float32 rows
    for tensor datasets."""
    per_sample = math.prod(dataset.sample_shape) * (1 if isinstance(dataset, ImageDataset) else 4)
    return len(dataset) * per_sample


def choose_backend(
    dataset: Dataset,
    cache: Literal["auto", "on", "off"] = "auto",
    cache_budget_bytes: int = CACHE_BUDGET_BYTES,
    stream: Literal["auto", "dali", "torch"] = "auto",
) -> Backend:
    """The backend :func:`open_training_input` uses (see the module docstring).

    ``cache="on"`` always caches, ``"off"`` always streams, ``"auto"`` caches when
    :func:`cache_bytes` fits in ``cache_budget_bytes``. Streams use DALI for image datasets
    when it is installed (``stream="auto"``), else the torch loader.
    """
    if cache not in ("auto", "on", "off"):
        raise ValueError(f"cache must be 'auto', 'on' or 'off', got {cache!r}")
    if stream not in ("auto", "dali", "torch"):
        raise ValueError(f"stream must be 'auto', 'dali' or 'torch', got {stream!r}")
    if cache == "on" or (cache == "auto" and cache_bytes(dataset) <= cache_budget_bytes):
        return "cache"
    from .dali_pipeline import dali_available

    if stream == "dali":
        if not isinstance(dataset, ImageDataset):
            raise ValueError(f"stream='dali' decodes images; {dataset.format!r} datasets need stream='torch'")
        if not dali_available():
            raise ImportError("stream='dali' needs NVIDIA DALI (pip install nvidia-dali-cuda130); use stream='torch'")
        return "dali"
    if stream == "auto" and isinstance(dataset, ImageDataset) and dali_available():
        return "dali"
    return "torch"


class IndexedBatchSampler:
    """A batch sampler over a subset: yields ``[(indices[p], sigma), ...]`` for the
    ``(p, sigma)`` pairs of ``sampler`` (positions in the subset -> dataset indices).

    Forwards ``batch_size``, ``epoch``, ``set_epoch`` and ``len``; its state is the wrapped
    sampler's (save and load that one).
    """

    def __init__(self, sampler, indices: np.ndarray):
        self.sampler = sampler
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = sampler.batch_size

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, float]]]:
        for batch in self.sampler:
            yield [(int(self.indices[p]), s) for p, s in batch]


class CachedBatchLoader:
    """Iterable of :class:`~ambient_fast.data.Batch` gathered from an in-memory copy of the
    dataset, one epoch of ``batch_sampler`` per ``iter`` (the same contract as the DALI and
    torch loaders).

    Args:
        samples: ``(N, ...)`` uint8 images (normalised per batch as DALI does) or float32 rows.
        tables: per-sample ``sigma_min`` / ``sigma_max`` / labels by dataset index.
        batch_sampler: yields lists of ``(index, sigma)``.
        sample_ids: int64 ``(N,)`` ids of the rows for the frozen noise (default: the row
            index, which is the dataset index for a cached dataset).
    """

    def __init__(
        self,
        samples: torch.Tensor,
        tables: LookupTables,
        batch_sampler: Iterable,
        sample_ids: torch.Tensor | None = None,
    ):
        self.samples = samples
        self.sample_ids = sample_ids
        self.tables = tables
        self.batch_sampler = batch_sampler
        self.epoch = getattr(batch_sampler, "epoch", 0)
        self._epoch_set = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._epoch_set = True
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(self.epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Batch]:
        self._epoch_set = False
        for ids, sigma in iterate_plan(self.batch_sampler, None, self.epoch):
            index = torch.from_numpy(ids).to(self.samples.device)
            rows = self.samples[index]
            if rows.dtype == torch.uint8:
                rows = rows.to(torch.float32).sub_(127.5).mul_(1 / 127.5)  # as DALI: (u8 - mean) * (1 / std)
            batch = self.tables.batch(rows, torch.from_numpy(ids), sigma)
            if self.sample_ids is not None:
                batch.sample_ids = self.sample_ids[batch.sample_ids]
            yield batch
        advance_epoch(self)


def _decode_all(dataset: Dataset, device: torch.device, num_threads: int) -> torch.Tensor:
    """The whole dataset in one preallocated tensor: uint8 ``(N, C, H, W)`` or float32 rows."""
    n = len(dataset)
    if isinstance(dataset, TensorDataset):
        rows = dataset.rows(range(n))
        values = rows.astype(np.float32) / 127.5 - 1.0 if rows.dtype == np.uint8 else rows.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(values)).to(device)
    shape = dataset.sample_shape
    out = torch.empty((n, *shape), dtype=torch.uint8)

    def fill(i: int) -> None:
        pixels = dataset.decode(i)
        if pixels.shape[:2] != tuple(shape[1:]):
            raise BadSampleError(
                dataset.describe(i),
                f"wrong size {pixels.shape[0]}x{pixels.shape[1]} (H x W): expected {shape[1]}x{shape[2]}",
            )
        out[i] = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        list(pool.map(fill, range(n)))
    return out.to(device)


def open_training_input(
    dataset: Dataset,
    batch_sampler: Iterable,
    *,
    backend: Backend,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_threads: int = 2,
    num_workers: int = 2,
) -> Iterable[Batch]:
    """This rank's training batches (one epoch of ``batch_sampler`` per ``iter``).

    Args:
        dataset: from :func:`~ambient_fast.data.open_dataset`.
        batch_sampler: the noise-level-first sampler of this rank (it shards by rank itself),
            possibly wrapped in :class:`IndexedBatchSampler`.
        backend: from :func:`choose_backend`.
        device: the training device: the cache lives there; DALI decodes there (``"mixed"``)
            when it is a CUDA device; streamed batches otherwise arrive on the CPU.
        rank, world_size, seed: the loaders' sharding and augmentation seeds (no
            augmentation is applied to training input here).
        num_threads: DALI worker threads / cache decode threads.
        num_workers: torch DataLoader workers.

    Bad samples raise :class:`~ambient_fast.data.BadSampleError` naming the file (a skipped
    sample would shift every later batch, so the backends would no longer agree).
    """
    device = torch.device(device)
    if backend == "cache":
        return CachedBatchLoader(_decode_all(dataset, device, num_threads), LookupTables(dataset), batch_sampler)
    if backend == "dali":
        from .dali_pipeline import build_dali_pipeline

        return build_dali_pipeline(
            dataset,
            batch_sampler=batch_sampler,
            device="mixed" if device.type == "cuda" else "cpu",
            device_id=device.index if device.type == "cuda" else None,
            crop=None,
            rank=rank,
            world_size=world_size,
            seed=seed,
            num_threads=num_threads,
            on_bad_sample="raise",
        )
    if backend == "torch":
        from .torch_loader import make_torch_loader

        return make_torch_loader(
            dataset,
            batch_sampler=batch_sampler,
            crop=None,
            rank=rank,
            world_size=world_size,
            seed=seed,
            num_workers=num_workers,
            on_bad_sample="raise",
            pin_memory=device.type == "cuda",
            multiprocessing_context="forkserver" if num_workers > 0 and "nvidia.dali" in sys.modules else None,
        )
    raise ValueError(f"backend must be 'cache', 'dali' or 'torch', got {backend!r}")


def iter_images(dataset: Dataset, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """Every sample of ``dataset`` once, in file order: float32 ``(B, ...)`` CPU batches in
    [-1, 1] (tensor datasets: their stored rows), with bounded memory. Bad files raise
    :class:`~ambient_fast.data.BadSampleError` naming the file."""
    from .dali_pipeline import dali_available

    if isinstance(dataset, ImageDataset) and dali_available():
        from .dali_pipeline import build_dali_pipeline

        loader = build_dali_pipeline(dataset, batch_size=batch_size, crop=None, on_bad_sample="raise")
    else:
        from .torch_loader import make_torch_loader

        loader = make_torch_loader(dataset, batch_size=batch_size, crop=None, on_bad_sample="raise")
    for batch in loader:
        yield batch.images
