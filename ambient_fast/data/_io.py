"""Low-level helpers shared by readers and writers: path safety, atomic writes, checksums,
and image probing / decoding / encoding.

Path safety: every name that comes from a dataset (a sample key, a zip or tar member, a
sidecar ``filename``) passes :func:`safe_relative_path` before it is joined to a folder,
so untrusted input can never make the engine read or write outside the folders it was given.

Atomic output: :func:`atomic_write_bytes` writes to a temporary name in the destination
folder, fsyncs the file, renames it over the final name, and fsyncs the folder, so a reader
sees either the complete old state or the complete new file, never a partial one. Folder
versions with thousands of small images rename each file atomically and make the whole
chunk durable with one :func:`sync_filesystem` before committing it.

Image probing (:func:`probe_image`) parses PNG, JPEG and WebP headers in pure Python (width,
height, channels) and checks the end marker (PNG ``IEND`` chunk, JPEG ``EOI`` after the
first scan, WebP's RIFF length), so truncated files are found without decoding them. It is what the DALI path
runs on every sample before handing bytes to a decoder that would otherwise abort the whole
pipeline on one bad file.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadSampleError, UnsafePathError

__all__ = [
    "IMAGE_EXTENSIONS",
    "CODEC_EXTENSION",
    "ImageInfo",
    "atomic_write_bytes",
    "atomic_writer",
    "decode_image",
    "encode_image",
    "fsync_dir",
    "probe_image",
    "safe_relative_path",
    "sha256_bytes",
    "sha256_file",
    "sync_filesystem",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")  # what both the PIL and the DALI decoders take here
CODEC_EXTENSION = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}  # probe_image's codec -> file extension
_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_relative_path(name: object, what: str) -> str:
    """Validate a dataset-supplied relative path and return it in normal POSIX form.

    Refused (``UnsafePathError`` naming ``what`` and the entry): non-strings, empty names,
    absolute paths, drive letters, backslashes, NUL bytes, ``..`` components. ``.`` and
    empty components (``a//b``, ``./a``) are dropped.
    """
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{what} {name!r}: expected a non-empty relative path string")
    if "\x00" in name:
        raise UnsafePathError(f"{what} {name!r}: NUL byte in path")
    if "\\" in name:
        raise UnsafePathError(f"{what} {name!r}: backslash in path (use '/' separators)")
    if name.startswith("/") or _DRIVE.match(name):
        raise UnsafePathError(f"{what} {name!r}: absolute paths are not allowed")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafePathError(f"{what} {name!r}: '..' components are not allowed")
    if not parts:
        raise UnsafePathError(f"{what} {name!r}: names no file")
    return "/".join(parts)


def fsync_dir(folder: Path) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sync_filesystem(folder: Path) -> None:
    """Flush every dirty page and directory entry of the filesystem holding ``folder``
    (Linux ``syncfs``; elsewhere ``os.sync``). One call makes a whole chunk of files written
    with ``durable=False`` durable, instead of one journal commit per file."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            if libc.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass
    os.sync()


@contextlib.contextmanager
def atomic_writer(path: Path, *, durable: bool = True) -> Iterator[io.BufferedWriter]:
    """Open a temporary file beside ``path`` for binary writing; on success fsync it,
    rename it to ``path`` and fsync the folder; on error remove it.

    ``durable=False`` skips both fsyncs (the rename is still atomic): for many small files
    whose batch is made durable with one :func:`sync_filesystem` before it is committed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, durable=durable) as f:
        f.write(data)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------
# Image probing (headers and end markers, no decode).


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`probe_image` reads from an encoded image's header.

    ``channels`` is what the pipelines decode it to: 1 for grayscale (with or without
    alpha), 3 for everything else (alpha dropped, palettes expanded).
    """

    codec: str  # "png" | "jpeg" | "webp"
    width: int
    height: int
    channels: int


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _probe_png(data: bytes) -> ImageInfo:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ValueError("truncated PNG header (no IHDR chunk)")
    width, height, bit_depth, color_type = struct.unpack(">IIBB", data[16:26])
    if bit_depth == 16:
        raise ValueError("16-bit PNG is not supported (store 8-bit images)")
    if not data.endswith(_PNG_IEND):
        raise ValueError("truncated PNG (file does not end with the IEND chunk)")
    channels = 1 if color_type in (0, 4) else 3
    return ImageInfo("png", width, height, channels)


def _probe_jpeg(data: bytes) -> ImageInfo:
    pos, n = 2, len(data)
    info = None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise ValueError(f"corrupt JPEG (expected a marker at byte {pos})")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF:
            if pos + 10 > n:
                break
            height, width, components = struct.unpack(">HHB", data[pos + 5 : pos + 10])
            info = ImageInfo("jpeg", width, height, 1 if components == 1 else 3)
        if marker == 0xDA:  # start of scan: the entropy-coded data follows
            if info is None:
                raise ValueError("corrupt JPEG (scan before frame header)")
            # Inside entropy-coded data 0xFF is always followed by 0x00 or RSTn, so the
            # first 0xFFD9 after the scan starts is the end-of-image marker.
            if data.find(b"\xff\xd9", pos + 2 + length) < 0:
                raise ValueError("truncated JPEG (no end-of-image marker after the scan data)")
            return info
        pos += 2 + length
    raise ValueError("truncated JPEG header (no start-of-scan marker)")


def _probe_webp(data: bytes) -> ImageInfo:
    if len(data) < 30:
        raise ValueError("truncated WebP header")
    (riff_size,) = struct.unpack("<I", data[4:8])
    if len(data) < 8 + riff_size:
        raise ValueError(f"truncated WebP ({len(data)} of {8 + riff_size} bytes)")
    kind = data[12:16]
    if kind == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise ValueError("corrupt WebP (no VP8 start code)")
        width, height = (v & 0x3FFF for v in struct.unpack("<HH", data[26:30]))
    elif kind == b"VP8L":
        if data[20] != 0x2F:
            raise ValueError("corrupt WebP (no VP8L signature)")
        (bits,) = struct.unpack("<I", data[21:25])
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif kind == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
    else:
        raise ValueError(f"unknown WebP chunk {kind!r}")
    return ImageInfo("webp", width, height, 3)


def probe_image(data: bytes, where: str) -> ImageInfo:
    """Read width, height and channels from PNG, JPEG or WebP bytes and check the file is complete.

    Raises :class:`BadSampleError` (naming ``where``) for unknown formats, truncated or
    malformed headers, and files that stop before their end marker.
    """
    try:
        if data.startswith(_PNG_MAGIC):
            info = _probe_png(data)
        elif data.startswith(b"\xff\xd8"):
            info = _probe_jpeg(data)
        elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            info = _probe_webp(data)
        else:
            raise ValueError("not a PNG, JPEG or WebP file (unknown magic bytes)")
    except (ValueError, struct.error) as exc:
        raise BadSampleError(where, str(exc)) from None
    if info.width == 0 or info.height == 0:
        raise BadSampleError(where, f"zero-sized image {info.width}x{info.height}")
    return info


def decode_image(data: bytes, where: str, channels: int) -> np.ndarray:
    """Decode PNG/JPEG/WebP bytes with PIL to uint8 ``(H, W, channels)`` (channels 1 or 3).

    Any decoder failure becomes a :class:`BadSampleError` naming ``where``.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = "L" if channels == 1 else "RGB"
            if img.mode in ("I;16", "I;16B", "I", "F"):
                raise ValueError(f"unsupported pixel mode {img.mode} (store 8-bit images)")
            if img.mode == "LA" and channels == 1:
                img = img.getchannel("L")
            elif img.mode != mode:
                img = img.convert(mode)
            array = np.array(img, dtype=np.uint8)  # a writable copy
    except BadSampleError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, struct.error) as exc:
        raise BadSampleError(where, f"cannot decode image: {exc}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return array


def encode_image(array: np.ndarray, ext: str, *, jpeg_quality: int = 95, webp_quality: int | None = None) -> bytes:
    """Encode uint8 ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` to PNG, JPEG or WebP bytes.

    PNG is written with a fixed compression level and no metadata, so the same pixels
    always give the same bytes (checksums in manifests are reproducible). WebP is lossless
    unless ``webp_quality`` (1-100) is given.
    """
    from PIL import Image

    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(
            f"image arrays must be uint8 (H, W, C); got {array.dtype}. "
            "Convert float images in [-1, 1] with ambient_fast.data.to_uint8_image."
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"image arrays must be (H, W), (H, W, 1) or (H, W, 3); got {array.shape}")
    img = Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB")
    buffer = io.BytesIO()
    ext = ext.lower()
    if ext == ".png":
        img.save(buffer, format="PNG", compress_level=6)
    elif ext in (".jpg", ".jpeg"):
        img.save(buffer, format="JPEG", quality=int(jpeg_quality))
    elif ext == ".webp":
        if webp_quality is None:
            img.save(buffer, format="WEBP", lossless=True, quality=100, method=4, exact=True)
        else:
            img.save(buffer, format="WEBP", quality=int(webp_quality), method=4)
    else:
        raise ValueError(f"cannot encode images as {ext!r}; use one of {IMAGE_EXTENSIONS}")
    return buffer.getvalue()


def file_ext(name: str) -> str:
    """Lower-case extension of the last path component (``'.png'``), ``''`` if none."""
    base = name.rsplit("/", 1)[-1]
    dot = base.rfind(".")
    return base[dot:].lower() if dot > 0 else ""


def to_uint8_image(x) -> np.ndarray:
    """Float ``(C, H, W)`` in [-1, 1] (numpy or torch) -> uint8 ``(H, W, C)``.

    EDM's convention: ``round(x * 127.5 + 127.5)`` clipped to [0, 255]; the inverse of the
    pipelines' ``u8 / 127.5 - 1`` up to rounding (exact for values that came from uint8).
    """
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float64).numpy()
    except ImportError:  # pragma: no cover
        pass
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"expected one image (C, H, W), got shape {x.shape}")
    return np.clip(np.rint(x * 127.5 + 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)
