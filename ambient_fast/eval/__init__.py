"""Evaluation: Frechet distances, streamed from image batches, and memorisation.

- FID (SPEC 6, ANCHORS 5): pytorch-fid's Inception-v3 pool3 features, weights from a local
  file (:func:`inception_feature_extractor`; never downloads), statistics accumulated in
  float64 straight from a sampler's batches (:func:`fid_from_batches`), reference
  statistics cached as ``.npz`` with a fingerprint (:func:`cached_reference_stats`).
- ``FD_digits`` for the 8x8 digits demo: the same distance in the features of a small
  digits classifier shipped with the package (:func:`fd_digits`). Not an FID.
- :func:`memorisation_rate`: share of samples within an RMS distance of a training sample.
"""

from .digits import (
    DigitsFeatureNet,
    digits_feature_extractor,
    fd_digits,
    load_digits_images,
    train_digits_feature_net,
)
from .inception import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_NAME,
    InceptionFeatures,
    fid_from_batches,
    inception_feature_extractor,
    resolve_inception_weights,
)
from .memorisation import DIGITS_COPY_THRESHOLD, memorisation_rate, nearest_neighbour_distances
from .stats import (
    FeatureExtractor,
    FeatureStatistics,
    GaussianStats,
    cached_reference_stats,
    feature_statistics,
    frechet_distance,
    load_stats,
    save_stats,
)

__all__ = [
    "DIGITS_COPY_THRESHOLD",
    "DigitsFeatureNet",
    "FeatureExtractor",
    "FeatureStatistics",
    "GaussianStats",
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_NAME",
    "InceptionFeatures",
    "cached_reference_stats",
    "digits_feature_extractor",
    "fd_digits",
    "feature_statistics",
    "fid_from_batches",
    "frechet_distance",
    "inception_feature_extractor",
    "load_digits_images",
    "load_stats",
    "memorisation_rate",
    "nearest_neighbour_distances",
    "resolve_inception_weights",
    "save_stats",
    "train_digits_feature_net",
]
