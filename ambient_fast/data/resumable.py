"""Writing a derived dataset version so that a failed run leaves nothing, or a state its
rerun continues (corruptions, annotations).

:func:`write_version` drives :class:`~ambient_fast.data.DatasetWriter` in resume mode: the
samples whose output key an earlier, interrupted run already committed are skipped (their
``make_sample`` is never called), so rerunning the same command after a crash, a full disk
or a bad sample finishes the version. When a run fails before its first chunk is committed
and the destination did not exist before, the destination is removed: nothing is left.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from .dataset import Sample
from .writer import STAGING, DatasetWriter

__all__ = ["write_version"]


def write_version(
    dest: str | os.PathLike,
    format: str,
    keys: Sequence[str],
    make_sample: Callable[[int], Sample],
    *,
    chunk_size: int = 1024,
    extra: Callable[[DatasetWriter], dict] | None = None,
    progress: str | None = None,
    **writer_kwargs,
) -> Path:
    """Write (or continue) a version of ``len(keys)`` samples; returns ``dest``.

    Args:
        dest: the version's folder: new, empty, or an unfinished version started with the
            same format and parameters (the writer refuses other parameters, naming them).
        format: the writer's format.
        keys: ``keys[i]`` is the key sample ``i`` is written under (before the writer's
            :meth:`~DatasetWriter.output_key` normalisation).
        make_sample: ``i -> Sample`` (called only for samples still to write).
        chunk_size: samples per atomic chunk.
        extra: ``writer -> dict`` of manifest sections, computed at close.
        progress: label of a tqdm bar over the samples (stderr; a resumed run starts it at
            the samples already committed); None: no bar.
        writer_kwargs: ``parent``, ``creator``, ``params``, ... for :class:`DatasetWriter`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dest = Path(dest)
    existed = dest.exists()
    writer = None
    try:
        writer = DatasetWriter(dest, format, resume=True, **writer_kwargs)
        done = writer.completed_keys
        todo = [i for i, key in enumerate(keys) if writer.output_key(key) not in done]
        with _bar(progress, len(keys), len(keys) - len(todo)) as bar:
            for start in range(0, len(todo), chunk_size):
                rows = todo[start : start + chunk_size]
                writer.write_chunk([make_sample(i) for i in rows])
                bar.update(len(rows))
        return writer.close(extra=extra(writer) if extra is not None else None)
    except BaseException:
        committed = writer is not None and bool(writer.completed_keys)
        if not existed and not committed and not any((dest / STAGING).glob("chunk-*.json")):
            shutil.rmtree(dest, ignore_errors=True)
        raise


def _bar(label: str | None, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="sample", desc=label, disable=label is None, dynamic_ncols=True)
