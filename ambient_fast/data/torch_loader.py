"""Plain ``torch.utils.data`` input pipeline with the same batch contract as DALI's.

For platforms without DALI (macOS, Windows, CPU-only CI) and as the reference the DALI
pipeline is tested against. Decoding is PIL in DataLoader workers; every sample first
passes the same header / end-marker / size checks as the DALI path, so both backends skip
(or refuse) the same files.

Augmentation is deterministic: the main process gives every batch slot a seed from
``(seed, epoch, batch, slot)``, so crops and flips do not depend on ``num_workers``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.utils.data

from ._io import probe_image
from .batch import (
    BadSampleLog,
    Batch,
    EpochPlanMixin,
    LookupTables,
    advance_epoch,
    as_hw,
    check_batch_sampler,
    crop_offsets,
    iterate_plan,
    prescan,
)
from .dataset import Dataset, ImageDataset, TensorDataset, size_problem
from .errors import BadSampleError

__all__ = ["TorchBatchLoader", "make_torch_loader"]


class _SampleReader(torch.utils.data.Dataset):
    """Map-style dataset over items ``(index, augment_seed)``: decoded, cropped, flipped,
    normalised CHW float32 rows, or ``(index, (where, reason))`` for a bad sample."""

    def __init__(self, dataset: Dataset, resolution, crop: str | None, flip: bool):
        self.dataset = dataset
        self.resolution = resolution
        self.crop = crop
        self.flip = flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, augment_seed = item
        dataset = self.dataset
        if isinstance(dataset, TensorDataset):
            row = dataset.row(index)
            values = row.astype(np.float32) / 127.5 - 1.0 if row.dtype == np.uint8 else row.astype(np.float32)
            return index, torch.from_numpy(np.ascontiguousarray(values))
        try:
            data = dataset.read_bytes(index)
            info = probe_image(data, dataset.describe(index))
            problem = size_problem(info, self.resolution, self.crop is not None)
            if problem:
                raise BadSampleError(dataset.describe(index), problem)
            pixels = dataset.decode(index, data)
        except BadSampleError as exc:
            return index, (exc.where, exc.reason)
        rng = np.random.default_rng(augment_seed)
        if self.resolution is not None and self.crop is not None:
            top, left = crop_offsets(pixels.shape[:2], self.resolution, self.crop, rng)
            pixels = pixels[top : top + self.resolution[0], left : left + self.resolution[1]]
        if self.flip and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        chw = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        return index, chw.to(torch.float32).sub_(127.5).mul_(1 / 127.5)  # as DALI: (u8 - mean) * (1 / std)


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, list]:
    """-> ``(images (B', ...), ids (B',), keep bool (B,), bad [(index, (where, reason))])``."""
    keep = np.array([isinstance(x, torch.Tensor) for _, x in items], dtype=bool)
    good = [(i, x) for (i, x), k in zip(items, keep, strict=True) if k]
    bad = [(i, x) for (i, x), k in zip(items, keep, strict=True) if not k]
    ids = torch.tensor([i for i, _ in good], dtype=torch.int64)
    images = torch.stack([x for _, x in good]) if good else torch.empty(0)
    return images, ids, keep, bad


class _PlanSampler(torch.utils.data.Sampler):
    """Batch sampler for the DataLoader: lists of ``(index, augment_seed)`` for one epoch;
    keeps each batch's sigma for the main process."""

    def __init__(self, loader: TorchBatchLoader):
        self.loader = weakref.proxy(loader)  # no cycle: the workers end with the loader

    def __iter__(self):
        loader = self.loader
        for number, (ids, sigma) in enumerate(iterate_plan(loader.batch_sampler, loader._epoch_batches, loader.epoch)):
            seeds = np.random.SeedSequence([loader.seed, loader.epoch, number]).generate_state(
                len(ids), dtype=np.uint64
            )
            loader._pending.append(sigma)
            yield [(int(i), int(s)) for i, s in zip(ids, seeds, strict=True)]

    def __len__(self) -> int:
        return len(self.loader)


class TorchBatchLoader(EpochPlanMixin):
    """Iterable of :class:`~ambient_fast.data.Batch` over a dataset, one epoch per ``iter``.

    Built by :func:`make_torch_loader`; ``set_epoch(e)`` chooses the epoch (else it
    increments after each pass); ``bad_samples`` maps skipped indices to messages.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int | None,
        batch_sampler: Iterable | None,
        resolution,
        crop: str | None,
        flip: bool,
        shuffle: bool,
        drop_last: bool,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int,
        on_bad_sample: str,
        scan: str,
        pin_memory: bool,
        prefetch_factor: int | None,
        multiprocessing_context: str | None,
    ):
        if (batch_size is None) == (batch_sampler is None):
            raise ValueError("give exactly one of batch_size (epoch order) or batch_sampler (noise-first order)")
        if crop not in (None, "center", "random"):
            raise ValueError(f"crop must be None, 'center' or 'random', got {crop!r}")
        if isinstance(dataset, TensorDataset) and (crop is not None and resolution is not None or flip):
            raise ValueError("crop and flip apply to image datasets only; tensor rows are returned as stored")
        if batch_sampler is not None:
            check_batch_sampler(batch_sampler, len(dataset))
        self.dataset = dataset
        self.batch_size = batch_size
        self.batch_sampler = batch_sampler
        self.resolution = as_hw(resolution)
        if isinstance(dataset, ImageDataset) and self.resolution is None:
            self.resolution = dataset.sample_shape[1:]
            crop = None
        self.crop, self.flip = crop, flip
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0
        self._epoch_set = False
        self.bad = BadSampleLog(on_bad_sample)
        if isinstance(dataset, ImageDataset):
            prescan(dataset, self.bad, scan, batch_sampler is not None, self.resolution, self.crop is not None)
        self.tables = LookupTables(dataset)
        self._pending: list = []
        self._reader = _SampleReader(dataset, self.resolution, self.crop, flip)
        self._loader_kwargs = dict(
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            persistent_workers=num_workers > 0,  # workers outlive epochs; the plan is read per epoch
            multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
        )
        self._loader: torch.utils.data.DataLoader | None = None

    def __iter__(self) -> Iterator[Batch]:
        self._epoch_set = False  # a set_epoch from now on names the *next* pass
        self._pending.clear()
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                self._reader, batch_sampler=_PlanSampler(self), **self._loader_kwargs
            )
        loader = self._loader
        complete = False
        try:
            for images, ids, keep, bad in loader:
                sigma = self._pending.pop(0)
                for index, (where, reason) in bad:
                    if self.bad.policy == "raise":
                        raise BadSampleError(where, reason)
                    self.bad.record(index, f"{where}: {reason}")
                if len(ids) == 0:
                    continue
                yield self.tables.batch(images, ids, None if sigma is None else sigma[keep])
            complete = True
        finally:
            if complete:
                advance_epoch(self)


def make_torch_loader(
    dataset: Dataset,
    *,
    batch_size: int | None = None,
    batch_sampler: Iterable | None = None,
    resolution: int | Sequence[int] | None = None,
    crop: str | None = "center",
    flip: bool = False,
    shuffle: bool = False,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    on_bad_sample: str = "skip",
    scan: str = "auto",
    pin_memory: bool = False,
    prefetch_factor: int | None = 2,
    multiprocessing_context: str | None = None,
) -> TorchBatchLoader:
    """A torch ``DataLoader``-based loader yielding :class:`~ambient_fast.data.Batch`.

    Args:
        dataset: from :func:`~ambient_fast.data.open_dataset`.
        batch_size: epoch order (sequential, or ``shuffle``), sharded by ``rank`` /
            ``world_size`` with DALI's contiguous rule. Exclusive with ``batch_sampler``.
        batch_sampler: noise-first order: an iterable of batches of ``(index, sigma)``
            pairs (e.g. ``NoiseFirstBatchSampler``; it shards by rank itself). Batches then
            carry ``sigma``.
        resolution: output ``H = W`` (int) or ``(H, W)``; default: the dataset's size.
        crop: ``"center"`` or ``"random"`` crop of larger images, None: exact size only.
        flip: random horizontal flip (p = 0.5).
        seed: for shuffling and augmentation.
        num_workers: DataLoader worker processes.
        on_bad_sample: ``"skip"`` (drop it from its batch, log its path, count it in
            ``loader.bad_samples``) or ``"raise"`` (:class:`BadSampleError` naming it).
        scan: check files before the first batch: ``"quick"`` (headers, end markers,
            sizes), ``"decode"`` (also decode), ``"none"``; ``"auto"``: quick in epoch
            order, none with a batch sampler (each sample is still checked when loaded).
        multiprocessing_context: for the workers (``"fork"``, ``"spawn"``, ...). Use
            ``"spawn"`` or ``"forkserver"`` in a process that already runs DALI pipelines (or
            other thread pools): forking a multithreaded process can crash the workers.
    """
    return TorchBatchLoader(
        dataset,
        batch_size=batch_size,
        batch_sampler=batch_sampler,
        resolution=resolution,
        crop=crop,
        flip=flip,
        shuffle=shuffle,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_workers=num_workers,
        on_bad_sample=on_bad_sample,
        scan=scan,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        multiprocessing_context=multiprocessing_context,
    )
