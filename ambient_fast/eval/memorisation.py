"""Memorisation: the share of generated samples that are near-copies of a training sample.

Distance: root-mean-square difference per element, ``||a - b||_2 / sqrt(d)``, in data units
(images in [-1, 1]), so the threshold does not depend on the resolution. A sample is a copy
when its nearest training sample is closer than the threshold.

Default threshold for the 8x8 digits, :data:`DIGITS_COPY_THRESHOLD` = 0.1 (0.8 of the 16
grey-level steps of ``load_digits``): the closest pair of distinct real digits is at 0.083
and only 2 of the 1,797 digits have another digit closer than 0.1 (median nearest-neighbour
distance 0.25), so a rate well above 0.1% means copying, not chance resemblance.
"""

from __future__ import annotations

import torch

__all__ = ["DIGITS_COPY_THRESHOLD", "memorisation_rate", "nearest_neighbour_distances"]

DIGITS_COPY_THRESHOLD = 0.1


def nearest_neighbour_distances(samples: torch.Tensor, train: torch.Tensor, *, chunk_size: int = 4096) -> torch.Tensor:
    """RMS distance from each sample to its nearest training sample.

    Args:
        samples: ``(N, ...)`` float.
        train: ``(M, ...)`` float, same elements per sample as ``samples``.
        chunk_size: samples per distance-matrix block (memory ``chunk_size * M``).

    Returns:
        ``(N,)`` float64 on ``samples``' device (computed in float64 on that device).
    """
    queries = samples.reshape(samples.shape[0], -1).to(torch.float64)
    keys = train.reshape(train.shape[0], -1).to(queries.device, torch.float64)
    if queries.shape[1] != keys.shape[1] or keys.shape[0] == 0:
        raise ValueError(
            f"samples {tuple(samples.shape)} and train {tuple(train.shape)} must have the "
            "same elements per sample, and train must be non-empty"
        )
    nearest = [torch.cdist(block, keys).amin(dim=1) for block in queries.split(chunk_size)]
    return torch.cat(nearest) / queries.shape[1] ** 0.5


def memorisation_rate(samples: torch.Tensor, train: torch.Tensor, threshold: float = DIGITS_COPY_THRESHOLD) -> float:
    """Share in [0, 1] of ``samples`` whose RMS distance to the nearest ``train`` sample is
    below ``threshold`` (data units; see the module docstring for the digits default)."""
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    distances = nearest_neighbour_distances(samples, train)
    return float((distances < threshold).double().mean())
