"""Dataset IO of the restoration engine: what it needs from a dataset version, on top of
:func:`ambient_fast.data.open_dataset` (every format: folder, zip, WebDataset, tensors).

:class:`RestoreSource` gives the engine: keys in a fixed order (sample i has id i, its seed
comes from ``(seed, i)``), the ``(sigma_min, sigma_max)`` annotations, decoded samples in
their storage dtype written straight into the sampler's host buffers, the stored bytes of
samples copied through, the stored form of a restored sample (PNG for images, whatever
their source codec -- restoring JPEG samples is refused, since a lossy re-encode would add
a corruption the new annotation does not describe; ``.npy`` bytes for tensor rows), and a
content fingerprint for the resume check.

Storage and model space: images (and ``uint8 (C, H, W)`` tensor rows) are uint8 with
``x = u8 / 127.5 - 1``; float tensor rows are in model units, restored in their own dtype.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch

from ..data import SIDECAR_NAME, Dataset, DatasetFormatError, open_dataset
from ..data._io import encode_image, file_ext
from ..data.dataset import MANIFEST_NAME
from .stages import IMAGE_UINT8, DeviceCodec, Stages, float_codec, npy_bytes

__all__ = ["RestoreSource", "open_source"]

_FLOAT_DTYPES = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}


class RestoreSource:
    """A read-only dataset version as the restoration engine sees it.

    Args:
        dataset: an opened :class:`ambient_fast.data.Dataset`.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.format: str = dataset.format
        self.root = Path(dataset.root)
        self.keys: tuple[str, ...] = tuple(dataset.keys)
        self.sigma_min = np.asarray(dataset.sigma_min, dtype=np.float64)
        self.sigma_max = np.asarray(dataset.sigma_max, dtype=np.float64)

    @property
    def is_image(self) -> bool:
        return bool(self.dataset.is_image)

    def sample_layout(self, index: int) -> tuple[tuple[int, ...], DeviceCodec]:
        """Shape and storage codec of restored sample ``index`` (all restored samples share it)."""
        if self.is_image:
            if file_ext(self.keys[index]) in (".jpg", ".jpeg") or self.dataset.probe(index).codec == "jpeg":
                raise DatasetFormatError(
                    f"{self.dataset.describe(index)}: restoring JPEG samples is refused (a lossy re-encode adds a "
                    "corruption the new annotation does not describe); convert the dataset to PNG"
                )
            info = self.dataset.probe(index)
            return (info.channels, info.height, info.width), IMAGE_UINT8
        dtype = np.dtype(self.dataset.dtype)
        shape = tuple(self.dataset.sample_shape)
        if dtype == np.uint8 and len(shape) == 3:
            return shape, IMAGE_UINT8
        if dtype not in _FLOAT_DTYPES:
            raise DatasetFormatError(
                f"{self.root}: tensor rows of dtype {dtype} cannot be restored (float16/32/64, or uint8 images)"
            )
        return shape, float_codec(_FLOAT_DTYPES[dtype])

    def read_into(self, index: int, out: np.ndarray) -> None:
        """Decode sample ``index`` into ``out`` (storage dtype, the restored layout)."""
        if self.is_image:
            array = self.dataset.decode(index).transpose(2, 0, 1)
        else:
            array = self.dataset.row(index)
        if array.shape != out.shape:
            raise DatasetFormatError(
                f"{self.dataset.describe(index)}: shape {array.shape}, but the restored samples of this dataset are "
                f"{out.shape} (restoration batches need one shape)"
            )
        out[...] = array

    def read_bytes(self, index: int) -> bytes:
        """Stored bytes of sample ``index`` (images: the encoded file)."""
        return self.dataset.read_bytes(index)

    def encode(self, index: int, restored: np.ndarray) -> bytes:
        """Stored form of a restored sample: PNG bytes (images) or ``.npy`` bytes (tensor rows)."""
        if self.is_image:
            return encode_image(np.ascontiguousarray(restored.transpose(1, 2, 0)), ".png")
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(restored), allow_pickle=False)
        return buffer.getvalue()

    def stages(self, index: int) -> Stages:
        """The pixel / tensor :class:`~.stages.Stages` of this source (``index``: a restored sample)."""
        shape, codec = self.sample_layout(index)

        def encode_output(i: int, outputs: dict[str, np.ndarray]):
            if self.is_image:
                return self.encode(i, outputs["sample"]), None, {}
            return None, np.array(outputs["sample"]), {}

        return Stages(codec, shape, self.read_into, encode_output, {"codec": "png" if self.is_image else "array"})

    @staticmethod
    def npy(array: np.ndarray) -> bytes:
        return npy_bytes(array)

    def decode_restored(self, payload: bytes) -> np.ndarray:
        """Inverse of :meth:`encode` for tensor rows (images are passed on as bytes)."""
        return np.load(io.BytesIO(payload), allow_pickle=False)

    def fingerprint(self) -> str:
        """SHA-256 over format, keys, annotations and the (name, size) of every file of the
        version: changes whenever the samples or annotations could have changed, without
        reading the data."""
        digest = hashlib.sha256(f"{self.format}\0".encode())
        digest.update("\0".join(self.keys).encode())
        digest.update(self.sigma_min.tobytes() + self.sigma_max.tobytes())
        if self.root.is_file():
            digest.update(f"{self.root.name}\0{self.root.stat().st_size}".encode())
        else:
            for rel in _walk_files(self.root):
                digest.update(f"{rel}\0{(self.root / rel).stat().st_size}\0".encode())
        return digest.hexdigest()

    def extra_files(self) -> list[str]:
        """Folder format: files that are neither samples nor regenerated (copied verbatim)."""
        if self.format != "folder":
            return []
        skip = set(self.keys) | {SIDECAR_NAME, MANIFEST_NAME}
        return [rel for rel in _walk_files(self.root) if rel not in skip]


def _walk_files(root: Path) -> list[str]:
    """Sorted relative paths of the regular, non-hidden files under ``root``; symlinks are
    refused (they could point outside the dataset)."""
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        for name in (*dirnames, *filenames):
            if os.path.islink(os.path.join(dirpath, name)):
                raise DatasetFormatError(f"{root}: symlink {(rel_dir / name).as_posix()!r} (refused in datasets)")
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        names += [(rel_dir / f).as_posix() for f in filenames if not f.startswith(".")]
    return sorted(names)


def open_source(path: str | os.PathLike[str]) -> RestoreSource:
    """Open a dataset version (any :func:`ambient_fast.data.open_dataset` format)."""
    return RestoreSource(open_dataset(path))
