"""The anchors' ``annotations.jsonl`` in all its forms (ANCHORS 2), on top of ``ambient_fast.data``.

``ambient_fast.data.annotations`` reads and writes the fixed form ``{"filename",
"sigma_min", "sigma_max"}`` and the scalar forms ``{"filename", "annotation"|"sigma"}``
strictly (finite, >= 0, no duplicates, errors with line numbers). The anchors' files also
hold two raw forms that their training loop converts at load time; this module does the
same conversion, then hands the rest of the file to the strict reader:

- classifier trajectories ``{"filename", "probabilities": [[p_trial, ...] per sigma]}`` with
  the sibling ``sigmas.txt`` (one level per line): mean over trials, EMA with span 32
  (``pandas.Series.ewm(span, adjust=False)``: ``y_0 = x_0``,
  ``y_t = (1 - a) y_{t-1} + a x_t``, ``a = 2/(span + 1)``), then ``sigma_min`` = the first
  level (ascending) with ``p < 0.5 + epsilon`` (epsilon = 0.05), else the largest level;
  ``sigma_max = 0``;
- crop predictions ``{"filename", "crop_predictions_<p>": [...], ...}``: the largest patch
  size p whose mean prediction is > 0.25 (else 1) gives ``sigma_max`` from
  :data:`CROP_PATCH_TO_SIGMA_MAX`, with the sentinel ``sigma_min = 300``.

Precedence when a line has several forms is the anchors': probabilities, crops, scalar
(``annotation`` before ``sigma``), fixed.

As the anchors' loader (``training_loop.py`` / ``torch_utils/ambient.py::load_annotations``),
not as the strict engine reader:

- duplicate filenames (the anchors' ``restore.py`` and ``annotate.py`` open the file in
  append mode, so a rerun repeats every name): the last line of each name wins, with one
  warning naming the count;
- ``sigmas.txt`` goes through a float32 tensor, so classifier levels are float32 values;
- the confusion test is their ``(0.5 - p + epsilon) > 0`` on the float64 EMA.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..data import SIDECAR_NAME, AnnotationError, join_annotations, parse_annotations
from ..data import write_annotations as _write_sidecar
from ..data.annotations import iter_annotation_records

__all__ = [
    "Annotation",
    "CROP_PATCH_TO_SIGMA_MAX",
    "CROP_SIGMA_MIN",
    "SIGMAS_NAME",
    "annotation_arrays",
    "classifier_sigma_min",
    "crop_sigma_max",
    "ewm_mean",
    "read_annotations",
    "read_sigmas",
    "write_annotations",
]

SIGMAS_NAME = "sigmas.txt"  # the classifier's levels, next to annotations.jsonl
CROP_SIGMA_MIN = 300.0  # anchors' sentinel: a crop-annotated image never trains above sigma_max
CROP_THRESHOLD = 0.25  # mean crop prediction above which a patch size counts as in-distribution
CROP_PATCH_TO_SIGMA_MAX: Mapping[int, float] = {  # Ambient-o pixel crops: patch size -> sigma_max
    1: 0.01,
    4: 0.05,
    8: 0.15,
    16: 0.2,
    24: 0.35,
    32: 0.55,
    48: 0.7,
    64: 1.0,
}
_CROP_PREFIX = "crop_predictions"


class Annotation(NamedTuple):
    """One image's levels: trusted above ``sigma_min`` (0 = clean), as clean below ``sigma_max``."""

    sigma_min: float
    sigma_max: float = 0.0


def ewm_mean(values: np.ndarray, span: float = 32.0) -> np.ndarray:
    """Exponentially weighted mean along the last axis, ``pandas ewm(span, adjust=False)``.

    ``y_0 = x_0``, ``y_t = (1 - a) y_{t-1} + a x_t`` with ``a = 2 / (span + 1)``; float64,
    same shape as ``values``; leading axes are independent trajectories.
    """
    if not span >= 1:
        raise ValueError(f"span must be >= 1, got {span}")
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"values: expected a non-empty last axis, got shape {x.shape}")
    alpha = 2.0 / (span + 1.0)
    out = np.empty_like(x)
    out[..., 0] = x[..., 0]
    for t in range(1, x.shape[-1]):
        out[..., t] = (1.0 - alpha) * out[..., t - 1] + alpha * x[..., t]
    return out


def classifier_sigma_min(
    probabilities: np.ndarray | Sequence,
    sigmas: np.ndarray | Sequence[float],
    *,
    epsilon: float = 0.05,
    ema_span: float = 32.0,
) -> np.ndarray:
    """``sigma_min`` from classifier trajectories (Ambient-o ``annotate.py`` + training loop).

    Args:
        probabilities: ``(S, T)`` (one image, T trials per level), ``(N, S, T)`` (N images)
            or ``(S,)`` / ``(N, S)`` with one trial; entry ``[..., j, :]`` belongs to the j-th
            smallest level. 1 = "the classifier sees a corrupted image".
        sigmas: the S levels (``sigmas.txt``); sorted ascending here, as the anchors do.
        epsilon: confusion margin: the first level with smoothed ``p < 0.5 + epsilon``.
        ema_span: EMA span over levels (anchors: 32).

    Returns:
        float64 ``(N,)`` (or 0-dim for one image): the first confused level, else the largest.
    """
    levels = np.sort(np.asarray(sigmas, dtype=np.float64).reshape(-1))
    probs = np.asarray(probabilities, dtype=np.float64)
    num_levels = levels.shape[0]
    if probs.ndim >= 2 and probs.shape[-2] == num_levels:
        probs = probs.mean(axis=-1)  # mean over trials
    if probs.ndim not in (1, 2) or probs.shape[-1] != num_levels:
        raise ValueError(
            f"probabilities: expected (S,), (S, T), (N, S) or (N, S, T) with S = {num_levels} levels "
            f"(len(sigmas)), got shape {np.asarray(probabilities).shape}"
        )
    if not np.isfinite(probs).all():
        raise ValueError("probabilities: non-finite values")
    smoothed = ewm_mean(probs, ema_span)
    confused = (0.5 - smoothed + epsilon) > 0  # the anchors' expression (ambient_utils.classifier)
    first = np.where(confused.any(axis=-1), confused.argmax(axis=-1), num_levels - 1)
    return levels[first]


def crop_sigma_max(predictions: Mapping[int, Sequence[float] | float], threshold: float = CROP_THRESHOLD) -> float:
    """``sigma_max`` from crop-classifier predictions ``{patch_size: [probs...]}``.

    The largest patch size whose mean prediction exceeds ``threshold`` (else 1), mapped by
    :data:`CROP_PATCH_TO_SIGMA_MAX`. Raises ``ValueError`` for a size the table lacks.
    """
    chosen = 1
    for size in sorted(predictions, reverse=True):
        if float(np.mean(predictions[size])) > threshold:
            chosen = size
            break
    if chosen not in CROP_PATCH_TO_SIGMA_MAX:
        raise ValueError(f"crop patch size {chosen} has no sigma_max (known: {sorted(CROP_PATCH_TO_SIGMA_MAX)})")
    return CROP_PATCH_TO_SIGMA_MAX[chosen]


def read_sigmas(path: str | Path) -> np.ndarray:
    """The classifier levels of ``sigmas.txt`` (one float per line), sorted ascending.

    Read as the anchors' loader does: the parsed floats go into a float32 tensor
    (``torch.tensor(list)``), so each level is rounded to float32; returned as float64
    holding those float32 values (a level written as 0.1 reads as 0.10000000149011612).
    """
    path = Path(path)
    try:
        parsed = [float(token) for token in path.read_text().split()]
    except ValueError as exc:
        raise AnnotationError(f"{path}: expected one float per line ({exc})") from None
    levels = np.array(parsed, dtype=np.float32).astype(np.float64)
    if levels.size == 0 or not (np.isfinite(levels).all() and (levels > 0).all()):
        raise AnnotationError(f"{path}: expected a non-empty list of finite float32 levels > 0")
    return np.sort(levels)


def _sidecar_paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    sidecar = path / SIDECAR_NAME if path.is_dir() else path
    return sidecar, sidecar.parent / SIGMAS_NAME


def read_annotations(
    path: str | Path,
    *,
    sigmas: np.ndarray | Sequence[float] | None = None,
    epsilon: float = 0.05,
    ema_span: float = 32.0,
) -> dict[str, Annotation]:
    """Read an anchors' ``annotations.jsonl`` in any of its forms (ANCHORS 2).

    Args:
        path: the dataset folder (reads ``annotations.jsonl`` and, for classifier lines,
            ``sigmas.txt`` in it) or the sidecar file itself.
        sigmas: classifier levels instead of ``sigmas.txt``.
        epsilon, ema_span: classifier conversion (anchors: ``--cls_epsilon 0.05``, span 32).

    Returns:
        ``{filename: Annotation(sigma_min, sigma_max)}``; a dataset without the file gives
        ``{}`` (every image clean, as the anchors).

    Raises:
        AnnotationError: malformed lines, invalid values, unknown crop sizes, classifier
            lines without levels or with a trajectory of the wrong length.

    Warns:
        UserWarning: once, with the count, when lines repeat a filename (reruns of the
            anchors' scripts append); the last line of each filename wins, as upstream.
            (:func:`ambient_fast.data.read_annotations`, the engine's strict reader, refuses
            duplicates.)
    """
    sidecar, sigmas_path = _sidecar_paths(path)
    if not sidecar.exists():
        return {}
    # Raw forms are converted and their lines rewritten in the fixed form, so the strict
    # reader validates every line (names, values, duplicates) with its own line number.
    text = sidecar.read_text(encoding="utf-8")
    lines = text.splitlines()
    records = list(iter_annotation_records(text, str(sidecar)))
    # The anchors' scripts append to annotations.jsonl, so reruns repeat names; their loader
    # keeps the last line of each name (dict assignment). Drop the earlier ones, warn once.
    last = {json.dumps(record["filename"]): lineno for lineno, record in records}
    dropped = [lineno for lineno, record in records if last[json.dumps(record["filename"])] != lineno]
    if dropped:
        warnings.warn(
            f"{sidecar}: {len(dropped)} duplicate line(s) (first at line {dropped[0]}) repeat a filename; "
            "kept the last line of each filename, as the anchors' loader does",
            stacklevel=2,
        )
        for lineno in dropped:
            lines[lineno - 1] = ""
    trajectories: list[tuple[int, object, object]] = []
    for lineno, record in records:
        if lines[lineno - 1] == "":
            continue
        name = record["filename"]
        if "probabilities" in record:
            trajectories.append((lineno, name, record["probabilities"]))
        elif any(key.startswith(_CROP_PREFIX) for key in record):
            try:
                crops = {
                    int(key.rsplit("_", 1)[-1]): value for key, value in record.items() if key.startswith(_CROP_PREFIX)
                }
                level = crop_sigma_max(crops)
            except (TypeError, ValueError) as exc:
                raise AnnotationError(f"{sidecar} line {lineno} ({name}): bad crop predictions ({exc})") from None
            lines[lineno - 1] = _fixed_line(name, CROP_SIGMA_MIN, level)
        elif "annotation" in record or "sigma" in record:
            key = "annotation" if "annotation" in record else "sigma"
            lines[lineno - 1] = json.dumps({"filename": name, key: record[key]})
    if trajectories:
        if sigmas is None:
            if not sigmas_path.exists():
                raise AnnotationError(f"{sidecar}: classifier 'probabilities' lines need {sigmas_path} (or sigmas=)")
            sigmas = read_sigmas(sigmas_path)
        try:
            found = classifier_sigma_min(
                np.stack([np.asarray(p, dtype=np.float64) for _, _, p in trajectories]),
                sigmas,
                epsilon=epsilon,
                ema_span=ema_span,
            )
        except ValueError as exc:
            raise AnnotationError(f"{sidecar} (classifier lines, first at line {trajectories[0][0]}): {exc}") from None
        for (lineno, name, _), level in zip(trajectories, found.tolist(), strict=True):
            lines[lineno - 1] = _fixed_line(name, level, 0.0)
    parsed = parse_annotations("\n".join(lines), str(sidecar))
    return {name: Annotation(lo, hi) for name, (lo, hi) in parsed.items()}


def _fixed_line(name: object, sigma_min: float, sigma_max: float) -> str:
    return json.dumps({"filename": name, "sigma_min": sigma_min, "sigma_max": sigma_max})


def write_annotations(path: str | Path, annotations: Mapping[str, tuple[float, float]]) -> Path:
    """Write ``{filename: (sigma_min, sigma_max)}`` in the fixed form, atomically; returns the path.

    ``path`` is the sidecar file or a dataset folder (then ``<folder>/annotations.jsonl``).
    The anchors' loaders read the result unchanged (``{"filename", "sigma_min", "sigma_max"}``).
    """
    target = Path(path)
    if target.is_dir():
        target = target / SIDECAR_NAME
    names = list(annotations)
    return _write_sidecar(
        target, names, [float(annotations[n][0]) for n in names], [float(annotations[n][1]) for n in names]
    )


def annotation_arrays(
    annotations: Mapping[str, tuple[float, float]],
    filenames: Sequence[str],
    *,
    default: tuple[float, float] = (0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Dense ``(sigma_min, sigma_max)`` float64 ``(N,)`` arrays in dataset order.

    Images without an entry take ``default`` (the anchors: clean); entries naming images the
    dataset does not hold are refused (a silent mismatch would train everything as clean).
    """
    entries = {name: (float(lo), float(hi)) for name, (lo, hi) in annotations.items()}
    return join_annotations(list(filenames), entries, default=default, where="annotations")
