"""Host-side concurrency of one rank: read/decode -> H2D -> sample -> D2H -> encode -> write.

A *shard* is a contiguous run of source samples (clean and corrupt alike) and becomes ONE
chunk of the new version's :class:`~ambient_fast.data.DatasetWriter` (chunk number = shard
number), so the new version keeps the source's order, whatever rank or run wrote a shard.
The writer's committed chunk records are the journal: a shard is done when its chunk is
committed, and the record keeps a digest of the source bytes it came from (the resume
check re-hashes those samples).

Threads (the device never waits on the host, the host never waits on the device except
the completion thread, which only waits for finished batches; after a failure it still
drains the batches the device finished, so their shards are committed):

- **reader** (one thread, fanning reads and decodes out to the IO pool): fills a free host
  batch slot with the next corrupt samples of this rank's shards (batches run across shard
  boundaries, so only the very last batch is padded), decodes each straight into its row
  of the pinned buffer (:meth:`~.stages.Stages.read_into`), drops undecodable samples (or
  raises, ``on_bad_sample="raise"``), fills levels and seeds, and queues the slot;
- **main** (the caller's thread): submits queued batches to the
  :class:`~.sampler.RestorationSampler` (which only enqueues device work);
- **completion** (one thread): waits for each submitted batch's event and fans its rows out
  to the IO pool, which encodes them (PNG by default) in the background;
- **copier** (one thread, fanning out to the IO pool): reads the clean samples of each
  shard, decode-checks them and passes their bytes through untouched;
- the IO thread that completes a shard writes its chunk.

``SLOTS`` host batches circulate, which bounds memory and gives back-pressure: if the
encoders fall behind, the reader waits for a slot and the device idles, rather than memory
growing. The copier stays at most one shard ahead of the reader. The first error in any
thread stops all of them and is re-raised in the caller.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data import BadSampleError, DatasetWriter, Sample, decode_image, probe_image
from .io import RawSample, RestoreSource, bad_reason
from .sampler import HostBatch, RestorationSampler, fill_host_batch
from .stages import GridSpec, Stages

__all__ = ["Shard", "ShardExecutor", "plan_shards", "sample_digest", "source_digest", "SLOTS", "UNREADABLE"]

log = logging.getLogger("ambient_fast.restoration")

SLOTS = 4  # host batches in flight: one being decoded, two queued on the device, one being written
_POLL = 0.05  # seconds between checks of the stop flag while blocked on a queue


@dataclass(frozen=True)
class Shard:
    """A unit of work, of resume and of the split across ranks: source samples ``indices``
    (contiguous, ascending), of which those flagged in ``restore`` are restored."""

    number: int  # the writer chunk it becomes
    indices: np.ndarray  # int64
    restore: np.ndarray  # bool, per index

    @property
    def id(self) -> str:
        return f"shard-{self.number:06d}"


def plan_shards(restore_mask: np.ndarray, shard_size: int) -> list[Shard]:
    """Cut ``0..N-1`` into shards of ``shard_size`` samples (stable for equal inputs)."""
    n = len(restore_mask)
    return [
        Shard(k, np.arange(start, min(start + shard_size, n), dtype=np.int64), restore_mask[start : start + shard_size])
        for k, start in enumerate(range(0, n, shard_size))
    ]


UNREADABLE = b"unreadable"  # the digest of a sample whose bytes could not be read (a truncated member)


def sample_digest(source: RestoreSource, index: int) -> bytes:
    """Sample ``index``'s source digest (:meth:`RestoreSource.fetch`), :data:`UNREADABLE` if unreadable."""
    try:
        return source.fetch(index).digest
    except BadSampleError:
        return UNREADABLE


def source_digest(digests: Sequence[bytes]) -> str:
    """One shard's source digest from its samples' digests (in index order)."""
    h = hashlib.sha256()
    for d in digests:
        h.update(d)
    return h.hexdigest()


@dataclass
class _ShardState:
    shard: Shard
    pending: int  # samples not yet restored / copied / dropped
    samples: dict[int, Sample] = field(default_factory=dict)
    digests: dict[int, bytes] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)  # index -> "path: reason"
    codecs_in: dict[str, int] = field(default_factory=dict)  # source codecs of the restored samples


@dataclass
class _Batch:
    indices: np.ndarray
    raws: list[RawSample]
    slot: HostBatch
    pending_chunks: int = 0


class ShardExecutor:
    """Runs one rank's shards into the version writer (see the module docstring).

    Args:
        sampler: the device sampler (None when nothing is restored on this rank's shards).
        source: the dataset being restored.
        stages: the path's host hooks (None when nothing is restored).
        writer: the new version (shared by the threads; chunk writes are serialised).
        grid, seed, training_noise_seed: levels and seeds of every batch.
        new_sigma_min, new_sigma_max: ``(N,)`` annotations of the new version.
        on_bad_sample: ``"skip"`` (drop the sample, count and name it) or ``"raise"``.
        num_workers: IO threads (read, decode, encode, write).
        on_progress: called with ``(count, "restore" | "copy")`` as samples finish.
        decoder: a batch image decoder (:class:`~ambient_fast.data.dali_pipeline.DALIImageDecoder`)
            used instead of ``stages.read_into`` for image stages (``stages.image`` set); a batch
            it fails on is decoded with PIL sample by sample, which names the bad file.
    """

    def __init__(
        self,
        sampler: RestorationSampler | None,
        source: RestoreSource,
        stages: Stages | None,
        writer: DatasetWriter,
        *,
        grid: GridSpec,
        seed: int,
        training_noise_seed: int,
        new_sigma_min: np.ndarray,
        new_sigma_max: np.ndarray,
        on_bad_sample: str = "skip",
        num_workers: int = 4,
        on_progress: Callable[[int, str], None] | None = None,
        decoder: Any = None,
    ) -> None:
        self.sampler, self.source, self.stages, self.writer = sampler, source, stages, writer
        self.decoder = decoder if stages is not None and stages.image is not None else None
        self.grid, self.seed, self.training_noise_seed = grid, seed, training_noise_seed
        self.new_sigma_min, self.new_sigma_max = new_sigma_min, new_sigma_max
        self.on_bad_sample = on_bad_sample
        self.num_workers = max(1, num_workers)
        self.on_progress = on_progress or (lambda n, kind: None)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._reader_at = threading.Condition()
        self._reader_shard = -1  # position (in this rank's list) of the shard the reader is on
        self.skipped: dict[int, str] = {}

    # ---------------------------------------------------------------- errors
    def _fail(self, err: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = err
        self._stop.set()
        with self._reader_at:
            self._reader_at.notify_all()

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

    # ---------------------------------------------------------------- samples
    def _bad(self, state: _ShardState, index: int, err: BadSampleError) -> None:
        """A sample that does not decode: dropped (counted, named) or fatal."""
        if self.on_bad_sample == "raise":
            raise err
        reason = bad_reason(err)
        log.warning("restoration: skipping bad sample %r (%s) of %s", self.source.keys[index], reason, state.shard.id)
        self._finish_sample(state, index, None, reason)

    def _output(self, raw: RawSample, data: bytes | None, array: np.ndarray | None, extras: dict[str, bytes]) -> Sample:
        i = raw.index
        return Sample(
            index=i,
            key=raw.key,
            array=array,
            sigma_min=float(self.new_sigma_min[i]),
            sigma_max=float(self.new_sigma_max[i]),
            label=self.source.label(i),
            extras={**raw.extras, **extras},
            data=data,
        )

    def _finish_sample(self, state: _ShardState, index: int, sample: Sample | None, reason: str | None) -> None:
        with self._lock:
            if sample is not None:
                state.samples[index] = sample
            else:
                state.skipped[index] = reason or "bad sample"
                self.skipped[index] = reason or "bad sample"
            state.pending -= 1
            done = state.pending == 0
        if done:
            self._write_shard(state)

    def _write_shard(self, state: _ShardState) -> None:
        shard = state.shard
        samples = [state.samples[int(i)] for i in shard.indices if int(i) in state.samples]
        digests = [state.digests.get(int(i), UNREADABLE) for i in shard.indices]
        note = {
            "source_sha256": source_digest(digests),
            "restored": int(
                sum(1 for i, r in zip(shard.indices, shard.restore, strict=True) if r and int(i) in state.samples)
            ),
            "codecs_in": dict(sorted(state.codecs_in.items())),
            "skipped": [[self.source.keys[i], state.skipped[i]] for i in sorted(state.skipped)],
        }
        with self._write_lock:
            self.writer.write_chunk(samples, chunk=shard.number, note=note)

    # ---------------------------------------------------------------- copier
    def _copy_one(self, state: _ShardState, index: int) -> None:
        if self._stop.is_set():
            return
        try:
            raw = self.source.fetch(index)
            state.digests[index] = raw.digest
            if raw.data is not None:  # decode check: a truncated or corrupt clean image is never passed on
                decode_image(raw.data, raw.where, probe_image(raw.data, raw.where).channels)
        except BadSampleError as err:
            self._bad(state, index, err)
            return
        self._finish_sample(state, index, self._output(raw, raw.data, raw.row, {}), None)
        self.on_progress(1, "copy")

    def _copy(self, states: Sequence[_ShardState], pool: ThreadPoolExecutor) -> None:
        for position, state in enumerate(states):
            with self._reader_at:  # stay at most one shard ahead of the reader
                while self._reader_shard < position - 1 and not self._stop.is_set():
                    self._reader_at.wait(_POLL)
            if self._stop.is_set():
                return
            clean = [int(i) for i, r in zip(state.shard.indices, state.shard.restore, strict=True) if not r]
            for future in [pool.submit(self._guarded, self._copy_one, state, i) for i in clean]:
                future.result()

    # ---------------------------------------------------------------- reader
    def _decode_one(self, state: _ShardState, index: int, row: np.ndarray) -> RawSample | None:
        try:
            raw = self.source.fetch(index)
            state.digests[index] = raw.digest
            self.stages.read_into(raw, row)
        except BadSampleError as err:
            self._bad(state, index, err)
            return None
        if raw.data is not None:
            codec = probe_image(raw.data, raw.where).codec
            with self._lock:
                state.codecs_in[codec] = state.codecs_in.get(codec, 0) + 1
        return raw

    def _fetch_checked(self, state: _ShardState, index: int) -> RawSample | None:
        """Read and header-check one sample for the batch decoder (None: dropped as bad)."""
        try:
            raw = self.source.fetch(index)
            state.digests[index] = raw.digest
            codec = self.stages.image.check(raw).codec
        except BadSampleError as err:
            self._bad(state, index, err)
            return None
        with self._lock:
            state.codecs_in[codec] = state.codecs_in.get(codec, 0) + 1
        return raw

    def _decode_group(
        self, group: list, slot: HostBatch, base: int, pool: ThreadPoolExecutor
    ) -> list[RawSample | None]:
        """Decode ``group``'s samples into rows ``base + j`` of ``slot`` (``None``: dropped)."""
        raw_rows = slot.raw.numpy()
        if self.decoder is None:
            futures = [
                pool.submit(self._decode_one, state, i, raw_rows[base + j]) for j, (_, state, i) in enumerate(group)
            ]
            return [f.result() for f in futures]
        results = [f.result() for f in [pool.submit(self._fetch_checked, state, i) for _, state, i in group]]
        good = [j for j, raw in enumerate(results) if raw is not None]
        if not good:
            return results
        try:
            images = self.decoder.decode([results[j].data for j in good])
        except Exception:  # noqa: BLE001 - a decoder failure: PIL names the bad file (or proves it fine)
            log.warning("restoration: DALI failed on a batch; decoding it with PIL to find the bad sample")
            states = {i: state for _, state, i in group}
            for j in good:
                raw = results[j]
                try:
                    raw_rows[base + j] = self.stages.image.decode(raw).transpose(2, 0, 1)
                except BadSampleError as err:
                    self._bad(states[raw.index], raw.index, err)
                    results[j] = None
            if slot.raw_device is not None:
                slot.raw_device[base : base + len(group)].copy_(torch.from_numpy(raw_rows[base : base + len(group)]))
            return results
        target = slot.raw_device if slot.raw_device is not None else slot.raw
        rows = torch.as_tensor(good, device=target.device) + base
        target.index_copy_(0, rows, images.to(target.device))
        return results

    def _read(
        self, states: Sequence[_ShardState], free: queue.Queue, ready: queue.Queue, pool: ThreadPoolExecutor
    ) -> None:
        batch_size = self.sampler.batch_size
        todo = [
            (position, state, int(i))
            for position, state in enumerate(states)
            for i, r in zip(state.shard.indices, state.shard.restore, strict=True)
            if r
        ]
        cursor = 0
        while cursor < len(todo):
            slot = self._get(free)
            if slot is None:
                return
            raw_rows = slot.raw.numpy()
            kept: list[RawSample] = []
            while len(kept) < batch_size and cursor < len(todo):
                group = todo[cursor : cursor + batch_size - len(kept)]
                cursor += len(group)
                with self._reader_at:
                    self._reader_shard = max(self._reader_shard, group[-1][0])
                    self._reader_at.notify_all()
                base = len(kept)
                results = self._decode_group(group, slot, base, pool)
                rows = slot.raw_device if slot.raw_device is not None else raw_rows
                for j, raw in enumerate(results):  # compact: rows of dropped samples are filled by later ones
                    if raw is not None:
                        if len(kept) != base + j:
                            rows[len(kept)] = rows[base + j]
                        kept.append(raw)
                if self._stop.is_set():
                    return
            if not kept:
                free.put(slot)
                continue
            indices = np.array([r.index for r in kept], dtype=np.int64)
            slot.context = self.stages.prepare(indices)
            fill_host_batch(
                slot,
                torch.from_numpy(indices),
                torch.from_numpy(self.source.sigma_min[indices]),
                grid=self.grid,
                seed=self.seed,
                training_noise_seed=self.training_noise_seed,
            )
            if slot.raw_device is not None:
                slot.raw_device[len(kept) :] = slot.raw_device[:1]
                if slot.raw_device.is_cuda:  # the sampler's copy stream reads it next: finish our writes first
                    torch.cuda.current_stream(slot.raw_device.device).synchronize()
            if not self._put(ready, _Batch(indices, kept, slot)):
                return
        with self._reader_at:
            self._reader_shard = len(states)
            self._reader_at.notify_all()
        self._put(ready, None)

    # ---------------------------------------------------------------- completion
    def _complete(
        self, submitted: queue.Queue, states: dict[int, _ShardState], free: queue.Queue, pool: ThreadPoolExecutor
    ) -> None:
        """Wait for each submitted batch's device work, then fan its rows out to the encoders
        (so no IO thread ever blocks on the device)."""
        chunk = -(-self.sampler.batch_size // self.num_workers)
        while True:
            batch = self._get(submitted)
            if batch is None and self._stop.is_set():  # failing: still write what the device finished
                try:
                    batch = submitted.get_nowait()
                except queue.Empty:
                    return
            if batch is None:
                return
            batch.slot.wait()
            count = len(batch.indices)
            chunks = [range(a, min(a + chunk, count)) for a in range(0, count, chunk)]
            batch.pending_chunks = len(chunks)
            for rows in chunks:
                pool.submit(self._guarded, self._encode_rows, batch, rows, states, free)

    def _encode_rows(self, batch: _Batch, rows: range, states: dict[int, _ShardState], free: queue.Queue) -> None:
        outs = {name: t.numpy() for name, t in batch.slot.outputs.items()}
        finished = []
        for j in rows:
            raw = batch.raws[j]
            data, array, extras = self.stages.encode_output(raw.index, {name: o[j] for name, o in outs.items()})
            finished.append((raw, self._output(raw, data, array, extras)))
        with self._lock:
            batch.pending_chunks -= 1
            batch_done = batch.pending_chunks == 0
        if batch_done:
            free.put(batch.slot)  # every row of the slot is encoded: the reader may refill it
        for raw, sample in finished:
            self._finish_sample(states[raw.index], raw.index, sample, None)
        self.on_progress(len(finished), "restore")

    # ---------------------------------------------------------------- driver
    def run(self, shards: Sequence[Shard]) -> None:
        """Process ``shards``; returns when each is committed as a writer chunk."""
        states = [_ShardState(s, len(s.indices)) for s in shards]
        by_index = {int(i): st for st in states for i in st.shard.indices}
        restoring = any(bool(s.restore.any()) for s in shards)
        if restoring and (self.sampler is None or self.stages is None):
            raise ValueError("restore shards need a sampler and stages")
        for st in states:
            if st.pending == 0:
                self._write_shard(st)
        free: queue.Queue = queue.Queue()
        for _ in range(SLOTS if restoring else 0):
            slot = self.sampler.new_host_batch()
            if self.decoder is not None and self.decoder.device == "mixed":  # GPU decode straight to the device
                slot.raw_device = torch.empty_like(slot.raw, device=self.sampler.device)
            free.put(slot)
        ready: queue.Queue = queue.Queue(maxsize=SLOTS)
        submitted: queue.Queue = queue.Queue()
        if not restoring:
            self._reader_shard = len(states)
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="restore-io") as pool:
            threads = [
                threading.Thread(
                    target=self._guarded, args=(self._copy, states, pool), name="restore-copy", daemon=True
                )
            ]
            if restoring:
                threads += [
                    threading.Thread(
                        target=self._guarded,
                        args=(self._read, states, free, ready, pool),
                        name="restore-read",
                        daemon=True,
                    ),
                    threading.Thread(
                        target=self._guarded,
                        args=(self._complete, submitted, by_index, free, pool),
                        name="restore-complete",
                        daemon=True,
                    ),
                ]
            for thread in threads:
                thread.start()
            try:
                if restoring:
                    self._drive(ready, submitted)
                for thread in threads:
                    while thread.is_alive():
                        thread.join(_POLL)
            except BaseException as err:
                self._fail(err)
            finally:
                for thread in threads:
                    thread.join()
                pool.shutdown(wait=True)
        if self._error is not None:
            raise self._error
        unfinished = [st.shard.id for st in states if st.pending]
        if unfinished:
            raise RuntimeError(f"restoration stopped with unfinished shards {unfinished[:5]}")

    def _drive(self, ready: queue.Queue, submitted: queue.Queue) -> None:
        """Main thread: hand each decoded batch to the device (enqueue only), then on."""
        while True:
            batch = self._get(ready)
            if batch is None:
                self._put(submitted, None)
                return
            self.sampler.submit(batch.slot)
            self._put(submitted, batch)
