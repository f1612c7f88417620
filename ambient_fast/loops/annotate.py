"""sigma_min annotation: fixed presets and the noisy-input classifier of Ambient-o.

Two ways to say from which noise level on a corrupt sample can be trusted (SPEC 2):

- **Fixed** (``annotate_fixed``): one level per corruption, the anchors' presets
  (ANCHORS 2: blur 0.6 -> 1.2, 0.8 -> 1.9, 1.0 -> 2.4; JPEG q18 -> 1.6, q25 -> 1.3,
  q50 -> 1.2).
- **Classifier** (``annotate_classifier``, Ambient-o): train a small classifier on noisy
  inputs ``x + sigma eps`` to tell clean from corrupt samples, evaluate it on every
  corrupt sample over a grid of sigma (several noise draws each), smooth the probability
  along sigma and take the first sigma where it is within ``epsilon`` of chance: from there
  on, noise hides the corruption. The anchors run 2048 sigmas x 4 trials as single passes
  per image; here every (sample, sigma, trial) triple is one row of a large batch.

The pieces (:func:`train_classifier` over a stream of batches,
:func:`classifier_probabilities`, :func:`crossing_sigmas`) work on any sample shape; the
dataset-level functions read a dataset version and write a *new* version with the new
``annotations.jsonl`` (samples copied byte for byte) through :mod:`ambient_fast.data`; a
source is never modified.

:func:`annotate_classifier` reads through the training input
(:func:`ambient_fast.data.stream.open_training_input`: the in-memory cache when the decoded
set fits the budget, else a DALI / torch stream) in the order of one
:class:`ClassifierPlan`: the classifier's training batches, then every corrupt sample once
in dataset order, each batch carrying its sample ids; the crossings are written by id. Host
memory holds the per-sample annotation and index arrays (8 bytes a sample each) but no
images beyond the reader's prefetch queue (or the cache, where chosen).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..core.noise import STREAM_CLASSIFIER_EVAL, sample_normal
from ..core.precond import edm_precond_coefficients
from ..core.schedules import SIGMA_DATA
from ..data.batch import Batch
from ..data.stream import CACHE_BUDGET_BYTES

__all__ = [
    "NoisyClassifier",
    "ClassifierAnnotation",
    "ClassifierPlan",
    "fixed_sigma_min",
    "train_classifier",
    "classifier_probabilities",
    "smooth_along_sigma",
    "crossing_sigmas",
    "annotation_sigmas",
    "annotate_fixed",
    "annotate_classifier",
    "write_annotated_version",
]


def fixed_sigma_min(corruption: str, level: float) -> float:
    """The preset sigma_min for ``corruption`` (``"blur"`` std or ``"jpeg"`` quality) at ``level``,
    from the data package's table of the anchors' presets (``ambient_fast.data.PRESET_SIGMA_MIN``).

    Additive Gaussian noise (``"noise"``) is its own annotation: ``sigma_min = level``.
    """
    if corruption == "noise":
        return float(level)
    from ..data import PRESET_SIGMA_MIN

    table = {(c, float(lv)): sigma for (c, lv), sigma in PRESET_SIGMA_MIN.items()}
    key = (corruption, float(level))
    if key not in table:
        known = ", ".join(f"{c} {lv:g}" for c, lv in sorted(table))
        raise ValueError(f"no fixed sigma_min preset for {corruption} {level:g}; known: {known}, noise <std>")
    return table[key]


# ---------------------------------------------------------------------------------------
# The classifier (Ambient-o `EDMPrecondCLS`: preconditioned input, encoder, linear head).


class NoisyClassifier(nn.Module):
    """Logit of ``P(corrupt | x_sigma)`` for ``x_sigma = y + sigma eps``.

    The input is EDM-preconditioned like a denoiser (``c_in x``, ``c_noise = ln(sigma)/4``);
    the backbone is any network ``F(x, noise_labels, class_labels) -> (B, *sample_shape)``
    (e.g. from :func:`ambient_fast.nn.build_network`); a linear head maps its flattened
    output to one logit.

    Args:
        backbone: feature network.
        sample_shape: shape of one sample (and of the backbone's output per sample).
        sigma_data: EDM sigma_data.
    """

    def __init__(self, backbone: nn.Module, sample_shape: tuple[int, ...], sigma_data: float = SIGMA_DATA) -> None:
        super().__init__()
        self.backbone = backbone
        self.sigma_data = float(sigma_data)
        self.head = nn.Linear(math.prod(sample_shape), 1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, *sample_shape)``, ``sigma`` ``(B,)`` -> logits ``(B,)`` float32."""
        _, _, c_in, c_noise = edm_precond_coefficients(sigma.to(torch.float32), self.sigma_data)
        view = (-1,) + (1,) * (x.dim() - 1)
        feat = self.backbone((c_in.view(view) * x.float()), c_noise, None)
        return self.head(feat.flatten(1).float()).squeeze(1)


@dataclass
class ClassifierAnnotation:
    """Result of :func:`annotate_classifier`: per-sample levels and the evidence behind them."""

    sigma_min: torch.Tensor  # float64 (N,) new annotation of every sample (0 for clean ones)
    sigmas: torch.Tensor  # float32 (S,) evaluation grid
    annotated: torch.Tensor  # int64 (M,) dataset indices of the M annotated (corrupt) samples
    train_accuracy: float  # classifier accuracy on its last training batches
    input_backend: str  # how the dataset was read: "cache", "dali" or "torch"


class ClassifierPlan:
    """The batch order of one classifier annotation, as lists of dataset indices: ``steps``
    class-balanced training batches, then every corrupt sample once in dataset order (the
    evaluation pass, ``eval_batch`` samples a batch).

    Training batch ``t`` holds ``batch_size // 2`` clean samples then the rest corrupt,
    uniformly with replacement, drawn from ``numpy.random.default_rng([seed, t])``: the plan
    is the same whatever reads it (cache, DALI, torch) and however far that reader prefetches.

    Args:
        sigma_min: float ``(N,)`` the dataset's annotation (0 = clean, > 0 = corrupt).
        steps: training batches.  batch_size: rows per training batch (>= 2).
        eval_batch: samples per evaluation batch.  seed: the draws' seed.

    ``batch_size`` (attribute) is the largest batch yielded, as the DALI reader requires.
    """

    def __init__(self, sigma_min: np.ndarray, *, steps: int, batch_size: int, eval_batch: int, seed: int) -> None:
        sigma_min = np.asarray(sigma_min, dtype=np.float64)
        self.clean = np.flatnonzero(sigma_min == 0)
        self.corrupt = np.flatnonzero(sigma_min > 0)
        if len(self.clean) == 0 or len(self.corrupt) == 0:
            raise ValueError("classifier annotation needs both clean (sigma_min = 0) and corrupt (> 0) samples")
        if steps < 1 or batch_size < 2 or eval_batch < 1:
            raise ValueError(
                f"need steps >= 1, batch_size >= 2, eval_batch >= 1; got {steps}, {batch_size}, {eval_batch}"
            )
        self.steps, self.train_batch, self.eval_batch, self.seed = int(steps), int(batch_size), int(eval_batch), seed
        self.batch_size = max(self.train_batch, self.eval_batch)

    def __len__(self) -> int:
        return self.steps + -(-len(self.corrupt) // self.eval_batch)

    def __iter__(self) -> Iterator[list[int]]:
        half = self.train_batch // 2
        for step in range(self.steps):
            rng = np.random.default_rng([self.seed, step])
            clean = self.clean[rng.integers(len(self.clean), size=half)]
            corrupt = self.corrupt[rng.integers(len(self.corrupt), size=self.train_batch - half)]
            yield np.concatenate([clean, corrupt]).tolist()
        for start in range(0, len(self.corrupt), self.eval_batch):
            yield self.corrupt[start : start + self.eval_batch].tolist()


def train_classifier(
    batches: Iterable[Batch],
    backbone: nn.Module,
    sample_shape: tuple[int, ...],
    *,
    steps: int,  # optimiser steps: the number of batches consumed
    sigma_lo: float = 0.01,  # lowest training noise level
    sigma_hi: float = 10.0,  # highest training noise level (log-uniform in between)
    lr: float = 1e-3,  # Adam learning rate
    seed: int = 0,  # noise levels and noise
    sigma_data: float = SIGMA_DATA,  # EDM sigma_data for the input scaling
    device: torch.device | str = "cpu",  # where the classifier trains (the backbone is moved there)
    progress: Callable[[int], None] | None = None,  # called with the step count after each step
) -> tuple[NoisyClassifier, float]:
    """Train a clean-vs-corrupt classifier on noisy inputs, one step per batch.

    Each :class:`~ambient_fast.data.Batch` gives images ``(B, *sample_shape)`` and the label
    ``sigma_min > 0`` (corrupt); batches should be class balanced (a :class:`ClassifierPlan`
    is) so chance is 1/2. Sigma is log-uniform on ``[sigma_lo, sigma_hi]`` so every level of
    the evaluation grid is trained; it and the noise come from one generator seeded with
    ``seed`` on ``device``, drawn in step order. Loss: binary cross-entropy. Exactly
    ``steps`` batches are taken from ``batches`` (an iterator is left at the next one).

    Returns:
        ``(classifier, accuracy)``: the trained model (eval mode) and its accuracy over the
        last 10% of steps.
    """
    device = torch.device(device)
    model = NoisyClassifier(backbone, tuple(sample_shape), sigma_data).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # Linear decay to 0: the last steps average out the optimiser noise, which would
    # otherwise show as false confidence near chance, exactly where the crossing is read.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    gen = torch.Generator(device=device).manual_seed(seed)
    log_lo, log_hi = math.log(sigma_lo), math.log(sigma_hi)
    correct, seen, done = 0, 0, 0
    model.train()
    for step, batch in zip(range(steps), batches, strict=False):  # range first: no batch is drawn past steps
        y = batch.images.to(device, non_blocking=True).float()
        if tuple(y.shape[1:]) != tuple(sample_shape):
            raise ValueError(f"batch samples {tuple(y.shape[1:])} differ from the classifier's {tuple(sample_shape)}")
        labels = (batch.sigma_min > 0).to(device=device, dtype=torch.float32)
        rows = y.shape[0]
        sigma = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(rows, device=device, generator=gen))
        view = (-1,) + (1,) * (y.dim() - 1)
        x = y + sigma.view(view) * torch.randn(y.shape, device=device, generator=gen)
        logits = model(x, sigma)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= steps - max(1, steps // 10):
            correct += int(((logits > 0).float() == labels).sum())
            seen += rows
        done = step + 1
        if progress is not None:
            progress(done)
    if done < steps:
        raise ValueError(f"the classifier's input ended after {done} of {steps} batches")
    model.eval()
    return model, correct / max(seen, 1)


@torch.no_grad()
def classifier_probabilities(
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    samples: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    trials: int = 4,
    batch_rows: int = 16384,
    sample_ids: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Mean ``P(corrupt | y_i + sigma_s eps)`` over ``trials`` noise draws: ``(N, S)`` float32.

    The ``N * S * trials`` rows are evaluated in batches of ``batch_rows``. Noise is
    per-sample seeded (:func:`ambient_fast.core.noise.sample_normal`, keyed by sample id,
    sigma index and trial), so the result does not depend on ``batch_rows``.

    Args:
        classifier: ``(x (B, ...), sigma (B,)) -> logits (B,)``.
        samples: ``(N, ...)``.  sigmas: ``(S,)`` levels.
        sample_ids: ``(N,)`` ids for the noise seeds (default ``arange(N)``).
    """
    n, s_count = samples.shape[0], sigmas.shape[0]
    device = samples.device
    ids = torch.arange(n, device=device) if sample_ids is None else sample_ids.to(device)
    sig = sigmas.to(device=device, dtype=torch.float32)
    rows = n * s_count * trials
    row = torch.arange(rows, device=device)
    sample_of = row // (s_count * trials)
    sigma_of = (row // trials) % s_count
    trial_of = row % trials
    seeds = ((ids[sample_of].to(torch.int64) * s_count + sigma_of) * trials + trial_of) * 1_000_003 + seed
    out = torch.empty(rows, device=device)
    view = (-1,) + (1,) * (samples.dim() - 1)
    for start in range(0, rows, batch_rows):
        sl = slice(start, min(start + batch_rows, rows))
        eps = sample_normal(seeds[sl], samples.shape[1:], stream=STREAM_CLASSIFIER_EVAL, device=device)
        sigma = sig[sigma_of[sl]]
        x = samples[sample_of[sl]].float() + sigma.view(view) * eps
        out[sl] = torch.sigmoid(classifier(x, sigma).float())
    return out.view(n, s_count, trials).mean(dim=2)


def smooth_along_sigma(probs: torch.Tensor, span: float) -> torch.Tensor:
    """Exponentially weighted mean along the sigma axis, as the anchors smooth classifier
    trajectories (pandas ``ewm(span=span, adjust=False).mean()``, ANCHORS 2.3).

    ``y_0 = p_0``, ``y_j = (1 - a) y_{j-1} + a p_j`` with ``a = 2 / (span + 1)``.
    ``probs`` ``(N, S)`` with sigma increasing along dim 1; ``span <= 1`` returns it unchanged.
    """
    if span <= 1:
        return probs
    alpha = 2.0 / (span + 1.0)
    out = torch.empty_like(probs)
    out[:, 0] = probs[:, 0]
    for j in range(1, probs.shape[1]):
        out[:, j] = (1 - alpha) * out[:, j - 1] + alpha * probs[:, j]
    return out


def crossing_sigmas(
    probs: torch.Tensor, sigmas: torch.Tensor, *, epsilon: float = 0.05, smooth_span: float = 1.0
) -> torch.Tensor:
    """First sigma where the (smoothed) ``P(corrupt)`` falls below ``0.5 + epsilon``: ``(N,)``.

    The anchors' rule (``analyze_classifier_trajectory``): the first level where
    ``0.5 - p + epsilon > 0``, evaluated in that order so float ties fall the same way;
    samples that never cross get the last sigma. ``sigmas`` must be increasing.
    """
    if not bool((sigmas[1:] > sigmas[:-1]).all()):
        raise ValueError("sigmas must be strictly increasing")
    smoothed = smooth_along_sigma(probs, smooth_span)
    below = (0.5 - smoothed + epsilon) > 0
    first = torch.where(
        below.any(dim=1), below.float().argmax(dim=1), torch.full_like(below[:, 0], len(sigmas) - 1, dtype=torch.long)
    )
    return sigmas.to(probs.device)[first]


def annotation_sigmas(sigma_lo: float = 0.01, sigma_hi: float = 10.0, count: int = 64) -> torch.Tensor:
    """The evaluation grid: ``count`` log-spaced levels from ``sigma_lo`` to ``sigma_hi`` (float32)."""
    if not (0 < sigma_lo < sigma_hi) or count < 2:
        raise ValueError(f"need 0 < sigma_lo < sigma_hi and count >= 2, got {sigma_lo}, {sigma_hi}, {count}")
    return torch.exp(torch.linspace(math.log(sigma_lo), math.log(sigma_hi), count))


# ---------------------------------------------------------------------------------------
# Dataset level.


def annotate_fixed(src: str | Path, dst: str | Path, sigma_min: float, *, progress: bool = False) -> torch.Tensor:
    """A new version ``dst`` of ``src`` with ``sigma_min`` on every corrupt sample.

    Corrupt samples are those annotated ``> 0`` in ``src``; clean ones keep 0. Samples are
    copied byte for byte (``progress``: a tqdm bar over them). Returns the new ``(N,)``
    float64 levels.
    """
    from ..data import open_dataset

    if not (sigma_min > 0 and math.isfinite(sigma_min)):
        raise ValueError(f"sigma_min must be finite and > 0, got {sigma_min}")
    ds = open_dataset(src)
    old = torch.from_numpy(ds.sigma_min.copy())
    new = torch.where(old > 0, torch.full_like(old, float(sigma_min)), torch.zeros_like(old))
    write_annotated_version(
        src, dst, new, creator="ambient_fast.loops.annotate_fixed", params={"sigma_min": float(sigma_min)},
        progress=progress,
    )
    return new


def annotate_classifier(
    src: str | Path,
    dst: str | Path | None,
    *,
    network: str = "mlp-small",  # backbone name for ambient_fast.nn.build_network
    network_kwargs: dict | None = None,  # extra backbone kwargs
    sigma_lo: float = 0.01,  # evaluation / training grid, lowest level
    sigma_hi: float = 10.0,  # highest level
    num_sigmas: int = 64,  # grid points (the anchors use 2048 random levels)
    trials: int = 4,  # noise draws per (sample, sigma), as the anchors
    epsilon: float = 0.05,  # "cannot tell": P(corrupt) < 0.5 + epsilon (anchors: 0.05)
    smooth_span: float = 4.0,  # EWM span along the grid (anchors: 32 over 2048 levels)
    steps: int = 1500,  # classifier optimiser steps
    batch_size: int = 256,  # classifier batch
    lr: float = 1e-3,  # classifier learning rate (linear decay to 0)
    batch_rows: int = 16384,  # rows (sample x sigma x trial) per evaluation batch
    seed: int = 0,  # classifier and noise seed
    device: str = "auto",  # "auto", "cpu", "cuda", ...
    cache: Literal["auto", "on", "off"] = "auto",  # in-memory dataset; auto = when it fits cache_budget_bytes
    cache_budget_bytes: int = CACHE_BUDGET_BYTES,  # decoded size up to which "auto" caches (4 GiB)
    stream: Literal["auto", "dali", "torch"] = "auto",  # streaming reader when not cached; auto = DALI if installed
    loader_threads: int = 2,  # DALI / cache decode threads
    loader_workers: int = 2,  # torch DataLoader workers (torch stream)
    progress: bool = False,  # tqdm bars: classifier steps, evaluated samples, written samples
) -> ClassifierAnnotation:
    """Classifier-based (Ambient-o) sigma_min for every corrupt sample of ``src``.

    Corrupt samples are those annotated ``sigma_min > 0`` in ``src`` (e.g. by ``corrupt``,
    a fixed preset, or a restoration); their level is replaced by the classifier's
    crossing, clean ones keep 0. The dataset is read like ``train`` reads it
    (``cache`` / ``cache_budget_bytes`` / ``stream``, see
    :func:`ambient_fast.data.stream.choose_backend`) in the order of a
    :class:`ClassifierPlan`; every backend gives the same annotation for a seed. The result
    is written as a new version ``dst`` (samples copied byte for byte, the evidence in its
    manifest), or nowhere when ``dst`` is None.
    """
    from tqdm.auto import tqdm

    from ..data import open_dataset
    from ..data.stream import choose_backend, open_training_input
    from ..nn import build_network
    from ..runtime import resolve_device
    from .train import network_kwargs_for

    dev = resolve_device(device)
    dataset = open_dataset(src)
    sample_shape = tuple(dataset.sample_shape)
    sigmas = annotation_sigmas(sigma_lo, sigma_hi, num_sigmas).to(dev)
    try:
        plan = ClassifierPlan(
            dataset.sigma_min, steps=steps, batch_size=batch_size,
            eval_batch=max(1, batch_rows // (num_sigmas * trials)), seed=seed,
        )
    except ValueError as err:
        raise ValueError(f"{src}: {err}") from None
    backend = choose_backend(dataset, cache, cache_budget_bytes, stream)
    torch.manual_seed(seed)
    backbone = build_network(network, **network_kwargs_for(network, sample_shape, **(network_kwargs or {})))
    loader = open_training_input(
        dataset, plan, backend=backend, device=dev, seed=seed, num_threads=loader_threads, num_workers=loader_workers
    )
    batches = iter(loader)
    with tqdm(total=steps, unit="step", desc="classifier", disable=not progress, dynamic_ncols=True) as bar:
        classifier, accuracy = train_classifier(
            batches, backbone, sample_shape, steps=steps, sigma_lo=sigma_lo, sigma_hi=sigma_hi, lr=lr, seed=seed,
            device=dev, progress=lambda _: bar.update(),
        )
    # The evaluation pass: the rest of the plan, every corrupt sample once; per-sample noise
    # is keyed by the id that travelled with the sample, so batching does not matter.
    new = np.zeros(len(dataset), dtype=np.float64)
    seen = np.zeros(len(dataset), dtype=bool)
    with tqdm(total=len(plan.corrupt), unit="sample", desc="annotate", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches:
            probs = classifier_probabilities(
                classifier, batch.images.to(dev), sigmas, trials=trials, batch_rows=batch_rows,
                sample_ids=batch.sample_ids.to(dev), seed=seed,
            )
            ids = batch.sample_ids.numpy()
            new[ids] = crossing_sigmas(probs, sigmas, epsilon=epsilon, smooth_span=smooth_span).cpu().double().numpy()
            seen[ids] = True
            bar.update(len(ids))
    if not seen[plan.corrupt].all() or seen.sum() != len(plan.corrupt):
        raise RuntimeError(f"{src}: the evaluation pass did not cover exactly the corrupt samples")
    levels, annotated = torch.from_numpy(new), torch.from_numpy(plan.corrupt)
    if dst is not None:
        params = {
            "network": network,
            "sigma_lo": sigma_lo,
            "sigma_hi": sigma_hi,
            "num_sigmas": num_sigmas,
            "trials": trials,
            "epsilon": epsilon,
            "smooth_span": smooth_span,
            "steps": steps,
            "seed": seed,
            "train_accuracy": accuracy,
            "median_sigma_min": float(levels[annotated].median()),
        }
        write_annotated_version(
            src, dst, levels, creator="ambient_fast.loops.annotate_classifier", params=params, progress=progress
        )
    return ClassifierAnnotation(levels, sigmas.cpu(), annotated, accuracy, backend)


def write_annotated_version(
    src: str | Path, dst: str | Path, sigma_min: torch.Tensor, *, creator: str, params: dict, progress: bool = False
) -> Path:
    """A new dataset version ``dst``: ``src``'s samples (byte for byte) with new ``sigma_min``.

    The source is never modified (SPEC 6); ``sigma_max`` is kept. A failed run leaves
    nothing, or an unfinished version that the same call continues. ``progress``: a tqdm
    bar over the samples written.
    """
    from dataclasses import replace

    from ..data import open_dataset
    from ..data.resumable import write_version

    ds = open_dataset(src)
    if sigma_min.shape != (len(ds),):
        raise ValueError(f"sigma_min must have one value per sample ({len(ds)}), got shape {tuple(sigma_min.shape)}")
    values = sigma_min.double().tolist()
    return write_version(
        dst,
        ds.format,
        ds.keys,
        lambda i: replace(ds.read(i), sigma_min=values[i]),
        parent=ds,
        creator=creator,
        params=params,
        progress="write" if progress else None,
    )
