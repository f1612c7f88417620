"""Resumable output: the staging folder, the run arguments and the per-rank progress journal.

Layout, beside the destination ``DST`` (same filesystem, so the final rename is atomic)::

    .DST.partial/
        run.json               arguments that fix the output (written once, by rank 0)
        journal/rank-00000.jsonl  one line per finished shard: {"shard": id, "files": [[name, size, sha256], ...]}
        data/                  folder format: the new version being built (renamed to DST at the
                               end); other formats: one zip of staged payloads per shard
        tmp/                   files being written (renamed into data/ when complete)

Protocol. Every output file is written to ``tmp/`` and renamed into ``data/``; a shard is
finished when all its files are renamed, and only then is its journal line appended (and
fsynced). A killed run leaves at most a torn line at the end of a journal (ignored on read,
cut off on resume),
unjournaled files in ``data/`` (rewritten, with the same bytes, when their shard is redone)
and litter in ``tmp/`` (deleted). A restart with the same arguments reads every rank's
journal, skips the finished shards and redoes the others; since each sample's output is a
pure function of the arguments and the sample, the final version is byte-identical to an
uninterrupted run. A restart with different arguments is refused, naming each difference.
Journals are per rank so that concurrent ranks never append to one file; a restart may use
a different number of ranks (all journals are read).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data._io import sync_filesystem

__all__ = ["FileRecord", "ArgumentsChanged", "RunDir", "staging_dir", "describe_changes"]

RUN_FORMAT = 1


@dataclass(frozen=True)
class FileRecord:
    """One output file: path relative to the dataset root, size in bytes, hex SHA-256."""

    name: str
    size: int
    sha256: str

    def to_json(self) -> list[Any]:
        return [self.name, self.size, self.sha256]


class ArgumentsChanged(ValueError):
    """A restart used arguments that differ from those of the unfinished run."""


def staging_dir(dst: Path) -> Path:
    """``.DST.partial`` beside ``DST``."""
    return dst.parent / f".{dst.name}.partial"


def describe_changes(old: dict[str, Any], new: dict[str, Any], label: Callable[[str], str] = str) -> list[str]:
    """One ``"<label(name)>: was A, now B"`` line per argument that differs (sorted by name)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            lines.append(f"{label(key)}: was {old.get(key, '<unset>')!r}, now {new.get(key, '<unset>')!r}")
    return lines


def _write_atomic(path: Path, data: bytes, tmp_dir: Path, fsync: bool = False) -> None:
    tmp = tmp_dir / f"{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)


class RunDir:
    """The staging folder of one restoration (see the module docstring).

    Args:
        dst: the destination dataset folder (must not exist yet).
        fsync: flush the filesystem (one ``syncfs``) before each journal line, so a
            journaled shard survives a power loss, not only a killed process.
    """

    def __init__(self, dst: Path, *, fsync: bool = False) -> None:
        self.dst = dst
        self.root = staging_dir(dst)
        self.data = self.root / "data"
        self.tmp = self.root / "tmp"
        self.journal_dir = self.root / "journal"
        self.run_file = self.root / "run.json"
        self.fsync = fsync
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- set-up (rank 0)
    def prepare(self, arguments: dict[str, Any], *, restart: bool, label: Callable[[str], str] = str) -> bool:
        """Create the staging folder or check it against ``arguments``; returns "resumed".
        ``label`` names an argument in the refusal message.

        Raises:
            ArgumentsChanged: an unfinished run exists with other arguments (and not ``restart``).
        """
        if self.root.exists() and restart:
            shutil.rmtree(self.root)
        if self.root.exists():
            old = self.read_arguments()
            changes = describe_changes(old, arguments, label)
            if changes:
                raise ArgumentsChanged(
                    f"refusing to resume the unfinished restoration in {self.root}: "
                    + "; ".join(changes)
                    + ". Rerun with the same arguments, or pass restart=True (--restart) to discard it."
                )
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
            self._drop_torn_lines()
            return True
        for folder in (self.data, self.tmp, self.journal_dir):
            folder.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"format": RUN_FORMAT, "arguments": arguments}, indent=1, sort_keys=True)
        _write_atomic(self.run_file, payload.encode(), self.tmp, fsync=True)
        return False

    def read_arguments(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.run_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(
                f"{self.root} is not a restoration staging folder ({err}); remove it or pass --restart"
            ) from None
        if raw.get("format") != RUN_FORMAT or not isinstance(raw.get("arguments"), dict):
            raise ValueError(f"{self.run_file}: unknown staging format; remove {self.root} or pass --restart")
        return raw["arguments"]

    # ---------------------------------------------------------------- journal
    def _drop_torn_lines(self) -> None:
        """Cut each journal after its last complete line, so that appends by the resumed
        run start on a fresh line (a kill can leave half a line at the end)."""
        for path in self.journal_dir.glob("rank-*.jsonl"):
            data = path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end != len(data):
                with open(path, "r+b") as handle:
                    handle.truncate(end)

    def finished(self) -> dict[str, list[FileRecord]]:
        """``{shard id: its files}`` over every rank's journal (torn or foreign lines ignored)."""
        done: dict[str, list[FileRecord]] = {}
        if not self.journal_dir.is_dir():
            return done
        for path in sorted(self.journal_dir.glob("rank-*.jsonl")):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    files = [FileRecord(str(n), int(s), str(h)) for n, s, h in entry["files"]]
                    done[str(entry["shard"])] = files
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a line torn by a kill: its shard is redone
        return done

    def record_shard(self, rank: int, shard: str, files: list[FileRecord]) -> None:
        """Append (and fsync) one finished shard to ``rank``'s journal. Thread-safe."""
        line = json.dumps({"shard": shard, "files": [f.to_json() for f in files]}, separators=(",", ":")) + "\n"
        if self.fsync:
            sync_filesystem(self.data)  # the shard's files are durable before its line is
        with self._lock, open(self.journal_dir / f"rank-{rank:05d}.jsonl", "a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    # ---------------------------------------------------------------- files
    def write_file(self, name: str, data: bytes) -> FileRecord:
        """Write ``data/<name>`` atomically; ``name`` must already be a safe relative path."""
        path = self.data / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, data, self.tmp)
        return FileRecord(name, len(data), hashlib.sha256(data).hexdigest())

    def write_pack(self, name: str, entries: list[tuple[str, bytes]]) -> FileRecord:
        """Write ``data/<name>`` atomically: an uncompressed zip of ``(member, bytes)`` (the
        staged payloads of one shard, for formats assembled at publish time)."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            for member, data in entries:
                archive.writestr(zipfile.ZipInfo(member, date_time=(1980, 1, 1, 0, 0, 0)), data)
        return self.write_file(name, buffer.getvalue())

    def publish(self) -> None:
        """Rename ``data/`` to the destination and remove the staging folder."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.rename(self.data, self.dst)
        shutil.rmtree(self.root, ignore_errors=True)
