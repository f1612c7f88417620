"""Classifier-based sigma_min annotation (Ambient-o) finds a known crossing.

Synthetic data with a closed-form answer: clean samples sit at ``-mu``, corrupt ones at
``+mu`` (d = 8). At noise sigma the Bayes classifier's log-odds for a corrupt sample are
``N(m, 2m)`` with ``m = |2 mu|^2 / (2 sigma^2)``, so its mean probability crosses
``0.5 + eps`` where ``E[sigmoid(N(m, 2m))] = 0.5 + eps``: a known ``sigma*``.

On a dataset, the annotation reads through the training input (cache or stream) and every
reader gives the same annotation for a seed.
"""

import math

import numpy as np
import pytest
import torch

from ambient_fast.cli import main
from ambient_fast.data import Sample, write_dataset
from ambient_fast.data.batch import LookupTables
from ambient_fast.data.dali_pipeline import dali_available
from ambient_fast.data.stream import CachedBatchLoader
from ambient_fast.loops.annotate import (
    ClassifierPlan,
    annotate_classifier,
    annotation_sigmas,
    classifier_probabilities,
    crossing_sigmas,
    fixed_sigma_min,
    smooth_along_sigma,
    train_classifier,
)
from ambient_fast.nn import build_network

DIM, SHIFT, EPS = 8, 0.12, 0.05


def _expected_sigmoid(m: float) -> float:
    z = torch.linspace(-12, 12, 20001, dtype=torch.float64)
    w = torch.exp(-z * z / 2)
    return float((torch.sigmoid(m + math.sqrt(2 * m) * z) * w).sum() / w.sum())


def _known_crossing() -> float:
    lo, hi = 1e-6, 5.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _expected_sigmoid(mid) < 0.5 + EPS else (lo, mid)
    delta = 2 * SHIFT * math.sqrt(DIM)
    return delta / math.sqrt(2 * lo)


def _data(n: int = 40):
    mu = torch.full((DIM,), SHIFT)
    return -mu.expand(n, DIM).clone(), mu.expand(n, DIM).clone(), mu


def test_exact_classifier_recovers_the_closed_form_crossing():
    _, corrupt, mu = _data()
    star = _known_crossing()

    def bayes(x, sigma):  # log-odds corrupt vs clean at noise sigma
        v = (sigma**2).unsqueeze(1)
        return (((x + mu) ** 2 - (x - mu) ** 2) / (2 * v)).sum(1)

    sigmas = annotation_sigmas(0.01, 10.0, 128)
    probs = classifier_probabilities(bayes, corrupt, sigmas, trials=256, batch_rows=50_000)
    crossing = crossing_sigmas(probs, sigmas, epsilon=EPS)
    assert crossing.median() == pytest.approx(star, rel=0.06)


def _cached_batches(clean: torch.Tensor, corrupt: torch.Tensor, steps: int, batch_size: int, seed: int):
    """The plan's batches from the in-memory samples (the cache backend): rows 0.. clean, then corrupt."""
    sigma_min = np.r_[np.zeros(len(clean)), np.ones(len(corrupt))]
    plan = ClassifierPlan(sigma_min, steps=steps, batch_size=batch_size, eval_batch=len(corrupt), seed=seed)
    tables = LookupTables.from_arrays(sigma_min, np.zeros_like(sigma_min))
    return iter(CachedBatchLoader(torch.cat([clean, corrupt]), tables, plan))


def test_trained_classifier_finds_the_crossing():
    clean, corrupt, _ = _data()
    star = _known_crossing()
    classifier, accuracy = train_classifier(
        _cached_batches(clean, corrupt, 500, 128, 0), build_network("mlp-small", data_dim=DIM), (DIM,), steps=500
    )
    assert accuracy > 0.7
    sigmas = annotation_sigmas(0.01, 10.0, 64)
    probs = classifier_probabilities(classifier, corrupt, sigmas, trials=8)
    crossing = crossing_sigmas(probs, sigmas, epsilon=EPS, smooth_span=4)
    assert 0.6 * star < float(crossing.median()) < 1.6 * star
    # Far below the crossing it tells them apart; far above it cannot.
    assert float(probs[:, sigmas < 0.1].mean()) > 0.9
    assert abs(float(probs[:, sigmas > 6].mean()) - 0.5) < 0.1


def test_probabilities_do_not_depend_on_the_batch():
    _, corrupt, mu = _data(5)
    clf = lambda x, s: (x * mu).sum(1) / s  # noqa: E731
    sigmas = annotation_sigmas(0.1, 3.0, 7)
    a = classifier_probabilities(clf, corrupt, sigmas, trials=3, batch_rows=4)
    b = classifier_probabilities(clf, corrupt, sigmas, trials=3, batch_rows=1000)
    torch.testing.assert_close(a, b)


def test_crossing_rules():
    sigmas = torch.tensor([0.1, 0.2, 0.4, 0.8])
    probs = torch.tensor([[0.99, 0.9, 0.52, 0.5], [0.99, 0.99, 0.99, 0.98]])
    assert crossing_sigmas(probs, sigmas).tolist() == pytest.approx([0.4, 0.8])  # never crosses: last sigma
    smoothed = smooth_along_sigma(probs, span=3)
    assert smoothed[0, 2] > probs[0, 2]  # the EWM lags: conservative
    with pytest.raises(ValueError, match="increasing"):
        crossing_sigmas(probs, sigmas.flip(0))


def test_fixed_presets():
    assert fixed_sigma_min("blur", 0.6) == 1.2
    assert fixed_sigma_min("jpeg", 18) == 1.6
    assert fixed_sigma_min("noise", 0.3) == 0.3
    with pytest.raises(ValueError, match="blur 0.7"):
        fixed_sigma_min("blur", 0.7)


def _anchors_ewm(values: list[float], span: float) -> list[float]:
    """pandas ``Series(values).ewm(span=span, adjust=False).mean()``, written out."""
    alpha = 2.0 / (span + 1.0)
    out = [values[0]]
    for v in values[1:]:
        out.append((1 - alpha) * out[-1] + alpha * v)
    return out


def _anchors_first_confusion(trajectory: list[float], times: list[float], epsilon: float) -> float:
    """The anchors' ``analyze_classifier_trajectory``: the first time where
    ``0.5 - p + epsilon > 0``, else the last time."""
    confused = [j for j, p in enumerate(trajectory) if 0.5 - p + epsilon > 0]
    return times[confused[0] if confused else len(times) - 1]


def test_annotation_equals_the_anchors_rule_on_their_trajectories():
    """Ambient-o's annotation at load (ANCHORS 2.3): 2048 levels exp(1.2 N(0,1) - 1.2)
    sorted (torch seed 42), 4 trials per level averaged, EWM span 32 (adjust=False), then the
    first level with 0.5 - p + 0.05 > 0. Trajectories fall from ~1 to chance at a per-sample
    level, plus a row that never crosses and one sitting exactly on the threshold."""
    gen = torch.Generator().manual_seed(42)
    sigmas = torch.sort(torch.exp(1.2 * torch.randn(2048, generator=gen, dtype=torch.float64) - 1.2)).values
    n, trials = 24, 4
    gen = torch.Generator().manual_seed(0)
    crossing = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-2.5, 1.5, generator=gen))
    logits = 6.0 * (crossing.log()[:, None] - sigmas.log()[None, :])
    clean = torch.sigmoid(logits)[:, :, None] * 0.5 + 0.5
    probs = (clean + 0.08 * torch.randn(n, 2048, trials, generator=gen, dtype=torch.float64)).clamp(0, 1).mean(2)
    probs[0] = 0.97  # never confused: the last level
    probs[1] = 0.55  # on the threshold: the float rounding of 0.5 - p + eps decides, as in the anchors
    ours = crossing_sigmas(smooth_along_sigma(probs, 32.0), sigmas, epsilon=0.05)
    times = sigmas.tolist()
    anchors = [_anchors_first_confusion(_anchors_ewm(row, 32.0), times, 0.05) for row in probs.tolist()]
    assert ours.tolist() == anchors
    assert anchors[0] == times[-1]
    assert len(set(anchors[2:])) > 10  # the rows cross at many different levels


def test_plan_is_balanced_then_every_corrupt_sample_once():
    sigma_min = np.array([0, 0.5, 0, 0.3, 0.3, 0, 0.2])
    plan = ClassifierPlan(sigma_min, steps=3, batch_size=5, eval_batch=2, seed=1)
    batches = list(plan)
    assert len(batches) == len(plan) == 3 + 2 and plan.batch_size == 5
    for batch in batches[:3]:
        assert len(batch) == 5
        assert all(sigma_min[i] == 0 for i in batch[:2]) and all(sigma_min[i] > 0 for i in batch[2:])
    assert batches[3:] == [[1, 3], [4, 6]]  # the evaluation pass: dataset order
    assert batches == list(plan)  # the same plan on every pass (and for every reader)
    with pytest.raises(ValueError, match="both clean"):
        ClassifierPlan(np.ones(3), steps=1, batch_size=2, eval_batch=1, seed=0)


def _shifted_digits(root, n: int = 24):
    """8x8 grayscale PNGs: the clean half darker than the corrupt half by 24 grey levels
    (plus per-pixel jitter), so the classifier tells them apart at low noise, not at high."""
    rng = np.random.default_rng(0)
    samples = [
        Sample(index=i, key=f"{i:02d}.png", array=(116 + 24 * (i % 2) + rng.integers(-6, 7, (8, 8))).astype(np.uint8),
               sigma_min=0.4 * (i % 2), sigma_max=0.0)
        for i in range(n)
    ]
    return write_dataset(root / "data", "folder", samples)


READERS = [("on", "auto"), ("off", "torch")] + ([("off", "dali")] if dali_available() else [])


def test_cache_and_streams_give_the_same_annotation(tmp_path, single_thread):
    data = _shifted_digits(tmp_path)
    kwargs = dict(steps=60, batch_size=32, num_sigmas=12, trials=2, batch_rows=96, seed=3, device="cpu",
                  loader_workers=0)
    results = {s: annotate_classifier(data, None, cache=c, stream=s, **kwargs) for c, s in READERS}
    backends = [r.input_backend for r in results.values()]
    assert backends == ["cache", "torch", "dali"][: len(results)]
    first = results["auto"]
    for result in results.values():
        assert torch.equal(result.sigma_min, first.sigma_min)
        assert result.train_accuracy == first.train_accuracy
    # It still separates: clean samples keep 0, every corrupt one gets a level of the grid,
    # and the classifier tells them apart (chance is 1/2).
    corrupt = torch.arange(24) % 2 == 1
    assert torch.equal(first.sigma_min == 0, ~corrupt)
    assert torch.equal(first.annotated, torch.nonzero(corrupt).flatten())
    assert bool(torch.isin(first.sigma_min[corrupt].float(), first.sigmas).all())
    assert first.train_accuracy > 0.7


def test_annotate_dry_run_validates_the_reader(tmp_path, capsys):
    data = _shifted_digits(tmp_path, 4)
    argv = ["annotate", "--src", str(data), "--classifier", "--dry-run"]
    assert main(argv + ["--cache", "off", "--stream", "torch"]) == 0
    out = capsys.readouterr().out
    assert "dataset read by torch" in out and '"cache": "off"' in out
    assert main(argv + ["--cache-budget", "0"]) == 0
    assert f"dataset read by {'dali' if dali_available() else 'torch'}" in capsys.readouterr().out
    for bad, option in ((["--cache-budget", "lots"], "--cache-budget"), (["--stream", "pil"], "--stream"),
                        (["--cache", "maybe"], "--cache")):
        with pytest.raises(SystemExit) as exc:
            main(argv + bad)
        assert exc.value.code == 2 and f"argument {option}" in capsys.readouterr().err
