"""``restore_dataset``: restore every corrupt sample of a dataset version (SPEC 5).

The one dataset driver of the restoration engine: source (:mod:`.io`) -> the path's stages
(:mod:`.stages`: pixel, tensor, or latent) -> the captured sampler (:mod:`.sampler`) ->
the version writer (:class:`~ambient_fast.data.DatasetWriter`, writing the new version
straight into ``.DST.partial``, renamed to ``DST`` when complete), with the ``--dst`` lock
(:mod:`.lock`), resume (:mod:`.resume`) and the split over ``torchrun`` ranks
(:mod:`.distributed`). The host pipeline is :mod:`.pipeline`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import DatasetWriter
from ..nn.checkpoint import file_sha256, load_denoiser, module_fingerprint
from ..runtime import ArgumentsChanged, RankContext, describe_changes
from ..samplers.restore import RESTORE_SIGMA_FLOOR
from .io import DEFAULT_MAX_PIXELS, RestoreSource, open_source, parse_output_codec
from .lock import DestinationLock
from .pipeline import SLOTS, Shard, ShardExecutor, plan_shards, sample_digest, source_digest
from .resume import SourceChanged, staging_dir
from .sampler import COMPILE_MODES, METHODS, START_NOISE, RestorationSampler, SamplerConfig
from .stages import GRID_SCHEDULES, GridSpec, Stages

__all__ = [
    "RestoreOptions",
    "RestorePlan",
    "RestoreReport",
    "restore_dataset",
    "staging_folder",
    "PRECISIONS",
    "STATE_DTYPES",
    "READERS",
    "CREATOR",
]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
READERS = ("auto", "dali", "pil")
BAD_SAMPLE_POLICIES = ("skip", "raise")
DEFAULT_SHARD_SAMPLES = 1024  # source samples per shard (one output chunk / tar shard each)
CREATOR = "ambient_fast.restoration"
_SEED_LIMIT = 2**32  # derive_seeds mixes 32 bits of the run seed
_REPORTED_BAD = 100  # bad samples named in the manifest and report (all are counted)


@dataclass(frozen=True)
class RestoreOptions:
    """Validated options of :func:`restore_dataset` (see its docstring for each)."""

    num_steps: int = 18
    batch_size: int = 256
    method: str = "heun"
    seed: int = 0
    rho_ambient: float = 8.0
    sigma_out: float = 0.0
    rho: float = 7.0
    sigma_floor: float = RESTORE_SIGMA_FLOOR
    grid: str = "per_sample"
    sigma_max: float = 80.0
    start_noise: str = "fresh"
    training_noise_seed: int = 0
    state_dtype: str = "float32"
    precision: str = "fp32"
    compile: str = "none"
    cuda_graph: bool | None = None
    backend: str = "auto"
    shard_size: int = DEFAULT_SHARD_SAMPLES
    output_codec: str = "png"
    on_bad_sample: str = "skip"
    resize: bool = False
    resolution: tuple[int, int] | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        def is_int(v: object) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and math.isfinite(v)

        need(is_int(self.num_steps) and 1 <= self.num_steps <= 10_000, "num_steps", "an integer in [1, 10000]")
        need(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(self.method in METHODS, "method", f"one of {METHODS}")
        need(is_int(self.seed) and 0 <= self.seed < _SEED_LIMIT, "seed", "an integer in [0, 2^32)")
        need(is_num(self.rho_ambient) and self.rho_ambient >= 1, "rho_ambient", "a finite number >= 1")
        need(is_num(self.sigma_out) and self.sigma_out >= 0, "sigma_out", "a finite number >= 0")
        need(is_num(self.rho) and self.rho > 0, "rho", "a finite number > 0")
        need(is_num(self.sigma_floor) and self.sigma_floor > 0, "sigma_floor", "a finite number > 0")
        need(self.grid in GRID_SCHEDULES, "grid", f"one of {GRID_SCHEDULES}")
        need(is_num(self.sigma_max) and self.sigma_max > self.sigma_floor, "sigma_max", "a finite number > sigma_floor")
        need(self.grid != "global" or self.sigma_out == 0, "sigma_out", "0 with grid='global' (it integrates to 0)")
        need(self.start_noise in START_NOISE, "start_noise", f"one of {START_NOISE}")
        need(
            is_int(self.training_noise_seed) and 0 <= self.training_noise_seed < _SEED_LIMIT,
            "training_noise_seed",
            "an integer in [0, 2^32)",
        )
        need(self.state_dtype in STATE_DTYPES, "state_dtype", f"one of {tuple(STATE_DTYPES)}")
        need(self.precision in PRECISIONS, "precision", f"one of {tuple(PRECISIONS)}")
        need(self.compile in COMPILE_MODES, "compile", f"one of {COMPILE_MODES}")
        need(self.cuda_graph in (None, True, False), "cuda_graph", "None, True or False")
        if self.cuda_graph and self.compile == "reduce-overhead":
            raise ValueError("cuda_graph=True cannot be combined with compile='reduce-overhead' (graphs cannot nest)")
        need(is_int(self.shard_size) and self.shard_size >= 1, "shard_size", "an integer >= 1")
        try:
            parse_output_codec(self.output_codec)
        except ValueError as err:
            raise ValueError(str(err)) from None
        need(self.on_bad_sample in BAD_SAMPLE_POLICIES, "on_bad_sample", f"one of {BAD_SAMPLE_POLICIES}")
        need(isinstance(self.resize, bool), "resize", "True or False")
        need(
            self.resolution is None
            or (len(self.resolution) == 2 and all(is_int(v) and v >= 1 for v in self.resolution)),
            "resolution",
            "None or (height, width) with positive integers",
        )
        need(is_int(self.max_pixels) and self.max_pixels >= 1, "max_pixels", "an integer >= 1")

    def grid_spec(self) -> GridSpec:
        return GridSpec(self.grid, self.num_steps, self.sigma_out, self.rho, self.sigma_floor, self.sigma_max)  # type: ignore[arg-type]

    def sampler_config(self, device: torch.device, steps: int) -> SamplerConfig:
        return SamplerConfig(
            num_steps=steps,
            method=self.method,  # type: ignore[arg-type]
            final_to_zero=self.sigma_out == 0,
            start_noise=self.start_noise,  # type: ignore[arg-type]
            state_dtype=STATE_DTYPES[self.state_dtype],
            amp_dtype=PRECISIONS[self.precision],
            compile=self.compile,  # type: ignore[arg-type]
            cuda_graph=self.cuda_graph if device.type == "cuda" else False,
            backend=self.backend,
        )


@dataclass(frozen=True)
class RestorePlan:
    """What a restoration will do to a dataset version (computed identically on every rank)."""

    num_samples: int
    restore: np.ndarray  # int64 indices restored (sigma_min > sigma_out)
    copy: np.ndarray  # int64 indices copied through byte for byte (after a decode check)
    new_sigma_min: np.ndarray  # (N,) float64 annotations of the new version
    new_sigma_max: np.ndarray  # (N,) float64
    steps: int  # K of the captured loop (GridSpec.steps)
    shards: list[Shard]

    @classmethod
    def build(cls, source: RestoreSource, options: RestoreOptions) -> RestorePlan:
        """SPEC 5: restore every sample with ``sigma_min > sigma_out``; the new annotation is
        ``sigma_min / rho_ambient`` (``sigma_out == 0``) or ``sigma_out``, with
        ``sigma_max = 0`` (as the anchors write); the others keep theirs."""
        sigma_min = np.asarray(source.sigma_min, dtype=np.float64)
        sigma_max = np.asarray(source.sigma_max, dtype=np.float64)
        to_restore = sigma_min > options.sigma_out
        restore = np.flatnonzero(to_restore).astype(np.int64)
        copy = np.flatnonzero(~to_restore).astype(np.int64)
        new_min = sigma_min.copy()
        new_max = sigma_max.copy()
        new_min[restore] = sigma_min[restore] / options.rho_ambient if options.sigma_out == 0 else options.sigma_out
        new_max[restore] = 0.0
        steps = options.grid_spec().steps(sigma_min[restore])
        shards = plan_shards(to_restore, options.shard_size)
        return cls(len(sigma_min), restore, copy, new_min, new_max, steps, shards)


@dataclass
class RestoreReport:
    """Summary of a :func:`restore_dataset` call (the CLI prints it as its JSON report)."""

    src: str
    dst: str
    num_samples: int
    num_restored: int  # samples restored in the new version (all runs)
    num_copied: int  # samples copied through byte for byte
    nfe_per_sample: int
    shards_total: int
    shards_resumed: int  # already committed by an earlier, interrupted run
    restored_this_run: int
    restored_per_rank: list[int]  # samples restored by each rank in this run
    seconds: float  # wall time of the sampling phase of this run (slowest rank)
    images_per_second: float  # restored_this_run / seconds
    nfe_per_second: float
    world_size: int
    device: str
    reader: str = "pil"  # who decoded the images: "dali" or "pil"
    output_codec: str = "png"
    codec_note: str = ""  # what the re-encode of restored samples means (lossless or a new corruption)
    bad_samples_skipped: int = 0
    bad_samples: list[str] = field(default_factory=list)  # "shard key: path: reason" (first 100)
    host_batch_bytes: int = 0  # pinned host memory of the batches in flight
    device_batch_bytes: int = 0  # device memory of the sampler's static buffers (network activations excluded)
    dry_run: bool = False
    already_complete: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        if self.dry_run:
            return (
                f"dry run: would restore {self.num_restored} of {self.num_samples} samples "
                f"({self.num_copied} copied through) at {self.nfe_per_sample} NFE each, "
                f"{self.shards_total} shards ({self.shards_resumed} already done) -> {self.dst}; batch memory: "
                f"host {self.host_batch_bytes / 2**20:.1f} MiB pinned ({SLOTS} batches in flight), device "
                f"{self.device_batch_bytes / 2**20:.1f} MiB static buffers (+ the network's activations)"
            )
        if self.already_complete:
            return f"{self.dst} is already complete (same arguments); nothing to do"
        bad = f", {self.bad_samples_skipped} bad samples skipped" if self.bad_samples_skipped else ""
        return (
            f"restored {self.num_restored} of {self.num_samples} samples ({self.num_copied} copied through, "
            f"{self.shards_resumed}/{self.shards_total} shards resumed{bad}) in {self.seconds:.1f} s: "
            f"{self.images_per_second:.1f} img/s, {self.nfe_per_second:.0f} NFE/s on "
            f"{self.world_size} x {self.device} -> {self.dst}"
        )


def _resolve_denoiser(
    denoiser: nn.Module | Callable[..., torch.Tensor] | str | os.PathLike[str],
    device: torch.device | str | None,
    local_rank: int,
    model_fingerprint: str | None,
) -> tuple[Callable[..., torch.Tensor], torch.device, str]:
    if isinstance(denoiser, (str, os.PathLike)):
        dev = torch.device(device) if device is not None else _default_device(local_rank)
        return load_denoiser(denoiser, device=dev), dev, model_fingerprint or file_sha256(denoiser)
    if isinstance(denoiser, nn.Module):
        if denoiser.training:
            raise ValueError("denoiser is in training mode; call .eval() before restoring (dropout, norms)")
        tensor = next(itertools.chain(denoiser.parameters(), denoiser.buffers()), None)
        dev = tensor.device if tensor is not None else _default_device(local_rank)
        if device is not None and _normalized(device) != _normalized(dev) and tensor is not None:
            raise ValueError(f"denoiser is on {dev} but device={str(device)!r}: move it there first (denoiser.to(...))")
        return denoiser, dev, model_fingerprint or module_fingerprint(denoiser)
    if not callable(denoiser):
        raise TypeError(f"denoiser must be a module, a callable or a checkpoint path, got {type(denoiser).__name__}")
    if model_fingerprint is None:
        raise ValueError("denoiser is a plain callable: pass model_fingerprint=... so a resume can check the model")
    return denoiser, torch.device(device) if device is not None else _default_device(local_rank), model_fingerprint


def _normalized(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _default_device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


_DERIVED_ARGUMENTS = {
    "src_fingerprint": "the source dataset (src: its files, sizes or annotations changed)",
    "model_fingerprint": "the model (denoiser / --model)",
    "device_type": "the device type (device / --device)",
    "stages": "the restoration path's stages (codec / latent settings)",
    "steps": "the captured loop's step count (from the grid and the levels)",
}


def _argument_label(name: str) -> str:
    """How a refusal names an argument: the keyword and its CLI flag."""
    return _DERIVED_ARGUMENTS.get(name, f"{name} (--{name.replace('_', '-')})")


def _plain_json(arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments as they read back from JSON (numpy scalars -> Python), for exact comparison."""
    return json.loads(json.dumps(arguments, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


def _check_paths(src: Path, dst: Path) -> None:
    if src == dst or src in dst.parents or dst in src.parents:
        raise ValueError(f"dst {dst} must be outside src {src} (and src outside dst): the source is never modified")


def _complete_version(dst: Path, arguments: dict[str, Any]) -> bool:
    """True if ``dst`` is a finished restoration with the same arguments; error if it is anything else."""
    try:
        manifest = json.loads((dst / "manifest.json").read_text())
        same = manifest["params"] == arguments and manifest["creator"] == CREATOR
    except (OSError, ValueError, KeyError, TypeError):
        same = False
    if not same:
        raise FileExistsError(f"{dst} already exists and is not this restoration's output; choose a new folder")
    return True


def _batch_bytes(
    stages: Stages | None, batch: int, steps: int, state_dtype: torch.dtype, cuda: bool
) -> tuple[int, int]:
    """(host, device) bytes of the batch buffers a run allocates (see :class:`RestorationSampler`)."""
    if stages is None:
        return 0, 0
    shape = stages.storage_shape
    raw = math.prod(shape) * torch.empty((), dtype=stages.device.storage_dtype).element_size()
    model = math.prod(stages.device.model_shape(shape)) * torch.empty((), dtype=state_dtype).element_size()
    outs = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in stages.device.outputs(shape).values())
    cond = sum(
        math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in stages.device.conditioning(shape).values()
    )
    per_row_levels = 8 * (steps + 1) + 8 * 3
    host = SLOTS * batch * (raw + outs + per_row_levels)
    staging = (2 if cuda else 0) * batch * (raw + per_row_levels)
    device = batch * (raw + 2 * model + outs + cond + per_row_levels) + staging
    return host, device


def _codec_section(stages: Stages | None, committed: dict[int, dict], output_codec: str) -> tuple[dict, str]:
    """The manifest's record of how restored samples are stored (from the chunk notes)."""
    if stages is None:
        return {"restored_as": None}, ""
    restored_as = stages.description.get("codec", output_codec)
    codecs_in: dict[str, int] = {}
    for record in committed.values():
        for name, count in record.get("note", {}).get("codecs_in", {}).items():
            codecs_in[name] = codecs_in.get(name, 0) + int(count)
    name = str(restored_as).split(":", 1)[0]
    changed = sum(count for codec, count in codecs_in.items() if codec != name)
    lossy = ":" in str(restored_as) or name == "jpeg"
    if lossy:
        note = (
            f"restored samples are stored as {restored_as}: a lossy re-encode, a corruption that the new sigma_min "
            "does not describe"
        )
    elif restored_as == "array":
        note = "restored tensor rows are stored in their own dtype"
    else:
        note = f"restored samples are stored losslessly as {restored_as}; clean samples keep their bytes and codec"
    section = {
        "restored_as": restored_as,
        "source_codecs": dict(sorted(codecs_in.items())),
        "codec_changed": changed,
        "lossy_reencode": lossy,
        "note": note,
    }
    return section, note


def _verify_sources(source: RestoreSource, plan: RestorePlan, committed: dict[int, dict], workers: int) -> None:
    """Re-hash the source samples of every committed shard; refuse a shard whose bytes changed."""
    by_number = {s.number: s for s in plan.shards}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for number, record in sorted(committed.items()):
            want = record.get("note", {}).get("source_sha256")
            shard = by_number.get(number)
            if shard is None or want is None:
                raise SourceChanged(f"{shard}: committed chunk {number} does not belong to this restoration plan")
            digests = list(pool.map(lambda i: sample_digest(source, int(i)), shard.indices))
            if source_digest(digests) != want:
                first, last = source.keys[int(shard.indices[0])], source.keys[int(shard.indices[-1])]
                raise SourceChanged(
                    f"the source changed since the unfinished run: {shard.id} (samples {first!r}..{last!r}, "
                    f"{source.dataset.describe(int(shard.indices[0]))} ...) no longer has the bytes it was restored "
                    "from; rerun with restart=True (--restart) to restore it again from scratch"
                )


def restore_dataset(
    denoiser: nn.Module | Callable[..., torch.Tensor] | str | os.PathLike[str],
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    num_steps: int = 18,
    batch_size: int = 256,
    method: str = "heun",
    seed: int = 0,
    rho_ambient: float = 8.0,
    sigma_out: float = 0.0,
    rho: float = 7.0,
    sigma_floor: float = RESTORE_SIGMA_FLOOR,
    grid: str = "per_sample",
    sigma_max: float = 80.0,
    start_noise: str = "fresh",
    training_noise_seed: int = 0,
    state_dtype: str = "float32",
    precision: str = "fp32",
    compile: str = "none",
    cuda_graph: bool | None = None,
    backend: str = "auto",
    shard_size: int = DEFAULT_SHARD_SAMPLES,
    output_codec: str = "png",
    on_bad_sample: str = "skip",
    resize: bool = False,
    resolution: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reader: str = "auto",
    stages: Callable[[RestoreSource, Stages], Stages] | None = None,
    device: torch.device | str | None = None,
    num_workers: int = 4,
    restart: bool = False,
    progress: bool = True,
    dry_run: bool = False,
    model_fingerprint: str | None = None,
) -> RestoreReport:
    """Restore every corrupt sample of the dataset version ``src`` into a new version ``dst``.

    SPEC 5 per sample i with ``sigma_min_i > sigma_out``: start at ``y0_i + sigma_min_i eps_i``
    (eps from the seed derived from ``(seed, i)``, i = the sample's index in key order), run
    the sampler on the sample's own grid from ``sigma_min_i`` to ``sigma_out`` (``grid``), store
    the result (images: ``output_codec``, lossless PNG by default, under the same key) and
    annotate it ``sigma_min_i / rho_ambient`` (``sigma_out == 0``) or ``sigma_out``. Other
    samples are decode-checked and copied byte for byte with their annotations; every other
    member of a sample's key (captions, JSON, unknown components) travels through untouched.
    The output is a function of the arguments and the data only: batch composition, rank
    count and interruptions do not change a byte of it.

    Rank-agnostic: under ``torchrun`` (an initialised process group) the shards are split
    across ranks, each writes its own chunks of the version, and rank 0 writes the sidecar
    and manifest after a barrier. Resumable: rerunning a killed call with the same arguments
    skips finished shards (after checking their source bytes are unchanged); different
    arguments are refused naming each one (``restart=True`` discards the unfinished run).
    ``dst`` appears atomically when complete; ``.DST.lock`` keeps a second run out.

    Args:
        denoiser: EDM denoiser ``D(x, sigma)`` module, a checkpoint path
            (:func:`~ambient_fast.restoration.save_denoiser` format), or a plain callable (then
            pass ``model_fingerprint``). Modules must be in eval mode. With ``stages``:
            whatever its :meth:`~.stages.DeviceCodec.wrap_denoiser` takes.
        src: a dataset version in any :func:`ambient_fast.data.open_dataset` format (folder,
            zip, WebDataset shards, tensors; JPEG, PNG or WebP images) with its
            ``annotations.jsonl``; never modified.
        dst: the new version's folder, in ``src``'s format (must not exist).
        num_steps: grid points per sample before the final level (anchor 18: NFE 35 with
            Heun); ``grid="global"``: points of the global grid (anchors' text-to-image 30).
        batch_size: samples per device batch (the captured shape; the last batch is padded).
        method: ``"heun"`` (deterministic, anchor), ``"euler"``, ``"stochastic"`` (ancestral
            reverse SDE: samples the posterior ``p(x0 | x_sigma_min)``).
        seed: run seed of the restoration noise, in [0, 2^32).
        rho_ambient: new annotation ``sigma_min / rho_ambient`` when integrating to 0 (anchor 8).
        sigma_out: stop level; > 0 stores the noisy state there, annotated ``sigma_out``.
            Samples with ``sigma_min <= sigma_out`` are copied through.
        rho, sigma_floor: grid curvature and lowest positive level (EDM 7 and 0.002).
        grid: ``"per_sample"`` (SPEC 5) or ``"global"`` (ANCHORS 3.3: the global EDM grid
            from ``sigma_max``, truncated at each sample's level), see :class:`~.stages.GridSpec`.
        sigma_max: top of the global grid (EDM 80).
        start_noise: ``"fresh"`` (anchor), ``"training"`` (the frozen training noise of
            ``noisy_pair(..., sample_ids, noise_seed=training_noise_seed)``) or ``"none"``
            (samples are stored already noisy at their sigma_min, the anchors' ``npy`` case).
        state_dtype: sampler state, ``"float32"`` or ``"float64"`` (the anchors').
        precision: network compute, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast).
        compile: ``torch.compile`` mode of the per-step function (``"none"``, ``"default"``,
            ``"max-autotune-no-cudagraphs"``, ``"reduce-overhead"``).
        cuda_graph: capture the K-step loop (None: on for CUDA unless ``reduce-overhead``).
        backend: fused step ops for eager steps (``"auto"``, ``"torch"``, ``"triton"``, ``"cpp"``).
        shard_size: source samples per shard (one chunk of the new version: one tar shard,
            tensor part, ...); the unit of resume and of the split across ranks.
        output_codec: restored images: ``"png"`` (lossless, default), ``"webp"`` (lossless),
            ``"webp:Q"`` / ``"jpeg:Q"`` (lossy: the manifest and report say that this
            re-encode is a corruption the new sigma_min does not describe).
        on_bad_sample: a sample that does not decode is ``"skip"``-ped (left out of the new
            version, counted, named by shard and key in the report and manifest) or
            ``"raise"``-d (the data layer's convention).
        resize: restored images of another size than the run's are resized and centre-cropped
            to it (else refused naming the key).
        resolution: ``(H, W)`` of the restored images (default: the first restored sample's).
        max_pixels: every image header is checked against this before anything is decoded or
            allocated (default 4096 x 4096).
        reader: who decodes images: ``"dali"`` (NVIDIA DALI: mixed GPU decode on CUDA, its CPU
            pipeline on CPU), ``"pil"``, or ``"auto"`` (DALI where it is installed, else PIL).
            Recorded with the arguments: decoders may differ in the last bit of a JPEG.
        stages: ``(source, pixel stages) -> Stages`` for a path built on the pixel / tensor
            stages (which carry the size, resize, max_pixels and output codec options): latent
            text-to-image, ``restoration/latent_stages.py``; default: the pixel / tensor stages.
        device: default: the module's device, else ``cuda:LOCAL_RANK`` or CPU.
        num_workers: IO threads per rank (read, decode, encode, write).
        restart: discard an unfinished run's staging folder instead of resuming it.
        progress: tqdm progress bar and summary line on rank 0.
        dry_run: validate everything, print the plan and the batch's host and device memory;
            write nothing.
        model_fingerprint: identifies the model for the resume check (default: the
            checkpoint's SHA-256 or the module's state-dict hash).

    Returns:
        A :class:`RestoreReport` (the same on every rank).
    """
    options = RestoreOptions(
        num_steps=num_steps,
        batch_size=batch_size,
        method=method,
        seed=seed,
        rho_ambient=rho_ambient,
        sigma_out=sigma_out,
        rho=rho,
        sigma_floor=sigma_floor,
        grid=grid,
        sigma_max=sigma_max,
        start_noise=start_noise,
        training_noise_seed=training_noise_seed,
        state_dtype=state_dtype,
        precision=precision,
        compile=compile,
        cuda_graph=cuda_graph,
        backend=backend,
        shard_size=shard_size,
        output_codec=output_codec,
        on_bad_sample=on_bad_sample,
        resize=resize,
        resolution=None if resolution is None else (int(resolution[0]), int(resolution[1])),
        max_pixels=max_pixels,
    )
    if reader not in READERS:
        raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    ctx = RankContext.current()
    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    _check_paths(src_path, dst_path)
    source = open_source(src_path)
    plan = RestorePlan.build(source, options)
    model, dev, model_id = _resolve_denoiser(denoiser, device, ctx.local_rank, model_fingerprint)
    run_stages: Stages | None = None
    if len(plan.restore):
        run_stages = source.stages(
            source.sizing_sample(plan.restore, options.max_pixels, options.on_bad_sample),
            max_pixels=options.max_pixels,
            resize=options.resize,
            resolution=options.resolution,
            output_codec=parse_output_codec(options.output_codec),
        )
        if stages is not None:  # a path built on the pixel stages (latent: VAE + captions around them)
            run_stages = stages(source, run_stages)
    used_reader = _select_reader(reader, source, run_stages)
    arguments = _plain_json(
        {
            **asdict(options),
            "steps": plan.steps,
            "reader": used_reader,
            "stages": run_stages.description if run_stages is not None else None,
            "src_fingerprint": source.fingerprint(),
            "model_fingerprint": model_id,
            "device_type": dev.type,
        }
    )
    config = options.sampler_config(dev, plan.steps)
    host_bytes, device_bytes = _batch_bytes(
        run_stages, options.batch_size, plan.steps, STATE_DTYPES[options.state_dtype], dev.type == "cuda"
    )
    report = RestoreReport(
        src=str(src_path),
        dst=str(dst_path),
        num_samples=plan.num_samples,
        num_restored=len(plan.restore),
        num_copied=len(plan.copy),
        nfe_per_sample=config.nfe,
        shards_total=len(plan.shards),
        shards_resumed=0,
        restored_this_run=0,
        restored_per_rank=[0] * ctx.world_size,
        seconds=0.0,
        images_per_second=0.0,
        nfe_per_second=0.0,
        world_size=ctx.world_size,
        device=str(dev),
        reader=used_reader,
        output_codec=options.output_codec if source.is_image else "array",
        host_batch_bytes=host_bytes,
        device_batch_bytes=device_bytes,
        arguments=arguments,
    )
    staging = staging_dir(dst_path)
    if dry_run:
        report.dry_run = True
        stored = DatasetWriter.stored_params(staging) if staging.is_dir() and not restart else None
        if stored == arguments:
            committed = {int(p.stem.split("-")[1]) for p in (staging / ".chunks").glob("chunk-*.json")}
            report.shards_resumed = sum(s.number in committed for s in plan.shards)
        _print_main(ctx, progress, report.summary())
        return report

    lock = DestinationLock(dst_path)
    try:
        ctx.on_main(lock.acquire)
        ctx.on_main(lambda: _finish_interrupted_publish(staging, dst_path, arguments, restart))
        if dst_path.exists() and ctx.on_main(lambda: _complete_version(dst_path, arguments)):
            report.already_complete = True
            _print_main(ctx, progress, report.summary())
            return report
        writer = _open_writer(ctx, source, plan, staging, arguments, restart, num_workers)
        committed = writer.committed
        pending = [s for s in plan.shards if s.number not in committed]
        mine = pending[ctx.rank :: ctx.world_size]
        report.shards_resumed = len(plan.shards) - len(pending)

        start = time.perf_counter()
        restored_here = _run_shards(
            model, source, run_stages, writer, plan, options, config, dev, ctx, mine, num_workers, progress, used_reader
        )
        seconds = time.perf_counter() - start
        counts = ctx.gather((restored_here, seconds))
        ctx.barrier()  # every rank's shards are committed
        report.restored_per_rank = [c for c, _ in counts]
        report.restored_this_run = sum(report.restored_per_rank)
        report.seconds = max(s for _, s in counts)
        report.images_per_second = report.restored_this_run / report.seconds if report.seconds > 0 else 0.0
        report.nfe_per_second = report.images_per_second * config.nfe
        summary = ctx.on_main(
            lambda: _publish(writer, source, plan, run_stages, options, config.nfe, staging, dst_path)
        )
        report.num_restored = summary["num_restored"]
        report.codec_note = summary["codec"].get("note", "")
        report.bad_samples_skipped = summary["bad_samples"]["skipped"]
        report.num_copied = plan.num_samples - report.num_restored - report.bad_samples_skipped
        report.bad_samples = [f"{shard} {key}: {why}" for shard, key, why in summary["bad_samples"]["samples"]]
        ctx.barrier()
    finally:
        if ctx.is_main:
            lock.release()
    _print_main(ctx, progress, report.summary())
    return report


def _finish_interrupted_publish(staging: Path, dst: Path, arguments: dict[str, Any], restart: bool) -> None:
    """A run killed after the version's manifest was written but before the final rename left
    a complete version in ``.DST.partial``: rename it (same arguments) or discard it (restart)."""
    if dst.exists() or not (staging / "manifest.json").is_file():
        return
    if restart:
        shutil.rmtree(staging)
        return
    manifest = json.loads((staging / "manifest.json").read_text())
    changes = describe_changes(manifest.get("params", {}), arguments, label=_argument_label)
    if changes or manifest.get("creator") != CREATOR:
        raise ArgumentsChanged(
            f"refusing to finish the restoration in {staging}: "
            + "; ".join(changes or ["another creator"])
            + ". Rerun with the same arguments, or pass restart=True (--restart) to discard it."
        )
    shutil.rmtree(staging / ".chunks", ignore_errors=True)  # killed between the manifest and the cleanup
    os.rename(staging, dst)


def _select_reader(reader: str, source: RestoreSource, stages: Stages | None) -> str:
    """``"dali"`` or ``"pil"`` for this run (``"pil"`` where there is no image to decode)."""
    from ..data import dali_available

    if not source.is_image or stages is None or stages.image is None:
        return "pil"
    if reader == "dali" and not dali_available():
        raise ValueError(
            "reader='dali' (--reader dali): NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)"
        )
    if reader == "auto":
        return "dali" if dali_available() else "pil"
    return reader


def _open_writer(
    ctx: RankContext,
    source: RestoreSource,
    plan: RestorePlan,
    staging: Path,
    arguments: dict[str, Any],
    restart: bool,
    workers: int,
) -> DatasetWriter:
    """Rank 0 checks (or discards) an unfinished run and creates the version; then every rank opens it."""

    def prepare() -> None:
        if staging.exists() and restart:
            shutil.rmtree(staging)
        if staging.exists():
            try:
                stored = DatasetWriter.stored_params(staging)
            except (OSError, ValueError, KeyError) as err:
                raise ValueError(
                    f"{staging} is not a restoration staging folder ({err}); remove it or pass --restart"
                ) from None
            if stored is None:
                raise ValueError(f"{staging} is not a restoration staging folder; remove it or pass --restart")
            changes = describe_changes(stored, arguments, label=_argument_label)
            if changes:
                raise ArgumentsChanged(
                    f"refusing to resume the unfinished restoration in {staging}: "
                    + "; ".join(changes)
                    + ". Rerun with the same arguments, or pass restart=True (--restart) to discard it."
                )
        writer = DatasetWriter(
            staging, source.format, parent=source.dataset, creator=CREATOR, params=arguments, resume=True
        )
        _verify_sources(source, plan, writer.committed, workers)

    ctx.on_main(prepare)
    ctx.barrier()
    return DatasetWriter(staging, source.format, parent=source.dataset, creator=CREATOR, params=arguments, resume=True)


def _run_shards(
    model: Callable[..., torch.Tensor],
    source: RestoreSource,
    stages: Stages | None,
    writer: DatasetWriter,
    plan: RestorePlan,
    options: RestoreOptions,
    config: SamplerConfig,
    device: torch.device,
    ctx: RankContext,
    shards: list[Shard],
    num_workers: int,
    progress: bool,
    reader: str,
) -> int:
    """Restore and copy this rank's shards; returns the number of samples restored."""
    if not shards:
        return 0
    to_restore = int(sum(int(s.restore.sum()) for s in shards))
    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=to_restore, unit="img", desc=f"restore (rank 0 of {ctx.world_size})", dynamic_ncols=True)
    lock = threading.Lock()

    def on_progress(count: int, kind: str) -> None:
        if bar is not None and kind == "restore":
            with lock:
                bar.update(count)

    sampler = decoder = None
    if to_restore:
        assert stages is not None
        sampler = RestorationSampler(
            model, stages.storage_shape, options.batch_size, config, codec=stages.device, device=device
        )
        if reader == "dali":
            from ..data.dali_pipeline import DALIImageDecoder

            spec = stages.image
            decoder = DALIImageDecoder(
                options.batch_size,
                spec.channels,
                (spec.height, spec.width),
                resize=spec.resize,
                device="mixed" if device.type == "cuda" else "cpu",
                num_threads=num_workers,
                device_id=device.index if device.type == "cuda" else None,
            )
    executor = ShardExecutor(
        sampler,
        source,
        stages,
        writer,
        grid=options.grid_spec(),
        seed=options.seed,
        training_noise_seed=options.training_noise_seed,
        new_sigma_min=plan.new_sigma_min,
        new_sigma_max=plan.new_sigma_max,
        on_bad_sample=options.on_bad_sample,
        num_workers=num_workers,
        on_progress=on_progress,
        decoder=decoder,
    )
    try:
        executor.run(shards)
    finally:
        if bar is not None:
            bar.close()
    return to_restore - sum(1 for i in executor.skipped if source.sigma_min[i] > options.sigma_out)


def _publish(
    writer: DatasetWriter,
    source: RestoreSource,
    plan: RestorePlan,
    stages: Stages | None,
    options: RestoreOptions,
    nfe: int,
    staging: Path,
    dst: Path,
) -> dict[str, Any]:
    """Rank 0, after every shard is committed: sidecar, ``dataset.json``, manifest, rename."""
    writer.reload()
    committed = writer.committed
    missing = [s.id for s in plan.shards if s.number not in committed]
    if missing:
        raise RuntimeError(f"cannot publish {dst}: shards not committed: {missing[:5]}")
    codec, _ = _codec_section(stages, committed, options.output_codec)
    bad = [
        [f"shard-{number:06d}", key, why]
        for number, record in sorted(committed.items())
        for key, why in record.get("note", {}).get("skipped", [])
    ]
    section = {
        "num_restored": int(sum(r.get("note", {}).get("restored", 0) for r in committed.values())),
        "nfe_per_sample": nfe,
        "shards": len(plan.shards),
        "grid": {**options.grid_spec().to_json(), "steps": plan.steps},
        "codec": codec,
        "bad_samples": {"skipped": len(bad), "samples": bad[:_REPORTED_BAD]},
    }
    info = {k: v for k, v in source.dataset.info.items() if k != "labels"}
    writer.close(extra={"restoration": section}, info=info, timestamp=False, extra_files=source.extra_files())
    os.rename(staging, dst)
    return section


def _print_main(ctx: RankContext, enabled: bool, line: str) -> None:
    if enabled and ctx.is_main:
        print(line, file=sys.stderr, flush=True)


def staging_folder(dst: str | os.PathLike[str]) -> Path:
    """Where an unfinished restoration into ``dst`` keeps the version being written (``.DST.partial``)."""
    return staging_dir(Path(dst).resolve())
