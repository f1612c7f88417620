"""Resuming an interrupted restoration (SPEC 5; the journal is the version writer's).

An unfinished restoration into ``DST`` is the :class:`~ambient_fast.data.DatasetWriter`
version being built in ``.DST.partial`` beside it (same filesystem, so the final rename is
atomic). Its committed chunk records are the journal: one chunk per shard, each with the
digest of the source bytes it was made from. A rerun with the same arguments skips the
committed shards (after re-hashing their source samples: a changed source is refused naming
the shard) and redoes the rest; since each sample's output is a pure function of the
arguments and the sample, the final version is byte-identical to an uninterrupted run. A
rerun with different arguments is refused, naming each difference (the runtime's one guard,
:func:`ambient_fast.runtime.describe_changes`).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SourceChanged", "staging_dir"]


class SourceChanged(ValueError):
    """The source's bytes differ from those an unfinished run's finished shard was made from."""


def staging_dir(dst: Path) -> Path:
    """``.DST.partial`` beside ``DST``: the version being written."""
    return dst.parent / f".{dst.name}.partial"
