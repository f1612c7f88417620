"""Noise-level-first batch sampling (SPEC 3): eligibility, marginals, streams, resume."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

import ambient_fast
from ambient_fast.data import sampler as sampler_mod
from ambient_fast.data.sampler import NoiseFirstBatchSampler, draw_noise_first

HAS_CPP = sampler_mod._C is not None
BACKENDS = ["numpy", "cpp"] if HAS_CPP else ["numpy"]
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="ambient_fast._C not built")


def _eligible(indices, sigmas, sigma_min, sigma_max=None, s_max=4.0, buffer=None) -> np.ndarray:
    """ambient_fast.eligible on the drawn pairs, in float64."""
    sm = torch.as_tensor(np.asarray(sigma_min, dtype=np.float64)[indices])
    smax = None if sigma_max is None else torch.as_tensor(np.asarray(sigma_max, dtype=np.float64)[indices])
    return ambient_fast.eligible(torch.as_tensor(sigmas), sm, smax, s_max, buffer).numpy()


levels = st.lists(st.one_of(st.just(0.0), st.floats(0.0, 6.0, allow_nan=False, width=64)), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(
    sigma_min=levels,
    locality=st.booleans(),
    rule=st.sampled_from([(4.0, None), (2.0, None), (math.inf, None), (4.0, 0.05), (4.0, 0.0)]),
    seed=st.integers(0, 2**64 - 1),
)
def test_draws_are_always_eligible_and_backends_agree(sigma_min, locality, rule, seed):
    s_max, buffer = rule
    sigma_min = np.asarray(sigma_min) if min(sigma_min) < 1.5 else np.append(sigma_min, 0.0)  # reachable
    rng = np.random.default_rng(seed % 2**32)
    sigma_max = np.where(rng.random(sigma_min.size) < 0.4, rng.uniform(0, 3, sigma_min.size), 0.0) if locality else None
    draws = [
        draw_noise_first(sigma_min, 300, sigma_max=sigma_max, s_max=s_max, buffer=buffer, seed=seed, backend=b)
        for b in BACKENDS
    ]
    indices, sigmas = draws[0]
    assert indices.dtype == np.int64 and sigmas.dtype == np.float64 and indices.shape == sigmas.shape == (300,)
    assert _eligible(indices, sigmas, sigma_min, sigma_max, s_max, buffer).all()
    for other in draws[1:]:
        assert np.array_equal(other[0], indices) and np.array_equal(other[1], sigmas)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigma_marginal_is_the_lognormal(backend):
    """With a clean sample present every draw is kept: ln sigma ~ N(P_mean, P_std^2) exactly."""
    rng = np.random.default_rng(1)
    sigma_min = np.where(rng.random(5000) < 0.9, 1.2, 0.0)  # SPEC 3's 90%-corrupted CIFAR example
    _, sigmas = draw_noise_first(sigma_min, 200_000, P_mean=-0.4, P_std=1.1, seed=5, backend=backend)
    assert stats.kstest(np.log(sigmas), stats.norm(-0.4, 1.1).cdf).pvalue > 1e-3


def test_sigma_marginal_without_clean_samples_is_conditioned():
    """No clean sample: sigma is redrawn until something is eligible, i.e. the log-normal
    conditioned on sigma > min threshold."""
    threshold = 0.5 * math.sqrt(4 / 3)
    _, sigmas = draw_noise_first(np.array([0.5, 0.8, 2.0]), 100_000, seed=9)
    dist = stats.truncnorm((math.log(threshold) + 1.2) / 1.2, np.inf, loc=-1.2, scale=1.2)
    assert sigmas.min() > threshold
    assert stats.kstest(np.log(sigmas), dist.cdf).pvalue > 1e-3


def test_spec_worked_number():
    """SPEC 3: with sm = 1.2, s_max = 4, ~10% of EDM draws exceed 1.386."""
    sigma_min = np.where(np.arange(1000) < 900, 1.2, 0.0)
    indices, _ = draw_noise_first(sigma_min, 100_000, seed=2)
    corrupt_share_of_slots = np.mean(indices < 900)
    p_above = 0.5 * special.erfc((math.log(1.2 * math.sqrt(4 / 3)) + 1.2) / (1.2 * math.sqrt(2)))
    # Above the threshold all 1000 are eligible, 900 of them corrupt.
    assert abs(corrupt_share_of_slots - 0.9 * p_above) < 0.005
    assert 0.09 < p_above < 0.11


@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_uniform_among_eligible(backend):
    """Chi-square per sigma band: 50 clean, 30 corrupt at sm = 1, 20 corrupt with locality."""
    sigma_min = np.concatenate([np.zeros(50), np.ones(30), np.full(20, 3.0)])
    sigma_max = np.concatenate([np.zeros(80), np.full(20, 0.3)])
    indices, sigmas = draw_noise_first(sigma_min, 300_000, sigma_max=sigma_max, seed=4, backend=backend)
    threshold = math.sqrt(4 / 3)
    bands = [
        (sigmas < 0.3, np.r_[0:50, 80:100]),  # clean + locality (union, no double counting)
        ((sigmas >= 0.3) & (sigmas <= threshold), np.r_[0:50]),
        ((sigmas > threshold) & (sigmas <= 3 * threshold), np.r_[0:80]),
    ]
    for in_band, eligible in bands:
        counts = np.bincount(indices[in_band], minlength=100)
        assert counts[np.setdiff1d(np.arange(100), eligible)].sum() == 0
        assert stats.chisquare(counts[eligible]).pvalue > 1e-3


@needs_cpp
def test_sort_levels_is_the_stable_argsort():
    rng = np.random.default_rng(6)
    values = np.round(rng.uniform(0, 3, 200_001), 1)  # many ties
    values[::7] = -np.inf
    sorted_cpp, order_cpp = sampler_mod._C.sort_levels(values)
    order_np = np.argsort(values, kind="stable")
    assert np.array_equal(order_cpp, order_np) and np.array_equal(sorted_cpp, values[order_np])


def test_stream_primitives_match_references():
    """The numpy twins of the C++ primitives are accurate, so the stream is what it claims."""
    u = np.concatenate([np.linspace(1e-6, 1 - 1e-6, 100_001), [2.0**-54, 1e-12, 1 - 2.0**-53]])
    np.testing.assert_allclose(sampler_mod._ndtri(u), special.ndtri(u), rtol=4e-15, atol=1e-15)
    x = np.linspace(-11, 11, 100_001)
    np.testing.assert_allclose(sampler_mod._exp(x), np.exp(x), rtol=3e-16, atol=0)
    a = np.random.default_rng(0).integers(0, 2**63, 1000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = np.random.default_rng(1).integers(1, 2**62, 1000, dtype=np.uint64)
    assert [int(h) for h in sampler_mod._mulhi64(a, b)] == [(int(x) * int(y)) >> 64 for x, y in zip(a, b, strict=True)]


def test_same_seed_same_stream_other_seed_other_stream():
    sigma_min = np.linspace(0, 2, 500)
    a = draw_noise_first(sigma_min, 1000, seed=7)
    b = draw_noise_first(sigma_min, 1000, seed=7)
    c = draw_noise_first(sigma_min, 1000, seed=8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    # A prefix of the stream does not depend on how many draws were asked for.
    assert np.array_equal(draw_noise_first(sigma_min, 10, seed=7)[1], a[1][:10])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_sampler_yields_pairs_and_matches_the_function(backend):
    sigma_min = np.linspace(0, 2, 100)
    sampler = NoiseFirstBatchSampler(sigma_min, 16, seed=3, backend=backend)
    assert len(sampler) == 7  # ceil(100 / 16)
    batches = list(sampler)
    assert len(batches) == 7 and all(len(b) == 16 for b in batches)
    assert all(isinstance(i, int) and isinstance(s, float) for b in batches for i, s in b)
    indices, sigmas = draw_noise_first(sigma_min, 7 * 16, seed=3, backend=backend)
    assert [p for b in batches for p in b] == list(zip(indices.tolist(), sigmas.tolist(), strict=True))


def test_ranks_are_disjoint_and_union_is_the_global_batch():
    sigma_min = np.linspace(0, 2, 1000)
    single = NoiseFirstBatchSampler(sigma_min, 12, seed=1, batches_per_epoch=5)
    ranks = [NoiseFirstBatchSampler(sigma_min, 4, seed=1, rank=r, world_size=3, batches_per_epoch=5) for r in range(3)]
    for whole, *parts in zip(single, *ranks, strict=True):
        assert whole == [p for part in parts for p in part]
        sigmas = [s for part in parts for _, s in part]
        assert len(set(sigmas)) == len(sigmas)  # disjoint slots draw distinct levels


def test_epochs_differ_and_set_epoch_restarts():
    sampler = NoiseFirstBatchSampler(np.linspace(0, 2, 64), 8, seed=0)
    epoch0 = list(sampler)
    assert list(sampler) == epoch0  # same epoch again, as DistributedSampler
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0


def test_state_dict_resumes_exactly():
    sigma_min = np.linspace(0, 2, 300)
    reference = NoiseFirstBatchSampler(sigma_min, 10, seed=11)
    reference.set_epoch(2)
    uninterrupted = list(reference)

    first = NoiseFirstBatchSampler(sigma_min, 10, seed=11)
    first.set_epoch(2)
    iterator = iter(first)
    head = [next(iterator) for _ in range(4)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["next_batch"] == 4

    resumed = NoiseFirstBatchSampler(sigma_min, 10, seed=11)
    resumed.load_state_dict(state)
    assert head + list(resumed) == uninterrupted

    # Another world size with the same global batch resumes the same global stream.
    halves = [NoiseFirstBatchSampler(sigma_min, 5, seed=11, rank=r, world_size=2) for r in range(2)]
    for half in halves:
        half.load_state_dict(state)
    assert [a + b for a, b in zip(*halves, strict=True)] == uninterrupted[4:]

    with pytest.raises(ValueError, match="does not match"):
        NoiseFirstBatchSampler(sigma_min, 10, seed=12).load_state_dict(state)


def test_numpy_fallback_without_extension(monkeypatch):
    monkeypatch.setattr(sampler_mod, "_C", None)
    indices, sigmas = draw_noise_first(np.linspace(0, 2, 50), 100, seed=1)  # auto -> numpy
    assert _eligible(indices, sigmas, np.linspace(0, 2, 50)).all()
    with pytest.raises(RuntimeError, match="not built"):
        draw_noise_first(np.linspace(0, 2, 50), 10, backend="cpp")


def test_invalid_configurations():
    with pytest.raises(ValueError, match="sigma_min"):
        draw_noise_first([0.0, -1.0], 4)
    with pytest.raises(ValueError, match="sigma_min"):
        draw_noise_first([0.0, float("nan")], 4)
    with pytest.raises(ValueError, match="fraction"):
        draw_noise_first([50.0, 60.0], 4)  # sigma > 57.7 almost never drawn
    with pytest.raises(ValueError, match="sigma_max"):
        draw_noise_first([0.0, 1.0], 4, sigma_max=[0.0])
    with pytest.raises(ValueError, match="rank"):
        NoiseFirstBatchSampler([0.0], 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="backend"):
        draw_noise_first([0.0], 4, backend="cuda")


def test_accepts_tensors_and_large_datasets_without_index_lists():
    """10^6 samples with continuous levels: memory is the sorted tables only."""
    sigma_min = torch.rand(1_000_000, dtype=torch.float64) * 2
    sigma_min[::10] = 0
    indices, sigmas = draw_noise_first(sigma_min, 20_000, seed=13)
    assert _eligible(indices, sigmas, sigma_min.numpy()).all()
    assert len(np.unique(indices)) > 19_000  # spread over the whole dataset
