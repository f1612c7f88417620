"""The batch contract shared by the DALI pipeline and the torch fallback (SPEC 3).

Both loaders yield :class:`Batch` objects with the same fields, dtypes and meaning; the
only difference is where ``images`` live (DALI ``device="mixed"``: on the GPU).

Batch plans: a loader draws its order either from a noise-level-first batch sampler
(:class:`~ambient_fast.data.sampler.NoiseFirstBatchSampler`, any iterable of lists of
``(index, sigma)`` pairs, or of plain indices) or from an epoch order (sequential or
shuffled, sharded by rank with DALI's rule: rank r of S gets the contiguous range
``[r*N//S, (r+1)*N//S)``), so sequential runs give identical batches on both backends.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from .dataset import Dataset

__all__ = ["Batch", "epoch_order", "shard_range", "split_batch", "LookupTables", "BadSampleLog"]

log = logging.getLogger("ambient_fast.data")


@dataclass
class Batch:
    """One training / restoration batch.

    Attributes:
        images: float32 ``(B, C, H, W)`` in [-1, 1] (``u8 / 127.5 - 1``), NCHW; for tensor
            datasets float32 ``(B, *sample_shape)`` in the stored units.
        sigma_min: float32 ``(B,)`` per-sample nature level (0 = clean).
        sigma_max: float32 ``(B,)`` per-sample locality level (Ambient-o; 0 = none).
        sigma: float32 ``(B,)`` training level drawn with the sample by the noise-first
            sampler; None when the order is an epoch order (restoration, evaluation).
        sample_ids: int64 ``(B,)`` dataset indices (positions in ``Dataset.keys``): the
            seeds of the frozen per-sample noise (``noisy_pair(sample_ids=...)``).
        labels: int64 ``(B,)`` class labels (-1: dataset has none), or float32 ``(B, L)``.
        captions: list of B captions (None entries where missing), or None when the
            dataset has no captions.
    """

    images: torch.Tensor
    sigma_min: torch.Tensor
    sigma_max: torch.Tensor
    sigma: torch.Tensor | None
    sample_ids: torch.Tensor
    labels: torch.Tensor
    captions: list[str | None] | None = None

    def __len__(self) -> int:
        return int(self.sample_ids.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor moved to ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
        return Batch(**moved)


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """DALI's shard rule: rank ``r`` of ``S`` owns ``[r*n//S, (r+1)*n//S)``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank * n // world_size, (rank + 1) * n // world_size


def epoch_order(indices: np.ndarray, *, rank: int, world_size: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """This rank's sample order for one epoch: int64 ``(n_r,)``.

    ``indices`` are the usable samples (bad ones removed). Shuffled orders are a
    permutation seeded by ``(seed, epoch)``, the same on every rank, then sharded, so ranks
    never overlap.
    """
    order = np.asarray(indices, dtype=np.int64)
    if shuffle:
        order = order[np.random.default_rng([seed, epoch]).permutation(order.shape[0])]
    lo, hi = shard_range(order.shape[0], rank, world_size)
    return order[lo:hi]


def epoch_batches(order: np.ndarray, batch_size: int, drop_last: bool) -> list[np.ndarray]:
    """Split an order into batches of ``batch_size`` (the last partial one unless ``drop_last``)."""
    n_full = order.shape[0] // batch_size
    batches = [order[i * batch_size : (i + 1) * batch_size] for i in range(n_full)]
    if not drop_last and order.shape[0] % batch_size:
        batches.append(order[n_full * batch_size :])
    return batches


class EpochPlanMixin:
    """Epoch planning shared by the DALI and torch loaders (same order, same batches).

    Expects ``dataset``, ``bad`` (:class:`BadSampleLog`), ``batch_sampler`` (or None),
    ``rank``, ``world_size``, ``shuffle``, ``seed``, ``batch_size``, ``drop_last`` and
    ``epoch`` on the instance.
    """

    @property
    def bad_samples(self) -> dict[int, str]:
        """``{index: reason}`` of the samples skipped as bad so far."""
        return self.bad.samples

    def set_epoch(self, epoch: int) -> None:
        """Epoch for the shuffle and augmentation seeds; forwarded to the batch sampler."""
        self.epoch = int(epoch)
        self._epoch_set = True
        if self.batch_sampler is not None and hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(self.epoch)

    def _usable(self) -> np.ndarray:
        known_bad = np.fromiter(self.bad.samples, dtype=np.int64) if self.bad.samples else np.empty(0, np.int64)
        return np.setdiff1d(np.arange(len(self.dataset), dtype=np.int64), known_bad)

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        order = epoch_order(
            self._usable(),
            rank=self.rank,
            world_size=self.world_size,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=epoch,
        )
        return epoch_batches(order, self.batch_size, self.drop_last)

    def __len__(self) -> int:
        if self.batch_sampler is not None:
            return len(self.batch_sampler)
        return len(self._epoch_batches(self.epoch))


def split_batch(batch: Sequence) -> tuple[np.ndarray, np.ndarray | None]:
    """A sampler batch -> ``(indices int64 (B,), sigma float64 (B,) | None)``.

    Accepts lists of ``(index, sigma)`` pairs (noise-first samplers) or of plain indices.
    """
    if len(batch) == 0:
        return np.empty(0, np.int64), None
    first = batch[0]
    if isinstance(first, (tuple, list)):
        ids = np.fromiter((int(item[0]) for item in batch), dtype=np.int64, count=len(batch))
        sigma = np.fromiter((float(item[1]) for item in batch), dtype=np.float64, count=len(batch))
        return ids, sigma
    return np.asarray([int(i) for i in batch], dtype=np.int64), None


def check_batch_sampler(batch_sampler: Iterable, n: int) -> None:
    """Fail early on samplers built for another dataset (when they expose their size)."""
    state = batch_sampler.state_dict() if hasattr(batch_sampler, "state_dict") else {}
    size = state.get("dataset_size") if isinstance(state, dict) else None
    if isinstance(size, int) and size != n:
        raise ValueError(f"batch sampler was built for {size} samples, the dataset has {n}")


def advance_epoch(loader) -> None:
    """After a complete epoch: next epoch number for the loader and its batch sampler.

    The sampler's own ``epoch`` (when it has one) is the reference, so a sampler resumed
    with ``load_state_dict`` keeps its numbering. A ``set_epoch`` called during the pass
    (naming the next one) wins.
    """
    if loader._epoch_set:
        loader._epoch_set = False
        return
    sampler = loader.batch_sampler
    current = getattr(sampler, "epoch", loader.epoch) if sampler is not None else loader.epoch
    loader.epoch = int(current) + 1
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(loader.epoch)


class LookupTables:
    """Per-sample values looked up by the ids that travelled with a batch.

    float32 ``sigma_min``/``sigma_max`` tables and labels, indexed by the batch's
    ``sample_ids`` after the pipeline, so the values can never be paired with the wrong
    images, whatever the prefetch depth.
    """

    def __init__(self, dataset: Dataset):
        self._fill(dataset.sigma_min, dataset.sigma_max, dataset.labels)
        self.dataset = dataset
        self.has_captions = dataset.has_captions

    @classmethod
    def from_arrays(cls, sigma_min, sigma_max, labels=None) -> LookupTables:
        """Tables for samples held in memory (no dataset, no captions): ``(N,)`` arrays."""
        tables = cls.__new__(cls)
        tables._fill(np.asarray(sigma_min), np.asarray(sigma_max), None if labels is None else np.asarray(labels))
        tables.dataset, tables.has_captions = None, False
        return tables

    def _fill(self, sigma_min: np.ndarray, sigma_max: np.ndarray, labels: np.ndarray | None) -> None:
        self.sigma_min = torch.from_numpy(sigma_min.astype(np.float32))
        self.sigma_max = torch.from_numpy(sigma_max.astype(np.float32))
        if labels is None:
            self.labels = torch.full((len(sigma_min),), -1, dtype=torch.int64)
        else:
            self.labels = torch.from_numpy(np.ascontiguousarray(labels))

    def batch(self, images: torch.Tensor, ids: torch.Tensor, sigma: torch.Tensor | np.ndarray | None) -> Batch:
        ids = ids.to(torch.int64).reshape(-1)
        cpu_ids = ids.cpu()
        if sigma is not None:
            sigma = torch.as_tensor(sigma).reshape(-1).to(torch.float32)
        captions = [self.dataset.caption(int(i)) for i in cpu_ids] if self.has_captions else None
        return Batch(
            images=images,
            sigma_min=self.sigma_min[cpu_ids],
            sigma_max=self.sigma_max[cpu_ids],
            sigma=sigma,
            sample_ids=cpu_ids,
            labels=self.labels[cpu_ids],
            captions=captions,
        )


class BadSampleLog:
    """Counts and logs skipped bad samples once per sample (``loader.bad_samples``)."""

    def __init__(self, policy: str):
        if policy not in ("skip", "raise"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'raise', got {policy!r}")
        self.policy = policy
        self.samples: dict[int, str] = {}
        self.skipped = 0  # occurrences, counting repeats across epochs

    def record(self, index: int, message: str) -> None:
        self.skipped += 1
        if index not in self.samples:
            self.samples[index] = message
            log.warning(
                "skipping bad sample %d (%s); %d distinct bad samples so far", index, message, len(self.samples)
            )


def as_hw(resolution: int | Sequence[int] | None) -> tuple[int, int] | None:
    if resolution is None:
        return None
    if isinstance(resolution, (int, np.integer)):
        h = w = int(resolution)
    else:
        h, w = (int(v) for v in resolution)
    if h < 1 or w < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    return h, w


def crop_offsets(
    size: tuple[int, int], out: tuple[int, int], mode: str, rng: np.random.Generator | None
) -> tuple[int, int]:
    """Top-left corner of the crop: centred (DALI's ``crop_pos 0.5`` rounding) or uniform."""
    (h, w), (oh, ow) = size, out
    if mode == "center":
        return int(math.floor((h - oh) * 0.5 + 0.5)), int(math.floor((w - ow) * 0.5 + 0.5))
    return int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))


def iterate_plan(
    batch_sampler: Iterable | None, order_fn, epoch: int
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Batches of one epoch as ``(indices, sigma | None)`` from a sampler (its current
    epoch: see :func:`advance_epoch`) or from the epoch order of ``epoch``."""
    if batch_sampler is not None:
        for batch in batch_sampler:
            yield split_batch(batch)
    else:
        for ids in order_fn(epoch):
            yield ids, None


def prescan(dataset, bad: BadSampleLog, scan: str, sampler_mode: bool, resolution, crop: bool) -> None:
    """Run ``dataset.scan`` before the first batch and record (or raise on) bad samples.

    The whole dataset is scanned (a shuffled shard may hold any sample); ``"auto"`` is
    ``"quick"`` in epoch order and ``"none"`` in sampler order.
    """

    if scan not in ("auto", "none", "quick", "decode"):
        raise ValueError(f"scan must be 'auto', 'none', 'quick' or 'decode', got {scan!r}")
    level = ("none" if sampler_mode else "quick") if scan == "auto" else scan
    if level == "none":
        return
    found = dataset.scan(level, resolution=resolution, crop=crop)
    for index in sorted(found):
        if bad.policy == "raise":
            raise found[index]
        bad.record(index, f"{found[index].where}: {found[index].reason}")
