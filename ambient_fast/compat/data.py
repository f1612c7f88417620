"""The anchors' data side: their datasets, their frozen noise, and their noise-first ``InfiniteSampler``.

ANCHORS 1.2, 1.4, 2, 7. The anchors' ``torch_utils/misc.py::InfiniteSampler`` draws
``sigma ~ exp(N(-1.2, 1.2^2))`` from the global numpy RNG, walks EDM's windowed shuffled
order skipping images not eligible at it (``sigma > sigma_min * sqrt(1 + 1/(s_max - 1))`` or
``sigma < sigma_max``), and hands sigma to the training loop through
``sampler.sampled_sigmas[filename]`` (a dict that the DataLoader's prefetch overwrites before
the loop reads it). :class:`InfiniteSampler` keeps the constructor and the scan (same
coverage law: every image about once per pass), and yields ``(index, sigma)`` pairs
instead: :class:`WithSigma` wraps the dataset so each item carries the sigma it was drawn
with. (The engine's own :class:`~ambient_fast.data.sampler.NoiseFirstBatchSampler` draws uniformly
among eligible images, vectorised and counter-based; this class is for parity.)

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
from .annotations import annotation_arrays, read_annotations

__all__ = ["InfiniteSampler", "WithSigma", "anchor_nature_noise", "open_anchor_dataset"]


class InfiniteSampler(torch.utils.data.Sampler):
    """The anchors' noise-first ``InfiniteSampler`` (same constructor, same scan), yielding ``(index, sigma)``.

    ``iter(sampler)`` is infinite and yields ``(index, sigma)`` (int, float), with the law of
    the anchors' ``torch_utils/misc.py::InfiniteSampler`` (EDM's sampler plus the sigma
    rule): the order is ``np.random.RandomState(seed)``'s shuffle of ``0..N-1``; position
    ``i = step % N`` is this rank's when ``step % num_replicas == rank``; after every step,
    with ``window = rint(N * window_size) >= 2``, ``order[i]`` is swapped with
    ``order[(i - randint(window)) % N]`` (the same swap stream on every rank). A drawn
    ``sigma`` (``ln sigma ~ N(P_mean, P_std^2)``) is kept while the scan skips images not
    eligible at it (``sigma > b * sigma_min`` with ``b = sqrt(1 + 1/(s_max - 1))``, or
    ``sigma < sigma_max``; clean images always are) and is redrawn after each yield. So
    every image is visited about once per pass (its draw count has the scan's spread, not a
    Poisson one) and the sigma marginal is the log-normal.

    Unlike the anchors: the pair travels together (:class:`WithSigma` puts the sigma into
    the item; no ``sampled_sigmas`` dict that the DataLoader's prefetch overwrites), the
    sigmas come from a private ``RandomState(seed * num_replicas + rank)`` (the anchors draw
    from the global numpy RNG, which their training loop seeds with that value and their
    dataset reseeds per item), and a sigma at which no image of the dataset is eligible is
    redrawn (the anchors' scan would loop forever on it).

    Args:
        dataset: the annotated dataset; its levels come from, in order, ``sigma_min`` /
            ``sigma_max`` given here, the dataset's ``sigma_min`` / ``sigma_max`` arrays
            (:class:`ambient_fast.data.Dataset`), or the anchors' attributes
            ``dataset.annotations`` ({filename: (sigma_min, sigma_max)}) with
            ``dataset._image_fnames`` (unannotated images are clean).
        rank, num_replicas: this process's share of the scan positions.
        shuffle: must be True (the anchors train with True).
        seed: order and swap stream seed, shared by the ranks (the anchors' ``seed``).
        window_size: EDM's swap window as a fraction of N (default 0.5).
        s_max: buffer ``b = sqrt(1 + 1/(s_max - 1))``; None = 1 (the anchors' default;
            their scripts pass 4).
        sigma_min, sigma_max: explicit ``(N,)`` levels (>= 0).
        P_mean, P_std: training log-normal (the anchors hard-code -1.2, 1.2).
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
    ) -> None:
        if not shuffle:
            raise ValueError("InfiniteSampler(shuffle=False) is not supported: the anchors' sigma-first scan shuffles")
        if not 0 <= window_size <= 1:
            raise ValueError(f"window_size must be in [0, 1], got {window_size}")
        if not (num_replicas >= 1 and 0 <= rank < num_replicas):
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {rank}, {num_replicas}")
        if s_max is not None and not s_max > 1:
            raise ValueError(f"s_max must be > 1 or None, got {s_max}")
        if not (math.isfinite(P_mean) and P_std > 0):
            raise ValueError(f"need a finite P_mean and P_std > 0, got {P_mean}, {P_std}")
        levels_min, levels_max = _levels(dataset, sigma_min, sigma_max)
        if levels_max is None:
            levels_max = np.zeros_like(levels_min)
        if levels_min.ndim != 1 or levels_min.size == 0 or levels_max.shape != levels_min.shape:
            raise ValueError(
                f"sigma_min, sigma_max: expected two (N,) arrays, N >= 1; got {levels_min.shape}, {levels_max.shape}"
            )
        bad = np.flatnonzero(
            ~(np.isfinite(levels_min) & (levels_min >= 0) & np.isfinite(levels_max) & (levels_max >= 0))
        )
        if bad.size:
            raise ValueError(
                f"image {bad[0]}: sigma_min={levels_min[bad[0]]}, sigma_max={levels_max[bad[0]]} "
                "(levels must be finite and >= 0)"
            )
        self.rank, self.num_replicas, self.seed = rank, num_replicas, seed
        self.window_size, self.P_mean, self.P_std = window_size, float(P_mean), float(P_std)
        self.buffer_factor = 1.0 if s_max is None else math.sqrt(1 + 1 / (s_max - 1))
        self.sigma_min, self.sigma_max = levels_min, levels_max
        # Image i is eligible at sigma iff sigma > threshold[i] or sigma < sigma_max[i].
        self.threshold = levels_min * self.buffer_factor
        self._lowest, self._highest_max = float(self.threshold.min()), float(levels_max.max())
        reachable = (
            _lognormal_cdf(self._highest_max, self.P_mean, self.P_std)
            + 1
            - _lognormal_cdf(self._lowest, self.P_mean, self.P_std)
        )
        if reachable < 1e-6:
            raise ValueError(
                f"no image is eligible at almost any sigma: the lowest buffered sigma_min is {self._lowest:.4g} and "
                f"the highest sigma_max {self._highest_max:.4g} under ln sigma ~ N({P_mean}, {P_std}^2) "
                f"(P = {reachable:.2g}); add clean images or lower the annotations"
            )

    def __len__(self) -> int:
        return self.sigma_min.size

    def _draw_sigma(self, rnd: np.random.RandomState) -> float:
        """One training level at which some image is eligible (a never-eligible draw is redrawn)."""
        while True:
            sigma = math.exp(rnd.normal(0.0, 1.0) * self.P_std + self.P_mean)
            if sigma > self._lowest or sigma < self._highest_max:
                return sigma

    def __iter__(self) -> Iterator[tuple[int, float]]:
        size = self.sigma_min.size
        order = np.arange(size)
        swaps = np.random.RandomState(self.seed)
        swaps.shuffle(order)
        window = int(np.rint(size * self.window_size))
        sigmas = np.random.RandomState((self.seed * self.num_replicas + self.rank) % (1 << 31))
        threshold, sigma_max = self.threshold, self.sigma_max
        sigma = self._draw_sigma(sigmas)
        step = 0
        while True:
            i = step % size
            if step % self.num_replicas == self.rank:
                index = int(order[i])
                if sigma > threshold[index] or sigma < sigma_max[index]:
                    yield index, sigma
                    sigma = self._draw_sigma(sigmas)
            if window >= 2:
                j = (i - swaps.randint(window)) % size
                order[i], order[j] = order[j], order[i]
            step += 1


def _lognormal_cdf(level: float, P_mean: float, P_std: float) -> float:
    """``P(sigma <= level)`` for ``ln sigma ~ N(P_mean, P_std^2)``."""
    if level <= 0:
        return 0.0
    return 0.5 * math.erfc(-(math.log(level) - P_mean) / (P_std * math.sqrt(2)))


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
