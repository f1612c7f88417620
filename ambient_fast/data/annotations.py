"""The per-sample ``sigma_min`` annotation: ``annotations.jsonl`` (SPEC 2, ANCHORS section 2).

One sidecar per dataset version, one JSON object per line, keyed by the sample's path
relative to the dataset root (for tar shards: the WebDataset sample key; for tensor shards:
the stored key), exactly the anchors' convention::

    {"filename": "00000/img00000000.png", "sigma_min": 1.2, "sigma_max": 0.0}
    {"filename": "00000/img00000001.png", "annotation": 0.0}      # scalar form
    {"filename": "00000/img00000002.png", "sigma": 0.15}          # scalar form

``sigma_min`` is the level above which the sample is trusted (0 = clean); ``sigma_max``
(default 0) is Ambient-o's locality level below which it trains as clean. Both are float64.

Joining is strict: a sidecar that misses samples is refused (unless the dataset declares a
per-dataset default, ``dataset.json: {"annotation_default": {"sigma_min": ..,
"sigma_max": ..}}``), and so is one with entries for unknown samples, duplicate entries,
or values that are negative, NaN, infinite or not numbers. Errors name the first few
offenders with their line numbers. Writers always write every sample explicitly, so the
anchors' own loader reads our sidecars unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ._io import atomic_write_bytes, safe_relative_path
from .errors import AnnotationError

__all__ = [
    "SIDECAR_NAME",
    "format_annotations",
    "iter_annotation_records",
    "join_annotations",
    "parse_annotations",
    "read_annotations",
    "write_annotations",
]

SIDECAR_NAME = "annotations.jsonl"
_SHOW = 5  # how many offenders an error message names


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _SHOW else "")


def _as_level(value: object) -> float | None:
    """A valid level (finite float >= 0) or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def iter_annotation_records(text: str, where: str) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for each non-blank line of ``annotations.jsonl`` text.

    Every record is a JSON object with a ``filename`` field (any form: fixed, scalar,
    classifier, crop); its values are not checked here.

    Raises:
        AnnotationError: a line that is not JSON, or not an object with ``filename``.
    """
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"{where} line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "filename" not in record:
            raise AnnotationError(f"{where} line {lineno}: expected an object with a 'filename' field")
        yield lineno, record


def parse_annotations(text: str | bytes, where: str) -> dict[str, tuple[float, float]]:
    """Parse sidecar text into ``{filename: (sigma_min, sigma_max)}``.

    Args:
        text: the ``annotations.jsonl`` content.
        where: how to name the sidecar in errors (its path).

    Raises:
        UnsafePathError: a ``filename`` is absolute or contains ``..`` (first one found).
        AnnotationError: malformed lines, unsupported forms (classifier ``probabilities``,
            crop predictions: convert them to ``sigma_min`` first), duplicates, or invalid
            values; names the first few.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AnnotationError(f"{where}: not UTF-8 text ({exc})") from None
    entries: dict[str, tuple[float, float]] = {}
    invalid: list[str] = []
    duplicates: list[str] = []
    for lineno, record in iter_annotation_records(text, where):
        name = safe_relative_path(record["filename"], f"{where} line {lineno}: filename")
        if "sigma_min" in record:
            field, raw_min = "sigma_min", record["sigma_min"]
        elif "annotation" in record:
            field, raw_min = "annotation", record["annotation"]
        elif "sigma" in record:
            field, raw_min = "sigma", record["sigma"]
        else:
            raise AnnotationError(
                f"{where} line {lineno} ({name}): no 'sigma_min', 'annotation' or 'sigma' field "
                f"(fields: {sorted(record)}); classifier trajectories and crop predictions must be "
                "converted to sigma_min before training"
            )
        sigma_min = _as_level(raw_min)
        sigma_max = _as_level(record.get("sigma_max", 0.0))
        if sigma_min is None:
            invalid.append(f"line {lineno} {name}: {field}={raw_min!r}")
            continue
        if sigma_max is None:
            invalid.append(f"line {lineno} {name}: sigma_max={record.get('sigma_max')!r}")
            continue
        if name in entries:
            duplicates.append(f"line {lineno} {name}")
            continue
        entries[name] = (sigma_min, sigma_max)
    if invalid:
        raise AnnotationError(f"{where}: {len(invalid)} invalid value(s) (must be finite and >= 0): {_names(invalid)}")
    if duplicates:
        raise AnnotationError(f"{where}: duplicate entries: {_names(duplicates)}")
    return entries


def read_annotations(path: str | Path) -> dict[str, tuple[float, float]]:
    """Read and validate an ``annotations.jsonl`` file (see :func:`parse_annotations`)."""
    path = Path(path)
    return parse_annotations(path.read_bytes(), str(path))


def join_annotations(
    keys: Sequence[str],
    entries: dict[str, tuple[float, float]] | None,
    *,
    default: tuple[float, float] | None,
    where: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Join sidecar entries to the dataset's keys: ``(sigma_min, sigma_max)`` float64 ``(N,)``.

    Missing keys take ``default`` when given, else raise :class:`AnnotationError` naming the
    first few; entries for keys the dataset does not hold are always refused. Without a
    sidecar (``entries is None``) every sample takes ``default`` (``(0, 0)``, clean, if None).
    """
    n = len(keys)
    if entries is None:
        lo, hi = default if default is not None else (0.0, 0.0)
        return np.full(n, lo, dtype=np.float64), np.full(n, hi, dtype=np.float64)
    key_set = set(keys)
    unknown = [name for name in entries if name not in key_set]
    if unknown:
        raise AnnotationError(f"{where}: entries for samples the dataset does not hold: {_names(unknown)}")
    missing = [k for k in keys if k not in entries]
    if missing and default is None:
        raise AnnotationError(
            f"{where}: {len(missing)} of {n} samples have no annotation: {_names(missing)} "
            "(annotate them, or declare dataset.json 'annotation_default')"
        )
    lo, hi = default if default is not None else (0.0, 0.0)
    sigma_min = np.fromiter((entries.get(k, (lo, hi))[0] for k in keys), dtype=np.float64, count=n)
    sigma_max = np.fromiter((entries.get(k, (lo, hi))[1] for k in keys), dtype=np.float64, count=n)
    return sigma_min, sigma_max


def format_annotations(keys: Sequence[str], sigma_min: Sequence[float], sigma_max: Sequence[float]) -> bytes:
    """Sidecar bytes, one ``{"filename", "sigma_min", "sigma_max"}`` line per key, in order.

    Values are written with ``repr`` precision, so float64 values round-trip exactly.
    Raises :class:`AnnotationError` for invalid values, naming the first few keys.
    """
    if not (len(keys) == len(sigma_min) == len(sigma_max)):
        raise ValueError(
            f"keys ({len(keys)}), sigma_min ({len(sigma_min)}) and sigma_max ({len(sigma_max)}) differ in length"
        )
    bad = [
        f"{k}: sigma_min={lo!r}, sigma_max={hi!r}"
        for k, lo, hi in zip(keys, sigma_min, sigma_max, strict=True)
        if _as_level(float(lo)) is None or _as_level(float(hi)) is None
    ]
    if bad:
        raise AnnotationError(f"refusing to write invalid annotations (finite, >= 0 required): {_names(bad)}")
    lines = [
        json.dumps(
            {"filename": safe_relative_path(k, "annotation key"), "sigma_min": float(lo), "sigma_max": float(hi)}
        )
        for k, lo, hi in zip(keys, sigma_min, sigma_max, strict=True)
    ]
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def write_annotations(
    path: str | Path, keys: Sequence[str], sigma_min: Sequence[float], sigma_max: Sequence[float] | None = None
) -> Path:
    """Write an ``annotations.jsonl`` atomically (temp name, fsync, rename); returns the path.

    ``sigma_max`` defaults to zeros. Never call this on a source dataset: new annotations
    belong to a new dataset version (:class:`~ambient_fast.data.DatasetWriter`).
    """
    path = Path(path)
    if sigma_max is None:
        sigma_max = [0.0] * len(keys)
    atomic_write_bytes(path, format_annotations(list(keys), list(sigma_min), list(sigma_max)))
    return path
