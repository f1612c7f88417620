"""Bundled demo data: scikit-learn's digits in the EDM folder format, clean and corrupted,
and an in-memory loader for small datasets.

Resolution: the digits are 8x8 scans with 17 grey levels. The demo keeps them at **8x8**
by default: every pixel is real data (an upsampled 16x16 set is a smooth 64-dimensional
manifold inside 256 dimensions, on which a blur of 0.6 px barely changes anything, so the
corruption and the ambient experiment would be nearly vacuous), 64-dimensional samples train
an MLP denoiser on 1,797 images in seconds on a CPU, and a UNet still has two 2x
downsamplings (8 -> 4 -> 2). ``resolution=16`` (bicubic upsampling) is available for
UNets that need more depth.

Grey levels 0..16 are stored as ``round(v * 255 / 16)`` in 1-channel PNGs with EDM names
(``00000/img00000000.png``) and the digit as the label.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .corrupt import corrupt_dataset
from .dataset import MANIFEST_NAME, Dataset, ImageDataset, Sample, open_dataset
from .errors import BadSampleError
from .writer import DatasetWriter

__all__ = ["DatasetTensors", "DEMO_BLUR_SIGMA_MIN", "demo_dataset", "export_digits", "load_dataset_tensors"]

DEMO_BLUR_SIGMA_MIN = 1.0  # annotation of the demo's blurred digits (sigma_blur 0.6)


def _edm_key(index: int) -> str:
    """EDM ``dataset_tool`` naming: ``{idx:08d}`` -> ``00000/img00000000.png``."""
    name = f"{index:08d}"
    return f"{name[:5]}/img{name}.png"


def export_digits(root: str | os.PathLike, *, resolution: int = 8) -> Path:
    """Write scikit-learn's 1,797 digits as a clean folder dataset at ``root`` (all
    ``sigma_min = 0``, labels 0-9); returns ``root``. Reuses a complete existing export."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    if (root / MANIFEST_NAME).is_file():
        return root
    if resolution not in (8, 16):
        raise ValueError(f"resolution must be 8 or 16, got {resolution}")
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    if resolution == 16:
        pixels = np.stack([np.asarray(Image.fromarray(p).resize((16, 16), Image.BICUBIC)) for p in pixels])
    samples = [
        Sample(index=i, key=_edm_key(i), array=pixels[i][:, :, None], label=int(digits.target[i]))
        for i in range(pixels.shape[0])
    ]
    writer = DatasetWriter(
        root,
        "folder",
        creator="ambient_fast.data.demo",
        params={"source": "sklearn.datasets.load_digits", "resolution": resolution, "levels": "round(v*255/16)"},
        resume=root.exists() and (root / ".chunks").is_dir(),
    )
    writer.write_chunk(samples)
    return writer.close()


def demo_dataset(
    root: str | os.PathLike,
    corruption: str | None = "blur",
    clean_fraction: float = 0.03,
    seed: int = 0,
    *,
    sigma_blur: float = 0.6,
    noise_std: float = 0.2,
    sigma_min: float | None = None,
    resolution: int = 8,
) -> Path:
    """The digits demo, one call away; returns the dataset folder (reused if complete).

    Args:
        root: folder that receives ``digits-8x8/`` (clean) and the corrupted version.
        corruption: ``"blur"`` (1-``clean_fraction`` of the samples blurred at
            ``sigma_blur``, annotated ``sigma_min`` (default 1.0)), ``"noise"`` (noised at
            ``noise_std`` in [-1, 1] units, annotated ``sigma_min = noise_std``, stored as
            float32 tensors so the noise stays Gaussian), or None (the clean set).
        clean_fraction: share of samples left clean (exactly ``round(f * 1797)``, chosen by
            ``seed`` from the sample keys).
        seed: which samples stay clean, and the per-sample corruption randomness.

    Open the result with :func:`~ambient_fast.data.open_dataset` or load it whole with
    :func:`load_dataset_tensors`; its manifest lists the corrupted keys.
    """
    root = Path(root)
    clean = export_digits(root / f"digits-{resolution}x{resolution}", resolution=resolution)
    if corruption is None:
        return clean
    if not 0.0 <= clean_fraction <= 1.0:
        raise ValueError(f"clean_fraction must be in [0, 1], got {clean_fraction}")
    if corruption == "blur":
        level = DEMO_BLUR_SIGMA_MIN if sigma_min is None else sigma_min
        name, params = f"blur{sigma_blur:g}", {"sigma_blur": sigma_blur}
    elif corruption == "noise":
        level = sigma_min
        name, params = f"noise{noise_std:g}", {"std": noise_std}
    else:
        raise ValueError(f"demo corruption must be 'blur', 'noise' or None, got {corruption!r}")
    dest = root / f"digits-{resolution}x{resolution}-{name}-clean{clean_fraction:g}-seed{seed}"
    if (dest / MANIFEST_NAME).is_file():
        return dest
    if (dest / ".chunks").is_dir():  # our own unfinished output from a crashed call: start over
        shutil.rmtree(dest)
    return corrupt_dataset(
        clean,
        dest,
        corruption,
        fraction=1.0 - clean_fraction,
        seed=seed,
        sigma_min=level,
        selection="exact",
        **params,
    )


class DatasetTensors(NamedTuple):
    """A whole dataset in memory (see :func:`load_dataset_tensors`)."""

    images: torch.Tensor  # float32 (N, C, H, W) in [-1, 1] (tensor datasets: (N, ...) stored units)
    sigma_min: torch.Tensor  # float64 (N,)
    sigma_max: torch.Tensor  # float64 (N,)
    ids: torch.Tensor  # int64 (N,) dataset indices (keys: open_dataset(path).keys[ids])
    labels: torch.Tensor  # int64 (N,) (-1: none) or float32 (N, L)


def load_dataset_tensors(
    path: str | os.PathLike | Dataset, *, on_bad_sample: str = "raise", num_threads: int = 4
) -> DatasetTensors:
    """Load a small dataset whole: ``(images, sigma_min, sigma_max, ids, labels)``.

    Images are ``u8 / 127.5 - 1`` float32 ``(N, C, H, W)``; tensor datasets give their rows
    as float32 (uint8 rows normalised the same way). ``sigma_min``/``sigma_max`` stay
    float64 (the annotation's exact values, e.g. for writing ``sigma_min / 8`` back). With
    ``on_bad_sample="skip"``, unreadable or differently-sized images are left out and
    ``ids`` says which samples remain; ``"raise"`` raises :class:`BadSampleError`.
    """
    if on_bad_sample not in ("raise", "skip"):
        raise ValueError(f"on_bad_sample must be 'raise' or 'skip', got {on_bad_sample!r}")
    dataset = path if isinstance(path, Dataset) else open_dataset(path)
    n = len(dataset)
    if isinstance(dataset, ImageDataset):
        shape = dataset.sample_shape

        def load(i: int) -> np.ndarray | BadSampleError:
            try:
                pixels = dataset.decode(i)
            except BadSampleError as exc:
                return exc
            if pixels.shape[:2] != shape[1:]:
                return BadSampleError(
                    dataset.describe(i),
                    f"wrong size {pixels.shape[0]}x{pixels.shape[1]} (H x W): expected {shape[1]}x{shape[2]}",
                )
            return pixels

        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            loaded = list(pool.map(load, range(n)))
        bad = [r for r in loaded if isinstance(r, BadSampleError)]
        if bad and (on_bad_sample == "raise" or len(bad) == n):
            raise bad[0]
        keep = np.array([not isinstance(r, BadSampleError) for r in loaded])
        stacked = np.stack([r for r in loaded if not isinstance(r, BadSampleError)]).transpose(0, 3, 1, 2)
        images = torch.from_numpy(np.ascontiguousarray(stacked)).to(torch.float32).div_(127.5).sub_(1.0)
    else:
        rows = dataset.rows(range(n))
        keep = np.ones(n, dtype=bool)
        values = rows.astype(np.float32) / 127.5 - 1.0 if rows.dtype == np.uint8 else rows.astype(np.float32)
        images = torch.from_numpy(np.ascontiguousarray(values))
    ids = np.flatnonzero(keep).astype(np.int64)
    labels = dataset.labels
    label_tensor = (
        torch.full((n,), -1, dtype=torch.int64) if labels is None else torch.from_numpy(np.ascontiguousarray(labels))
    )
    return DatasetTensors(
        images=images,
        sigma_min=torch.from_numpy(dataset.sigma_min[ids].copy()),
        sigma_max=torch.from_numpy(dataset.sigma_max[ids].copy()),
        ids=torch.from_numpy(ids),
        labels=label_tensor[torch.from_numpy(ids)],
    )
