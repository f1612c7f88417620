"""EDM-style training with the ambient loss and noise-level-first batches (SPEC 2, 3).

One optimiser step, as in the anchors (ANCHORS 1, 4):

1. The noise-level-first sampler gives this rank's ``(index, sigma)`` pairs: sigma is drawn
   first from the EDM log-normal, then a sample eligible at sigma (SPEC 3).
2. The noisy pair ``y_tmin = y0 + sigma_min n_i`` (``n_i`` frozen per sample) and
   ``y_t = y_tmin + sqrt(sigma^2 - sigma_min^2) eta``; ``eta`` is counter-based noise keyed by
   (run seed, step, global batch slot), so a slot gets the same noise whichever rank holds
   it: 1 process and N processes with the same global batch follow the same trajectory, and
   a resumed run draws the same noise as an uninterrupted one.
3. ``D = net(y_t, sigma)``, per-sample ambient loss (``ambient_fast.ambient_loss``), summed
   over elements and averaged over the batch as the anchors do (``loss_reduction``).
4. Grads: ``nan_to_num``, clip to ``grad_clip``, Adam with a linear lr ramp-up, EMA with a
   half-life in images (EDM's ramp: half-life <= ``ema_rampup`` x images seen).

Training modes (for the demo and ablations): ``clean`` (only samples with sigma_min = 0),
``plain`` (all samples as if clean), ``contraction`` (corrupt samples only above their
buffered sigma_min, plain loss), ``ambient`` (the ambient loss).

Checkpoints: the whole training state (model, EMA, optimiser, step, RNG states, sampler
state, config) is one safetensors file, ``training-state.safetensors``, replaced atomically
every ``checkpoint_images`` images and at the end; ``train(..., resume=True)`` continues
from it with the same batches. The EMA denoiser is exported with
``ambient_fast.restoration.save_denoiser`` as ``denoiser.safetensors``.

Multi-process: run the same call under ``torchrun``; DistributedDataParallel (NCCL on CUDA,
gloo on CPU), per-rank batch = ``batch_size / world_size``, rank 0 writes and prints.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.loss import ambient_loss
from ..core.noise import derive_seeds, noisy_pair
from ..core.precond import EDMPrecond
from ..core.schedules import EDM_P_MEAN, EDM_P_STD, SIGMA_DATA
from ..data.nature_noise import detect_nature_noise
from ..data.sampler import NoiseFirstBatchSampler
from .runs import append_jsonl, init_distributed, read_jsonl, write_json

__all__ = [
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
_META_KEY = "ambient_fast.training_state"
# Options that may change between a checkpoint and its resumption (they do not change the
# trajectory): everything else must match or resume refuses.
_RESUMABLE_CHANGES = frozenset(
    {"total_images", "checkpoint_images", "progress", "log_every", "device", "init", "resume"}
)


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    run_dir: Path  # the training folder
    denoiser_path: Path  # EMA denoiser (restoration.save_denoiser format)
    images: int  # images trained on in total (all ranks)
    steps: int  # optimiser steps
    log: list[dict[str, Any]]  # records of log.jsonl: images, loss, lr, images_per_second, ...
    images_per_second: float  # throughput of this call (all ranks, excluding start-up)


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
    checkpoint_images: int = 100_000,          # write the training state every this many images
    log_every: int = 20,                       # log / progress update every this many steps
    seed: int = 0,                             # init, batches and noise
    device: str = "auto",                      # "auto" = this rank's CUDA device, else CPU
    resume: bool = True,                       # continue from run_dir's training state if present
    progress: bool = True,                     # tqdm bar with images/s and ETA (rank 0)
) -> TrainResult:
    """Train an EDM denoiser on a dataset with per-sample sigma_min (see module docstring).

    Args:
        data: dataset folder (read with ``ambient_fast.data.load_dataset_tensors``) or the
            tuple it returns: ``(images (N, C, H, W) in [-1, 1], sigma_min (N,),
            sigma_max (N,), ids (N,), labels (N,) or None)``.
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
    dist = init_distributed(device)
    world, rank, dev = dist.world_size, dist.rank, dist.device
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the world size {world}")
    local_batch = batch_size // world
    run_dir = Path(run_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32

    # Data, in memory on the training device (the anchors cache datasets in RAM); the
    # sampler decides eligibility on the float64 annotation.
    images, sigma_min, sigma_max, sample_ids, labels = _training_set(data, mode, use_labels)
    sampler = NoiseFirstBatchSampler(
        sigma_min, local_batch, sigma_max=sigma_max, s_max=s_max, buffer=buffer,
        P_mean=P_mean, P_std=P_std, seed=seed, rank=rank, world_size=world,
    )
    images, sample_ids = images.to(dev), sample_ids.to(dev)
    sigma_min, sigma_max = sigma_min.to(dev, torch.float32), sigma_max.to(dev, torch.float32)
    labels = labels.to(dev) if labels is not None else None

    # Networks and optimiser.
    torch.manual_seed(seed)
    net_kwargs = network_kwargs_for(network, tuple(images.shape[1:]), **(network_kwargs or {}))
    if labels is not None:
        net_kwargs.setdefault("num_classes", int(labels.max()) + 1)
    net = _build_denoiser(network, net_kwargs, sigma_data).to(dev)
    if init is not None:
        _load_init(net, init)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=betas, eps=adam_eps, foreach=True)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")

    step, images_done = 0, 0
    state_path = run_dir / STATE_FILE
    if resume and state_path.exists():
        step, images_done = _restore_state(state_path, config, net, ema, opt, scaler, sampler, dev)
        if dist.is_main:  # drop log records written after the checkpoint by the interrupted run
            kept = [r for r in read_jsonl(run_dir / LOG_FILE) if r["step"] <= step]
            (run_dir / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept))
    elif dist.is_main:
        if state_path.exists():
            state_path.unlink()
        (run_dir / LOG_FILE).unlink(missing_ok=True)
    if dist.is_main:
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

    # Loop.
    elements = math.prod(images.shape[1:])
    loss_scale = float(elements) if loss_reduction == "sum" else 1.0
    batches = _endless(sampler)
    bar = _progress_bar(total_images, images_done, enabled=progress and dist.is_main)
    next_checkpoint = (images_done // checkpoint_images + 1) * checkpoint_images
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    loss_count = 0
    t_start, images_start, t_log = time.perf_counter(), images_done, time.perf_counter()
    net.train()
    params = list(net.parameters())
    ema_params = list(ema.parameters())
    buffers, ema_buffers = list(net.buffers()), list(ema.buffers())
    while images_done < total_images:
        idx, sigma = next(batches)
        idx, sigma = idx.to(dev), sigma.to(device=dev, dtype=torch.float32)
        label = labels[idx] if labels is not None else None
        first_slot = step * batch_size + rank * local_batch
        y_t, y_tmin = _noisy_pair(
            images[idx], sigma, sigma_min[idx], sample_ids[idx], nature_noise, mode, seed, first_slot
        )
        with autocast:
            pred = model(y_t, sigma, label)
        per_sample = ambient_loss(
            pred.float(), y_t, y_tmin, sigma, sigma_min[idx], sigma_max=sigma_max[idx], s_max=s_max, buffer=buffer,
            mode="contraction" if mode == "contraction" else "ambient", sigma_data=sigma_data, reduction="none",
            validate=False,
        )
        loss = per_sample.mean() * loss_scale
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grads = [p.grad for p in params if p.grad is not None]
        for g in grads:
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
            mean_loss = _all_reduce_mean(loss_sum / loss_count, world)
            now = time.perf_counter()
            record = {
                "images": images_done,
                "step": step,
                "loss": float(mean_loss),
                "lr": opt.param_groups[0]["lr"],
                "images_per_second": loss_count * batch_size / max(now - t_log, 1e-9),
            }
            if dist.is_main:
                append_jsonl(run_dir / LOG_FILE, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            loss_sum.zero_()
            loss_count, t_log = 0, now
        if images_done >= next_checkpoint or images_done >= total_images:
            next_checkpoint += checkpoint_images
            if dist.is_main:
                _save_state(state_path, config, step, images_done, net, ema, opt, scaler, sampler)
            _barrier(world)
    bar.close()
    elapsed = time.perf_counter() - t_start
    denoiser_path = run_dir / DENOISER_FILE
    if dist.is_main:
        extra = {"images": images_done, "steps": step, "mode": mode, "ema_halflife_images": ema_halflife_images,
                 "sample_shape": list(images.shape[1:])}
        _export_denoiser(ema, denoiser_path, network, net_kwargs, extra)
    _barrier(world)
    return TrainResult(
        run_dir=run_dir,
        denoiser_path=denoiser_path,
        images=images_done,
        steps=step,
        log=read_jsonl(run_dir / LOG_FILE),
        images_per_second=(images_done - images_start) / max(elapsed, 1e-9),
    )


# ---------------------------------------------------------------------------------------
# Pieces of the step.


def _noisy_pair(
    y0: torch.Tensor,
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    sample_ids: torch.Tensor,
    nature_noise: str,
    mode: str,
    seed: int,
    first_slot: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y_t, y_tmin)`` of SPEC 2 (VE) with rank-invariant noise (see module docstring).

    - ambient, ``nature_noise="fixed"``: ``y_tmin = y0 + sm n_i`` (``n_i`` frozen per sample id,
      exactly ``noisy_pair(..., sample_ids, noise_seed=seed)``), ``y_t = y_tmin + sqrt(s^2 - sm^2) eta``;
    - ``"stored"`` (the data *is* noisy at sm): ``y_tmin = y0``, ``y_t = y0 + sqrt(s^2 - sm^2) eta``;
    - contraction with ``"fixed"``: the corrupt sample is used as if clean, as Ambient-o's
      released code does: ``y_tmin = y0``, ``y_t = y0 + s eta`` (plain target ``y0``).

    ``first_slot``: run-global number of this rank's first batch slot
    (``step * batch_size + rank * local_batch``); slot k's ``eta`` depends only on k and ``seed``.
    """
    fixed = nature_noise == "fixed"
    pair_sigma_min = torch.zeros_like(sigma_min) if fixed and mode == "contraction" else sigma_min
    slots = first_slot + torch.arange(y0.shape[0], device=y0.device, dtype=torch.int64)
    return noisy_pair(
        y0.to(torch.float32),
        sigma,
        pair_sigma_min,
        "ve",
        sample_ids=sample_ids if fixed else None,
        noise_seed=seed,
        eta_seeds=derive_seeds(slots, seed),
        stored=not fixed,
        validate=False,
    )


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


def _all_reduce_mean(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world
    return float(value)


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


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
        ("checkpoint_images", config["checkpoint_images"] > 0, "> 0"),
        ("log_every", config["log_every"] > 0, "> 0"),
    ]
    for name, ok, rule in checks:
        if not ok:
            raise ValueError(f"{name} must be {rule}, got {config[name]!r}")


# ---------------------------------------------------------------------------------------
# Wiring to the data, nn and restoration packages.


def _training_set(
    data: str | Path | Sequence[torch.Tensor], mode: str, use_labels: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Load the dataset and apply the training mode to its annotations."""
    if isinstance(data, (str, Path)):
        from ..data import load_dataset_tensors

        data = load_dataset_tensors(data)
    images, sigma_min, sigma_max, ids, labels = data
    if not use_labels:
        labels = None
    elif labels is None or labels.dim() != 1 or bool((labels < 0).any()):
        raise ValueError("use_labels=True needs an integer class label (>= 0) for every sample")
    sigma_min = torch.as_tensor(sigma_min, dtype=torch.float64)
    sigma_max = torch.zeros_like(sigma_min) if sigma_max is None else torch.as_tensor(sigma_max, dtype=torch.float64)
    ids = torch.as_tensor(ids, dtype=torch.int64)
    if mode == "clean":
        keep = torch.nonzero(sigma_min == 0).flatten()
        if keep.numel() == 0:
            raise ValueError("mode='clean' needs samples with sigma_min = 0; the dataset has none")
        images, sigma_min, sigma_max, ids = images[keep], sigma_min[keep], sigma_max[keep], ids[keep]
        labels = labels[keep] if labels is not None else None
    elif mode == "plain":
        sigma_min, sigma_max = torch.zeros_like(sigma_min), torch.zeros_like(sigma_max)
    return images.to(torch.float32), sigma_min, sigma_max, ids, labels


def _endless(sampler: NoiseFirstBatchSampler) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's ``(indices int64, sigmas float64)`` batches, epoch after epoch.

    The sampler's state (epoch, next batch) always describes the batches consumed so far,
    so saving it after a step and loading it resumes with the next batch.
    """
    while True:
        if sampler.state_dict()["next_batch"] >= len(sampler):
            sampler.set_epoch(sampler.epoch + 1)
        for pairs in sampler:
            indices, sigmas = zip(*pairs, strict=True)
            yield torch.tensor(indices, dtype=torch.int64), torch.tensor(sigmas, dtype=torch.float64)


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
    from ..restoration import load_denoiser

    source = load_denoiser(path)
    try:
        net.load_state_dict(source.state_dict())
    except RuntimeError as err:
        raise ValueError(f"init={path}: its network does not match this run's network ({err})") from None


def _export_denoiser(ema: EDMPrecond, path: Path, network: str, kwargs: dict[str, Any], extra: dict[str, Any]) -> None:
    from ..restoration import save_denoiser

    save_denoiser(path, ema, name=network, network_kwargs=kwargs, sigma_data=ema.sigma_data, extra=extra)


# ---------------------------------------------------------------------------------------
# The training state: one safetensors file, tensors by name, everything else as JSON metadata.


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move tensors and arrays of a nested state into ``tensors``; return the JSON skeleton."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": prefix}
    if isinstance(obj, dict):
        pairs = [
            [_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
            for i, (k, v) in enumerate(obj.items())
        ]
        return {"__dict__": pairs}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _save_state(path, config, step, images_done, net, ema, opt, scaler, sampler) -> None:
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "step": step,
        "images": images_done,
        "config": config,
        "model": net.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "sampler": sampler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }
    skeleton = _flatten(state, "s", tensors)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    save_file(tensors, tmp, metadata={_META_KEY: json.dumps(skeleton)})
    os.replace(tmp, path)


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a ``training-state.safetensors`` back into its nested dict (CPU tensors).

    Keys: ``step``, ``images``, ``config``, ``model``, ``ema``, ``optimizer``, ``scaler``,
    ``sampler``, ``rng``.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    if meta is None or _META_KEY not in meta:
        raise ValueError(f"{path} is not an ambient_fast training state")
    return _unflatten(json.loads(meta[_META_KEY]), load_file(str(path)))


def _restore_state(path, config, net, ema, opt, scaler, sampler, dev) -> tuple[int, int]:
    state = load_training_state(path)
    saved = state["config"]
    changed = sorted(
        k
        for k in set(saved) | set(config)
        if k not in _RESUMABLE_CHANGES and _jsonable(saved.get(k)) != _jsonable(config.get(k))
    )
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise ValueError(
            f"cannot resume {path}: options differ from the checkpoint ({diffs}); use a new run folder or resume=False"
        )
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


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _to_tuples(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_to_tuples(v) for v in value)
    return value
