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

The pure-tensor pieces (:func:`train_classifier`, :func:`classifier_probabilities`,
:func:`crossing_sigmas`) work on any sample shape; the dataset-level functions read a
dataset version and write a *new* version with the new ``annotations.jsonl`` (samples
copied byte for byte) through :mod:`ambient_fast.data`; a source is never modified.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.noise import STREAM_CLASSIFIER_EVAL, sample_normal
from ..core.precond import edm_precond_coefficients
from ..core.schedules import SIGMA_DATA

__all__ = [
    "NoisyClassifier",
    "ClassifierAnnotation",
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

    sigma_min: torch.Tensor  # (N,) new annotation of every sample (0 for clean ones)
    sigmas: torch.Tensor  # (S,) evaluation grid
    probabilities: torch.Tensor  # (M, S) smoothed P(corrupt) of the M annotated samples
    annotated: torch.Tensor  # (M,) indices of those samples in the dataset
    train_accuracy: float  # classifier accuracy on its last training batches


def train_classifier(
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    backbone: nn.Module,
    *,
    sigma_lo: float = 0.01,  # lowest training noise level
    sigma_hi: float = 10.0,  # highest training noise level (log-uniform in between)
    steps: int = 1500,  # optimiser steps
    batch_size: int = 256,  # rows per step, half clean and half corrupt
    lr: float = 1e-3,  # Adam learning rate
    seed: int = 0,  # data order and noise
    sigma_data: float = SIGMA_DATA,  # EDM sigma_data for the input scaling
    progress: Callable[[int], None] | None = None,  # called with the step count after each step
) -> tuple[NoisyClassifier, float]:
    """Train a clean-vs-corrupt classifier on noisy inputs.

    Batches are class balanced (so chance is 1/2, whatever the clean share), and sigma is
    log-uniform on ``[sigma_lo, sigma_hi]`` so every level of the evaluation grid is
    trained. Loss: binary cross-entropy with label 1 = corrupt.

    Args:
        clean: ``(Nc, ...)`` clean samples; ``corrupt``: ``(Nk, ...)`` corrupt samples.
        backbone: feature network (see :class:`NoisyClassifier`), on the samples' device.

    Returns:
        ``(classifier, accuracy)``: the trained model (eval mode) and its accuracy over the
        last 10% of steps.
    """
    if clean.shape[1:] != corrupt.shape[1:]:
        raise ValueError(
            f"clean samples {tuple(clean.shape[1:])} and corrupt {tuple(corrupt.shape[1:])} differ in shape"
        )
    if len(clean) == 0 or len(corrupt) == 0:
        raise ValueError("the classifier needs at least one clean and one corrupt sample")
    device = clean.device
    model = NoisyClassifier(backbone, tuple(clean.shape[1:]), sigma_data).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # Linear decay to 0: the last steps average out the optimiser noise, which would
    # otherwise show as false confidence near chance, exactly where the crossing is read.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    gen = torch.Generator(device=device).manual_seed(seed)
    half = batch_size // 2
    labels = torch.cat([torch.zeros(half, device=device), torch.ones(batch_size - half, device=device)])
    log_lo, log_hi = math.log(sigma_lo), math.log(sigma_hi)
    correct, seen = 0, 0
    model.train()
    for step in range(steps):
        ic = torch.randint(len(clean), (half,), device=device, generator=gen)
        ik = torch.randint(len(corrupt), (batch_size - half,), device=device, generator=gen)
        y = torch.cat([clean[ic], corrupt[ik]]).float()
        sigma = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(batch_size, device=device, generator=gen))
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
            seen += batch_size
        if progress is not None:
            progress(step + 1)
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


def annotate_fixed(src: str | Path, dst: str | Path, sigma_min: float) -> torch.Tensor:
    """A new version ``dst`` of ``src`` with ``sigma_min`` on every corrupt sample.

    Corrupt samples are those annotated ``> 0`` in ``src``; clean ones keep 0. Samples are
    copied byte for byte. Returns the new ``(N,)`` float64 levels.
    """
    from ..data import open_dataset

    if not (sigma_min > 0 and math.isfinite(sigma_min)):
        raise ValueError(f"sigma_min must be finite and > 0, got {sigma_min}")
    ds = open_dataset(src)
    old = torch.from_numpy(ds.sigma_min.copy())
    new = torch.where(old > 0, torch.full_like(old, float(sigma_min)), torch.zeros_like(old))
    write_annotated_version(
        src, dst, new, creator="ambient_fast.loops.annotate_fixed", params={"sigma_min": float(sigma_min)}
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
    batch_rows: int = 16384,  # rows per evaluation batch
    seed: int = 0,  # classifier and noise seed
    device: str = "auto",  # "auto", "cpu", "cuda", ...
) -> ClassifierAnnotation:
    """Classifier-based (Ambient-o) sigma_min for every corrupt sample of ``src``.

    Corrupt samples are those annotated ``sigma_min > 0`` in ``src`` (e.g. by ``corrupt``,
    a fixed preset, or a restoration); their level is replaced by the classifier's
    crossing, clean ones keep 0. The result is written as a new version ``dst`` (samples
    copied byte for byte, the evidence in its manifest), or nowhere when ``dst`` is None.
    """
    from ..data import load_dataset_tensors
    from ..nn import build_network
    from ..runtime import resolve_device
    from .train import network_kwargs_for

    dev = resolve_device(device)
    ds = load_dataset_tensors(src)
    images = ds.images.to(dev)
    corrupt_idx = torch.nonzero(ds.sigma_min > 0).flatten()
    clean_idx = torch.nonzero(ds.sigma_min == 0).flatten()
    if len(corrupt_idx) == 0 or len(clean_idx) == 0:
        raise ValueError(f"{src}: classifier annotation needs both clean (sigma_min = 0) and corrupt (> 0) samples")
    torch.manual_seed(seed)
    backbone = build_network(
        network, **network_kwargs_for(network, tuple(images.shape[1:]), **(network_kwargs or {}))
    ).to(dev)
    classifier, accuracy = train_classifier(
        images[clean_idx.to(dev)],
        images[corrupt_idx.to(dev)],
        backbone,
        sigma_lo=sigma_lo,
        sigma_hi=sigma_hi,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
    )
    sigmas = annotation_sigmas(sigma_lo, sigma_hi, num_sigmas).to(dev)
    probs = classifier_probabilities(
        classifier,
        images[corrupt_idx.to(dev)],
        sigmas,
        trials=trials,
        batch_rows=batch_rows,
        sample_ids=ds.ids[corrupt_idx].to(dev),
        seed=seed,
    )
    smoothed = smooth_along_sigma(probs, smooth_span)
    crossing = crossing_sigmas(smoothed, sigmas, epsilon=epsilon)
    new = torch.zeros_like(ds.sigma_min)
    new[corrupt_idx] = crossing.cpu().to(new.dtype)
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
            "median_sigma_min": float(crossing.median()),
        }
        write_annotated_version(src, dst, new, creator="ambient_fast.loops.annotate_classifier", params=params)
    return ClassifierAnnotation(new, sigmas.cpu(), smoothed.cpu(), corrupt_idx, accuracy)


def write_annotated_version(
    src: str | Path, dst: str | Path, sigma_min: torch.Tensor, *, creator: str, params: dict
) -> Path:
    """A new dataset version ``dst``: ``src``'s samples (byte for byte) with new ``sigma_min``.

    The source is never modified (SPEC 6); ``sigma_max`` is kept. A failed run leaves
    nothing, or an unfinished version that the same call continues.
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
    )
