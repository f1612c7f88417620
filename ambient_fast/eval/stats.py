"""Gaussian feature statistics and the Frechet distance between them (Heusel et al. 2017).

``FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``. FID is this distance in
Inception-v3 pool features; ``FD_digits`` the same in the digits classifier's features.

- :class:`FeatureStatistics` accumulates the mean and covariance of feature batches as they
  stream in (float64; per-batch centred scatter merged with Chan et al.'s parallel update,
  which avoids the cancellation of a raw ``sum x x^T / n - mu mu^T``), on the features'
  device, so a sampler's output never has to be stored or written to PNG.
- :class:`GaussianStats` is the result: ``mu``, ``sigma`` (unbiased, as ``np.cov``), the
  sample count and a fingerprint of what they were computed on (``extractor``: which
  network and preprocessing; ``source``: which images). Saved as ``.npz`` with keys ``mu``
  and ``sigma`` like pytorch-fid and EDM, so their reference files load too.
- :func:`frechet_distance` takes ``tr((S1 S2)^(1/2))`` as the sum of square roots of the
  eigenvalues of the symmetric PSD matrix ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as
  ``S1 S2``): two symmetric eigendecompositions instead of pytorch-fid's general ``sqrtm``
  (2.2x faster at 2048 dimensions on this project's shared 2-core CPU, agreeing to 2e-14
  relative on full-rank covariances, and well defined for singular ones).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.linalg
import torch

__all__ = [
    "FeatureExtractor",
    "FeatureStatistics",
    "GaussianStats",
    "cached_reference_stats",
    "feature_statistics",
    "frechet_distance",
    "load_stats",
    "save_stats",
]

_STATS_FORMAT_VERSION = 1


class FeatureExtractor(Protocol):
    """What the statistics functions need of a feature network (a ``torch.nn.Module``).

    ``__call__(images (B, C, H, W)) -> (B, dims)`` float features; ``dims`` the feature
    width; ``fingerprint`` a string naming the network, its weights and its preprocessing
    (statistics from different fingerprints are never compared).
    """

    dims: int
    fingerprint: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...


def _as_float64(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().to("cpu", torch.float64).numpy()
    return np.asarray(array, dtype=np.float64)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    Args:
        mu1, mu2: ``(D,)`` means (numpy arrays or tensors; computed in float64).
        sigma1, sigma2: ``(D, D)`` symmetric positive semi-definite covariances (a scalar
            when ``D == 1``, as ``np.cov`` returns).

    Returns:
        The squared 2-Wasserstein distance between the Gaussians, in squared feature units,
        not clamped (round-off can make it slightly negative for identical inputs). Exact to
        float64 round-off for full-rank covariances; with singular ones the null-space
        round-off enters through square roots, an error of ~1e-8 of ``tr(sigma)``.
    """
    mu1, mu2 = _as_float64(mu1).reshape(-1), _as_float64(mu2).reshape(-1)
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    dims = mu1.shape[0]
    if mu2.shape != (dims,) or sigma1.shape != (dims, dims) or sigma2.shape != (dims, dims):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    # Symmetrise: accumulated covariances are symmetric only up to round-off.
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    evals1, evecs1 = scipy.linalg.eigh(sigma1)
    sqrt_sigma1 = (evecs1 * np.sqrt(np.clip(evals1, 0, None))) @ evecs1.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    evals = scipy.linalg.eigh((middle + middle.T) / 2, eigvals_only=True)
    tr_covmean = np.sqrt(np.clip(evals, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


@dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance of features, with what they were computed on.

    Attributes:
        mu: ``(D,)`` float64 mean.
        sigma: ``(D, D)`` float64 covariance, normalised by ``count - 1``.
        count: number of samples (``None`` when loaded from a file without it).
        extractor: fingerprint of the feature network and preprocessing ("" if unknown).
        source: free-form description of the images ("" if unknown).
    """

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None
    extractor: str = ""
    source: str = ""

    def frechet_distance(self, other: GaussianStats) -> float:
        """:func:`frechet_distance` to ``other``; refuses statistics of different extractors."""
        if self.extractor and other.extractor and self.extractor != other.extractor:
            raise ValueError(
                f"statistics come from different feature extractors: {self.extractor!r} vs {other.extractor!r}"
            )
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


class FeatureStatistics:
    """Streaming mean and covariance of ``(B, D)`` feature batches, in float64.

    Each batch's mean and centred scatter ``(X - m)^T (X - m)`` are merged into the running
    ones with Chan, Golub & LeVeque's parallel update, on the device of the first batch
    (or ``device``). Batches of any size (including 1) and any order give the same result
    up to float64 round-off.

    Args:
        dims: feature width ``D``.
        device: where to accumulate (default: the device of the first batch).
    """

    def __init__(self, dims: int, device: torch.device | str | None = None) -> None:
        if dims < 1:
            raise ValueError(f"dims must be >= 1, got {dims}")
        self.dims = dims
        self.count = 0
        self._device = torch.device(device) if device is not None else None
        self._mean: torch.Tensor | None = None
        self._scatter: torch.Tensor | None = None

    def _merge(self, count: int, mean: torch.Tensor, scatter: torch.Tensor) -> None:
        if self._mean is None or self._scatter is None:
            self.count, self._mean, self._scatter = count, mean, scatter
            return
        total = self.count + count
        delta = mean - self._mean
        self._mean = self._mean + delta * (count / total)
        self._scatter = self._scatter + scatter + torch.outer(delta, delta) * (self.count * count / total)
        self.count = total

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features ``(B, D)`` (any float dtype; ``B`` may be 0)."""
        if features.dim() != 2 or features.shape[1] != self.dims:
            raise ValueError(f"features must be (B, {self.dims}), got {tuple(features.shape)}")
        if features.shape[0] == 0:
            return
        device = self._device or features.device
        batch = features.detach().to(device, torch.float64)
        mean = batch.mean(dim=0)
        centred = batch - mean
        self._merge(batch.shape[0], mean, centred.T @ centred)

    def merge(self, other: FeatureStatistics) -> None:
        """Fold another accumulator in (e.g. from another rank or shard)."""
        if other.dims != self.dims:
            raise ValueError(f"cannot merge dims {other.dims} into {self.dims}")
        if other._mean is None or other._scatter is None:
            return
        device = self._device or other._mean.device
        self._merge(other.count, other._mean.to(device), other._scatter.to(device))

    def compute(self, extractor: str = "", source: str = "") -> GaussianStats:
        """The statistics so far (needs at least 2 samples)."""
        if self._mean is None or self._scatter is None or self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
        return GaussianStats(
            mu=self._mean.cpu().numpy(),
            sigma=(self._scatter / (self.count - 1)).cpu().numpy(),
            count=self.count,
            extractor=extractor,
            source=source,
        )


def _images_of(batch: Any) -> torch.Tensor:
    """A batch is an image tensor, or a tuple/list whose first element is one."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"expected a tensor batch (or a tuple starting with one), got {type(batch)}")
    return batch


def feature_statistics(
    batches: Iterable[Any],
    extractor: FeatureExtractor,
    *,
    max_images: int | None = None,
    batch_size: int = 250,
    source: str = "",
) -> GaussianStats:
    """Feature statistics of streamed image batches.

    Args:
        batches: an iterable (a generator from a sampler, a DataLoader, a list) of image
            tensors ``(B, C, H, W)`` in the extractor's input convention, or of tuples whose
            first element is one (``(images, labels)``). Consumed lazily: iteration stops
            as soon as ``max_images`` images were seen.
        extractor: the feature network (runs on its own device, no gradients).
        max_images: use only the first ``max_images`` images (default: all).
        batch_size: larger batches are fed to the extractor in chunks of this size.
        source: description stored in the result's fingerprint.

    Returns:
        :class:`GaussianStats` with ``extractor = extractor.fingerprint``.
    """
    if max_images is not None and max_images < 2:
        raise ValueError(f"max_images must be >= 2, got {max_images}")
    device = next(iter(extractor.parameters())).device
    accumulator = FeatureStatistics(extractor.dims, device)
    for batch in batches:  # the producer (e.g. a sampler) runs in the caller's grad mode
        images = _images_of(batch)
        if max_images is not None:
            images = images[: max_images - accumulator.count]
        with torch.no_grad():
            for chunk in images.split(batch_size):
                accumulator.update(extractor(chunk.to(device, non_blocking=True)))
        if max_images is not None and accumulator.count >= max_images:
            break
    return accumulator.compute(extractor=extractor.fingerprint, source=source)


def save_stats(path: str | os.PathLike[str], stats: GaussianStats) -> None:
    """Write ``stats`` to ``path`` (``.npz``: ``mu``, ``sigma``, ``count``, ``extractor``,
    ``source``), atomically (a concurrent reader sees the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                mu=stats.mu,
                sigma=stats.sigma,
                count=np.int64(-1 if stats.count is None else stats.count),
                extractor=np.str_(stats.extractor),
                source=np.str_(stats.source),
                format_version=np.int64(_STATS_FORMAT_VERSION),
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_stats(path: str | os.PathLike[str]) -> GaussianStats:
    """Read statistics written by :func:`save_stats`, pytorch-fid (``--save-stats``) or EDM
    (``fid.py ref``); the latter two have no count or fingerprint (``None`` / "")."""
    with np.load(path, allow_pickle=False) as data:
        count = int(data["count"]) if "count" in data.files else -1
        return GaussianStats(
            mu=data["mu"].astype(np.float64),
            sigma=data["sigma"].astype(np.float64),
            count=None if count < 0 else count,
            extractor=str(data["extractor"]) if "extractor" in data.files else "",
            source=str(data["source"]) if "source" in data.files else "",
        )


def cached_reference_stats(
    path: str | os.PathLike[str],
    batches: Callable[[], Iterable[Any]],
    extractor: FeatureExtractor,
    *,
    source: str,
    max_images: int | None = None,
    batch_size: int = 250,
) -> GaussianStats:
    """Reference statistics from the cache file ``path`` if its fingerprint matches
    (``extractor.fingerprint`` and ``source``, and ``max_images`` when given), else
    computed from ``batches()`` and written there.

    ``source`` should name the images precisely enough that different reference sets
    never share it, e.g. ``"cifar10-train-50000-clean"``.
    """
    path = Path(path)
    if path.exists():
        cached = load_stats(path)
        if (
            cached.extractor == extractor.fingerprint
            and cached.source == source
            and (max_images is None or cached.count == max_images)
        ):
            return cached
    stats = feature_statistics(batches(), extractor, max_images=max_images, batch_size=batch_size, source=source)
    save_stats(path, stats)
    return stats
