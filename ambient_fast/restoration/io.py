"""Dataset IO of the restoration engine: what it needs from a dataset version, on top of
:func:`ambient_fast.data.open_dataset` (every format: folder, zip, WebDataset, tensors).

:class:`RestoreSource` gives the engine: keys in a fixed order (sample i has id i, its seed
comes from ``(seed, i)``), the ``(sigma_min, sigma_max)`` annotations, each sample's stored
bytes with a digest (:meth:`RestoreSource.fetch`: read once, hashed while read, so the
resume check covers content), the pixel/tensor :class:`~.stages.Stages`, and a cheap
fingerprint (names, sizes, annotations) for the resume check.

Images (JPEG, PNG, WebP) are decoded to uint8 ``(C, H, W)`` with ``x = u8 / 127.5 - 1``.
Every header is checked against ``max_pixels`` before anything is decoded or allocated; a
restored sample whose size differs from the run's is refused naming it, or (``resize``)
resized and centre-cropped to it (EDM's ``dataset_tool.py`` rule: scale the short side,
crop the centre). Restored images are written with the output codec (lossless PNG by
default). Float tensor rows are restored in their own dtype.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import (
    SIDECAR_NAME,
    BadSampleError,
    Dataset,
    DatasetError,
    DatasetFormatError,
    ImageInfo,
    decode_image,
    encode_image,
    open_dataset,
    probe_image,
)
from ..data.dataset import INFO_NAME, MANIFEST_NAME
from .stages import IMAGE_UINT8, DeviceCodec, Stages, float_codec, npy_bytes

__all__ = [
    "RestoreSource",
    "RawSample",
    "OutputCodec",
    "SizeMismatch",
    "open_source",
    "DEFAULT_MAX_PIXELS",
    "parse_output_codec",
]

DEFAULT_MAX_PIXELS = 4096 * 4096  # per sample; a 30000 x 30000 header is refused before any allocation

_FLOAT_DTYPES = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}


class SizeMismatch(DatasetError):
    """A restored sample's size differs from the run's (``resize=True`` fixes it)."""


@dataclass(frozen=True)
class OutputCodec:
    """How restored images are stored: ``png`` (default, lossless), ``webp`` (lossless),
    ``webp:Q`` or ``jpeg:Q`` (lossy, quality Q in 1..100)."""

    name: str = "png"  # png | webp | jpeg
    quality: int | None = None

    @property
    def lossy(self) -> bool:
        return self.quality is not None

    @property
    def ext(self) -> str:
        return {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}[self.name]

    def __str__(self) -> str:
        return self.name if self.quality is None else f"{self.name}:{self.quality}"

    def encode(self, hwc: np.ndarray) -> bytes:
        if self.name == "jpeg":
            return encode_image(hwc, ".jpg", jpeg_quality=self.quality or 95)
        return encode_image(hwc, self.ext, webp_quality=self.quality)


def parse_output_codec(text: str) -> OutputCodec:
    """``"png" | "webp" | "webp:Q" | "jpeg:Q"`` -> :class:`OutputCodec` (ValueError naming the rule)."""
    name, _, quality = str(text).partition(":")
    rule = "png, webp, webp:Q or jpeg:Q with Q an integer in 1..100"
    if name not in ("png", "webp", "jpeg") or (name == "png" and quality) or (name == "jpeg" and not quality):
        raise ValueError(f"output_codec must be {rule}, got {text!r}")
    if not quality:
        return OutputCodec(name)
    if not quality.isdigit() or not 1 <= int(quality) <= 100:
        raise ValueError(f"output_codec must be {rule}, got {text!r}")
    return OutputCodec(name, int(quality))


@dataclass
class RawSample:
    """One source sample as read: its stored bytes (or tensor row), the other members of its
    key (captions, JSON, unknown components: bytes, passed through untouched) and a digest
    of all of it."""

    index: int
    key: str
    where: str  # for messages: path or archive:member
    data: bytes | None  # encoded image (image formats)
    row: np.ndarray | None  # tensor row (tensor format)
    extras: dict[str, bytes] = field(default_factory=dict)
    digest: bytes = b""  # sha256 over data/row and extras


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

    # ------------------------------------------------------------------ reading
    def fetch(self, index: int) -> RawSample:
        """Read sample ``index``'s stored bytes once (image + every other member of its key)."""
        ds = self.dataset
        digest = hashlib.sha256()
        if self.is_image:
            data = ds.read_bytes(index)
            extras = ds.extras(index)
            digest.update(hashlib.sha256(data).digest())
            for name in sorted(extras):
                digest.update(name.encode() + b"\0" + hashlib.sha256(extras[name]).digest())
            return RawSample(index, self.keys[index], ds.describe(index), data, None, extras, digest.digest())
        row = ds.row(index)
        digest.update(np.ascontiguousarray(row).tobytes())
        return RawSample(index, self.keys[index], ds.describe(index), None, row, {}, digest.digest())

    def probe(self, index: int, max_pixels: int) -> ImageInfo:
        """Header of image sample ``index``, refused above ``max_pixels`` (nothing decoded)."""
        info = self.dataset.probe(index)
        check_pixels(info, self.dataset.describe(index), max_pixels)
        return info

    def label(self, index: int) -> Any:
        """Sample ``index``'s label as :class:`~ambient_fast.data.Sample` holds it (int, float vector, None)."""
        labels = self.dataset.labels
        if labels is None:
            return None
        return int(labels[index]) if labels.ndim == 1 else labels[index]

    # ------------------------------------------------------------------ stages
    def sizing_sample(self, candidates: np.ndarray, max_pixels: int, on_bad_sample: str) -> int:
        """The first of ``candidates`` (restored samples) whose header is good: it sizes the run's
        batch buffers. Bad headers before it are skipped (``on_bad_sample="skip"``; the run
        reports them again when it reaches them) or raised."""
        if not self.is_image:
            return int(candidates[0])
        first: BadSampleError | None = None
        for index in candidates:
            try:
                self.probe(int(index), max_pixels)
                return int(index)
            except BadSampleError as err:
                if on_bad_sample == "raise":
                    raise
                first = first or err
        raise DatasetError(f"{self.root}: no restorable sample has a readable header (first: {first})")

    def stages(
        self,
        index: int,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        resize: bool = False,
        resolution: tuple[int, int] | None = None,
        output_codec: OutputCodec | None = None,
    ) -> Stages:
        """The pixel / tensor :class:`~.stages.Stages` of this source, sized by restored sample
        ``index`` (or ``resolution`` ``(H, W)`` for images)."""
        output_codec = output_codec or OutputCodec()
        if not self.is_image:
            dtype = np.dtype(self.dataset.dtype)
            shape = tuple(self.dataset.sample_shape)
            if dtype == np.uint8 and len(shape) == 3:
                codec: DeviceCodec = IMAGE_UINT8
            elif dtype in _FLOAT_DTYPES:
                codec = float_codec(_FLOAT_DTYPES[dtype])
            else:
                raise DatasetFormatError(
                    f"{self.root}: tensor rows of dtype {dtype} cannot be restored (float16/32/64, or uint8 images)"
                )

            def read_tensor(raw: RawSample, out: np.ndarray) -> None:
                out[...] = raw.row

            def tensor_output(i: int, outputs: dict[str, np.ndarray]):
                return None, np.array(outputs["sample"]), {}

            return Stages(codec, shape, read_tensor, tensor_output, {"codec": "array", "dtype": str(dtype)})
        info = self.probe(index, max_pixels)
        channels = self.dataset.channels
        height, width = resolution or (info.height, info.width)
        if height * width > max_pixels:
            raise DatasetError(f"resolution {height}x{width} exceeds max_pixels={max_pixels}")
        shape = (channels, height, width)
        spec = ImageSpec(channels, height, width, resize, max_pixels)

        def read_image(raw: RawSample, out: np.ndarray) -> None:
            out[...] = spec.decode(raw).transpose(2, 0, 1)

        def image_output(i: int, outputs: dict[str, np.ndarray]):
            return output_codec.encode(np.ascontiguousarray(outputs["sample"].transpose(1, 2, 0))), None, {}

        return Stages(
            IMAGE_UINT8, shape, read_image, image_output, {"codec": str(output_codec), "resize": resize}, image=spec
        )

    # ------------------------------------------------------------------ fingerprint
    def fingerprint(self) -> str:
        """SHA-256 over format, keys, annotations and the (name, size) of every file of the
        version (cheap: reads no data). Content changes of equal size are caught by the
        per-shard digests of the samples' bytes (:meth:`fetch`), checked on resume."""
        digest = hashlib.sha256(f"{self.format}\0".encode())
        digest.update("\0".join(self.keys).encode())
        digest.update(self.sigma_min.tobytes() + self.sigma_max.tobytes())
        if self.root.is_file():
            digest.update(f"{self.root.name}\0{self.root.stat().st_size}".encode())
        else:
            for rel in _walk_files(self.root):
                digest.update(f"{rel}\0{(self.root / rel).stat().st_size}\0".encode())
        return digest.hexdigest()

    def extra_files(self) -> dict[str, bytes]:
        """Folder format: files that are neither samples nor regenerated (copied verbatim)."""
        if self.format != "folder":
            return {}
        skip = set(self.keys) | {SIDECAR_NAME, MANIFEST_NAME, INFO_NAME}
        return {rel: (self.root / rel).read_bytes() for rel in _walk_files(self.root) if rel not in skip}


@dataclass(frozen=True)
class ImageSpec:
    """The images a run restores: uint8 ``(channels, height, width)``; other sizes are refused
    or (``resize``) resized and centre-cropped; headers above ``max_pixels`` are refused."""

    channels: int
    height: int
    width: int
    resize: bool
    max_pixels: int

    def check(self, raw: RawSample) -> ImageInfo:
        """Header checks before any decode: complete file, ``max_pixels``, size (:class:`SizeMismatch`)."""
        info = probe_image(raw.data, raw.where)
        check_pixels(info, raw.where, self.max_pixels)
        if (info.height, info.width) != (self.height, self.width) and not self.resize:
            raise SizeMismatch(
                f"sample {raw.key!r} ({raw.where}): {info.height}x{info.width} (H x W), but this run restores "
                f"{self.height}x{self.width} images; pass --resize (resize=True) to resize and centre-crop it"
            )
        return info

    def decode(self, raw: RawSample) -> np.ndarray:
        """uint8 ``(H, W, C)`` with PIL, after :meth:`check`."""
        self.check(raw)
        array = decode_image(raw.data, raw.where, self.channels)
        if array.shape[:2] != (self.height, self.width):
            array = resize_center_crop(array, self.height, self.width)
        return array


def check_pixels(info: ImageInfo, where: str, max_pixels: int) -> None:
    """A header above ``max_pixels`` makes the sample bad (:class:`BadSampleError`): refused before decoding."""
    if info.width * info.height > max_pixels:
        raise BadSampleError(
            where,
            f"header says {info.width}x{info.height} = {info.width * info.height} pixels, above "
            f"max_pixels={max_pixels} (--max-pixels); refused before allocating it",
        )


def resize_center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale uint8 ``(h, w, C)`` so it covers ``height x width`` (Lanczos), crop the centre."""
    from PIL import Image

    h, w, c = array.shape
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    img = Image.fromarray(array[:, :, 0] if c == 1 else array)
    img = img.resize((new_w, new_h), Image.LANCZOS)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = np.asarray(img)[top : top + height, left : left + width]
    return out.reshape(height, width, c).copy()


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


def bad_reason(err: BadSampleError) -> str:
    """``"path: reason"`` of a bad sample, as reports and logs show it."""
    return f"{err.where}: {err.reason}"


__all__ += ["npy_bytes", "ImageSpec", "resize_center_crop", "check_pixels", "bad_reason"]
