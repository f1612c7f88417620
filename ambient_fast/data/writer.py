"""Writing dataset versions (SPEC 5 and 6): chunk by chunk, atomically, never over a source.

A *version* is a new folder (``root``) in one of the four formats of
:mod:`ambient_fast.data.dataset`, with its own ``annotations.jsonl``, a ``dataset.json``
(labels, EDM style) and a ``manifest.json``::

    {"kind": "ambient_fast.dataset_version", "manifest_version": 1,
     "format": "folder", "created": "2026-11-22T...Z", "creator": "ambient_fast.data.corrupt",
     "parent": {"path": ".../digits-8x8", "format": "folder", "samples": 1797,
                "manifest_sha256": "...", "annotation_sha256": "..."},
     "params": {...creation parameters...},
     "counts": {"samples": 1797, "chunks": 2, "sigma_min_positive": 1745},
     "files": {"00000/img00000000.png": {"sha256": "...", "bytes": 190}, ...},
     ...extra sections, e.g. "corruption": {...}}

Layout per format (``k`` = chunk number):

- ``folder``: ``root/<key>`` image files (a sample's encoded ``data`` is stored as given;
  an ``array`` is encoded by the key's extension: PNG, JPEG or WebP).
- ``zip``: ``root/dataset.zip`` (images + ``dataset.json`` + ``annotations.jsonl``, stored
  uncompressed like EDM's zips) and ``root/manifest.json``; chunks are staged as
  ``.chunks/chunk-k.zip`` and merged at :meth:`DatasetWriter.close`.
- ``webdataset``: ``root/{k:06d}.tar``, one shard per chunk (image, then the sample's
  extras: ``txt`` caption, ``json`` metadata, ``cls`` label, any other component, bytes
  unchanged). Tar headers are deterministic (mtime 0, uid/gid 0, mode 0644, ustar).
- ``tensors``: ``root/part-{k:06d}.safetensors`` (tensor ``"data"``, keys in metadata), or
  ``.npy`` + ``part-k.keys.json`` with ``tensor_container="npy"``.
- ``npy``: ``root/<key>.npy``, one float ``(C, H, W)`` array per sample (the anchors'
  stored-noise ``/npy`` folders; samples are taken as already noisy at their sigma_min).

Atomicity and resumption: every file is written to a temporary name in its destination
folder, fsynced and renamed; a chunk is *committed* when its record
``.chunks/chunk-k.json`` (keys, annotations, labels, checksums) is renamed into place.
A crashed writer reopened with ``resume=True`` keeps the committed chunks
(:attr:`DatasetWriter.completed_keys`, :attr:`DatasetWriter.committed`) and overwrites
anything uncommitted. Chunks may be written with explicit numbers, out of order, by several
processes into one version (each opens it with ``resume=True``; one calls ``close``, which
re-reads every committed record), and carry a ``note`` (e.g. the digest of the source bytes
they came from): this is the restoration engine's journal. The manifest is written last: a
folder with a ``manifest.json`` is a complete version.

Safety: ``root`` must be new (or an unfinished version when resuming) and may not lie
inside or around the parent dataset; every key passes the path check, so no key can write
outside ``root``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ._io import (
    CODEC_EXTENSION,
    IMAGE_EXTENSIONS,
    atomic_write_bytes,
    atomic_writer,
    encode_image,
    file_ext,
    probe_image,
    safe_relative_path,
    sha256_bytes,
    sha256_file,
    sync_filesystem,
)
from .annotations import SIDECAR_NAME, format_annotations
from .dataset import INFO_NAME, MANIFEST_NAME, ZIP_VERSION_NAME, Dataset, Sample
from .errors import DatasetError, DatasetFormatError

__all__ = ["DatasetWriter", "verify_version", "write_dataset", "parent_record", "FORMATS", "MANIFEST_KIND"]

log = logging.getLogger("ambient_fast.data")

FORMATS = ("folder", "zip", "webdataset", "tensors", "npy")
STAGING = ".chunks"
MANIFEST_KIND = "ambient_fast.dataset_version"
_TAR_FORMAT = tarfile.USTAR_FORMAT  # the plainest tar dialect: every WebDataset reader (DALI's too) takes it


def _json_bytes(obj: object, where: str) -> bytes:
    try:
        return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: not JSON-serialisable ({exc})") from None


def _label_json(label) -> int | list | None:
    if label is None:
        return None
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        return int(label)
    return [float(v) for v in np.asarray(label, dtype=np.float64).ravel()]


def _is_inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


class DatasetWriter:
    """Write a new dataset version chunk by chunk (see the module docstring for layouts).

    Args:
        root: the new version's folder (must not exist, or be empty; or be an unfinished
            version of the same format when ``resume=True``).
        format: ``"folder" | "zip" | "webdataset" | "tensors"``.
        parent: the dataset this version derives from (recorded in the manifest; ``root``
            may not be inside it or contain it).
        creator: who wrote it (e.g. ``"ambient_fast.data.corrupt"``).
        params: creation parameters (JSON-serialisable), recorded in the manifest.
        image_ext: extension for image keys that have none (``".png"`` or ``".jpg"``).
        jpeg_quality: quality for JPEG-encoded keys.
        tensor_container: ``"safetensors"`` (default) or ``"npy"`` for the tensors format.
        resume: continue an unfinished version.
        num_threads: image-encoding threads per chunk.

    Usage::

        with DatasetWriter(dest, "folder", parent=source, params={...}) as writer:
            for chunk in chunks:
                if not writer.completed_keys.issuperset(s.key for s in chunk):
                    writer.write_chunk(chunk)      # atomic: all of it or none of it
        # leaving the block without an exception calls close(): sidecar, dataset.json, manifest
    """

    def __init__(
        self,
        root: str | os.PathLike,
        format: str,
        *,
        parent: Dataset | None = None,
        creator: str = "ambient_fast.data",
        params: dict | None = None,
        image_ext: str = ".png",
        jpeg_quality: int = 95,
        tensor_container: str = "safetensors",
        resume: bool = False,
        num_threads: int = 4,
    ):
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        if image_ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"image_ext must be one of {IMAGE_EXTENSIONS}, got {image_ext!r}")
        if tensor_container not in ("safetensors", "npy"):
            raise ValueError(f"tensor_container must be 'safetensors' or 'npy', got {tensor_container!r}")
        self.root = Path(root)
        self.format = format
        self.parent = parent
        self.creator = creator
        self.params = dict(params or {})
        _json_bytes(self.params, "params")
        self.image_ext = image_ext
        self.jpeg_quality = int(jpeg_quality)
        self.tensor_container = tensor_container
        self.num_threads = max(1, int(num_threads))
        self._closed = False
        self._check_destination(resume)
        self._staging = self.root / STAGING
        self._staging.mkdir(parents=True, exist_ok=True)
        self._parent_record = parent_record(parent)
        config_path = self._staging / "writer.json"
        config = {"format": format, "creator": creator, "params": self.params, "parent": self._parent_record}
        if config_path.is_file():  # resuming: the version keeps the settings it was started with
            stored = json.loads(config_path.read_text("utf-8"))
            if stored["format"] != format:
                raise DatasetError(f"{self.root}: started as {stored['format']!r}, cannot resume as {format!r}")
            if params and stored["params"] != self.params:
                raise DatasetError(
                    f"{self.root}: resuming with params {self.params}, "
                    f"but the version was started with {stored['params']}"
                )
            self.params, self.creator = stored["params"], stored["creator"]
            self._parent_record = self._parent_record or stored["parent"]
        else:
            atomic_write_bytes(config_path, _json_bytes(config, "writer config"))
        self._tensor_layout: tuple | None = None
        self.reload()

    @staticmethod
    def stored_params(root: str | os.PathLike) -> dict | None:
        """The ``params`` an unfinished version at ``root`` was started with (None: no such version)."""
        path = Path(root) / STAGING / "writer.json"
        if not path.is_file():
            return None
        return json.loads(path.read_text("utf-8"))["params"]

    def reload(self) -> None:
        """Re-read the committed chunk records from disk (chunks other processes wrote into
        the same version, e.g. the other ranks of a ``torchrun`` job)."""
        self._records = {}
        for path in sorted(self._staging.glob("chunk-*.json")):
            record = json.loads(path.read_text("utf-8"))
            if record.get("format") != self.format:
                raise DatasetError(f"{path}: chunk of format {record.get('format')!r}, resuming as {self.format!r}")
            self._records[int(record["chunk"])] = record
        self.completed_keys: set[str] = {s["key"] for r in self._records.values() for s in r["samples"]}
        for record in self._records.values():
            if "row_shape" in record:
                self._tensor_layout = (tuple(record["row_shape"]), record["dtype"])

    @property
    def committed(self) -> dict[int, dict]:
        """``{chunk number: its record}`` of the committed chunks (see :meth:`write_chunk`)."""
        return dict(self._records)

    # -- destination checks ---------------------------------------------------------------

    def _check_destination(self, resume: bool) -> None:
        root = self.root.resolve()
        if self.parent is not None:
            source = Path(self.parent.root).resolve()
            if _is_inside(root, source) or _is_inside(source, root):
                raise DatasetError(f"refusing to write version {root} inside or around its source dataset {source}")
        if (self.root / MANIFEST_NAME).exists():
            raise DatasetError(
                f"{self.root} already holds a complete dataset version (manifest.json); refusing to overwrite it"
            )
        if self.root.exists():
            if not self.root.is_dir():
                raise DatasetError(f"{self.root} exists and is not a folder")
            entries = [p.name for p in self.root.iterdir()]
            if entries and not resume:
                raise DatasetError(
                    f"{self.root} is not empty ({len(entries)} entries, e.g. {sorted(entries)[:3]}); "
                    "versions go to new folders (pass resume=True to continue an unfinished one)"
                )
            if entries and resume and STAGING not in entries:
                raise DatasetError(f"{self.root}: nothing to resume (no {STAGING}/ folder) and the folder is not empty")
        self.root.mkdir(parents=True, exist_ok=True)

    # -- chunks ---------------------------------------------------------------------------

    def output_key(self, key: str) -> str:
        """The key a sample written as ``key`` gets in this version (validated; folder/zip
        keys without an image extension get ``image_ext``)."""
        key = safe_relative_path(key, "sample key")
        if self.format in ("folder", "zip"):
            if key in (INFO_NAME, SIDECAR_NAME, MANIFEST_NAME) or key.startswith(STAGING + "/"):
                raise DatasetError(f"sample key {key!r} collides with a reserved file name")
            if any(part.startswith(".") for part in key.split("/")):
                raise DatasetError(f"sample key {key!r}: hidden names (leading '.') are not allowed")
            return key if file_ext(key) in IMAGE_EXTENSIONS else key + self.image_ext
        if self.format == "npy":
            if key in (INFO_NAME, SIDECAR_NAME, MANIFEST_NAME) or any(part.startswith(".") for part in key.split("/")):
                raise DatasetError(f"sample key {key!r}: a reserved or hidden name")
            return key if file_ext(key) == ".npy" else key + ".npy"
        if self.format == "webdataset":
            base = key.rsplit("/", 1)[-1]
            if "." in base or base.startswith("."):
                raise DatasetError(f"sample key {key!r}: WebDataset keys may not contain '.' in their last component")
        return key

    def _image_bytes(self, sample: Sample, ext: str) -> bytes:
        """Encoded bytes: the sample's own ``data`` as given (checked to be a complete image;
        never re-encoded), else ``array`` encoded for ``ext``."""
        if sample.data is not None:
            probe_image(sample.data, f"sample {sample.key!r}")
            return sample.data
        if sample.array is None:
            raise DatasetError(f"sample {sample.key!r}: no image array or bytes to write")
        return encode_image(sample.array, ext, jpeg_quality=self.jpeg_quality)

    def write_chunk(self, samples: Sequence[Sample], *, chunk: int | None = None, note: dict | None = None) -> int:
        """Write one chunk atomically and commit it; returns its chunk number.

        Each :class:`~ambient_fast.data.Sample` needs ``key``, ``sigma_min`` (>= 0),
        ``sigma_max``, and the payload: image formats take ``data`` (encoded PNG/JPEG/WebP
        bytes, stored as given) or ``array`` (uint8 ``(H, W[, C])``, encoded by the key's
        extension); tensors take ``array`` (all rows of one shape and dtype). Labels,
        captions, metadata and ``extras`` are kept. Keys must be new to this version.

        Args:
            chunk: the chunk number (default: one past the last committed). Chunks are
                ordered by number in the version, whatever order they are written in, so
                several processes may write disjoint numbers into one version concurrently
                (then one of them calls :meth:`reload` and :meth:`close`). With an explicit
                number, ``samples`` may be empty (a chunk whose samples were all dropped).
            note: JSON-serialisable fields kept in the chunk's record (e.g. a checksum of
                the source bytes it came from); read back with :attr:`committed`.
        """
        if self._closed:
            raise DatasetError(f"{self.root}: writer already closed")
        if not samples and chunk is None:
            raise ValueError("write_chunk needs at least one sample")
        if chunk is None:
            chunk = max(self._records, default=-1) + 1
        elif chunk in self._records or (self._staging / f"chunk-{chunk:06d}.json").exists():
            raise DatasetError(f"{self.root}: chunk {chunk} is already committed")
        keys = [self.output_key(s.key) for s in samples]
        seen: set[str] = set()
        for key in keys:
            if key in self.completed_keys or key in seen:
                raise DatasetError(f"{self.root}: sample key {key!r} written twice")
            seen.add(key)
        # Validate the levels before anything is written (refuses negative / NaN values).
        format_annotations(keys, [s.sigma_min for s in samples], [s.sigma_max for s in samples])
        files = getattr(self, f"_write_{self.format}")(chunk, keys, samples) if samples else {}
        record = {
            "chunk": chunk,
            "format": self.format,
            "samples": [
                {
                    "key": key,
                    "source_key": s.key,
                    "sigma_min": float(s.sigma_min),
                    "sigma_max": float(s.sigma_max),
                    "label": _label_json(s.label),
                }
                for key, s in zip(keys, samples, strict=True)
            ],
            "files": files,
            "note": dict(note or {}),
        }
        if self.format in ("tensors", "npy") and samples:
            record["row_shape"], record["dtype"] = list(self._tensor_layout[0]), self._tensor_layout[1]
        atomic_write_bytes(self._staging / f"chunk-{chunk:06d}.json", _json_bytes(record, "chunk record"))
        self._records[chunk] = record
        self.completed_keys.update(keys)
        return chunk

    def _encode_all(self, keys: Sequence[str], samples: Sequence[Sample], exts: Sequence[str]) -> list[bytes]:
        jobs = list(zip(samples, exts, strict=True))
        if len(jobs) < 32 or self.num_threads == 1:
            return [self._image_bytes(s, e) for s, e in jobs]
        with ThreadPoolExecutor(self.num_threads) as pool:
            return list(pool.map(lambda job: self._image_bytes(*job), jobs))

    def _write_folder(self, chunk: int, keys: list[str], samples: Sequence[Sample]) -> dict:
        payloads = self._encode_all(keys, samples, [file_ext(k) for k in keys])
        files = {}
        for key, data in zip(keys, payloads, strict=True):
            atomic_write_bytes(self.root / key, data, durable=False)
            files[key] = {"sha256": sha256_bytes(data), "bytes": len(data)}
        sync_filesystem(self.root)  # one flush for the chunk, before its record commits it
        return files

    def _write_zip(self, chunk: int, keys: list[str], samples: Sequence[Sample]) -> dict:
        payloads = self._encode_all(keys, samples, [file_ext(k) for k in keys])
        files = {}
        with atomic_writer(self._staging / f"chunk-{chunk:06d}.zip") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive:
                for key, data in zip(keys, payloads, strict=True):
                    archive.writestr(zipfile.ZipInfo(key, date_time=(1980, 1, 1, 0, 0, 0)), data)
                    files[key] = {"sha256": sha256_bytes(data), "bytes": len(data)}
        return files

    def _write_webdataset(self, chunk: int, keys: list[str], samples: Sequence[Sample]) -> dict:
        exts = []
        for s in samples:
            ext = self.image_ext
            if s.data is not None:
                ext = CODEC_EXTENSION[probe_image(s.data, f"sample {s.key!r}").codec]
            exts.append(ext)
        payloads = self._encode_all(keys, samples, exts)
        name = f"{chunk:06d}.tar"
        with atomic_writer(self.root / name) as f:
            with tarfile.open(fileobj=f, mode="w", format=_TAR_FORMAT) as archive:
                for key, sample, ext, data in zip(keys, samples, exts, payloads, strict=True):
                    members = {ext[1:]: data}
                    extras = dict(sample.extras)
                    if sample.caption is not None and "txt" not in extras:
                        extras["txt"] = sample.caption.encode("utf-8")
                    if sample.metadata is not None and "json" not in extras:
                        extras["json"] = json.dumps(sample.metadata, sort_keys=True).encode("utf-8")
                    if sample.label is not None and "cls" not in extras and np.ndim(sample.label) == 0:
                        extras["cls"] = str(int(sample.label)).encode("ascii")
                    for ext_name in sorted(extras):
                        if "." + ext_name.lower() in IMAGE_EXTENSIONS or "/" in ext_name or not ext_name:
                            raise DatasetError(f"sample {key!r}: extra component {ext_name!r} not allowed")
                        members[ext_name] = extras[ext_name]
                    for ext_name, payload in members.items():
                        info = tarfile.TarInfo(f"{key}.{ext_name}")
                        info.size, info.mtime, info.mode = len(payload), 0, 0o644
                        try:
                            archive.addfile(info, io.BytesIO(payload))
                        except ValueError as exc:
                            raise DatasetError(
                                f"sample {key!r}: cannot store member name in a ustar tar ({exc})"
                            ) from None
        return {name: {"sha256": sha256_file(self.root / name), "bytes": (self.root / name).stat().st_size}}

    def _write_tensors(self, chunk: int, keys: list[str], samples: Sequence[Sample]) -> dict:
        rows = []
        for s in samples:
            if s.array is None:
                raise DatasetError(f"sample {s.key!r}: tensors format needs an array")
            rows.append(np.asarray(s.array))
        layout = (rows[0].shape, rows[0].dtype.str)
        if self._tensor_layout is not None:
            layout = self._tensor_layout
        for key, row in zip(keys, rows, strict=True):
            if (row.shape, row.dtype.str) != tuple(layout):
                raise DatasetFormatError(
                    f"sample {key!r}: array {row.shape} {row.dtype} differs from "
                    f"this version's {layout[0]} {np.dtype(layout[1])}"
                )
        self._tensor_layout = (tuple(layout[0]), layout[1])
        data = np.ascontiguousarray(np.stack(rows))
        stem = f"part-{chunk:06d}"
        files = {}
        if self.tensor_container == "safetensors":
            from safetensors.numpy import save

            payload = save({"data": data}, metadata={"keys": json.dumps(keys)})
            atomic_write_bytes(self.root / f"{stem}.safetensors", payload)
            files[f"{stem}.safetensors"] = {"sha256": sha256_bytes(payload), "bytes": len(payload)}
        else:
            buffer = io.BytesIO()
            np.save(buffer, data, allow_pickle=False)
            key_bytes = json.dumps(keys).encode("utf-8")
            atomic_write_bytes(self.root / f"{stem}.keys.json", key_bytes)
            atomic_write_bytes(self.root / f"{stem}.npy", buffer.getvalue())
            files[f"{stem}.keys.json"] = {"sha256": sha256_bytes(key_bytes), "bytes": len(key_bytes)}
            files[f"{stem}.npy"] = {"sha256": sha256_bytes(buffer.getvalue()), "bytes": len(buffer.getvalue())}
        return files

    def _write_npy(self, chunk: int, keys: list[str], samples: Sequence[Sample]) -> dict:
        """One ``<key>.npy`` per sample: float ``(C, H, W)``, finite, the version's one shape and dtype."""
        files = {}
        for key, s in zip(keys, samples, strict=True):
            row = None if s.array is None else np.asarray(s.array)
            if row is None or row.dtype.kind != "f" or row.ndim != 3 or not np.isfinite(row).all():
                raise DatasetFormatError(f"sample {key!r}: the npy format needs a finite float (C, H, W) array")
            layout = self._tensor_layout or (row.shape, row.dtype.str)
            if (row.shape, row.dtype.str) != tuple(layout):
                raise DatasetFormatError(
                    f"sample {key!r}: array {row.shape} {row.dtype} differs from this version's "
                    f"{layout[0]} {np.dtype(layout[1])}"
                )
            self._tensor_layout = (tuple(layout[0]), layout[1])
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(row), allow_pickle=False)
            atomic_write_bytes(self.root / key, buffer.getvalue(), durable=False)
            files[key] = {"sha256": sha256_bytes(buffer.getvalue()), "bytes": len(buffer.getvalue())}
        sync_filesystem(self.root)  # one flush for the chunk, before its record commits it
        return files

    # -- closing --------------------------------------------------------------------------

    def _remove_strays(self, files: dict) -> None:
        """Delete output files of chunks that were never committed (a crash before resume)."""
        keep = set(files) | {INFO_NAME, SIDECAR_NAME, MANIFEST_NAME, ZIP_VERSION_NAME}
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root)
            if rel_dir == STAGING:
                dirnames[:] = []
                continue
            dirnames[:] = [d for d in dirnames if d != STAGING]
            for name in filenames:
                rel = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
                if rel not in keep:
                    log.warning("%s: removing uncommitted file %s", self.root, rel)
                    os.unlink(Path(dirpath) / name)
        for dirpath, _, _ in sorted(os.walk(self.root), key=lambda entry: -len(entry[0])):
            if Path(dirpath) != self.root and STAGING not in Path(dirpath).parts and not os.listdir(dirpath):
                os.rmdir(dirpath)

    def close(
        self,
        *,
        extra: dict | None = None,
        info: dict | None = None,
        timestamp: bool = True,
        extra_files: dict[str, bytes] | None = None,
    ) -> Path:
        """Write ``annotations.jsonl``, ``dataset.json`` and, last, ``manifest.json``.

        Re-reads the committed chunks from disk first (:meth:`reload`).

        Args:
            extra: more manifest sections (e.g. ``{"corruption": {...}}``).
            info: more ``dataset.json`` fields (``labels`` is filled in from the samples).
            timestamp: record the UTC creation time in the manifest; False makes the version
                a pure function of its inputs (byte-identical reruns, as restoration needs).
            extra_files: folder format: more files ``{relative path: bytes}`` to add and list
                in the manifest (e.g. a source folder's README); names are path-checked.

        Returns:
            The version folder, ready for :func:`~ambient_fast.data.open_dataset`.
        """
        if self._closed:
            return self.root
        self.reload()
        if not self._records:
            raise DatasetError(f"{self.root}: no chunks written; refusing to create an empty version")
        records = [self._records[k] for k in sorted(self._records)]
        entries = [s for r in records for s in r["samples"]]
        keys = [s["key"] for s in entries]
        files: dict[str, dict] = {}
        for r in records:
            files.update(r["files"])
        sidecar = format_annotations(keys, [s["sigma_min"] for s in entries], [s["sigma_max"] for s in entries])
        labels = [s["label"] for s in entries]
        has_label = [lab is not None for lab in labels]
        if any(has_label) and not all(has_label):
            missing = [k for k, h in zip(keys, has_label, strict=True) if not h][:5]
            raise DatasetError(f"{self.root}: some samples have labels and some do not (e.g. no label: {missing})")
        dataset_info = dict(info or {})
        dataset_info["labels"] = [[k, lab] for k, lab in zip(keys, labels, strict=True)] if all(has_label) else None
        info_bytes = _json_bytes(dataset_info, "dataset.json")
        if self.format == "zip":
            with atomic_writer(self.root / ZIP_VERSION_NAME) as f:
                with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive:
                    for r in records:
                        with zipfile.ZipFile(self._staging / f"chunk-{r['chunk']:06d}.zip") as part:
                            for member in part.infolist():
                                archive.writestr(member, part.read(member))
                    archive.writestr(zipfile.ZipInfo(INFO_NAME, date_time=(1980, 1, 1, 0, 0, 0)), info_bytes)
                    archive.writestr(zipfile.ZipInfo(SIDECAR_NAME, date_time=(1980, 1, 1, 0, 0, 0)), sidecar)
            files = {
                ZIP_VERSION_NAME: {
                    "sha256": sha256_file(self.root / ZIP_VERSION_NAME),
                    "bytes": (self.root / ZIP_VERSION_NAME).stat().st_size,
                }
            }
        else:
            atomic_write_bytes(self.root / SIDECAR_NAME, sidecar)
            atomic_write_bytes(self.root / INFO_NAME, info_bytes)
            files[SIDECAR_NAME] = {"sha256": sha256_bytes(sidecar), "bytes": len(sidecar)}
            files[INFO_NAME] = {"sha256": sha256_bytes(info_bytes), "bytes": len(info_bytes)}
        if extra_files and self.format != "folder":
            raise ValueError(f"extra_files are for the folder format, not {self.format!r}")
        for name, data in sorted((extra_files or {}).items()):
            name = safe_relative_path(name, "extra file")
            if name in files or name == MANIFEST_NAME or name.split("/", 1)[0] == STAGING:
                raise DatasetError(f"extra file {name!r} collides with a file of the version")
            atomic_write_bytes(self.root / name, data)
            files[name] = {"sha256": sha256_bytes(data), "bytes": len(data)}
        self._remove_strays(files)
        manifest = {
            "kind": MANIFEST_KIND,
            "manifest_version": 1,
            "format": self.format,
            "creator": self.creator,
            "parent": self._parent_record,
            "params": self.params,
            "counts": {
                "samples": len(keys),
                "chunks": len(records),
                "sigma_min_positive": sum(1 for s in entries if s["sigma_min"] > 0),
            },
            "files": dict(sorted(files.items())),
        }
        if timestamp:
            manifest["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        for name, section in (extra or {}).items():
            if name in manifest:
                raise ValueError(f"extra manifest section {name!r} would replace a built-in one")
            manifest[name] = section
        atomic_write_bytes(self.root / MANIFEST_NAME, _json_bytes(manifest, "manifest"))
        shutil.rmtree(self._staging)
        self._closed = True
        return self.root

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def parent_record(parent: Dataset | None) -> dict | None:
    """How a manifest names the dataset a version derives from (path, format, count, checksums)."""
    if parent is None:
        return None
    root = Path(parent.root).resolve()
    record = {"path": str(root), "format": parent.format, "samples": len(parent)}
    if root.is_dir() and (root / MANIFEST_NAME).is_file():
        record["manifest_sha256"] = sha256_file(root / MANIFEST_NAME)
    record["annotation_sha256"] = sha256_bytes(
        format_annotations(list(parent.keys), parent.sigma_min, parent.sigma_max)
    )
    return record


def write_dataset(
    root: str | os.PathLike,
    format: str,
    samples: Iterable[Sample],
    *,
    chunk_size: int = 1024,
    extra: dict | None = None,
    info: dict | None = None,
    **writer_kwargs,
) -> Path:
    """Write ``samples`` as a new version in chunks of ``chunk_size``; returns ``root``.

    ``writer_kwargs`` go to :class:`DatasetWriter` (``parent``, ``params``, ``creator``, ...).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    writer = DatasetWriter(root, format, **writer_kwargs)
    chunk: list[Sample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == chunk_size:
            writer.write_chunk(chunk)
            chunk = []
    if chunk:
        writer.write_chunk(chunk)
    return writer.close(extra=extra, info=info)


def verify_version(path: str | os.PathLike, *, check_images: bool = True) -> dict:
    """Check a version's files against its manifest checksums; returns the manifest.

    With ``check_images`` every image sample is also probed (header and end marker, no
    decode), so a truncated image that was written with a matching checksum is caught.

    Raises :class:`DatasetError` naming the first missing, changed or unlisted file, or the
    first incomplete image.
    """
    root = Path(path)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DatasetError(f"{root}: no {MANIFEST_NAME}; not a complete dataset version")
    manifest = json.loads(manifest_path.read_text("utf-8"))
    if manifest.get("kind") != MANIFEST_KIND:
        raise DatasetError(f"{manifest_path}: not an ambient_fast dataset manifest")
    listed = manifest["files"]
    for rel, entry in listed.items():
        file = root / safe_relative_path(rel, f"{manifest_path} file entry")
        if not file.is_file():
            raise DatasetError(f"{root}: file {rel!r} listed in the manifest is missing")
        if sha256_file(file) != entry["sha256"]:
            raise DatasetError(f"{root}: file {rel!r} does not match its manifest checksum")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
            if rel != MANIFEST_NAME and rel not in listed and not name.startswith("."):
                raise DatasetError(f"{root}: file {rel!r} is not listed in the manifest")
    if check_images and manifest.get("format") in ("folder", "zip", "webdataset"):
        from .dataset import open_dataset

        dataset = open_dataset(root)
        for i in range(len(dataset)):
            dataset.probe(i)  # BadSampleError (a DatasetError) naming the file
    return manifest
