"""The last step of a restoration (rank 0, after every shard is journaled): assemble the new
dataset version in the source's format, with its sidecar and manifest, and rename it into
place so that it appears atomically.

- ``folder``: restored PNGs and copied files are already at their final names in the
  staging folder; add the sidecar, the copied extras (``dataset.json``, ...) and the
  manifest, then rename. The manifest follows :mod:`ambient_fast.data.writer`'s schema
  (``verify_version`` and ``open_dataset`` read it) with a ``restoration`` section, and has
  no timestamp, so an interrupted-and-resumed run writes the same bytes as a clean one.
- ``zip``, ``webdataset``, ``tensors``: stream the samples, in key order, through
  :class:`ambient_fast.data.DatasetWriter` (restored payloads from the shards' packs, the
  others read from the source and passed through byte for byte, captions, labels and
  WebDataset components kept), into a folder that is renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zipfile
from typing import Any

from ..data import DatasetWriter, format_annotations
from ..data.writer import MANIFEST_KIND, _parent_record
from .io import RestoreSource
from .journal import FileRecord, RunDir
from .pipeline import pack_name

__all__ = ["publish_version", "PUBLISH_CHUNK"]

PUBLISH_CHUNK = 4096  # samples per DatasetWriter chunk (one tar shard / tensor part each)
CREATOR = "ambient_fast.restoration"


def publish_version(
    source: RestoreSource,
    run_dir: RunDir,
    files: list[FileRecord],
    *,
    shard_of: dict[int, str],
    new_sigma_min: Any,
    new_sigma_max: Any,
    arguments: dict[str, Any],
    section: dict[str, Any],
) -> None:
    """Write the version's remaining files and rename it to ``run_dir.dst``.

    Args:
        files: journaled outputs (folder: every sample file; other formats: the packs).
        shard_of: ``{index: restore shard id}`` of the restored samples.
        new_sigma_min, new_sigma_max: ``(N,)`` annotations of the new version.
        arguments: the run's arguments (the manifest's ``params``).
        section: the manifest's ``restoration`` section.
    """
    if source.format == "folder":
        _publish_folder(source, run_dir, files, new_sigma_min, new_sigma_max, arguments, section)
    else:
        _publish_with_writer(source, run_dir, shard_of, new_sigma_min, new_sigma_max, arguments, section)


def _publish_folder(source, run_dir, files, new_sigma_min, new_sigma_max, arguments, section) -> None:
    records = list(files)
    sidecar = format_annotations(list(source.keys), list(new_sigma_min), list(new_sigma_max))
    records.append(run_dir.write_file("annotations.jsonl", sidecar))
    for name in source.extra_files():
        records.append(run_dir.write_file(name, (source.root / name).read_bytes()))
    manifest = {
        "kind": MANIFEST_KIND,
        "manifest_version": 1,
        "format": "folder",
        "creator": CREATOR,
        "parent": _parent_record(source.dataset),
        "params": arguments,
        "counts": {
            "samples": len(source.keys),
            "chunks": int(section.get("shards", 1)),
            "sigma_min_positive": int(sum(1 for v in new_sigma_min if v > 0)),
        },
        "files": {r.name: {"sha256": r.sha256, "bytes": r.size} for r in sorted(records, key=lambda r: r.name)},
        "restoration": section,
    }
    run_dir.write_file("manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    run_dir.publish()


class _Packs:
    """Staged payloads by sample index, reading one shard's pack at a time (publish visits
    samples in index order, and restore shards are ascending runs of indices)."""

    def __init__(self, run_dir: RunDir, shard_of: dict[int, str]) -> None:
        self.run_dir, self.shard_of = run_dir, shard_of
        self.current: str | None = None
        self.archive: zipfile.ZipFile | None = None

    def payload(self, index: int, key: str) -> bytes:
        shard = self.shard_of[index]
        if shard != self.current:
            self.close()
            self.archive = zipfile.ZipFile(self.run_dir.data / pack_name(shard))
            self.current = shard
        return self.archive.read(key)

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()
            self.archive, self.current = None, None


def _publish_with_writer(source, run_dir, shard_of, new_sigma_min, new_sigma_max, arguments, section) -> None:
    target = run_dir.root / "version"
    if target.exists():
        shutil.rmtree(target)  # an earlier publish was interrupted: redo it whole
    dataset = source.dataset
    writer = DatasetWriter(target, source.format, parent=dataset, creator=CREATOR, params=arguments)
    packs = _Packs(run_dir, shard_of)
    chunk = []
    for index in range(len(source.keys)):
        sample = dataset.read(index)
        if index in shard_of:
            payload = packs.payload(index, source.keys[index])
            content = (
                {"array": None, "data": payload}
                if source.is_image
                else {"array": source.decode_restored(payload), "data": None}
            )
            sample = dataclasses.replace(
                sample, sigma_min=float(new_sigma_min[index]), sigma_max=float(new_sigma_max[index]), **content
            )
        chunk.append(sample)
        if len(chunk) == PUBLISH_CHUNK:
            writer.write_chunk(chunk)
            chunk = []
    packs.close()
    if chunk:
        writer.write_chunk(chunk)
    writer.close(extra={"restoration": section}, timestamp=False)  # byte-identical on resume
    os.rename(target, run_dir.dst)
    shutil.rmtree(run_dir.root, ignore_errors=True)
