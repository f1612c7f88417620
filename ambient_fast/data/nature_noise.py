"""Is a dataset version *stored noisy*? What its manifest says about its nature noise (SPEC 2, 5).

A version is **stored noisy** when its corrupt samples already *are* Gaussian samples at
their annotated ``sigma_min``: an unclipped ``noise`` corruption (``corrupt_dataset``, the
demo's noise data), the anchors' ``/npy`` folders (``Dataset.stored_noisy``), or a
restoration stopped at ``sigma_out > 0`` (its stored states are
noisy at ``sigma_out``). For such data:

- training adds no noise of its own (``nature_noise="stored"``: ``y_tmin = y0``);
- restoration starts from the sample itself (``start_noise="none"``): fresh noise on top
  would put the start state at ``sqrt(2) sigma_min`` while the sampler integrates from
  ``sigma_min`` (the anchors' ``/npy`` datasets skip the start noise for this reason).

Every other version (clean, blurred, JPEG, a restoration to 0, or no manifest at all) is
"fixed": noise at ``sigma_min`` is added with a frozen (training) or fresh (restoration)
realisation. One detection serves training, the dataloop and the ``restore`` command.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

__all__ = ["detect_nature_noise", "resolve_start_noise", "stored_noise_reason"]


def stored_noise_reason(data: str | os.PathLike | dict[str, Any] | None) -> str | None:
    """Why ``data`` is stored noisy (a short phrase naming the manifest field), or None.

    Args:
        data: a dataset version folder/file (its manifest is read with
            :func:`~ambient_fast.data.open_dataset`) or an already loaded manifest dict;
            None (no manifest) is never stored noisy.
    """
    if data is None:
        return None
    if isinstance(data, dict):
        manifest = data
    else:
        from .dataset import open_dataset

        dataset = open_dataset(data)
        if dataset.stored_noisy:
            return f"it is a stored-noise {dataset.format} dataset (the anchors' /npy folders: samples already noisy)"
        manifest = dataset.manifest or {}
    corruption = manifest.get("corruption") or {}
    if corruption.get("kind") == "noise" and not corruption.get("clipped", True):
        std = (corruption.get("params") or {}).get("std")
        return f"its manifest records an unclipped noise corruption (std {std})"
    sigma_out = float((manifest.get("params") or {}).get("sigma_out", 0.0) or 0.0)
    if "restoration" in manifest and sigma_out > 0:
        return f"its manifest records a restoration stopped at sigma_out = {sigma_out:g}"
    return None


def detect_nature_noise(data: str | os.PathLike | Sequence[Any] | dict[str, Any]) -> Literal["stored", "fixed"]:
    """``"stored"`` when the dataset's corrupt samples *are* Gaussian noise at their
    sigma_min (see the module docstring), else ``"fixed"``; in-memory tensors
    (``load_dataset_tensors``' tuple) carry no manifest and are ``"fixed"``."""
    if not isinstance(data, (str, os.PathLike, dict)):
        return "fixed"
    return "stored" if stored_noise_reason(data) is not None else "fixed"


def resolve_start_noise(
    data: str | os.PathLike | dict[str, Any], start_noise: str | None = None
) -> tuple[str, str | None]:
    """The restoration start noise for ``data``: ``(start_noise, warning or None)``.

    ``None`` picks it from the manifest (stored noisy -> ``"none"``, else ``"fresh"``).
    An explicit ``"fresh"`` or ``"training"`` on stored-noisy data contradicts the manifest
    (a second noise on top of the stored one) and raises ``ValueError``; an explicit
    ``"none"`` on data whose manifest does not say it is stored noisy is allowed (datasets
    without a manifest may be noisy) and returns a warning to show the user. The value
    itself is checked by the restoration engine.
    """
    reason = stored_noise_reason(data)
    if start_noise is None:
        return ("none" if reason else "fresh"), None
    if reason and start_noise != "none":
        raise ValueError(
            f"{start_noise!r} contradicts the data: {reason}, so its corrupt samples already are noisy at "
            f"their sigma_min and {start_noise} noise would be added on top; use 'none' (the default for it)"
        )
    if not reason and start_noise == "none":
        return start_noise, (
            "start noise 'none' on data whose manifest does not say it is stored noisy: the samples are "
            "integrated from sigma_min as they are (right only if they already are noisy at sigma_min)"
        )
    return start_noise, None
