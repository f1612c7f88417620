"""The anchors' data side: their datasets, their frozen noise, and a noise-first ``InfiniteSampler``.

ANCHORS 1.2, 1.4, 2, 7. The anchors' ``torch_utils/misc.py::InfiniteSampler`` draws
``sigma ~ exp(N(-1.2, 1.2^2))`` from the global numpy RNG, walks a shuffled order skipping
images not eligible at it (``sigma > sigma_min * sqrt(1 + 1/(s_max - 1))`` or
``sigma < sigma_max``), and hands sigma to the training loop through
``sampler.sampled_sigmas[filename]`` (a dict that the DataLoader's prefetch can overwrite
before the loop reads it). :class:`InfiniteSampler` keeps the constructor and the buffer
rule, and yields ``(index, sigma)`` pairs instead: :class:`WithSigma` wraps the dataset so
each item carries the sigma it was drawn with. Draws come from
:class:`~ambient_fast.data.sampler.NoiseFirstBatchSampler` (counter-based stream: no global
RNG, independent of workers and ranks; uniform among eligible images, with replacement,
rather than a scan of a shuffled order — the sigma marginal and the eligibility rule are the
same).

:func:`anchor_nature_noise` reproduces the anchors' frozen per-image noise
(``np.random.seed(raw_idx); np.random.randn(*shape)``) from a private ``RandomState``, so
the global RNG is never reseeded. :func:`open_anchor_dataset` opens their dataset folders
and zips through :func:`ambient_fast.data.open_dataset`, with annotations in any of their
forms (:func:`~ambient_fast.compat.read_annotations`).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.schedules import EDM_P_MEAN, EDM_P_STD
from ..data import SIDECAR_NAME, Dataset, open_dataset
from ..data import write_annotations as _write_sidecar
from ..data.sampler import NoiseFirstBatchSampler
from .annotations import annotation_arrays, read_annotations

__all__ = ["InfiniteSampler", "WithSigma", "anchor_nature_noise", "open_anchor_dataset"]


class InfiniteSampler(torch.utils.data.Sampler):
    """Noise-level-first replacement of the anchors' ``InfiniteSampler`` (same constructor).

    ``iter(sampler)`` is infinite and yields ``(index, sigma)`` (int, float): sigma is
    drawn first (``ln sigma ~ N(P_mean, P_std^2)``), then an image eligible at it
    (``sigma_min == 0``, ``sigma > b * sigma_min`` with ``b = sqrt(1 + 1/(s_max - 1))``,
    or ``sigma < sigma_max``). Use with ``DataLoader(WithSigma(dataset), sampler=sampler,
    batch_size=...)``.

    Args:
        dataset: the annotated dataset; its levels come from, in order, ``sigma_min`` /
            ``sigma_max`` given here, the dataset's ``sigma_min`` / ``sigma_max`` arrays
            (:class:`ambient_fast.data.Dataset`), or the anchors' attributes
            ``dataset.annotations`` ({filename: (sigma_min, sigma_max)}) with
            ``dataset._image_fnames`` (unannotated images are clean).
        rank, num_replicas: this process's share; ranks draw disjoint slots of one stream.
        shuffle: must be True (the anchors train with True; draws are random by design).
        seed: stream seed (the stream is a pure function of seed, epoch and slot).
        window_size: accepted for compatibility; unused (no scan order).
        s_max: buffer ``b = sqrt(1 + 1/(s_max - 1))``; None = 1 (the anchors' default;
            their scripts pass 4).
        sigma_min, sigma_max: explicit ``(N,)`` levels.
        P_mean, P_std: training log-normal (the anchors hard-code -1.2, 1.2).
        chunk_size: pairs drawn per call of the underlying batch sampler.
    """

    def __init__(
        self,
        dataset: Any,
        rank: int = 0,
        num_replicas: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        window_size: float = 0.5,
        s_max: float | None = None,
        *,
        sigma_min: Sequence[float] | np.ndarray | None = None,
        sigma_max: Sequence[float] | np.ndarray | None = None,
        P_mean: float = EDM_P_MEAN,
        P_std: float = EDM_P_STD,
        chunk_size: int = 1024,
    ) -> None:
        if not shuffle:
            raise ValueError("InfiniteSampler(shuffle=False) is not supported: noise-first draws are random by design")
        if not 0 <= window_size <= 1:
            raise ValueError(f"window_size must be in [0, 1], got {window_size}")
        levels_min, levels_max = _levels(dataset, sigma_min, sigma_max)
        self.sampler = NoiseFirstBatchSampler(
            levels_min,
            chunk_size,
            sigma_max=levels_max,
            s_max=math.inf if s_max is None else s_max,
            P_mean=P_mean,
            P_std=P_std,
            seed=seed,
            rank=rank,
            world_size=num_replicas,
        )
        self.rank, self.num_replicas, self.seed = rank, num_replicas, seed
        self.buffer_factor = 1.0 if s_max is None else math.sqrt(1 + 1 / (s_max - 1))

    def __iter__(self) -> Iterator[tuple[int, float]]:
        epoch = 0
        while True:
            self.sampler.set_epoch(epoch)
            for pairs in self.sampler:
                yield from pairs
            epoch += 1


def _levels(dataset: Any, sigma_min, sigma_max) -> tuple[np.ndarray, np.ndarray | None]:
    if sigma_min is not None:
        return np.asarray(sigma_min, dtype=np.float64), None if sigma_max is None else np.asarray(
            sigma_max, dtype=np.float64
        )
    if hasattr(dataset, "sigma_min") and hasattr(dataset, "sigma_max"):
        return np.asarray(dataset.sigma_min, dtype=np.float64), np.asarray(dataset.sigma_max, dtype=np.float64)
    if hasattr(dataset, "annotations") and hasattr(dataset, "_image_fnames"):
        raw = {
            name: (value, 0.0) if isinstance(value, float) else tuple(value)
            for name, value in dataset.annotations.items()
        }
        return annotation_arrays(raw, list(dataset._image_fnames))
    raise ValueError(
        "InfiniteSampler: pass sigma_min= (and sigma_max=), or a dataset with sigma_min/sigma_max arrays "
        "(ambient_fast.data) or the anchors' annotations + _image_fnames"
    )


class WithSigma(torch.utils.data.Dataset):
    """``dataset[(index, sigma)]``: the item at ``index`` carrying the sigma it was drawn with.

    Dict items (the anchors' datasets) get ``"sigma_t"`` and ``"index"`` keys; tuple items
    (EDM's ``(image, label)``) get ``sigma`` appended; other items become ``(item, sigma)``.
    The training loop then reads ``sigma_t`` from the batch instead of a shared dict.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, float]) -> Any:
        index, sigma = item
        value = self.dataset[index]
        if isinstance(value, dict):
            return {**value, "sigma_t": float(sigma), "index": int(index)}
        if isinstance(value, tuple):
            return (*value, float(sigma))
        return value, float(sigma)


def anchor_nature_noise(
    indices: Sequence[int] | torch.Tensor, shape: Sequence[int], *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The anchors' frozen noise of images ``indices``: ``(B, *shape)`` (ANCHORS 1.4).

    Row i equals ``np.random.seed(indices[i]); np.random.randn(*shape)`` (their
    ``Dataset.__getitem__`` with ``raw_idx = index``), drawn from a private
    ``np.random.RandomState`` so the global numpy RNG is left alone (their defect, ANCHORS 7).
    """
    rows = [np.random.RandomState(int(i)).randn(*shape) for i in torch.as_tensor(indices).reshape(-1).tolist()]
    return torch.from_numpy(np.stack(rows) if rows else np.empty((0, *shape))).to(dtype)


def open_anchor_dataset(
    path: str | os.PathLike,
    *,
    annotations: str | os.PathLike | None = None,
    sigmas: Sequence[float] | np.ndarray | None = None,
    epsilon: float = 0.05,
    ema_span: float = 32.0,
    **open_kwargs: Any,
) -> Dataset:
    """Open an anchors' dataset (EDM folder or zip) with its ``annotations.jsonl`` in any form.

    Reads through :func:`ambient_fast.data.open_dataset` unchanged; images the sidecar does
    not list are clean (the anchors' default), entries naming images the dataset lacks are
    refused. Classifier and crop lines are converted first
    (:func:`~ambient_fast.compat.read_annotations`; ``sigmas``, ``epsilon``, ``ema_span``)
    and handed to the strict reader as a fixed-form sidecar; ``dataset.annotation_path``
    names the original file.

    Args:
        path: the dataset folder, or a ``.zip`` (the anchors read no sidecar for zips).
        annotations: a sidecar to use instead of ``<path>/annotations.jsonl``.
        open_kwargs: further :func:`~ambient_fast.data.open_dataset` arguments.
    """
    root = Path(path)
    sidecar = Path(annotations) if annotations is not None else root / SIDECAR_NAME
    open_kwargs.setdefault("default_sigma_min", 0.0)
    if not sidecar.is_file():
        return open_dataset(root, **open_kwargs)
    entries = read_annotations(sidecar, sigmas=sigmas, epsilon=epsilon, ema_span=ema_span)
    with tempfile.TemporaryDirectory(prefix="ambient_fast_annotations_") as tmp:
        converted = Path(tmp) / SIDECAR_NAME
        names = list(entries)
        _write_sidecar(converted, names, [entries[n].sigma_min for n in names], [entries[n].sigma_max for n in names])
        dataset = open_dataset(root, annotations=converted, **open_kwargs)
    dataset.annotation_path = str(sidecar)
    return dataset
