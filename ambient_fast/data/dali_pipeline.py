"""NVIDIA DALI input pipeline for training and restoration (SPEC 3), same batch contract as
:mod:`ambient_fast.data.torch_loader`.

Graph: encoded bytes -> ``fn.decoders.image`` (``device="cpu"``, or ``"mixed"`` for nvJPEG /
nvImageCodec on the GPU) -> ``fn.crop_mirror_normalize`` (centre or random crop to the model
resolution, random horizontal flip, ``(u8 - 127.5) / 127.5`` -> [-1, 1], NCHW float32).
The sample ids travel through the pipeline next to the images; ``sigma_min``,
``sigma_max`` and labels are then looked up by those ids on the host, so no prefetch depth
can pair a value with the wrong image.

Where the bytes come from:

- **Noise-first order** (a ``batch_sampler`` such as ``NoiseFirstBatchSampler``): an
  ``fn.external_source`` callable pulls one ``[(index, sigma), ...]`` batch per iteration
  and feeds the encoded bytes, the ids and sigma. DALI's readers fix their order when the
  pipeline is built, so only an external source can follow a sampler that picks the
  dataset index *after* drawing sigma. Works for folder, zip and tar alike (tar members
  are read with ``pread`` at offsets indexed once).
- **Epoch order** (``batch_size``; restoration input, evaluation, plain epochs):
  folder -> ``fn.readers.file`` (file list + ``labels`` = sample ids); tar shards ->
  ``fn.readers.webdataset`` with DALI index files that we generate (into a temporary
  folder, never beside the source shards), ids recovered from each sample's
  ``source_info`` (``"<shard>:<offset>:<member>"``); zip -> ``external_source``: DALI has
  no zip reader, so members are read in Python (``zipfile``) in the same sharded order as
  the torch loader. ``reader="external"`` forces the external source for every format.
  Native readers shard with ``shard_id``/``num_shards`` and ``pad_last_batch`` (padding
  dropped by the iterator) and shuffle with DALI's buffer shuffle when ``shuffle=True``.

Bad files: a DALI decoder error aborts the whole pipeline ("pipeline object is no longer
valid"), so files are checked before DALI sees them: native readers get a file list /
index from which a scan (``scan="quick"``: headers, end markers, sizes; ``"decode"``: full
PIL decode) has removed the bad ones; the external source checks every sample's header,
end marker and size before feeding it. ``on_bad_sample="skip"`` drops the sample (its
batch shrinks by one; path logged, ``loader.bad_samples`` counts it); ``"raise"`` raises
:class:`BadSampleError` naming the file. Corruption inside an otherwise complete file can
still fail in the decoder: the loader then re-checks the batches in flight with PIL and
raises a ``BadSampleError`` naming the file (advice: ``scan="decode"``), never a bare
decoder stack trace.

CPU-only machines: ``device="cpu"`` builds with ``device_id=None``. ``device="mixed"``
needs a CUDA device (tests marked ``gpu``).
"""

from __future__ import annotations

import collections
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ._io import probe_image
from .batch import (
    BadSampleLog,
    Batch,
    EpochPlanMixin,
    LookupTables,
    advance_epoch,
    as_hw,
    check_batch_sampler,
    iterate_plan,
    prescan,
)
from .dataset import Dataset, FileImageDataset, ImageDataset, WebDataset, size_problem
from .errors import BadSampleError

__all__ = ["DALIBatchLoader", "DALIImageDecoder", "build_dali_pipeline", "dali_available"]


def dali_available() -> bool:
    """Whether ``nvidia.dali`` and its PyTorch plugin import."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


class _Feeder:
    """``external_source`` callable (batch mode): one checked batch per call, StopIteration
    at the end of each epoch; the next call after it starts the next epoch."""

    def __init__(self, loader: DALIBatchLoader):
        # A proxy, not a reference: the pipeline holds this callable, so a strong reference
        # would make a cycle and keep the pipeline's buffers alive until the next gc run.
        self.loader = weakref.proxy(loader)
        self.plan: Iterator | None = None
        self.in_flight: collections.deque = collections.deque(maxlen=loader.prefetch_queue_depth + 2)
        self.error: BaseException | None = None

    def __call__(self):
        loader = self.loader
        if self.plan is None:
            self.plan = iterate_plan(loader.batch_sampler, loader._epoch_batches, loader.epoch)
        while True:
            try:
                ids, sigma = next(self.plan)
            except StopIteration:
                self.plan = None
                raise
            encoded, keep = [], np.zeros(len(ids), dtype=bool)
            for slot, index in enumerate(ids):
                index = int(index)
                if index in loader.bad.samples:
                    loader.bad.skipped += 1
                    continue
                try:
                    data = loader.dataset.read_bytes(index)
                    problem = size_problem(
                        probe_image(data, loader.dataset.describe(index)), loader.resolution, loader.crop is not None
                    )
                    if problem:
                        raise BadSampleError(loader.dataset.describe(index), problem)
                except BadSampleError as exc:
                    if loader.bad.policy == "raise":
                        self.error = exc
                        raise
                    loader.bad.record(index, f"{exc.where}: {exc.reason}")
                    continue
                encoded.append(np.frombuffer(data, dtype=np.uint8))
                keep[slot] = True
            if not encoded:
                continue  # every sample of this batch was bad: take the next batch
            ids = ids[keep]
            sigma = np.full(len(ids), np.nan) if sigma is None else sigma[keep]
            self.in_flight.append(ids)
            return encoded, ids, sigma.astype(np.float64)


class DALIBatchLoader(EpochPlanMixin):
    """Iterable of :class:`~ambient_fast.data.Batch` from a DALI pipeline, one epoch per
    ``iter``. Built by :func:`build_dali_pipeline`.

    Attributes:
        pipeline: the DALI ``Pipeline`` (built on the first ``iter``).
        mode: ``"external" | "file" | "webdataset"`` (how bytes enter DALI).
        bad_samples: ``{index: "path: reason"}`` of skipped samples.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        *,
        batch_size: int | None,
        batch_sampler: Iterable | None,
        resolution,
        device: str,
        crop: str | None,
        flip: bool,
        shuffle: bool,
        drop_last: bool,
        rank: int,
        world_size: int,
        seed: int,
        num_threads: int,
        prefetch_queue_depth: int,
        reader: str,
        on_bad_sample: str,
        scan: str,
        device_id: int | None,
        index_dir: str | None,
    ):
        if not dali_available():
            raise ImportError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130); use make_torch_loader")
        if not isinstance(dataset, ImageDataset):
            raise ValueError(
                f"the DALI pipeline decodes images; {dataset.format!r} datasets have nothing to decode "
                "(use make_torch_loader or load_dataset_tensors)"
            )
        if (batch_size is None) == (batch_sampler is None):
            raise ValueError("give exactly one of batch_size (epoch order) or batch_sampler (noise-first order)")
        if device not in ("cpu", "mixed"):
            raise ValueError(f"device must be 'cpu' or 'mixed', got {device!r}")
        if crop not in (None, "center", "random"):
            raise ValueError(f"crop must be None, 'center' or 'random', got {crop!r}")
        if reader not in ("auto", "native", "external"):
            raise ValueError(f"reader must be 'auto', 'native' or 'external', got {reader!r}")
        if device == "mixed" and not torch.cuda.is_available():
            raise RuntimeError("device='mixed' decodes on the GPU and needs CUDA; use device='cpu'")
        if batch_sampler is not None:
            check_batch_sampler(batch_sampler, len(dataset))
            max_batch = getattr(batch_sampler, "batch_size", None)
            if not isinstance(max_batch, int):
                raise ValueError("batch_sampler must expose .batch_size (the largest batch it yields)")
            batch_size = max_batch
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.batch_sampler = batch_sampler
        self.resolution = as_hw(resolution)
        if self.resolution is None:
            self.resolution, crop = tuple(dataset.sample_shape[1:]), None
        self.device, self.crop, self.flip = device, crop, flip
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_threads, self.prefetch_queue_depth = num_threads, prefetch_queue_depth
        self.device_id = (
            device_id if device_id is not None else (torch.cuda.current_device() if device == "mixed" else None)
        )
        self.epoch = 0
        self._epoch_set = False
        self.bad = BadSampleLog(on_bad_sample)
        self.tables = LookupTables(dataset)
        # DALI index files separate fields by whitespace: member names with spaces go external.
        spaced = dataset.format == "webdataset" and any(
            any(c.isspace() for c in dataset.image_member(i)[1]) for i in range(len(dataset))
        )
        if batch_sampler is not None or reader == "external" or dataset.format == "zip" or spaced:
            self.mode = "external"
        else:
            self.mode = "file" if dataset.format == "folder" else "webdataset"
        if reader == "native" and self.mode == "external":
            raise ValueError(
                f"no native DALI reader for this case ({dataset.format!r}"
                f"{', batch sampler' if batch_sampler is not None else ''}); use reader='auto'"
            )
        prescan(dataset, self.bad, scan, batch_sampler is not None, self.resolution, self.crop is not None)
        self._index_dir = Path(index_dir) if index_dir is not None else None
        self._feeder: _Feeder | None = None
        self._iterator = None
        self.pipeline = None
        self._epoch_complete = True
        self._wds_ids: dict[tuple[str, int], int] = {}

    # -- graph ----------------------------------------------------------------------------

    def _webdataset_index(self) -> tuple[list[str], list[str]]:
        """DALI index files (v1.2) listing each shard's usable image members; the folder is
        temporary (removed with the loader) unless ``index_dir`` was given."""
        dataset: WebDataset = self.dataset  # type: ignore[assignment]
        if self._index_dir is None:
            folder = Path(tempfile.mkdtemp(prefix="ambient_fast_wds_index_"))
            weakref.finalize(self, shutil.rmtree, folder, True)
        else:
            folder = self._index_dir
            folder.mkdir(parents=True, exist_ok=True)
        usable = set(self._usable().tolist())
        lines: dict[int, list[str]] = collections.defaultdict(list)
        for i in range(len(dataset)):
            if i not in usable:
                continue
            shard, name, offset, size = dataset.image_member(i)
            ext = name.rsplit("/", 1)[-1].split(".", 1)[1]
            lines[shard].append(f"{ext} {offset} {size} {name}")
            self._wds_ids[(str(dataset.shard_paths[shard]), offset)] = i
        self._wds_path_lengths = sorted({len(str(p)) for p in dataset.shard_paths})
        paths, index_paths = [], []
        for shard in sorted(lines):
            index_path = folder / f"shard{shard:06d}.idx"
            index_path.write_text(f"v1.2 {len(lines[shard])}\n" + "\n".join(lines[shard]) + "\n")
            paths.append(str(dataset.shard_paths[shard]))
            index_paths.append(str(index_path))
        return paths, index_paths

    def _build(self) -> None:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import Pipeline
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            seed=self.seed * 1009 + self.rank,
            prefetch_queue_depth=self.prefetch_queue_depth,
        )
        outputs = ["images", "ids"]
        with pipe:
            if self.mode == "external":
                self._feeder = _Feeder(self)
                encoded, ids, sigma = fn.external_source(
                    source=self._feeder,
                    num_outputs=3,
                    batch=True,
                    dtype=[types.UINT8, types.INT64, types.FLOAT64],
                )
                extra = [sigma]
                outputs.append("sigma")
            elif self.mode == "file":
                usable = self._usable()
                dataset: FileImageDataset = self.dataset  # type: ignore[assignment]
                encoded, ids = fn.readers.file(
                    files=[dataset.describe(int(i)) for i in usable],
                    labels=[int(i) for i in usable],
                    random_shuffle=self.shuffle,
                    shard_id=self.rank,
                    num_shards=self.world_size,
                    pad_last_batch=True,
                    name="reader",
                )
                extra = []
            else:
                paths, index_paths = self._webdataset_index()
                encoded = fn.readers.webdataset(
                    paths=paths,
                    index_paths=index_paths,
                    ext=["png;jpg;jpeg"],
                    case_sensitive_extensions=False,
                    missing_component_behavior="error",
                    random_shuffle=self.shuffle,
                    shard_id=self.rank,
                    num_shards=self.world_size,
                    pad_last_batch=True,
                    name="reader",
                )
                ids = fn.pad(fn.get_property(encoded, key="source_info"), fill_value=0)
                extra = []
            channels = self.dataset.channels
            images = fn.decoders.image(
                encoded,
                device="mixed" if self.device == "mixed" else "cpu",
                output_type=types.GRAY if channels == 1 else types.RGB,
            )
            crop_args = {}
            if self.crop is not None:
                crop_args["crop"] = self.resolution
                if self.crop == "random":
                    crop_args["crop_pos_x"] = fn.random.uniform(range=[0.0, 1.0])
                    crop_args["crop_pos_y"] = fn.random.uniform(range=[0.0, 1.0])
            images = fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[127.5] * channels,
                std=[127.5] * channels,
                mirror=fn.random.coin_flip(probability=0.5) if self.flip else 0,
                **crop_args,
            )
            pipe.set_outputs(images, ids, *extra)
        pipe.build()
        self.pipeline = pipe
        drop = self.drop_last and self.mode != "external"  # the external plan drops its own last batch
        kwargs = dict(last_batch_policy=LastBatchPolicy.DROP if drop else LastBatchPolicy.PARTIAL, auto_reset=False)
        if self.mode == "external":
            kwargs["size"] = -1
        else:
            kwargs["reader_name"] = "reader"
        self._iterator = DALIGenericIterator([pipe], outputs, **kwargs)

    # -- iteration ------------------------------------------------------------------------

    def _ids(self, raw: torch.Tensor) -> torch.Tensor:
        if self.mode != "webdataset":
            return raw.reshape(-1).to(torch.int64)
        return torch.tensor(
            [self._wds_id(bytes(row).rstrip(b"\x00").decode("utf-8")) for row in raw.cpu().numpy()], dtype=torch.int64
        )

    def _wds_id(self, source_info: str) -> int:
        """Sample id from DALI's ``"<shard path>:<data offset>:<member>"`` source info."""
        for length in self._wds_path_lengths:
            path, rest = source_info[:length], source_info[length + 1 :]
            offset = rest.split(":", 1)[0]
            if offset.isdigit() and (path, int(offset)) in self._wds_ids:
                return self._wds_ids[(path, int(offset))]
        raise RuntimeError(f"DALI returned a sample from an unknown tar position: {source_info!r}")

    def _diagnose(self, exc: BaseException) -> BaseException:
        """Turn a pipeline failure into a BadSampleError naming the file, when one is found."""
        if self._feeder is not None and self._feeder.error is not None:
            return self._feeder.error
        if self._feeder is not None:
            candidates = sorted({int(i) for ids in self._feeder.in_flight for i in ids})
        else:
            candidates = self._usable().tolist()
        found = self.dataset.scan("decode", resolution=self.resolution, crop=self.crop is not None, indices=candidates)
        if found:
            first = found[min(found)]
            return BadSampleError(
                first.where,
                f"{first.reason} (DALI's decoder failed on this file; "
                "run with scan='decode' to skip such files up front)",
            )
        return RuntimeError(f"DALI pipeline failed and no bad file was found among the samples in flight: {exc}")

    def _guarded(self, step):
        """Run a DALI call (build / reset / next); failures become named errors."""
        try:
            return step()
        except (StopIteration, BadSampleError):
            raise
        except Exception as exc:  # DALI raises RuntimeError for decoder failures
            self._iterator = None
            raise self._diagnose(exc) from None

    def __iter__(self) -> Iterator[Batch]:
        self._epoch_set = False  # a set_epoch from now on names the *next* pass
        if self._iterator is None or not self._epoch_complete:
            self._iterator = None
            self._guarded(self._build)  # building prefetches the first batches
        else:
            self._guarded(self._iterator.reset)
        self._epoch_complete = False
        try:
            while True:
                try:
                    out = self._guarded(lambda: next(self._iterator))[0]
                except StopIteration:
                    self._epoch_complete = True
                    break
                sigma = out["sigma"].reshape(-1) if "sigma" in out and self.batch_sampler is not None else None
                yield self.tables.batch(out["images"], self._ids(out["ids"]), sigma)
        finally:
            if self._epoch_complete:
                advance_epoch(self)


def build_dali_pipeline(
    dataset: Dataset,
    *,
    batch_size: int | None = None,
    batch_sampler: Iterable | None = None,
    resolution: int | Sequence[int] | None = None,
    device: str = "cpu",
    crop: str | None = "center",
    flip: bool = False,
    shuffle: bool = False,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_threads: int = 2,
    prefetch_queue_depth: int = 2,
    reader: str = "auto",
    on_bad_sample: str = "skip",
    scan: str = "auto",
    device_id: int | None = None,
    index_dir: str | None = None,
) -> DALIBatchLoader:
    """A DALI input pipeline over an image dataset, yielding :class:`~ambient_fast.data.Batch`.

    Args:
        dataset: an image dataset from :func:`~ambient_fast.data.open_dataset`
            (folder, zip or webdataset).
        batch_size: epoch order (restoration / evaluation input or plain epochs), sharded
            by ``rank`` / ``world_size`` (DALI ``shard_id`` / ``num_shards``). Exclusive
            with ``batch_sampler``.
        batch_sampler: noise-first order (SPEC 3): yields lists of ``(index, sigma)``;
            must expose ``batch_size``; it shards by rank itself. Batches carry ``sigma``.
        resolution: output ``H = W`` (int) or ``(H, W)``; default: the dataset's size.
        device: ``"cpu"`` (decode on CPU) or ``"mixed"`` (decode on the GPU; images come
            back as CUDA tensors, ids / sigmas on the CPU).
        crop: ``"center"``, ``"random"`` or None (images must then match ``resolution``).
        flip: random horizontal flip, p = 0.5.
        shuffle: epoch order only; native readers use DALI's buffer shuffle, the external
            source a seeded permutation per epoch.
        reader: ``"auto"`` (native readers where possible), ``"native"`` (fail if none),
            ``"external"`` (Python-fed bytes for every format).
        on_bad_sample, scan: see the module docstring.
        device_id: CUDA device for ``"mixed"`` (default: current).
        index_dir: where to keep generated WebDataset index files (default: a temporary
            folder removed with the loader).
    """
    return DALIBatchLoader(
        dataset,
        batch_size=batch_size,
        batch_sampler=batch_sampler,
        resolution=resolution,
        device=device,
        crop=crop,
        flip=flip,
        shuffle=shuffle,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_threads=num_threads,
        prefetch_queue_depth=prefetch_queue_depth,
        reader=reader,
        on_bad_sample=on_bad_sample,
        scan=scan,
        device_id=device_id,
        index_dir=index_dir,
    )


class DALIImageDecoder:
    """Decode batches of encoded images (PNG, JPEG, WebP bytes) with DALI into uint8 ``(n, C, H, W)``.

    The restoration engine's reader: it reads (and hashes) the bytes itself, checks every
    header, then hands a batch of bytes here. ``device="mixed"`` decodes on the GPU (nvJPEG /
    nvImageCodec) and returns a CUDA tensor; ``"cpu"`` uses DALI's CPU pipeline and returns
    a CPU tensor. With ``resize`` every image is scaled (aspect kept) to cover ``size`` and
    centre-cropped to it; without, every image must already be ``size`` (checked by the
    caller). Synchronous: one ``decode`` call, one pipeline run (no prefetch), so the caller
    keeps its own order and error handling (on a decoder failure, decode that batch with
    PIL to name the bad file).

    Args:
        batch_size: the largest batch ``decode`` takes.
        channels: 1 (grayscale) or 3 (RGB).
        size: ``(H, W)`` of the output.
        resize: resize + centre crop (else sizes must match).
        device: ``"cpu"`` or ``"mixed"``.
        num_threads: DALI CPU threads.
        device_id: CUDA device for ``"mixed"`` (default: current).
    """

    def __init__(
        self,
        batch_size: int,
        channels: int,
        size: tuple[int, int],
        *,
        resize: bool = False,
        device: str = "cpu",
        num_threads: int = 2,
        device_id: int | None = None,
    ):
        if not dali_available():
            raise ImportError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
        if device not in ("cpu", "mixed"):
            raise ValueError(f"device must be 'cpu' or 'mixed', got {device!r}")
        if device == "mixed" and not torch.cuda.is_available():
            raise RuntimeError("device='mixed' decodes on the GPU and needs CUDA; use device='cpu'")
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import Pipeline

        self.device, self.size, self.channels = device, (int(size[0]), int(size[1])), int(channels)
        self.device_id = None
        if device == "mixed":
            self.device_id = device_id if device_id is not None else torch.cuda.current_device()
        pipe = Pipeline(
            batch_size=int(batch_size),
            num_threads=max(1, int(num_threads)),
            device_id=self.device_id,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
        )
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, batch=True, no_copy=False)
            images = fn.decoders.image(encoded, device=device, output_type=types.GRAY if channels == 1 else types.RGB)
            if resize:
                height, width = self.size
                images = fn.resize(images, size=[height, width], mode="not_smaller")
                images = fn.crop(images, crop=[height, width], out_of_bounds_policy="trim_to_shape")
            pipe.set_outputs(fn.transpose(images, perm=[2, 0, 1]))
        pipe.build()
        self.pipeline = pipe

    def decode(self, encoded: Sequence[bytes]) -> torch.Tensor:
        """uint8 ``(len(encoded), C, H, W)``: on the GPU for ``"mixed"``, else on the CPU."""
        if not encoded:
            raise ValueError("decode needs at least one image")
        self.pipeline.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8) for data in encoded])
        (out,) = self.pipeline.run()
        n, (height, width) = len(encoded), self.size
        if self.device == "mixed":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            tensor = torch.empty((n, self.channels, height, width), dtype=torch.uint8, device=f"cuda:{self.device_id}")
            feed_ndarray(out.as_tensor(), tensor, cuda_stream=torch.cuda.current_stream(tensor.device))
            torch.cuda.current_stream(tensor.device).synchronize()
            return tensor
        array = np.asarray(out.as_tensor())
        if array.shape != (n, self.channels, height, width):
            raise RuntimeError(f"DALI decoded shape {array.shape}, expected {(n, self.channels, height, width)}")
        return torch.from_numpy(array.copy())
