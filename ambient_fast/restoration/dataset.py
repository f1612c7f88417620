"""``restore_dataset``: restore every corrupt sample of a dataset version (SPEC 5).

The orchestrator only wires components: options (:class:`RestoreOptions`), the dataset
(:mod:`.io`), the plan (which samples to restore, new annotations, shards), the staging
folder and journal (:mod:`.journal`), the ranks (:mod:`.distributed`), the device sampler
(:mod:`.sampler`) and the host pipeline (:mod:`.pipeline`).
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..nn.checkpoint import file_sha256, load_denoiser, module_fingerprint
from ..runtime import RankContext
from ..samplers.restore import RESTORE_SIGMA_FLOOR
from .io import RestoreSource, open_source
from .journal import RunDir, staging_dir
from .pipeline import GridSpec, Shard, ShardExecutor, plan_shards
from .publish import publish_version
from .sampler import COMPILE_MODES, METHODS, START_NOISE, Codec, RestorationSampler, SamplerConfig

__all__ = ["RestoreOptions", "RestorePlan", "RestoreReport", "restore_dataset", "PRECISIONS", "STATE_DTYPES"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
COPY_SHARD_SIZE = 4096  # clean files per copy shard: a journal line per ~4k small files
DEFAULT_SHARD_SAMPLES = 1024  # restore shards hold >= this many samples (a multiple of the batch)
_SEED_LIMIT = 2**32  # derive_seeds mixes 32 bits of the run seed


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
    start_noise: str = "fresh"
    training_noise_seed: int = 0
    state_dtype: str = "float32"
    precision: str = "fp32"
    compile: str = "none"
    cuda_graph: bool | None = None
    backend: str = "auto"
    shard_size: int | None = None

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
        need(
            self.shard_size is None
            or (is_int(self.shard_size) and self.shard_size >= 1 and self.shard_size % self.batch_size == 0),
            "shard_size",
            f"None or a positive multiple of batch_size ({self.batch_size})",
        )

    @property
    def effective_shard_size(self) -> int:
        if self.shard_size is not None:
            return self.shard_size
        return self.batch_size * max(1, -(-DEFAULT_SHARD_SAMPLES // self.batch_size))

    def sampler_config(self, device: torch.device) -> SamplerConfig:
        return SamplerConfig(
            num_steps=self.num_steps,
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
    copy: np.ndarray  # int64 indices copied through byte for byte
    new_sigma_min: np.ndarray  # (N,) float64 annotations of the new version
    new_sigma_max: np.ndarray  # (N,) float64
    sample_shape: tuple[int, ...]  # of the restored samples
    codec: Codec | None  # storage of the restored samples (None: nothing to restore)
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
        shape: tuple[int, ...] = ()
        codec = None
        if len(restore):
            shape, codec = source.sample_layout(int(restore[0]))
        # Folder versions copy clean files during the run; the other formats pass them
        # through when the version is assembled (publish.py).
        copied = copy if source.format == "folder" else copy[:0]
        shards = plan_shards(restore, copied, options.effective_shard_size, COPY_SHARD_SIZE)
        return cls(len(sigma_min), restore, copy, new_min, new_max, shape, codec, shards)


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
    shards_resumed: int  # already journaled by an earlier, interrupted run
    restored_this_run: int
    restored_per_rank: list[int]  # samples restored by each rank in this run
    seconds: float  # wall time of the sampling phase of this run (slowest rank)
    images_per_second: float  # restored_this_run / seconds
    nfe_per_second: float
    world_size: int
    device: str
    dry_run: bool = False
    already_complete: bool = False
    arguments: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        if self.dry_run:
            return (
                f"dry run: would restore {self.num_restored} of {self.num_samples} samples "
                f"({self.num_copied} copied through) at {self.nfe_per_sample} NFE each, "
                f"{self.shards_total} shards ({self.shards_resumed} already done) -> {self.dst}"
            )
        if self.already_complete:
            return f"{self.dst} is already complete (same arguments); nothing to do"
        return (
            f"restored {self.num_restored} of {self.num_samples} samples ({self.num_copied} copied through, "
            f"{self.shards_resumed}/{self.shards_total} shards resumed) in {self.seconds:.1f} s: "
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
        same = manifest["params"] == arguments and manifest["creator"] == "ambient_fast.restoration"
    except (OSError, ValueError, KeyError, TypeError):
        same = False
    if not same:
        raise FileExistsError(f"{dst} already exists and is not this restoration's output; choose a new folder")
    return True


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
    start_noise: str = "fresh",
    training_noise_seed: int = 0,
    state_dtype: str = "float32",
    precision: str = "fp32",
    compile: str = "none",
    cuda_graph: bool | None = None,
    backend: str = "auto",
    shard_size: int | None = None,
    device: torch.device | str | None = None,
    num_workers: int = 4,
    restart: bool = False,
    fsync: bool = False,
    progress: bool = True,
    dry_run: bool = False,
    model_fingerprint: str | None = None,
) -> RestoreReport:
    """Restore every corrupt sample of the dataset version ``src`` into a new version ``dst``.

    SPEC 5 per sample i with ``sigma_min_i > sigma_out``: start at ``y0_i + sigma_min_i eps_i``
    (eps from the seed derived from ``(seed, i)``, i = the sample's index in key order), run
    the sampler on the sample's own grid from ``sigma_min_i`` to ``sigma_out`` (``num_steps``
    rho-grid points, then 0 or ``sigma_out``), store the result in the sample's own format and
    annotate it ``sigma_min_i / rho_ambient`` (``sigma_out == 0``) or ``sigma_out``. Other
    samples are copied byte for byte with their annotations. The output is a function of the
    arguments and the data only: batch composition, rank count and interruptions do not
    change a byte of it.

    Rank-agnostic: under ``torchrun`` (an initialised process group) the shards are split
    across ranks, each writes its own, and rank 0 writes the sidecar and manifest after a
    barrier. Resumable: rerunning a killed call with the same arguments skips finished
    shards; different arguments are refused naming each one (``restart=True`` discards the
    unfinished run). ``dst`` appears atomically when complete.

    Args:
        denoiser: EDM denoiser ``D(x, sigma)`` module, a checkpoint path
            (:func:`~ambient_fast.restoration.save_denoiser` format), or a plain callable (then
            pass ``model_fingerprint``). Modules must be in eval mode.
        src: a dataset version in any :func:`ambient_fast.data.open_dataset` format (folder,
            zip, WebDataset shards, tensors) with its ``annotations.jsonl``; never modified.
        dst: the new version's folder, in ``src``'s format (must not exist; it appears
            atomically, built in a ``.DST.partial`` staging folder beside it).
        num_steps: grid points per sample before the final level (anchor 18: NFE 35 with Heun).
        batch_size: samples per device batch (the captured shape; the last batch is padded).
        method: ``"heun"`` (deterministic, anchor), ``"euler"``, ``"stochastic"`` (ancestral
            reverse SDE: samples the posterior ``p(x0 | x_sigma_min)``).
        seed: run seed of the restoration noise, in [0, 2^32).
        rho_ambient: new annotation ``sigma_min / rho_ambient`` when integrating to 0 (anchor 8).
        sigma_out: stop level; > 0 stores the noisy state there, annotated ``sigma_out``.
            Samples with ``sigma_min <= sigma_out`` are copied through.
        rho, sigma_floor: grid curvature and lowest positive level (EDM 7 and 0.002).
        start_noise: ``"fresh"`` (anchor), ``"training"`` (the frozen training noise of
            ``noisy_pair(..., sample_ids, noise_seed=training_noise_seed)``) or ``"none"``
            (samples are stored already noisy at their sigma_min, the anchors' ``npy`` case).
        state_dtype: sampler state, ``"float32"`` or ``"float64"`` (the anchors').
        precision: network compute, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast).
        compile: ``torch.compile`` mode of the per-step function (``"none"``, ``"default"``,
            ``"max-autotune-no-cudagraphs"``, ``"reduce-overhead"``).
        cuda_graph: capture the K-step loop (None: on for CUDA unless ``reduce-overhead``).
        backend: fused step ops for eager steps (``"auto"``, ``"torch"``, ``"triton"``, ``"cpp"``).
        shard_size: restored samples per shard, a multiple of ``batch_size`` (default: the
            smallest multiple >= 1024). The unit of resume and of the split across ranks.
        device: default: the module's device, else ``cuda:LOCAL_RANK`` or CPU.
        num_workers: IO threads per rank (decode, encode, write).
        restart: discard an unfinished run's staging folder instead of resuming it.
        fsync: flush each shard to disk before journaling it (survives power loss too).
        progress: tqdm progress bar and summary line on rank 0.
        dry_run: validate everything and return the plan's report; write nothing.
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
        start_noise=start_noise,
        training_noise_seed=training_noise_seed,
        state_dtype=state_dtype,
        precision=precision,
        compile=compile,
        cuda_graph=cuda_graph,
        backend=backend,
        shard_size=shard_size,
    )
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    ctx = RankContext.current()
    src_path, dst_path = Path(src).resolve(), Path(dst).resolve()
    _check_paths(src_path, dst_path)
    source = open_source(src_path)
    plan = RestorePlan.build(source, options)
    model, dev, model_id = _resolve_denoiser(denoiser, device, ctx.local_rank, model_fingerprint)
    arguments = _plain_json(
        {
            **asdict(options),
            "shard_size": options.effective_shard_size,
            "src_fingerprint": source.fingerprint(),
            "model_fingerprint": model_id,
            "device_type": dev.type,
        }
    )
    run_dir = RunDir(dst_path, fsync=fsync)
    config = options.sampler_config(dev)
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
        arguments=arguments,
    )
    if dst_path.exists() and ctx.on_main(lambda: _complete_version(dst_path, arguments)):
        if ctx.is_main and run_dir.root.exists():
            shutil.rmtree(run_dir.root, ignore_errors=True)  # litter of a kill after the final rename
        report.already_complete = True
        _print_main(ctx, progress, report.summary())
        return report
    if dry_run:
        report.dry_run = True
        if run_dir.root.exists() and not restart:
            report.shards_resumed = sum(s.id in run_dir.finished() for s in plan.shards)
        _print_main(ctx, progress, report.summary())
        return report

    ctx.on_main(lambda: run_dir.prepare(arguments, restart=restart, label=_argument_label))
    ctx.barrier()  # every rank now sees the same journal
    finished = run_dir.finished()
    pending = [s for s in plan.shards if s.id not in finished]
    mine = pending[ctx.rank :: ctx.world_size]
    report.shards_resumed = len(plan.shards) - len(pending)

    start = time.perf_counter()
    restored_here = _run_shards(model, source, plan, options, config, dev, run_dir, ctx, mine, num_workers, progress)
    seconds = time.perf_counter() - start
    counts = ctx.gather((restored_here, seconds))
    ctx.barrier()  # every rank's shards are journaled
    report.restored_per_rank = [c for c, _ in counts]
    report.restored_this_run = sum(report.restored_per_rank)
    report.seconds = max(s for _, s in counts)
    report.images_per_second = report.restored_this_run / report.seconds if report.seconds > 0 else 0.0
    report.nfe_per_second = report.images_per_second * config.nfe
    ctx.on_main(lambda: _publish(source, plan, arguments, run_dir, config.nfe))
    ctx.barrier()
    _print_main(ctx, progress, report.summary())
    return report


def _run_shards(
    model: Callable[..., torch.Tensor],
    source: RestoreSource,
    plan: RestorePlan,
    options: RestoreOptions,
    config: SamplerConfig,
    device: torch.device,
    run_dir: RunDir,
    ctx: RankContext,
    shards: list[Shard],
    num_workers: int,
    progress: bool,
) -> int:
    """Restore and copy this rank's shards; returns the number of samples restored."""
    to_restore = sum(len(s.indices) for s in shards if s.kind == "restore")
    if not shards:
        return 0
    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=to_restore, unit="img", desc=f"restore (rank 0 of {ctx.world_size})", dynamic_ncols=True)
    lock = threading.Lock()

    def on_progress(count: int, kind: str) -> None:
        if bar is not None and kind == "restore":
            with lock:
                bar.update(count)

    sampler = None
    if to_restore:
        assert plan.codec is not None
        sampler = RestorationSampler(
            model, plan.sample_shape, options.batch_size, config, codec=plan.codec, device=device
        )
    grid = GridSpec(
        options.sigma_out,
        options.num_steps,
        options.seed,
        options.training_noise_seed,
        options.rho,
        options.sigma_floor,
    )
    executor = ShardExecutor(
        sampler,
        source,
        run_dir,
        ctx.rank,
        grid,
        packed=source.format != "folder",  # type: ignore[arg-type]
        num_workers=num_workers,
        on_progress=on_progress,
    )
    try:
        executor.run(shards)
    finally:
        if bar is not None:
            bar.close()
    return to_restore


def _publish(source: RestoreSource, plan: RestorePlan, arguments: dict[str, Any], run_dir: RunDir, nfe: int) -> None:
    """Rank 0, after every shard is journaled: assemble the version and rename it into place."""
    finished = run_dir.finished()
    missing = [s.id for s in plan.shards if s.id not in finished]
    if missing:
        raise RuntimeError(f"cannot publish {run_dir.dst}: shards not journaled: {missing[:5]}")
    section = {"num_restored": int(len(plan.restore)), "nfe_per_sample": nfe, "shards": len(plan.shards)}
    publish_version(
        source,
        run_dir,
        [record for s in plan.shards for record in finished[s.id]],
        shard_of={int(i): s.id for s in plan.shards if s.kind == "restore" for i in s.indices},
        new_sigma_min=plan.new_sigma_min,
        new_sigma_max=plan.new_sigma_max,
        arguments=arguments,
        section=section,
    )


def _print_main(ctx: RankContext, enabled: bool, line: str) -> None:
    if enabled and ctx.is_main:
        print(line, file=sys.stderr, flush=True)


def staging_folder(dst: str | os.PathLike[str]) -> Path:
    """Where an unfinished restoration into ``dst`` keeps its state (``.DST.partial``)."""
    return staging_dir(Path(dst).resolve())
