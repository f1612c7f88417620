"""Reading datasets in the formats the field already uses, joined with their ``sigma_min``
annotation (SPEC 2, ANCHORS section 2).

Formats (``Dataset.format``):

- ``"folder"``: EDM/StyleGAN folder of PNG/JPEG images (any depth, e.g.
  ``00000/img00000000.png``) plus optional ``dataset.json`` ``{"labels": [[name, label], ...]}``.
  Keys are the paths relative to the root, sorted (EDM's order). Hidden files (a name
  starting with ``.``) are ignored.
- ``"zip"``: the same layout inside an (uncompressed or deflated) ``.zip``; ``dataset.json``
  and ``annotations.jsonl`` are members at the archive root.
- ``"webdataset"``: a folder of ``*.tar`` shards (or one ``.tar``). A sample is the run of
  members sharing a key (name up to the first dot of the basename): one image
  (``key.png|jpg|jpeg``), optional caption ``key.txt``, metadata ``key.json``, class
  ``key.cls`` and any other components, all carried through byte for byte (``Sample.extras``).
  Keys are the WebDataset keys; they must be unique across shards. Order: shard name, then
  position in the shard. Sidecar and ``dataset.json`` sit beside the shards.
- ``"tensors"``: a folder of ``*.npy`` / ``*.safetensors`` shards (or one file) holding
  ``(n, ...)`` arrays, e.g. protein coordinates ``(N, L, 3)`` or trajectories ``(N, T, D)``.
  ``.safetensors`` shards store the array as tensor ``"data"`` and the keys in their
  metadata (``"keys"``: JSON list); ``.npy`` shards take keys from a sibling
  ``<stem>.keys.json`` when present, else ``"<shard file>/<row:08d>"``. Floating arrays are
  in model units; ``uint8`` ``(n, C, H, W)`` arrays are images (normalised by the loaders).

- ``"npy"``: the anchors' stored-noise datasets: an EDM folder whose path ends in ``/npy``
  (or a version whose manifest says ``"npy"``) holding one ``.npy`` float array per sample
  (any depth, e.g. ``00000/img00000000.npy``), CHW, in model units (not normalised), and
  *already noisy at the sample's sigma_min* (``Dataset.stored_noisy``: training adds no
  nature noise, restoration starts from the sample without fresh noise). Read as tensor
  rows (:class:`NpyFolderDataset` is a ``TensorDataset``); each file is checked when read
  (no pickles or object arrays, float dtype, ``(C, H, W)`` of the first file's shape, finite
  values), errors name the file.

A *dataset version* written by :class:`~ambient_fast.data.DatasetWriter` is a folder with a
``manifest.json`` naming its format (for zip versions the folder holds ``dataset.zip``).

Everything a dataset supplies is untrusted: every key, member name and sidecar entry is
checked by :func:`~ambient_fast.data._io.safe_relative_path` and symlinks must resolve
inside the root; nothing here writes anywhere.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._io import (
    IMAGE_EXTENSIONS,
    ImageInfo,
    decode_image,
    file_ext,
    probe_image,
    safe_relative_path,
)
from .annotations import SIDECAR_NAME, join_annotations, parse_annotations
from .errors import BadSampleError, DatasetError, DatasetFormatError, UnsafePathError

__all__ = ["Dataset", "NpyFolderDataset", "Sample", "open_dataset", "size_problem", "MANIFEST_NAME", "INFO_NAME"]

MANIFEST_NAME = "manifest.json"
INFO_NAME = "dataset.json"
ZIP_VERSION_NAME = "dataset.zip"  # the archive inside a zip dataset version folder
TENSOR_EXTENSIONS = (".npy", ".safetensors")
MAX_MEMBER_BYTES = 1 << 30  # refuse single zip/tar members above 1 GiB (decompression bombs)
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


@dataclass
class Sample:
    """One sample as read from a dataset.

    Attributes:
        index: position in the dataset (0..N-1), the sample id used for seeds.
        key: stable key (path relative to the root, WebDataset key, or tensor key).
        array: images: uint8 ``(H, W, C)`` as decoded (C = the dataset's channels);
            tensors: the stored row, its own dtype and shape.
        sigma_min, sigma_max: the sample's annotation (float, >= 0).
        label: int class, float vector (``np.ndarray``), or None.
        caption: text caption (WebDataset ``.txt``) or None.
        metadata: parsed WebDataset ``.json`` component or None.
        extras: WebDataset components other than the image, raw bytes keyed by extension
            (``"txt"``, ``"json"``, ``"cls"``, ...); written back unchanged.
        data: image formats: the encoded file bytes (byte-for-byte pass-through).
    """

    index: int
    key: str
    array: np.ndarray | None
    sigma_min: float = 0.0
    sigma_max: float = 0.0
    label: int | np.ndarray | None = None
    caption: str | None = None
    metadata: dict | None = None
    extras: dict[str, bytes] = field(default_factory=dict)
    data: bytes | None = None


def size_problem(info: ImageInfo, resolution: tuple[int, int] | None, crop: bool) -> str | None:
    """Why an image of ``info``'s size cannot produce ``resolution`` (H, W), or None."""
    if resolution is None:
        return None
    height, width = resolution
    if crop and (info.height < height or info.width < width):
        return f"wrong size {info.height}x{info.width} (H x W): smaller than the crop {height}x{width}"
    if not crop and (info.height, info.width) != (height, width):
        return f"wrong size {info.height}x{info.width} (H x W): expected {height}x{width}"
    return None


# ----------------------------------------------------------------------------------------
# Byte sources: folder, zip, tar shards. Handles are opened lazily per process, so datasets
# pickle into DataLoader workers and DALI's parallel sources.


class _FolderSource:
    def __init__(self, root: Path):
        self.root = root

    def list_files(self) -> list[str]:
        names = []
        real_root = self.root.resolve()
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in filenames:
                if name.startswith("."):
                    continue
                rel = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
                path = Path(dirpath) / name
                if path.is_symlink():
                    real = path.resolve()
                    if real_root not in real.parents:
                        raise UnsafePathError(
                            f"dataset file {rel!r} is a symlink to {real}, outside the dataset root {real_root}"
                        )
                names.append(rel)
        return sorted(names)

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def read(self, name: str) -> bytes:
        with open(self.root / name, "rb") as f:
            return f.read()

    def describe(self, name: str) -> str:
        return str(self.root / name)


class _ZipSource:
    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()
        self._infos: dict[str, zipfile.ZipInfo] = {}
        try:
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
        except zipfile.BadZipFile as exc:
            raise DatasetFormatError(f"{path}: not a readable zip archive ({exc})") from None
        for info in infos:
            name = safe_relative_path(info.filename.rstrip("/") or info.filename, f"zip member of {path}:")
            if info.is_dir():
                continue
            if name in self._infos:
                raise DatasetFormatError(f"{path}: duplicate member {name!r}")
            if info.file_size > MAX_MEMBER_BYTES:
                raise DatasetFormatError(f"{path}:{name}: member of {info.file_size} bytes exceeds the 1 GiB limit")
            self._infos[name] = info

    def __getstate__(self):
        return {"path": self.path, "_infos": self._infos}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def _archive(self) -> zipfile.ZipFile:
        archive = getattr(self._local, "archive", None)
        if archive is None or getattr(self._local, "pid", None) != os.getpid():
            archive = zipfile.ZipFile(self.path)
            self._local.archive, self._local.pid = archive, os.getpid()
        return archive

    def list_files(self) -> list[str]:
        return sorted(n for n in self._infos if not n.rsplit("/", 1)[-1].startswith("."))

    def has(self, name: str) -> bool:
        return name in self._infos

    def read(self, name: str) -> bytes:
        try:
            return self._archive().read(self._infos[name])
        except (zipfile.BadZipFile, OSError, EOFError) as exc:  # CRC errors, truncated members
            raise BadSampleError(self.describe(name), f"cannot read zip member: {exc}") from None

    def describe(self, name: str) -> str:
        return f"{self.path}:{name}"


@dataclass(frozen=True)
class _Member:
    shard: int
    name: str
    offset: int
    size: int


class _TarShards:
    """Index of uncompressed tar shards: member name -> (shard, data offset, size)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        self.members: list[list[_Member]] = []
        self._local = threading.local()
        for shard, path in enumerate(self.paths):
            with open(path, "rb") as f:
                head = f.read(8)
            for magic, kind in _COMPRESSED_MAGIC.items():
                if head.startswith(magic):
                    raise DatasetFormatError(
                        f"{path}: {kind}-compressed tar; shards must be uncompressed tar files for random access"
                    )
            members = []
            try:
                with tarfile.open(path, mode="r:") as archive:
                    for info in archive:
                        name = safe_relative_path(info.name, f"tar member of {path}:")
                        if info.issym() or info.islnk():
                            raise UnsafePathError(
                                f"{path}:{name}: link member (to {info.linkname!r}); "
                                "shards must hold regular files only"
                            )
                        if not info.isfile():
                            continue
                        if info.size > MAX_MEMBER_BYTES:
                            raise DatasetFormatError(
                                f"{path}:{name}: member of {info.size} bytes exceeds the 1 GiB limit"
                            )
                        members.append(_Member(shard, name, info.offset_data, info.size))
            except tarfile.TarError as exc:
                raise DatasetFormatError(f"{path}: not a readable tar archive ({exc})") from None
            self.members.append(members)

    def __getstate__(self):
        return {"paths": self.paths, "members": self.members}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def _fd(self, shard: int) -> int:
        fds = getattr(self._local, "fds", None)
        if fds is None or getattr(self._local, "pid", None) != os.getpid():
            fds = self._local.fds = {}
            self._local.pid = os.getpid()
        if shard not in fds:
            fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return fds[shard]

    def read(self, member: _Member) -> bytes:
        data = os.pread(self._fd(member.shard), member.size, member.offset)
        if len(data) != member.size:
            raise BadSampleError(self.describe(member), f"tar member truncated ({len(data)} of {member.size} bytes)")
        return data

    def describe(self, member: _Member) -> str:
        return f"{self.paths[member.shard]}:{member.name}"


# ----------------------------------------------------------------------------------------
# Datasets.


def _parse_json(raw: bytes, where: str, kind: type, expected: str):
    """Decode UTF-8 JSON of type ``kind``, or one ``DatasetFormatError`` naming ``where``."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(value, kind):
        raise DatasetFormatError(f"{where}: expected {expected}")
    return value


def _parse_info(raw: bytes | None, where: str) -> dict:
    return {} if raw is None else _parse_json(raw, where, dict, "a JSON object")


def _parse_json_list(raw: bytes, where: str) -> list:
    return _parse_json(raw, where, list, "a JSON list of keys")


def _labels_from_info(info: dict, keys: Sequence[str], where: str) -> np.ndarray | None:
    """EDM ``dataset.json`` labels -> int64 ``(N,)`` or float32 ``(N, L)``, or None."""
    raw = info.get("labels")
    if raw is None:
        return None
    try:
        table = {safe_relative_path(name, f"{where} labels entry"): value for name, value in raw}
    except (TypeError, ValueError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetFormatError(f"{where}: 'labels' must be a list of [name, label] pairs") from None
    missing = [k for k in keys if k not in table]
    if missing:
        raise DatasetFormatError(f"{where}: no label for {len(missing)} sample(s), e.g. {missing[:5]}")
    values = [table[k] for k in keys]
    array = np.asarray(values)
    if array.ndim == 1 and np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64)
    if array.ndim == 2 and np.issubdtype(array.dtype, np.number):
        return array.astype(np.float32)
    raise DatasetFormatError(f"{where}: labels must be all ints or all equal-length number lists")


def _annotation_default(info: dict, where: str) -> tuple[float, float] | None:
    raw = info.get("annotation_default")
    if raw is None:
        return None
    try:
        lo, hi = float(raw["sigma_min"]), float(raw.get("sigma_max", 0.0))
    except (TypeError, KeyError, ValueError):
        raise DatasetFormatError(f"{where}: 'annotation_default' must be {{'sigma_min': x, 'sigma_max': y}}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0 and hi >= 0):
        raise DatasetFormatError(f"{where}: 'annotation_default' values must be finite and >= 0, got {raw}")
    return lo, hi


class Dataset:
    """A read-only dataset with per-sample annotations. Use :func:`open_dataset` to make one.

    Attributes:
        root: the path given (folder, ``.zip``, ``.tar``, or tensor file).
        format: ``"folder" | "zip" | "webdataset" | "tensors" | "npy"``.
        stored_noisy: True when samples are stored already noisy at their sigma_min
            (``"npy"``, the anchors' ``/npy`` datasets).
        keys: tuple of N stable sample keys (the sidecar's ``filename`` values).
        sigma_min, sigma_max: float64 ``(N,)`` annotation arrays.
        labels: int64 ``(N,)``, float32 ``(N, L)``, or None.
        sample_shape: images ``(C, H, W)`` of the first sample (EDM: all the same);
            tensors: the per-sample array shape.
        annotation_path: where the annotation came from (None: default, no sidecar).
        manifest: the version manifest (dict) when this is a written version, else None.
        info: parsed ``dataset.json`` (``{}`` when absent).
    """

    format: str
    is_image: bool
    stored_noisy: bool = False  # samples are stored already noisy at their sigma_min (format "npy")

    def __init__(self, root: Path, keys: list[str], info: dict, info_where: str):
        self.root = root
        self.info = info
        seen: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key in seen:
                raise DatasetFormatError(f"{root}: duplicate sample key {key!r} (samples {seen[key]} and {i})")
            seen[key] = i
        self.keys: tuple[str, ...] = tuple(keys)
        self._index = seen
        if not keys:
            raise DatasetFormatError(f"{root}: no samples found")
        self._labels = _labels_from_info(info, self.keys, info_where)
        self.manifest: dict | None = None
        self.annotation_path: str | None = None
        self.sigma_min = np.zeros(len(keys))
        self.sigma_max = np.zeros(len(keys))

    def _join(self, sidecar: bytes | None, where: str, default: tuple[float, float] | None) -> None:
        entries = None if sidecar is None else parse_annotations(sidecar, where)
        self.sigma_min, self.sigma_max = join_annotations(self.keys, entries, default=default, where=where)
        self.annotation_path = where if sidecar is not None else None

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        corrupt = int(np.count_nonzero(self.sigma_min > 0))
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, format={self.format!r}, n={len(self)}, "
            f"sample_shape={self.sample_shape}, sigma_min>0: {corrupt})"
        )

    @property
    def labels(self) -> np.ndarray | None:
        return self._labels

    def index_of(self, key: str) -> int:
        """Position of ``key`` (``KeyError`` naming it if absent)."""
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"{self.root}: no sample with key {key!r}") from None

    def _check_index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self.keys):
            raise IndexError(f"sample index {i} out of range for {len(self.keys)} samples")
        return i

    def _label(self, i: int) -> int | np.ndarray | None:
        labels = self.labels
        if labels is None:
            return None
        return int(labels[i]) if labels.ndim == 1 else labels[i]

    def describe(self, i: int) -> str:
        """Where sample ``i`` lives, for messages (a path or ``archive:member``)."""
        raise NotImplementedError

    def read(self, i: int) -> Sample:
        """Read sample ``i`` (see :class:`Sample`); bad images raise :class:`BadSampleError`."""
        raise NotImplementedError

    def caption(self, i: int) -> str | None:
        """Caption of sample ``i`` (WebDataset ``.txt``), None where the format has none."""
        return None

    @property
    def has_captions(self) -> bool:
        """Whether any sample has a caption."""
        return False


class ImageDataset(Dataset):
    """Folder, zip or WebDataset images. Adds :meth:`read_bytes`, :meth:`probe`, :meth:`scan`."""

    is_image = True

    def _finish_images(self) -> None:
        """Channels and shape from the first sample whose header reads (EDM: the first)."""
        first_error = None
        for i in range(len(self.keys)):
            try:
                info = self.probe(i)
                break
            except BadSampleError as exc:
                first_error = first_error or exc
        else:
            raise DatasetFormatError(f"{self.root}: no readable image among {len(self.keys)} samples ({first_error})")
        self.channels = info.channels
        self.sample_shape = (info.channels, info.height, info.width)

    def read_bytes(self, i: int) -> bytes:
        """The encoded image file of sample ``i``."""
        raise NotImplementedError

    def extras(self, i: int) -> dict[str, bytes]:
        """The members of sample ``i``'s key other than the image (WebDataset ``txt``, ``json``,
        ``cls``, unknown components), raw bytes by extension; ``{}`` for folders and zips."""
        return {}

    def probe(self, i: int) -> ImageInfo:
        """Header of sample ``i`` (size, channels), checking the file is complete."""
        return probe_image(self.read_bytes(i), self.describe(i))

    def decode(self, i: int, data: bytes | None = None) -> np.ndarray:
        """uint8 ``(H, W, C)`` pixels of sample ``i`` (C = ``self.channels``)."""
        if data is None:
            data = self.read_bytes(i)
        where = self.describe(i)
        probe_image(data, where)
        return decode_image(data, where, self.channels)

    def scan(
        self,
        level: str = "quick",
        *,
        resolution: int | tuple[int, int] | None = None,
        crop: bool = True,
        indices: Sequence[int] | None = None,
        num_threads: int = 4,
    ) -> dict[int, BadSampleError]:
        """Find bad samples without stopping at the first: ``{index: BadSampleError}``
        (each with ``.where``, the path, and ``.reason``).

        Args:
            level: ``"quick"`` reads headers and end markers (catches truncation, wrong
                size, non-images); ``"decode"`` also decodes every image with PIL.
            resolution: the size the pipeline produces (int or ``(H, W)``); default: the
                first sample's size, i.e. EDM's "all images the same size" rule.
            crop: images larger than ``resolution`` are fine (they get cropped).
            indices: which samples (default all).
        """
        if level not in ("quick", "decode"):
            raise ValueError(f"level must be 'quick' or 'decode', got {level!r}")
        hw = _as_hw(resolution) if resolution is not None else self.sample_shape[1:]
        crop = crop if resolution is not None else False
        todo = range(len(self)) if indices is None else [self._check_index(i) for i in indices]

        def check(i: int) -> BadSampleError | None:
            try:
                data = self.read_bytes(i)
                info = probe_image(data, self.describe(i))
                problem = size_problem(info, hw, crop)
                if problem:
                    return BadSampleError(self.describe(i), problem)
                if level == "decode":
                    decode_image(data, self.describe(i), self.channels)
            except BadSampleError as exc:
                return exc
            return None

        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            results = pool.map(check, todo)
            return {i: r for i, r in zip(todo, results, strict=True) if r is not None}


def _as_hw(resolution: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(resolution, (int, np.integer)):
        return int(resolution), int(resolution)
    h, w = resolution
    return int(h), int(w)


class FileImageDataset(ImageDataset):
    """EDM folder or zip of images (``format`` ``"folder"`` or ``"zip"``)."""

    def __init__(
        self, root: Path, source: _FolderSource | _ZipSource, fmt: str, *, sidecar_override: Path | None, default
    ):
        self.format = fmt
        self._source = source
        names = source.list_files()
        keys = [n for n in names if file_ext(n) in IMAGE_EXTENSIONS]
        info_raw = source.read(INFO_NAME) if source.has(INFO_NAME) else None
        info_where = source.describe(INFO_NAME)
        super().__init__(root, keys, _parse_info(info_raw, info_where), info_where)
        if sidecar_override is not None:
            sidecar, where = sidecar_override.read_bytes(), str(sidecar_override)
        elif source.has(SIDECAR_NAME):
            sidecar, where = source.read(SIDECAR_NAME), source.describe(SIDECAR_NAME)
        else:
            sidecar, where = None, source.describe(SIDECAR_NAME)
        self._join(sidecar, where, default if default is not None else _annotation_default(self.info, info_where))
        self._finish_images()

    def describe(self, i: int) -> str:
        return self._source.describe(self.keys[i])

    def read_bytes(self, i: int) -> bytes:
        return self._source.read(self.keys[self._check_index(i)])

    def read(self, i: int) -> Sample:
        i = self._check_index(i)
        data = self.read_bytes(i)
        return Sample(
            index=i,
            key=self.keys[i],
            array=self.decode(i, data),
            sigma_min=float(self.sigma_min[i]),
            sigma_max=float(self.sigma_max[i]),
            label=self._label(i),
            data=data,
        )


class WebDataset(ImageDataset):
    """WebDataset tar shards (``format == "webdataset"``)."""

    format = "webdataset"

    def __init__(self, root: Path, shard_paths: list[Path], *, sidecar_override: Path | None, default):
        self.shards = _TarShards(shard_paths)
        self.shard_paths = list(shard_paths)
        keys: list[str] = []
        self._image: list[_Member] = []
        self._components: list[dict[str, _Member]] = []
        owner: dict[str, str] = {}
        for members in self.shards.members:
            current: str | None = None
            for m in members:
                directory, _, base = m.name.rpartition("/")
                if base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = f"{directory}/{stem}" if directory else stem
                if key != current:
                    if key in owner:
                        raise DatasetFormatError(
                            f"duplicate WebDataset key {key!r}: in {owner[key]} and {self.shards.describe(m)} "
                            "(keys must be unique and each sample's members contiguous)"
                        )
                    owner[key] = self.shards.describe(m)
                    current = key
                    keys.append(key)
                    self._components.append({})
                components = self._components[-1]
                if ext in components:
                    raise DatasetFormatError(f"{self.shards.describe(m)}: second {ext!r} component for key {key!r}")
                components[ext] = m
        for key, components in zip(keys, self._components, strict=True):
            images = [e for e in components if "." + e.lower() in IMAGE_EXTENSIONS]
            if len(images) != 1:
                where = self.shards.paths[next(iter(components.values())).shard]
                raise DatasetFormatError(
                    f"{where}: sample {key!r} has {len(images)} image components {images} "
                    f"(need exactly one of {IMAGE_EXTENSIONS}); components: {sorted(components)}"
                )
            self._image.append(components.pop(images[0]))
        info_path = root / INFO_NAME if root.is_dir() else None
        info_raw = info_path.read_bytes() if info_path is not None and info_path.is_file() else None
        info_where = str(info_path or root)
        super().__init__(root, keys, _parse_info(info_raw, info_where), info_where)
        self._cls_labels: np.ndarray | None = None
        sidecar_path = sidecar_override or (root / SIDECAR_NAME if root.is_dir() else None)
        sidecar = sidecar_path.read_bytes() if sidecar_path is not None and sidecar_path.is_file() else None
        self._join(
            sidecar,
            str(sidecar_path or root),
            default if default is not None else _annotation_default(self.info, info_where),
        )
        self._finish_images()

    @property
    def labels(self) -> np.ndarray | None:
        """``dataset.json`` labels, else the ``.cls`` components (int64, all samples)."""
        if self._labels is not None:
            return self._labels
        if self._cls_labels is None and all("cls" in c for c in self._components):
            values = []
            for _i, c in enumerate(self._components):
                text = self.shards.read(c["cls"]).decode("utf-8", "replace").strip()
                try:
                    values.append(int(text))
                except ValueError:
                    raise DatasetFormatError(
                        f"{self.shards.describe(c['cls'])}: class label {text!r} is not an int"
                    ) from None
            self._cls_labels = np.asarray(values, dtype=np.int64)
        return self._cls_labels

    def describe(self, i: int) -> str:
        return self.shards.describe(self._image[i])

    def read_bytes(self, i: int) -> bytes:
        return self.shards.read(self._image[self._check_index(i)])

    def extras(self, i: int) -> dict[str, bytes]:
        return {ext: self.shards.read(m) for ext, m in self._components[self._check_index(i)].items()}

    def image_member(self, i: int) -> tuple[int, str, int, int]:
        """``(shard, member name, data offset, size)`` of sample ``i``'s image."""
        m = self._image[i]
        return m.shard, m.name, m.offset, m.size

    @property
    def has_captions(self) -> bool:
        return any("txt" in c for c in self._components)

    def caption(self, i: int) -> str | None:
        member = self._components[self._check_index(i)].get("txt")
        if member is None:
            return None
        try:
            return self.shards.read(member).decode("utf-8")
        except UnicodeDecodeError:
            raise DatasetFormatError(f"{self.shards.describe(member)}: caption is not UTF-8 text") from None

    def read(self, i: int) -> Sample:
        i = self._check_index(i)
        data = self.read_bytes(i)
        extras = {ext: self.shards.read(m) for ext, m in self._components[i].items()}
        metadata = None
        if "json" in extras:
            try:
                metadata = json.loads(extras["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DatasetFormatError(
                    f"{self.shards.describe(self._components[i]['json'])}: invalid JSON ({exc})"
                ) from None
        return Sample(
            index=i,
            key=self.keys[i],
            array=self.decode(i, data),
            sigma_min=float(self.sigma_min[i]),
            sigma_max=float(self.sigma_max[i]),
            label=self._label(i),
            caption=self.caption(i),
            metadata=metadata,
            extras=extras,
            data=data,
        )


class TensorDataset(Dataset):
    """``.npy`` / ``.safetensors`` shards (``format == "tensors"``)."""

    format = "tensors"
    is_image = False

    def __init__(self, root: Path, shard_paths: list[Path], *, sidecar_override: Path | None, default):
        self.shard_paths = list(shard_paths)
        self._arrays: list[np.ndarray] = []
        keys: list[str] = []
        self._rows: list[tuple[int, int]] = []
        for shard, path in enumerate(self.shard_paths):
            array, shard_keys = self._load_shard(path)
            if self._arrays and (array.shape[1:] != self._arrays[0].shape[1:] or array.dtype != self._arrays[0].dtype):
                raise DatasetFormatError(
                    f"{path}: rows of shape {array.shape[1:]} {array.dtype} differ from "
                    f"{self.shard_paths[0]}'s {self._arrays[0].shape[1:]} {self._arrays[0].dtype}"
                )
            self._arrays.append(array)
            keys.extend(shard_keys)
            self._rows.extend((shard, row) for row in range(array.shape[0]))
        info_path = root / INFO_NAME if root.is_dir() else None
        info_raw = info_path.read_bytes() if info_path is not None and info_path.is_file() else None
        info_where = str(info_path or root)
        super().__init__(root, keys, _parse_info(info_raw, info_where), info_where)
        sidecar_path = sidecar_override or (root / SIDECAR_NAME if root.is_dir() else None)
        sidecar = sidecar_path.read_bytes() if sidecar_path is not None and sidecar_path.is_file() else None
        self._join(
            sidecar,
            str(sidecar_path or root),
            default if default is not None else _annotation_default(self.info, info_where),
        )
        self.sample_shape = tuple(self._arrays[0].shape[1:])
        self.dtype = self._arrays[0].dtype

    @staticmethod
    def _load_shard(path: Path) -> tuple[np.ndarray, list[str]]:
        where = str(path)
        if path.suffix == ".npy":
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise DatasetFormatError(f"{where}: cannot read .npy ({exc})") from None
            keys_path = path.with_name(path.stem + ".keys.json")
            keys_where = str(keys_path)
            raw_keys = _parse_json_list(keys_path.read_bytes(), keys_where) if keys_path.is_file() else None
        else:
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="np") as f:
                    if "data" not in f.keys():
                        raise DatasetFormatError(f"{where}: no tensor named 'data' (found {list(f.keys())})")
                    array = f.get_tensor("data")
                    meta = f.metadata() or {}
            except SafetensorError as exc:
                raise DatasetFormatError(f"{where}: cannot read .safetensors ({exc})") from None
            keys_where = f"{where} metadata 'keys'"
            raw_keys = _parse_json_list(meta["keys"].encode("utf-8"), keys_where) if "keys" in meta else None
        if array.ndim < 1:
            raise DatasetFormatError(f"{where}: expected an (n, ...) array, got a scalar")
        if array.dtype.kind not in "fiub":
            raise DatasetFormatError(f"{where}: unsupported dtype {array.dtype}")
        if raw_keys is None:
            keys = [f"{path.name}/{row:08d}" for row in range(array.shape[0])]
        else:
            if not isinstance(raw_keys, list) or len(raw_keys) != array.shape[0]:
                raise DatasetFormatError(f"{keys_where}: expected a list of {array.shape[0]} keys")
            keys = [safe_relative_path(k, f"{keys_where} entry") for k in raw_keys]
        return array, keys

    def describe(self, i: int) -> str:
        shard, row = self._rows[i]
        return f"{self.shard_paths[shard]}[{row}]"

    def row(self, i: int) -> np.ndarray:
        """Sample ``i``'s stored array (a copy, its own dtype and shape)."""
        shard, row = self._rows[self._check_index(i)]
        return np.array(self._arrays[shard][row])

    def rows(self, indices: Sequence[int]) -> np.ndarray:
        """Stacked rows ``(len(indices), *sample_shape)`` in the stored dtype."""
        return (
            np.stack([self.row(i) for i in indices]) if len(indices) else np.empty((0, *self.sample_shape), self.dtype)
        )

    def read(self, i: int) -> Sample:
        i = self._check_index(i)
        return Sample(
            index=i,
            key=self.keys[i],
            array=self.row(i),
            sigma_min=float(self.sigma_min[i]),
            sigma_max=float(self.sigma_max[i]),
            label=self._label(i),
        )


def _load_npy_sample(data: bytes, where: str) -> np.ndarray:
    """One stored-noise sample: a float ``(C, H, W)`` array with finite values, or BadSampleError."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # pickles and object arrays are refused here
        raise BadSampleError(where, f"not a plain .npy array ({exc})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
        raise BadSampleError(where, f"expected a float array, got {getattr(array, 'dtype', type(array).__name__)}")
    if array.ndim != 3:
        raise BadSampleError(where, f"expected a (C, H, W) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise BadSampleError(where, f"{int(np.count_nonzero(~np.isfinite(array)))} non-finite values")
    return array


class NpyFolderDataset(TensorDataset):
    """The anchors' ``/npy`` folders: one float ``(C, H, W)`` ``.npy`` per sample, stored noisy (``format == "npy"``).

    Keys are the ``.npy`` paths relative to the root, sorted (EDM's order); ``dataset.json``
    and ``annotations.jsonl`` sit at the root. ``row(i)`` reads and checks file ``i``
    (:class:`BadSampleError` naming it); all samples must share the first one's shape and
    dtype. Samples are in model units and already noisy at their ``sigma_min``
    (``stored_noisy``), as the anchors' ``train.py`` / ``restore.py`` treat a path ending in
    ``/npy`` (``normalize=False``, no noise added).
    """

    format = "npy"
    stored_noisy = True

    def __init__(self, root: Path, *, sidecar_override: Path | None, default):
        self._source = _FolderSource(root)
        keys = [n for n in self._source.list_files() if file_ext(n) == ".npy"]
        info_where = self._source.describe(INFO_NAME)
        info_raw = self._source.read(INFO_NAME) if self._source.has(INFO_NAME) else None
        Dataset.__init__(self, root, keys, _parse_info(info_raw, info_where), info_where)
        if sidecar_override is not None:
            sidecar, where = sidecar_override.read_bytes(), str(sidecar_override)
        elif self._source.has(SIDECAR_NAME):
            sidecar, where = self._source.read(SIDECAR_NAME), self._source.describe(SIDECAR_NAME)
        else:
            sidecar, where = None, self._source.describe(SIDECAR_NAME)
        self._join(sidecar, where, default if default is not None else _annotation_default(self.info, info_where))
        try:
            first = _load_npy_sample(self._source.read(self.keys[0]), self.describe(0))
        except BadSampleError as exc:
            raise DatasetFormatError(f"{root}: the first sample sets the dataset's shape and dtype: {exc}") from None
        self.sample_shape, self.dtype = tuple(first.shape), first.dtype

    def describe(self, i: int) -> str:
        return self._source.describe(self.keys[i])

    def row(self, i: int) -> np.ndarray:
        """Sample ``i``'s stored array ``(C, H, W)`` in its float dtype, checked (see the class)."""
        i = self._check_index(i)
        where = self.describe(i)
        array = _load_npy_sample(self._source.read(self.keys[i]), where)
        if array.shape != self.sample_shape or array.dtype != self.dtype:
            raise BadSampleError(
                where, f"array {array.shape} {array.dtype} differs from the dataset's {self.sample_shape} {self.dtype}"
            )
        return array


def _shards(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    return sorted(
        p for p in root.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
    )


def _detect(root: Path) -> str:
    if root.is_file():
        suffix = root.suffix.lower()
        if suffix == ".zip":
            return "zip"
        if suffix == ".tar":
            return "webdataset"
        if suffix in TENSOR_EXTENSIONS:
            return "tensors"
        raise DatasetFormatError(
            f"{root}: unknown dataset file type {suffix!r} (expected .zip, .tar, .npy, .safetensors)"
        )
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        fmt = _parse_info(manifest.read_bytes(), str(manifest)).get("format")
        if fmt not in ("folder", "zip", "webdataset", "tensors", "npy"):
            raise DatasetFormatError(f"{manifest}: unknown format {fmt!r}")
        return fmt
    if root.name == "npy":  # the anchors' convention: a path ending in /npy holds stored-noise arrays
        return "npy"
    if _shards(root, (".tar",)):
        return "webdataset"
    if _shards(root, TENSOR_EXTENSIONS):
        return "tensors"
    return "folder"


def open_dataset(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    annotations: str | os.PathLike | None = None,
    default_sigma_min: float | None = None,
    default_sigma_max: float = 0.0,
) -> Dataset:
    """Open a dataset read-only, auto-detecting its format, and join its annotation.

    Args:
        path: a folder (images, tar shards, tensor shards, or a written version), a
            ``.zip``, a ``.tar`` shard, or a ``.npy`` / ``.safetensors`` file.
        format: force ``"folder" | "zip" | "webdataset" | "tensors" | "npy"``.
        annotations: a sidecar to use instead of the dataset's own ``annotations.jsonl``.
        default_sigma_min, default_sigma_max: per-dataset default for samples the sidecar
            does not list (overrides ``dataset.json`` ``annotation_default``). Without any
            default, a sidecar that misses samples is refused; without a sidecar every
            sample takes the default, or is clean (0, 0).

    Returns:
        A :class:`Dataset` (``ImageDataset`` subclasses for image formats,
        ``TensorDataset`` for tensors): ``len``, ``keys``, ``sigma_min``/``sigma_max``
        (float64), ``labels``, ``read(i)``.

    Raises:
        DatasetFormatError, AnnotationError, UnsafePathError (all ``DatasetError``).
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"dataset not found: {root}")
    fmt = format or _detect(root)
    sidecar = Path(annotations) if annotations is not None else None
    default = None if default_sigma_min is None else (float(default_sigma_min), float(default_sigma_max))
    if root.is_dir() and (root / ".chunks").is_dir() and not (root / MANIFEST_NAME).is_file():
        raise DatasetError(f"{root}: an unfinished dataset version (being written, or crashed: resume its writer)")
    manifest = None
    if root.is_dir() and (root / MANIFEST_NAME).is_file():
        manifest = _parse_info((root / MANIFEST_NAME).read_bytes(), str(root / MANIFEST_NAME))
    if fmt == "folder":
        if not root.is_dir():
            raise DatasetFormatError(f"{root}: format 'folder' needs a directory")
        dataset: Dataset = FileImageDataset(
            root, _FolderSource(root), "folder", sidecar_override=sidecar, default=default
        )
    elif fmt == "zip":
        archive = root / ZIP_VERSION_NAME if root.is_dir() else root
        if not archive.is_file():
            raise DatasetFormatError(
                f"{root}: format 'zip' needs a .zip file or a version folder holding {ZIP_VERSION_NAME}"
            )
        dataset = FileImageDataset(root, _ZipSource(archive), "zip", sidecar_override=sidecar, default=default)
    elif fmt == "webdataset":
        shards = [root] if root.is_file() else _shards(root, (".tar",))
        if not shards:
            raise DatasetFormatError(f"{root}: no .tar shards found")
        dataset = WebDataset(root, shards, sidecar_override=sidecar, default=default)
    elif fmt == "tensors":
        shards = [root] if root.is_file() else _shards(root, TENSOR_EXTENSIONS)
        if not shards:
            raise DatasetFormatError(f"{root}: no .npy or .safetensors shards found")
        dataset = TensorDataset(root, shards, sidecar_override=sidecar, default=default)
    elif fmt == "npy":
        if not root.is_dir():
            raise DatasetFormatError(f"{root}: format 'npy' needs a directory of per-sample .npy files")
        dataset = NpyFolderDataset(root, sidecar_override=sidecar, default=default)
    else:
        raise ValueError(f"format must be 'folder', 'zip', 'webdataset', 'tensors' or 'npy', got {format!r}")
    dataset.manifest = manifest
    return dataset
