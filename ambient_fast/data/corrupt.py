"""Corruptions and corrupted dataset versions: the ground truth of ambient experiments.

Image corruptions act on float64 ``(C, H, W)`` images in [0, 1] (JPEG on uint8
``(H, W, C)``), as in the anchors (``ambient_utils/noise.py``):

- :func:`gaussian_blur`: ``scipy.ndimage.gaussian_filter(x, sigma=(0, s, s))`` per channel.
- :func:`jpeg_compress`: PIL JPEG round trip at quality ``q``.
- :func:`add_gaussian_noise`: ``x + std/2 * n`` ([0, 1] units; ``std`` is in the data's
  [-1, 1] units, so ``sigma_min = std`` exactly).
- :func:`random_mask`: inpainting holes (square holes or independent pixels) set to ``fill``.
- :func:`downsample_upsample`: area downsampling by ``factor`` then bilinear upsampling.

:func:`corrupt_dataset` applies one of them to a fraction of a dataset and writes a new
version. Which samples are corrupted is a pure function of ``(seed, sample key)``
(``per_sample``: ``u(seed, key) < fraction``, the anchors' rule keyed by name instead of
position; or ``exact``: the ``round(fraction * N)`` keys with the smallest ``u``), and so is
any randomness inside a corruption (noise, hole positions). The version's manifest section
``"corruption"`` lists the corrupted keys and the parameters; its annotation gives
corrupted samples ``sigma_min`` (user value, or :data:`PRESET_SIGMA_MIN`, or the noise
std) and clean ones 0. Clean samples are copied byte for byte.

Noise and storage: clipping to [0, 1] and 8-bit quantisation would make stored noise
non-Gaussian (digits are mostly black: half the noise would be clipped away), so noise
versions default to the ``tensors`` format (float32 ``(C, H, W)`` in [-1, 1], unclipped).
Writing noise into an image format is allowed but clips and quantises; the manifest then
records ``"clipped": true``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .dataset import Dataset, ImageDataset, Sample, TensorDataset, open_dataset
from .resumable import write_version
from .writer import DatasetWriter

__all__ = [
    "CORRUPTIONS",
    "PRESET_SIGMA_MIN",
    "add_gaussian_noise",
    "apply_corruption",
    "corrupt_dataset",
    "corruption_sigma_min",
    "downsample_upsample",
    "gaussian_blur",
    "jpeg_compress",
    "per_sample_seed",
    "random_mask",
    "select_corrupted",
]

log = logging.getLogger("ambient_fast.data")

CORRUPTIONS = ("blur", "jpeg", "noise", "mask", "downsample")

# (kind, parameter) -> sigma_min, from the anchors' annotate_fixed_sigma scripts (CIFAR-10
# 32x32, [-1, 1] units): blur sigma_blur 0.6/0.8/1.0, JPEG quality 18/25/50.
PRESET_SIGMA_MIN: dict[tuple[str, float], float] = {
    ("blur", 0.6): 1.2,
    ("blur", 0.8): 1.9,
    ("blur", 1.0): 2.4,
    ("jpeg", 18): 1.6,
    ("jpeg", 25): 1.3,
    ("jpeg", 50): 1.2,
}


def per_sample_seed(seed: int, key: str, purpose: str) -> int:
    """64-bit seed from ``(seed, sample key, purpose)`` (BLAKE2b): stable across runs,
    machines, dataset order and sharding."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{purpose}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def select_corrupted(keys: Sequence[str], fraction: float, seed: int, selection: str = "per_sample") -> np.ndarray:
    """bool ``(N,)``: which samples a corruption touches.

    ``per_sample``: ``u(seed, key) < fraction`` with ``u`` uniform in [0, 1) from
    :func:`per_sample_seed`; a sample's fate never depends on the others.
    ``exact``: the ``round(fraction * N)`` samples with the smallest ``u``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    u = np.array([per_sample_seed(seed, k, "select") / 2.0**64 for k in keys], dtype=np.float64)
    if selection == "per_sample":
        return u < fraction
    if selection == "exact":
        chosen = np.zeros(len(keys), dtype=bool)
        chosen[np.argsort(u, kind="stable")[: int(round(fraction * len(keys)))]] = True
        return chosen
    raise ValueError(f"selection must be 'per_sample' or 'exact', got {selection!r}")


def _check_chw(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3:
        raise ValueError(f"expected an image (C, H, W), got shape {image.shape}")
    return image


def gaussian_blur(image: np.ndarray, sigma_blur: float) -> np.ndarray:
    """Blur float ``(C, H, W)`` [0, 1] per channel: ``gaussian_filter(x, (0, s, s))``
    (scipy's default ``mode="reflect"``, truncate 4). Returns float64 ``(C, H, W)``."""
    from scipy.ndimage import gaussian_filter

    if not sigma_blur > 0:
        raise ValueError(f"sigma_blur must be > 0, got {sigma_blur}")
    return gaussian_filter(_check_chw(image), sigma=(0.0, float(sigma_blur), float(sigma_blur)))


def jpeg_compress(image: np.ndarray, quality: int) -> np.ndarray:
    """PIL JPEG round trip of uint8 ``(H, W, C)`` (C = 1 or 3) at ``quality`` (1..95).
    Returns uint8 ``(H, W, C)``."""
    from PIL import Image

    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected uint8 (H, W, 1|3), got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="JPEG", quality=int(quality))
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        out = np.asarray(decoded.convert("L" if image.shape[2] == 1 else "RGB"), dtype=np.uint8)
    return out.reshape(image.shape)


def add_gaussian_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """``x + (std / 2) n`` on a [0, 1] image: noise of std ``std`` in [-1, 1] units.
    Not clipped. Returns float64 of ``image``'s shape."""
    if not std >= 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    image = np.asarray(image, dtype=np.float64)
    return image + 0.5 * float(std) * rng.standard_normal(image.shape)


def random_mask(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    holes: int = 1,
    hole_size: int | None = None,
    pixel_fraction: float | None = None,
    fill: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Inpainting holes in float ``(C, H, W)``: ``holes`` squares of side ``hole_size``
    (default ``min(H, W) // 4``, at least 1) at uniform positions, or, with
    ``pixel_fraction``, each pixel independently. Masked pixels (all channels) become ``fill``.

    Returns ``(image float64 (C, H, W), kept bool (H, W))``.
    """
    image = _check_chw(image).copy()
    _, h, w = image.shape
    if pixel_fraction is not None:
        if not 0.0 <= pixel_fraction <= 1.0:
            raise ValueError(f"pixel_fraction must be in [0, 1], got {pixel_fraction}")
        kept = rng.random((h, w)) >= pixel_fraction
    else:
        side = max(1, min(h, w) // 4) if hole_size is None else int(hole_size)
        if not 1 <= side <= min(h, w) or holes < 1:
            raise ValueError(f"need holes >= 1 and 1 <= hole_size <= {min(h, w)}, got holes={holes}, hole_size={side}")
        kept = np.ones((h, w), dtype=bool)
        for _ in range(int(holes)):
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            kept[top : top + side, left : left + side] = False
    image[:, ~kept] = fill
    return image, kept


def downsample_upsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Area-downsample float ``(C, H, W)`` to ``(H // factor, W // factor)``, then bilinear
    upsample (``align_corners=False``) back. Returns float64 ``(C, H, W)``."""
    import torch
    import torch.nn.functional as F

    image = _check_chw(image)
    _, h, w = image.shape
    if int(factor) < 2 or h // int(factor) < 1 or w // int(factor) < 1:
        raise ValueError(f"factor must be an int >= 2 no larger than the image ({h}x{w}), got {factor}")
    x = torch.from_numpy(image)[None]
    small = F.interpolate(x, size=(h // int(factor), w // int(factor)), mode="area")
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()


def _validate_params(kind: str, params: dict) -> dict:
    allowed = {
        "blur": {"sigma_blur"},
        "jpeg": {"quality"},
        "noise": {"std"},
        "mask": {"holes", "hole_size", "pixel_fraction", "fill"},
        "downsample": {"factor"},
    }
    if kind not in allowed:
        raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {kind!r}")
    unknown = set(params) - allowed[kind]
    if unknown:
        raise ValueError(f"corruption {kind!r} takes {sorted(allowed[kind])}, got unknown {sorted(unknown)}")
    required = {"blur": "sigma_blur", "jpeg": "quality", "noise": "std", "downsample": "factor"}.get(kind)
    if required and required not in params:
        raise ValueError(f"corruption {kind!r} needs {required}=...")
    return params


def corruption_sigma_min(kind: str, params: dict, sigma_min: float | None = None) -> tuple[float, str]:
    """The annotation for corrupted samples and where it came from.

    A user value wins; else noise -> its std ([-1, 1] units); else the preset table
    (blur 0.6/0.8/1.0 -> 1.2/1.9/2.4, JPEG q18/25/50 -> 1.6/1.3/1.2). Other cases need a
    user value. Returns ``(sigma_min, "user" | "noise std" | "preset")``.
    """
    _validate_params(kind, params)
    if sigma_min is not None:
        if not (math.isfinite(sigma_min) and sigma_min >= 0):
            raise ValueError(f"sigma_min must be finite and >= 0, got {sigma_min}")
        return float(sigma_min), "user"
    if kind == "noise":
        return float(params["std"]), "noise std"
    key = {"blur": ("blur", params.get("sigma_blur")), "jpeg": ("jpeg", params.get("quality"))}.get(kind)
    if key is not None:
        for (preset_kind, value), level in PRESET_SIGMA_MIN.items():
            if preset_kind == key[0] and math.isclose(float(key[1]), value):
                return level, "preset"
    presets = ", ".join(f"{k} {v:g} -> {s:g}" for (k, v), s in PRESET_SIGMA_MIN.items())
    raise ValueError(f"no preset sigma_min for {kind} {params}; pass sigma_min= (presets: {presets})")


def apply_corruption(kind: str, image_u8: np.ndarray, params: dict, rng: np.random.Generator) -> np.ndarray:
    """Corrupt one uint8 ``(H, W, C)`` image; returns float64 ``(C, H, W)`` in [0, 1]
    units (noise: unclipped)."""
    _validate_params(kind, params)
    if kind == "jpeg":
        return jpeg_compress(image_u8, params["quality"]).transpose(2, 0, 1) / 255.0
    x = np.asarray(image_u8, dtype=np.float64).transpose(2, 0, 1) / 255.0
    if kind == "blur":
        return gaussian_blur(x, params["sigma_blur"])
    if kind == "noise":
        return add_gaussian_noise(x, params["std"], rng)
    if kind == "mask":
        return random_mask(x, rng, **params)[0]
    return downsample_upsample(x, params["factor"])


def _quantise(x01: np.ndarray) -> np.ndarray:
    """float ``(C, H, W)`` in [0, 1] -> uint8 ``(H, W, C)`` (round, clip)."""
    return np.clip(np.rint(x01 * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def _version_key(key: str, fmt: str) -> str:
    """A source key in the output format's conventions (WebDataset keys have no extension)."""
    if fmt == "webdataset":
        directory, _, base = key.rpartition("/")
        base = base.split(".", 1)[0]
        return f"{directory}/{base}" if directory else base
    return key


def corrupt_dataset(
    source: str | os.PathLike | Dataset,
    dest: str | os.PathLike,
    corruption: str,
    *,
    fraction: float,
    seed: int = 0,
    sigma_min: float | None = None,
    selection: str = "per_sample",
    format: str | None = None,
    chunk_size: int = 1024,
    progress: bool = False,
    **params,
) -> Path:
    """Corrupt a fraction of a dataset into a new version at ``dest``; returns ``dest``.

    Args:
        source: a dataset or its path (never modified).
        dest: the new version's folder: new, or an unfinished version of the same call
            (a failed run leaves nothing or a state this call continues; see
            :func:`ambient_fast.data.resumable.write_version`).
        corruption: ``"blur" | "jpeg" | "noise" | "mask" | "downsample"``.
        fraction: probability (``per_sample``) or share (``exact``) of corrupted samples.
        seed: selects the samples and seeds per-sample randomness (with each key).
        sigma_min: annotation for corrupted samples (default: preset / noise std).
        selection: ``"per_sample"`` or ``"exact"`` (see :func:`select_corrupted`).
        format: output format; default the source's, ``"tensors"`` for noise.
        progress: a tqdm bar over the samples written (stderr).
        params: the corruption's parameters: ``sigma_blur``; ``quality``; ``std`` ([-1, 1]
            units); ``holes``/``hole_size``/``pixel_fraction``/``fill``; ``factor``.

    The source's annotation is *not* inherited: corrupted samples get ``sigma_min``,
    clean ones 0 (a corruption defines the ground truth).
    """
    dataset = source if isinstance(source, Dataset) else open_dataset(source)
    params = _validate_params(corruption, dict(params))
    level, level_source = corruption_sigma_min(corruption, params, sigma_min)
    if isinstance(dataset, TensorDataset) and corruption != "noise":
        raise ValueError(f"{corruption!r} corrupts images; tensor datasets take only 'noise'")
    fmt = format or ("tensors" if corruption == "noise" or isinstance(dataset, TensorDataset) else dataset.format)
    chosen = select_corrupted(dataset.keys, fraction, seed, selection)
    clipped = corruption == "noise" and fmt != "tensors"
    if clipped:
        log.warning("noise written as %s images is clipped to [0, 1] and quantised to 8 bits: no longer Gaussian", fmt)
    record = {
        "kind": corruption,
        "params": params,
        "fraction": float(fraction),
        "selection": selection,
        "seed": int(seed),
        "sigma_min": level,
        "sigma_min_source": level_source,
        "per_sample_randomness": "numpy default_rng(blake2b-64(seed, 'corrupt', source key))",
        "clipped": clipped,
        "count": int(chosen.sum()),
    }
    keys = [_version_key(k, fmt) for k in dataset.keys]

    def manifest(writer: DatasetWriter) -> dict:
        corrupted = [writer.output_key(k) for k, c in zip(keys, chosen, strict=True) if c]
        return {"corruption": {**record, "corrupted_keys": corrupted}}

    return write_version(
        dest,
        fmt,
        keys,
        lambda i: _corrupt_sample(dataset, i, bool(chosen[i]), corruption, params, level, seed, fmt),
        chunk_size=chunk_size,
        extra=manifest,
        progress="corrupt" if progress else None,
        parent=dataset,
        creator="ambient_fast.data.corrupt",
        params={"corruption": corruption, **params, "fraction": fraction, "seed": seed, "selection": selection},
    )


def _corrupt_sample(
    dataset: Dataset, i: int, corrupt: bool, kind: str, params: dict, level: float, seed: int, fmt: str
) -> Sample:
    sample = dataset.read(i)
    key = _version_key(sample.key, fmt)
    out = Sample(
        index=i,
        key=key,
        array=sample.array,
        sigma_min=level if corrupt else 0.0,
        sigma_max=0.0,
        label=sample.label,
        caption=sample.caption,
        metadata=sample.metadata,
        extras=sample.extras,
    )
    rng = np.random.default_rng(per_sample_seed(seed, sample.key, "corrupt"))
    if isinstance(dataset, TensorDataset):
        row = sample.array.astype(np.float64)
        out.array = (row + params["std"] * rng.standard_normal(row.shape) if corrupt else row).astype(np.float32)
        return out
    assert isinstance(dataset, ImageDataset)
    if fmt == "tensors":
        x01 = apply_corruption(kind, sample.array, params, rng) if corrupt else sample.array.transpose(2, 0, 1) / 255.0
        out.array = (2.0 * x01 - 1.0).astype(np.float32)
        return out
    if corrupt:
        out.array = _quantise(apply_corruption(kind, sample.array, params, rng))
    else:
        out.data = sample.data  # clean: byte for byte
    return out
