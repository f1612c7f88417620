"""EDM-style training with the ambient loss and noise-level-first batches (SPEC 2, 3).

One optimiser step, as in the anchors (ANCHORS 1, 4):

1. The training input (:func:`ambient_fast.data.open_training_input`: the in-memory cache,
   or a DALI / torch stream) gives this rank's batch in the noise-level-first sampler's
   order: sigma drawn first from the EDM log-normal, then a sample eligible at it (SPEC 3);
   sample ids and sigmas travel with the images.
2. :class:`~ambient_fast.core.loss.AmbientLoss` forms the noisy pair (``n_i`` frozen per
   sample id; ``eta`` counter-based, keyed by (run seed, global batch slot), so a slot gets
   the same noise whichever rank holds it: 1 process and N processes with the same global
   batch follow the same trajectory, and a resumed run draws the same noise as an
   uninterrupted one), runs the denoiser and returns the per-sample loss, summed over
   elements and averaged over the batch as the anchors do (``loss_reduction``).
3. Grads: ``nan_to_num``, clip to ``grad_clip``, Adam with a linear lr ramp-up, EMA with a
   half-life in images (EDM's ramp: half-life <= ``ema_rampup`` x images seen).

Training modes (for the demo and ablations): ``clean`` (only samples with sigma_min = 0),
``plain`` (all samples as if clean), ``contraction`` (corrupt samples only above their
buffered sigma_min, plain loss), ``ambient`` (the ambient loss).

Checkpoints: the whole training state (model, EMA, optimiser, step, RNG states, sampler
position, config) is one safetensors file, ``training-state.safetensors``
(:func:`ambient_fast.nn.save_training_state`), replaced atomically every
``checkpoint_images`` images and at the end; ``train(..., resume=True)`` continues from it
with the same batches. The EMA denoiser is exported with :func:`ambient_fast.nn.save_denoiser`
as ``denoiser.safetensors``.

Multi-process: run the same call under ``torchrun``; DistributedDataParallel (NCCL on CUDA,
gloo on CPU), per-rank batch = ``batch_size / world_size``, rank 0 writes and prints.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..core.noise import derive_seeds
from ..core.precond import EDMPrecond
from ..core.schedules import EDM_P_MEAN, EDM_P_STD, SIGMA_DATA
from ..data.batch import Batch, LookupTables
from ..data.nature_noise import detect_nature_noise
from ..data.sampler import NoiseFirstBatchSampler
from ..data.stream import (
    CACHE_BUDGET_BYTES,
    CachedBatchLoader,
    IndexedBatchSampler,
    choose_backend,
    open_training_input,
)
from ..loss import AmbientLoss
from ..nn.checkpoint import load_denoiser, load_training_state, save_denoiser, save_training_state
from ..runtime import (
    RankContext,
    append_jsonl,
    check_unchanged,
    init_runtime,
    read_jsonl,
    write_json,
    write_jsonl,
)

__all__ = [
    "RESUMABLE_CHANGES",
    "TRAIN_MODES",
    "TrainResult",
    "detect_nature_noise",
    "load_training_state",
    "network_kwargs_for",
    "train",
    "train_defaults",
]

TRAIN_MODES = ("clean", "plain", "contraction", "ambient")
STATE_FILE = "training-state.safetensors"
DENOISER_FILE = "denoiser.safetensors"
LOG_FILE = "log.jsonl"
# Options that may change between a checkpoint and its resumption (they do not change the
# trajectory: every input backend gives the same batches): everything else must match.
RESUMABLE_CHANGES = frozenset(
    {
        "total_images", "checkpoint_images", "progress", "log_every", "device", "init", "resume",
        "cache", "cache_budget_bytes", "stream", "loader_threads", "loader_workers",
    }
)


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    run_dir: Path  # the training folder
    denoiser_path: Path  # EMA denoiser (nn.save_denoiser format)
    images: int  # images trained on in total (all ranks)
    steps: int  # optimiser steps
    log: list[dict[str, Any]]  # records of log.jsonl: images, loss, lr, images_per_second, ...
    images_per_second: float  # throughput of this call (all ranks, excluding start-up)
    input_backend: str = "cache"  # "cache", "dali" or "torch" (see ambient_fast.data.stream)


def train_defaults() -> dict[str, Any]:
    """The default keyword arguments of :func:`train` (for CLIs and configs)."""
    import inspect

    sig = inspect.signature(train)
    return {k: p.default for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


def train(
    data: str | Path | Sequence[torch.Tensor],
    run_dir: str | Path,
    *,
    mode: Literal["clean", "plain", "contraction", "ambient"] = "ambient",  # see module docstring
    network: str = "mlp",                      # ambient_fast.nn.build_network name
    network_kwargs: dict[str, Any] | None = None,  # extra network options
    use_labels: bool = False,                  # class-conditional on the dataset's labels
    init: str | Path | None = None,            # denoiser to start from (previous loop); None = scratch
    total_images: int = 512_000,               # training length, images over all ranks
    batch_size: int = 256,                     # global batch (divisible by the world size)
    lr: float = 1e-3,                          # Adam learning rate (anchors: 1e-3)
    betas: tuple[float, float] = (0.9, 0.999),  # Adam betas
    adam_eps: float = 1e-8,                    # Adam epsilon
    lr_rampup_images: int = 10_000,            # linear lr ramp-up (anchors CIFAR: 10 Mimg)
    ema_halflife_images: int = 50_000,         # EMA half-life (anchors CIFAR: 0.5 Mimg)
    ema_rampup: float | None = 0.05,           # half-life <= ema_rampup * images seen (EDM)
    grad_clip: float = 1.0,                    # grad-norm clip after nan_to_num (anchors: 1.0)
    loss_reduction: Literal["sum", "mean"] = "sum",  # over elements; then mean over the batch
    P_mean: float = EDM_P_MEAN,                # log-normal training sigma, mean
    P_std: float = EDM_P_STD,                  # log-normal training sigma, std
    sigma_data: float = SIGMA_DATA,            # EDM sigma_data
    s_max: float = 4.0,                        # eligibility sigma > sqrt(s_max/(s_max-1)) sigma_min
    buffer: float | None = None,               # additive eligibility sigma > sigma_min + buffer instead
    nature_noise: Literal["auto", "fixed", "stored"] = "auto",  # fixed: add sm n_i; stored: data at sm; auto: manifest
    precision: Literal["fp32", "bf16", "fp16"] = "fp32",  # autocast dtype of the network
    allow_tf32: bool = False,                  # TF32 matmuls on CUDA (anchors: off)
    compile: Literal["auto", "on", "off"] = "auto",  # torch.compile the denoiser; auto = on for CUDA only
    cache: Literal["auto", "on", "off"] = "auto",  # in-memory dataset; auto = when it fits cache_budget_bytes
    cache_budget_bytes: int = CACHE_BUDGET_BYTES,  # decoded size up to which "auto" caches (4 GiB)
    stream: Literal["auto", "dali", "torch"] = "auto",  # streaming reader when not cached; auto = DALI if installed
    loader_threads: int = 2,                   # DALI / cache decode threads
    loader_workers: int = 2,                   # torch DataLoader workers (stream="torch")
    checkpoint_images: int = 100_000,          # write the training state every this many images
    log_every: int = 20,                       # log / progress update every this many steps
    seed: int = 0,                             # init, batches and noise
    device: str = "auto",                      # "auto" = this rank's CUDA device, else CPU
    resume: bool = True,                       # continue from run_dir's training state if present
    progress: bool = True,                     # tqdm bar with images/s and ETA (rank 0)
) -> TrainResult:
    """Train an EDM denoiser on a dataset with per-sample sigma_min (see module docstring).

    Args:
        data: dataset folder (any format of ``ambient_fast.data.open_dataset``), or the
            tuple ``load_dataset_tensors`` returns: ``(images (N, C, H, W) in [-1, 1],
            sigma_min (N,), sigma_max (N,), ids (N,), labels (N,) or None)``, used as the cache.
        run_dir: folder for ``config.json``, ``log.jsonl``, the training state and
            ``denoiser.safetensors``; created if missing.

    Returns:
        :class:`TrainResult`. Rank 0 writes every file; all ranks return.
    """
    config = {k: v for k, v in locals().items() if k not in ("data", "run_dir")}
    config["data"] = str(data) if isinstance(data, (str, Path)) else "<tensors>"
    _check_options(config)
    if nature_noise == "auto":
        nature_noise = config["nature_noise"] = detect_nature_noise(data)
    ctx = init_runtime(device)
    world, rank, dev = ctx.world_size, ctx.rank, ctx.device
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the world size {world}")
    local_batch = batch_size // world
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32

    # Data: the noise-level-first sampler over the samples this mode trains on, read
    # through the cache or a stream (same batches either way).
    pool = _training_pool(data, mode, use_labels)
    sampler = NoiseFirstBatchSampler(
        pool.sigma_min, local_batch, sigma_max=pool.sigma_max, s_max=s_max, buffer=buffer,
        P_mean=P_mean, P_std=P_std, seed=seed, rank=rank, world_size=world,
    )
    loader, backend = _open_input(pool, sampler, config, ctx)

    # Networks, optimiser, loss.
    torch.manual_seed(seed)
    net_kwargs = network_kwargs_for(network, pool.sample_shape, **(network_kwargs or {}))
    if pool.num_classes is not None:
        net_kwargs.setdefault("num_classes", pool.num_classes)
    net = _build_denoiser(network, net_kwargs, sigma_data).to(dev)
    if init is not None:
        _load_init(net, init)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=betas, eps=adam_eps, foreach=True)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    loss_fn = AmbientLoss(
        P_mean=P_mean, P_std=P_std, sigma_data=sigma_data, s_max=s_max, buffer=buffer,
        mode="contraction" if mode == "contraction" else "ambient",
        fixed_noise=nature_noise == "fixed", stored=nature_noise == "stored", noise_seed=seed, validate=False,
    )

    # The run folder: created only now that every option and the data have been checked.
    run_dir = Path(run_dir)
    state_path = run_dir / STATE_FILE
    step, images_done = 0, 0
    if resume and state_path.exists():
        step, images_done = _restore_state(state_path, config, net, ema, opt, scaler, sampler)
        if ctx.is_main:  # drop log records written after the checkpoint by the interrupted run
            kept = [r for r in read_jsonl(run_dir / LOG_FILE) if r["step"] <= step]
            write_jsonl(run_dir / LOG_FILE, kept)
    elif ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        state_path.unlink(missing_ok=True)
        (run_dir / LOG_FILE).unlink(missing_ok=True)
    if ctx.is_main:
        write_json(run_dir / "config.json", config)

    model: nn.Module = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    # "auto" compiles on CUDA only: on CPU, measured with `ambient-fast bench --compile both`
    # (mlp-base, batch 256, 2 cores), the compiled step was slower (18.2k vs 21.3k img/s)
    # and cost 15 s of compilation.
    if compile == "on" or (compile == "auto" and dev.type == "cuda"):
        model = torch.compile(model)
    autocast = _autocast(precision, dev)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        with autocast:
            return model(x, sigma, labels).float()

    # Loop.
    loss_scale = float(math.prod(pool.sample_shape)) if loss_reduction == "sum" else 1.0
    bar = _progress_bar(total_images, images_done, enabled=progress and ctx.is_main)
    next_checkpoint = (images_done // checkpoint_images + 1) * checkpoint_images
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    loss_count = 0
    t_start, images_start, t_log = time.perf_counter(), images_done, time.perf_counter()
    net.train()
    params, ema_params = list(net.parameters()), list(ema.parameters())
    buffers, ema_buffers = list(net.buffers()), list(ema.buffers())
    batches = _endless(loader)
    while images_done < total_images:
        batch = _for_mode(next(batches), mode).to(dev, non_blocking=True)
        slots = step * batch_size + rank * local_batch + torch.arange(len(batch), device=dev)
        per_sample = loss_fn(
            denoise, batch.images, batch.sigma_min, batch.labels if use_labels else None,
            sigma=batch.sigma, sigma_max=batch.sigma_max, sample_ids=batch.sample_ids,
            eta_seeds=derive_seeds(slots, seed),
        )
        loss = per_sample.mean() * loss_scale
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        for g in [p.grad for p in params if p.grad is not None]:
            torch.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5, out=g)
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(params, grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr * min((images_done + batch_size) / max(lr_rampup_images, 1e-8), 1.0)
        scaler.step(opt)
        scaler.update()
        _update_ema(ema_params, params, images_done, batch_size, ema_halflife_images, ema_rampup)
        if buffers:
            torch._foreach_copy_(ema_buffers, buffers)
        step += 1
        images_done += batch_size
        loss_sum += loss.detach().double()
        loss_count += 1
        bar.update(batch_size)

        if step % log_every == 0 or images_done >= total_images:
            mean_loss = ctx.all_reduce_mean(loss_sum / loss_count)
            now = time.perf_counter()
            record = {
                "images": images_done,
                "step": step,
                "loss": mean_loss,
                "lr": opt.param_groups[0]["lr"],
                "images_per_second": loss_count * batch_size / max(now - t_log, 1e-9),
            }
            if ctx.is_main:
                append_jsonl(run_dir / LOG_FILE, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            loss_sum.zero_()
            loss_count, t_log = 0, now
        if images_done >= next_checkpoint or images_done >= total_images:
            next_checkpoint += checkpoint_images
            if ctx.is_main:
                _save_state(state_path, config, step, images_done, net, ema, opt, scaler, sampler)
            ctx.barrier()
    bar.close()
    elapsed = time.perf_counter() - t_start
    denoiser_path = run_dir / DENOISER_FILE
    if ctx.is_main:
        extra = {"images": images_done, "steps": step, "mode": mode, "ema_halflife_images": ema_halflife_images,
                 "sample_shape": list(pool.sample_shape)}
        save_denoiser(denoiser_path, ema, name=network, network_kwargs=net_kwargs, sigma_data=sigma_data, extra=extra)
    ctx.barrier()
    return TrainResult(
        run_dir=run_dir,
        denoiser_path=denoiser_path,
        images=images_done,
        steps=step,
        log=read_jsonl(run_dir / LOG_FILE),
        images_per_second=(images_done - images_start) / max(elapsed, 1e-9),
        input_backend=backend,
    )


# ---------------------------------------------------------------------------------------
# Data wiring.


@dataclass
class _Pool:
    """The samples a run trains on: a dataset (or in-memory tensors) and its annotation
    after the training mode (``clean``: the clean subset; ``plain``: sigma_min = 0)."""

    dataset: Any  # ambient_fast.data.Dataset, or None for in-memory tensors
    tensors: tuple | None  # (images, sigma_min, sigma_max, ids, labels) when given in memory
    indices: np.ndarray | None  # dataset indices of the pool (None: all)
    sigma_min: np.ndarray  # float64 (n,), the sampler's eligibility levels
    sigma_max: np.ndarray  # float64 (n,)
    sample_shape: tuple[int, ...]
    num_classes: int | None


def _training_pool(data: str | Path | Sequence[torch.Tensor], mode: str, use_labels: bool) -> _Pool:
    """Open the dataset and apply the training mode to its annotation."""
    if isinstance(data, (str, Path)):
        from ..data import open_dataset

        dataset, tensors = open_dataset(data), None
        sigma_min, sigma_max, labels = dataset.sigma_min, dataset.sigma_max, dataset.labels
        sample_shape = tuple(dataset.sample_shape)
    else:
        images, sigma_min, sigma_max, ids, labels = data
        dataset = None
        sigma_min = torch.as_tensor(sigma_min, dtype=torch.float64).numpy()
        sigma_max = np.zeros_like(sigma_min) if sigma_max is None else torch.as_tensor(sigma_max).double().numpy()
        labels = None if labels is None else torch.as_tensor(labels).numpy()
        tensors = (images.to(torch.float32), sigma_min, sigma_max, torch.as_tensor(ids, dtype=torch.int64), labels)
        sample_shape = tuple(images.shape[1:])
    sigma_min, sigma_max = np.asarray(sigma_min, np.float64), np.asarray(sigma_max, np.float64)
    num_classes = None
    if use_labels:
        if labels is None or np.asarray(labels).ndim != 1 or bool((np.asarray(labels) < 0).any()):
            raise ValueError("use_labels=True needs an integer class label (>= 0) for every sample")
        num_classes = int(np.asarray(labels).max()) + 1
    indices = None
    if mode == "clean":
        indices = np.flatnonzero(sigma_min == 0)
        if indices.size == 0:
            raise ValueError("mode='clean' needs samples with sigma_min = 0; the dataset has none")
        sigma_min, sigma_max = sigma_min[indices], sigma_max[indices]
    elif mode == "plain":
        sigma_min, sigma_max = np.zeros_like(sigma_min), np.zeros_like(sigma_max)
    return _Pool(dataset, tensors, indices, sigma_min, sigma_max, sample_shape, num_classes)


def _open_input(pool: _Pool, sampler: NoiseFirstBatchSampler, config: dict[str, Any], ctx: RankContext):
    """``(loader, backend)``: this rank's batches (dataset indices) and how they are read."""
    order = sampler if pool.indices is None else IndexedBatchSampler(sampler, pool.indices)
    if pool.dataset is None:
        images, sigma_min, sigma_max, ids, labels = pool.tensors
        tables = LookupTables.from_arrays(sigma_min, sigma_max, labels)
        return CachedBatchLoader(images.to(ctx.device), tables, order, sample_ids=ids), "cache"
    backend = choose_backend(pool.dataset, config["cache"], config["cache_budget_bytes"], config["stream"])
    loader = open_training_input(
        pool.dataset, order, backend=backend, device=ctx.device, rank=ctx.rank, world_size=ctx.world_size,
        seed=config["seed"], num_threads=config["loader_threads"], num_workers=config["loader_workers"],
    )
    return loader, backend


def _for_mode(batch: Batch, mode: str) -> Batch:
    """``plain`` trains every sample as clean: its batch gets sigma_min = sigma_max = 0."""
    if mode == "plain":
        batch.sigma_min = torch.zeros_like(batch.sigma_min)
        batch.sigma_max = torch.zeros_like(batch.sigma_max)
    return batch


def _endless(loader: Iterable[Batch]) -> Iterator[Batch]:
    """The loader's batches, epoch after epoch (each ``iter`` is one epoch of the sampler,
    which starts from its own position: see :func:`_save_state`)."""
    while True:
        yield from loader


# ---------------------------------------------------------------------------------------
# Pieces of the step.


def _update_ema(
    ema: list[torch.Tensor],
    net: list[torch.Tensor],
    images_done: int,
    batch: int,
    halflife: float,
    rampup: float | None,
) -> None:
    """EDM's EMA: ``ema <- net + beta (ema - net)``, ``beta = 0.5 ** (batch / halflife)``,
    the half-life ramped to at most ``rampup`` x images seen."""
    if rampup is not None:
        halflife = min(halflife, images_done * rampup)
    beta = 0.5 ** (batch / max(halflife, 1e-8))
    with torch.no_grad():
        torch._foreach_lerp_(ema, net, 1.0 - beta)


def _autocast(precision: str, dev: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=dev.type, dtype=dtype)


def _progress_bar(total: int, initial: int, *, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, unit="img", unit_scale=True, disable=not enabled, dynamic_ncols=True, desc="train"
    )


def _check_options(config: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first bad option."""
    checks = [
        ("mode", config["mode"] in TRAIN_MODES, f"one of {TRAIN_MODES}"),
        ("total_images", config["total_images"] > 0, "> 0"),
        ("batch_size", config["batch_size"] > 0, "> 0"),
        ("lr", config["lr"] > 0, "> 0"),
        ("lr_rampup_images", config["lr_rampup_images"] >= 0, ">= 0"),
        ("ema_halflife_images", config["ema_halflife_images"] >= 0, ">= 0"),
        ("grad_clip", config["grad_clip"] >= 0, ">= 0 (0 = off)"),
        ("loss_reduction", config["loss_reduction"] in ("sum", "mean"), "'sum' or 'mean'"),
        ("P_std", config["P_std"] > 0, "> 0"),
        ("sigma_data", config["sigma_data"] > 0, "> 0"),
        ("s_max", config["s_max"] > 1, "> 1"),
        ("buffer", config["buffer"] is None or config["buffer"] >= 0, ">= 0"),
        ("nature_noise", config["nature_noise"] in ("auto", "fixed", "stored"), "'auto', 'fixed' or 'stored'"),
        ("precision", config["precision"] in ("fp32", "bf16", "fp16"), "'fp32', 'bf16' or 'fp16'"),
        ("compile", config["compile"] in ("auto", "on", "off"), "'auto', 'on' or 'off'"),
        ("cache", config["cache"] in ("auto", "on", "off"), "'auto', 'on' or 'off'"),
        ("cache_budget_bytes", config["cache_budget_bytes"] >= 0, ">= 0"),
        ("stream", config["stream"] in ("auto", "dali", "torch"), "'auto', 'dali' or 'torch'"),
        ("loader_threads", config["loader_threads"] > 0, "> 0"),
        ("loader_workers", config["loader_workers"] >= 0, ">= 0"),
        ("checkpoint_images", config["checkpoint_images"] > 0, "> 0"),
        ("log_every", config["log_every"] > 0, "> 0"),
    ]
    for name, ok, rule in checks:
        if not ok:
            raise ValueError(f"{name} must be {rule}, got {config[name]!r}")




def network_kwargs_for(network: str, sample_shape: tuple[int, ...], **overrides: Any) -> dict[str, Any]:
    """``build_network`` kwargs fitting samples of ``sample_shape``, then ``overrides``.

    MLP families get ``data_dim = prod(sample_shape)``; UNets get ``channels = C`` of
    ``(C, H, W)`` samples.
    """
    kwargs: dict[str, Any] = {}
    if network.startswith("mlp"):
        kwargs["data_dim"] = math.prod(sample_shape)
    elif network.startswith("unet"):
        if len(sample_shape) != 3:
            raise ValueError(f"network {network!r} needs (C, H, W) samples, got shape {tuple(sample_shape)}")
        kwargs["channels"] = sample_shape[0]
    return {**kwargs, **overrides}


def _build_denoiser(network: str, kwargs: dict[str, Any], sigma_data: float) -> EDMPrecond:
    from ..nn import build_network

    return EDMPrecond(build_network(network, **kwargs), sigma_data)


def _load_init(net: EDMPrecond, path: str | Path) -> None:
    """Copy the weights of a saved denoiser (the previous loop's model) into ``net``."""
    source = load_denoiser(path)
    try:
        net.load_state_dict(source.state_dict())
    except RuntimeError as err:
        raise ValueError(f"init={path}: its network does not match this run's network ({err})") from None


# ---------------------------------------------------------------------------------------
# The training state.


def _save_state(path, config, step, images_done, net, ema, opt, scaler, sampler) -> None:
    """The whole state after ``step`` steps. The sampler's position is the one the loop
    consumed (``step`` batches from the start: a streaming reader may have drawn further
    ahead), so a resumed run continues with the next batch."""
    per_epoch = len(sampler)
    save_training_state(
        path,
        {
            "step": step,
            "images": images_done,
            "config": config,
            "model": net.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "sampler": {**sampler.state_dict(), "epoch": step // per_epoch, "next_batch": step % per_epoch},
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        },
    )


def _restore_state(path, config, net, ema, opt, scaler, sampler) -> tuple[int, int]:
    state = load_training_state(path)
    check_unchanged(state["config"], config, may_change=RESUMABLE_CHANGES, where=str(path))
    net.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["sampler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(_to_tuples(rng["python"]))
    return int(state["step"]), int(state["images"])


def _to_tuples(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_to_tuples(v) for v in value)
    return value
