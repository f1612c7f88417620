"""Host-side concurrency of one rank: decode -> H2D -> sample -> D2H -> encode/write.

Threads (the device never waits on the host, the host never waits on the device except
in a writer that needs a finished batch):

- **reader** (one thread, fanning decodes out to the IO pool): takes a free host batch
  slot, decodes the next batch's samples straight into its (pinned) buffer, fills the
  per-sample levels and seeds, and queues it;
- **main** (the caller's thread): submits queued batches to the
  :class:`~.sampler.RestorationSampler` (which only enqueues device work);
- **completion** (one thread): waits for each submitted batch's event and fans its rows
  out to the writers, so no IO thread blocks on the device;
- **writers** (the IO pool): encode rows (PNG / ``.npy``), write them atomically (or keep
  them for the shard's pack), free the slot; the last writer of a shard writes its pack,
  if any, and journals it;
- **copier** (one thread): copies the clean samples' bytes through, shard by shard.

``SLOTS`` host batches circulate, which bounds memory and gives back-pressure: if writers
fall behind, the reader waits for a slot and the device idles, rather than memory growing.
The first error in any thread stops all of them and is re-raised in the caller.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from .io import RestoreSource
from .journal import FileRecord, RunDir
from .sampler import HostBatch, RestorationSampler, fill_host_batch
from .stages import GridSpec, Stages

__all__ = ["Shard", "ShardExecutor", "plan_shards", "pack_name"]

SLOTS = 4  # host batches in flight: one being decoded, two queued on the device, one being written
_POLL = 0.05  # seconds between checks of the stop flag while blocked on a queue


@dataclass(frozen=True)
class Shard:
    """A unit of work and of resume: restore (or copy through) these sample indices."""

    id: str
    kind: Literal["restore", "copy"]
    indices: np.ndarray  # int64, ascending


def plan_shards(restore: np.ndarray, copy: np.ndarray, shard_size: int, copy_shard_size: int) -> list[Shard]:
    """Cut the restore and copy index lists into shards (ids are stable for equal inputs)."""
    shards = [
        Shard(f"restore-{k:05d}", "restore", restore[start : start + shard_size])
        for k, start in enumerate(range(0, len(restore), shard_size))
    ]
    shards += [
        Shard(f"copy-{k:05d}", "copy", copy[start : start + copy_shard_size])
        for k, start in enumerate(range(0, len(copy), copy_shard_size))
    ]
    return shards


@dataclass
class _Batch:
    shard: Shard
    indices: np.ndarray
    slot: HostBatch
    pending_chunks: int = 0


@dataclass
class _ShardState:
    batches_left: int
    records: list[FileRecord] = field(default_factory=list)  # files written (folder format)
    payloads: list[tuple[str, bytes]] = field(default_factory=list)  # staged payloads (packed)


def pack_name(shard_id: str) -> str:
    """Staged payloads of a restore shard, for formats assembled at publish time."""
    return f"packs/{shard_id}.zip"


class ShardExecutor:
    """Runs one rank's shards (see the module docstring).

    Args:
        sampler: the device sampler (fixed batch size and sample shape); None when there
            is nothing to restore.
        source: the dataset being restored.
        run_dir: the staging folder and journal.
        rank: this process's rank (names its journal).
        grid: levels and seeds of every batch.
        packed: stage each restore shard's outputs as one zip (:func:`pack_name`) instead of
            one file per sample at its final name (formats other than ``folder``).
        num_workers: IO threads (decode, encode, write).
        on_progress: called with the number of samples just finished (restored or copied).
    """

    def __init__(
        self,
        sampler: RestorationSampler | None,
        source: RestoreSource,
        run_dir: RunDir,
        rank: int,
        grid: GridSpec,
        stages: Stages,
        *,
        seed: int = 0,
        training_noise_seed: int = 0,
        packed: bool = False,
        num_workers: int = 4,
        on_progress: Callable[[int, str], None] | None = None,
    ) -> None:
        self.sampler, self.source, self.run_dir, self.rank, self.grid = sampler, source, run_dir, rank, grid
        self.stages, self.seed, self.training_noise_seed = stages, seed, training_noise_seed
        self.packed = packed
        self.num_workers = max(1, num_workers)
        self.on_progress = on_progress or (lambda n, kind: None)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- errors
    def _fail(self, err: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = err
        self._stop.set()

    def _guarded(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            self._fail(err)

    def _put(self, q: queue.Queue, item: object) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue) -> object | None:
        while not self._stop.is_set():
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                continue
        return None

    # ---------------------------------------------------------------- stages
    def _read(self, shards: Sequence[Shard], free: queue.Queue, ready: queue.Queue, pool: ThreadPoolExecutor) -> None:
        for shard in shards:
            batch_size = self.sampler.batch_size
            for start in range(0, len(shard.indices), batch_size):
                slot = self._get(free)
                if slot is None:
                    return
                indices = shard.indices[start : start + batch_size]
                raw = slot.raw.numpy()
                for future in [pool.submit(self.stages.read_into, int(i), raw[j]) for j, i in enumerate(indices)]:
                    future.result()
                slot.context = self.stages.prepare(indices)
                fill_host_batch(
                    slot,
                    torch.from_numpy(indices),
                    torch.from_numpy(self.source.sigma_min[indices]),
                    grid=self.grid,
                    seed=self.seed,
                    training_noise_seed=self.training_noise_seed,
                )
                if not self._put(ready, _Batch(shard, indices, slot)):
                    return
        self._put(ready, None)

    def _complete(
        self, submitted: queue.Queue, states: dict[str, _ShardState], free: queue.Queue, pool: ThreadPoolExecutor
    ) -> None:
        """Wait for each submitted batch's device work, then fan its rows out to the writers
        (so no IO thread ever blocks on the device)."""
        chunk = -(-self.sampler.batch_size // self.num_workers) if self.sampler is not None else 1
        while True:
            batch = self._get(submitted)
            if batch is None:
                return
            batch.slot.wait()
            count = len(batch.indices)
            chunks = [range(a, min(a + chunk, count)) for a in range(0, count, chunk)]
            batch.pending_chunks = len(chunks)
            for rows in chunks:
                pool.submit(self._guarded, self._write_rows, batch, rows, states, free)

    def _write_rows(self, batch: _Batch, rows: range, states: dict[str, _ShardState], free: queue.Queue) -> None:
        outs = {name: t.numpy() for name, t in batch.slot.outputs.items()}
        payloads = []
        for j in rows:
            index = int(batch.indices[j])
            data, array, _ = self.stages.encode_output(index, {name: o[j] for name, o in outs.items()})
            payloads.append((self.source.keys[index], data if data is not None else self.source.npy(array)))
        records = [] if self.packed else [self.run_dir.write_file(key, data) for key, data in payloads]
        with self._lock:
            state = states[batch.shard.id]
            state.records.extend(records)
            if self.packed:
                state.payloads.extend(payloads)
            batch.pending_chunks -= 1
            batch_done = batch.pending_chunks == 0
            shard_done = False
            if batch_done:
                state.batches_left -= 1
                shard_done = state.batches_left == 0
        self.on_progress(len(payloads), "restore")
        if batch_done:
            free.put(batch.slot)
        if shard_done:
            if self.packed:
                state.records = [self.run_dir.write_pack(pack_name(batch.shard.id), sorted(state.payloads))]
                state.payloads = []
            self.run_dir.record_shard(self.rank, batch.shard.id, sorted(state.records, key=lambda r: r.name))

    def _copy(self, shards: Sequence[Shard]) -> None:
        for shard in shards:
            records = []
            for index in shard.indices:
                if self._stop.is_set():
                    return
                key = self.source.keys[int(index)]
                records.append(self.run_dir.write_file(key, self.source.read_bytes(int(index))))
            self.run_dir.record_shard(self.rank, shard.id, records)
            self.on_progress(len(records), "copy")

    # ---------------------------------------------------------------- driver
    def run(self, shards: Sequence[Shard]) -> None:
        """Process ``shards`` (restore and copy); returns when all are journaled."""
        restore = [s for s in shards if s.kind == "restore"]
        copy = [s for s in shards if s.kind == "copy"]
        if restore and self.sampler is None:
            raise ValueError("restore shards need a sampler")
        batch_size = self.sampler.batch_size if restore else 1
        states = {s.id: _ShardState(-(-len(s.indices) // batch_size)) for s in restore}
        free: queue.Queue = queue.Queue()
        for _ in range(SLOTS if restore else 0):
            free.put(self.sampler.new_host_batch())
        ready: queue.Queue = queue.Queue(maxsize=SLOTS)
        submitted: queue.Queue = queue.Queue()
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="restore-io") as pool:
            threads = [
                threading.Thread(target=self._guarded, args=(self._copy, copy), name="restore-copy", daemon=True),
                threading.Thread(
                    target=self._guarded,
                    args=(self._read, restore, free, ready, pool),
                    name="restore-read",
                    daemon=True,
                ),
                threading.Thread(
                    target=self._guarded,
                    args=(self._complete, submitted, states, free, pool),
                    name="restore-complete",
                    daemon=True,
                ),
            ]
            for thread in threads:
                thread.start()
            try:
                self._drive(ready, submitted)
            except BaseException as err:
                self._fail(err)
            finally:
                for thread in threads:
                    thread.join()
                pool.shutdown(wait=True)
        if self._error is not None:
            raise self._error

    def _drive(self, ready: queue.Queue, submitted: queue.Queue) -> None:
        """Main thread: hand each decoded batch to the device (enqueue only), then on."""
        while True:
            batch = self._get(ready)
            if batch is None:
                self._put(submitted, None)
                return
            self.sampler.submit(batch.slot)
            self._put(submitted, batch)
