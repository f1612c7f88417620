"""Exceptions of :mod:`ambient_fast.data`: each names the dataset entry at fault.

All derive from :class:`DatasetError` (a ``ValueError``), so callers can catch one type.
"""

from __future__ import annotations

__all__ = [
    "AnnotationError",
    "BadSampleError",
    "DatasetError",
    "DatasetFormatError",
    "UnsafePathError",
]


class DatasetError(ValueError):
    """Base class: a dataset, a sidecar or a version cannot be used as given."""


class UnsafePathError(DatasetError):
    """A sample key, archive member or sidecar entry would leave the dataset's folder
    (absolute path, ``..`` component, drive letter, backslash, NUL, or a symlink that
    resolves outside the root)."""


class DatasetFormatError(DatasetError):
    """The dataset's layout is malformed (duplicate keys, unreadable ``dataset.json``,
    compressed tar shards, mixed sample shapes in a tensor shard, ...)."""


class AnnotationError(DatasetError):
    """The ``annotations.jsonl`` sidecar is missing ids, names unknown samples, or holds
    invalid values (negative, NaN, infinite, non-numeric)."""


class BadSampleError(DatasetError):
    """One sample cannot be decoded or has the wrong size. ``where`` is the file path
    (or ``archive:member``), ``reason`` the problem."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"bad sample {where}: {reason}")
        self.where = where
        self.reason = reason
