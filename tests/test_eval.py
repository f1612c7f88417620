"""Evaluation: Frechet distance, streaming statistics, FID parity with pytorch-fid (with a
random-weight Inception built without any download), FD_digits and memorisation."""

from __future__ import annotations

import math
import socket
import urllib.request

import numpy as np
import pytest
import pytorch_fid.inception
import torch
import torchvision
from PIL import Image
from pytorch_fid.fid_score import calculate_activation_statistics, calculate_frechet_distance
from pytorch_fid.inception import InceptionV3
from safetensors import safe_open

from ambient_fast.eval import (
    DIGITS_COPY_THRESHOLD,
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_NAME,
    DigitsFeatureNet,
    FeatureStatistics,
    GaussianStats,
    InceptionFeatures,
    cached_reference_stats,
    digits_feature_extractor,
    fd_digits,
    feature_statistics,
    fid_from_batches,
    frechet_distance,
    inception_feature_extractor,
    load_digits_images,
    load_stats,
    memorisation_rate,
    nearest_neighbour_distances,
    save_stats,
    train_digits_feature_net,
)
from ambient_fast.eval.digits import DIGITS_ASSET

# ---------------------------------------------------------------------------------------
# Frechet distance.


def _random_gaussian(rng: np.random.Generator, dims: int, samples: int, shift: float):
    features = rng.standard_normal((samples, dims)) @ (np.eye(dims) + 0.3 * rng.standard_normal((dims, dims)))
    features = np.abs(features) + shift  # nonnegative, skewed, like pooled ReLU features
    return features.mean(0), np.cov(features, rowvar=False)


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")  # pytorch-fid
@pytest.mark.parametrize("dims", [2, 16, 128])  # D=1: scipy 1.17's sqrtm breaks pytorch-fid
def test_frechet_distance_matches_pytorch_fid(dims):
    rng = np.random.default_rng(dims)
    mu1, sigma1 = _random_gaussian(rng, dims, 4 * dims + 50, 0.0)
    mu2, sigma2 = _random_gaussian(rng, dims, 4 * dims + 50, 0.5)
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    theirs = calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
    assert ours == pytest.approx(theirs, rel=1e-6)
    # Tensors are accepted too.
    as_tensors = [torch.from_numpy(a) for a in (mu1, sigma1, mu2, sigma2)]
    assert frechet_distance(*as_tensors) == pytest.approx(ours, rel=1e-12)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    dims = 12
    mu1, mu2 = rng.standard_normal(dims), rng.standard_normal(dims)
    factor = rng.standard_normal((dims, 5))
    singular = factor @ factor.T  # rank 5
    expected = float(np.sum((mu1 - mu2) ** 2))
    # Round-off eigenvalues ~1e-15 |S| of the null space enter through square roots: the
    # error is ~sqrt(eps) relative to tr(S) for singular covariances (exact otherwise).
    tolerance = 1e-7 * np.trace(singular)
    assert frechet_distance(mu1, singular, mu2, singular) == pytest.approx(expected, abs=tolerance)
    # Commuting (diagonal) covariances: ||dmu||^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.1, 3, dims), rng.uniform(0.1, 3, dims)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # Scalar Gaussians: (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu1, np.eye(dims), mu2[:-1], np.eye(dims - 1))


# ---------------------------------------------------------------------------------------
# Streaming statistics.


def test_streaming_statistics_match_numpy():
    rng = np.random.default_rng(1)
    # A large common offset: the raw "sum x x^T / n - mu mu^T" would lose ~8 digits here.
    features = rng.standard_normal((257, 7)) * [1, 2, 3, 4, 5, 6, 7] + 1e4
    acc = FeatureStatistics(7)
    start = 0
    for size in (1, 0, 100, 3, 153):
        acc.update(torch.from_numpy(features[start : start + size]))
        start += size
    stats = acc.compute(extractor="x", source="y")
    assert stats.count == 257 and (stats.extractor, stats.source) == ("x", "y")
    np.testing.assert_allclose(stats.mu, features.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-9)
    # Merging shards equals one pass.
    left, right = FeatureStatistics(7), FeatureStatistics(7)
    left.update(torch.from_numpy(features[:57]))
    right.update(torch.from_numpy(features[57:]))
    left.merge(right)
    merged = left.compute()
    np.testing.assert_allclose(merged.mu, stats.mu, rtol=1e-13)
    np.testing.assert_allclose(merged.sigma, stats.sigma, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStatistics(3).compute()
    with pytest.raises(ValueError, match="features must be"):
        acc.update(torch.zeros(2, 8))


def test_stats_files_round_trip_and_pytorch_fid_format(tmp_path):
    stats = GaussianStats(np.arange(3.0), np.eye(3), count=10, extractor="net/a", source="set-1")
    save_stats(tmp_path / "ref.npz", stats)
    loaded = load_stats(tmp_path / "ref.npz")
    assert (loaded.count, loaded.extractor, loaded.source) == (10, "net/a", "set-1")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    # pytorch-fid --save-stats / EDM reference files: only mu and sigma.
    np.savez_compressed(tmp_path / "theirs.npz", mu=stats.mu, sigma=stats.sigma)
    theirs = load_stats(tmp_path / "theirs.npz")
    assert (theirs.count, theirs.extractor) == (None, "")
    assert theirs.frechet_distance(stats) == pytest.approx(0.0, abs=1e-12)
    other = GaussianStats(stats.mu, stats.sigma, extractor="net/b")
    with pytest.raises(ValueError, match="different feature extractors"):
        stats.frechet_distance(other)


def test_cached_reference_stats(tmp_path):
    extractor = digits_feature_extractor()
    images = load_digits_images()[0]
    calls = []

    def batches():
        calls.append(1)
        return images.split(500)

    path = tmp_path / "cache" / "digits.npz"
    first = cached_reference_stats(path, batches, extractor, source="digits-all")
    again = cached_reference_stats(path, batches, extractor, source="digits-all")
    assert len(calls) == 1 and path.exists()
    np.testing.assert_array_equal(first.sigma, again.sigma)
    assert again.count == 1797 and again.extractor == extractor.fingerprint
    cached_reference_stats(path, batches, extractor, source="digits-other")
    assert len(calls) == 2


def test_feature_statistics_consumes_the_stream_lazily():
    extractor = digits_feature_extractor()
    images = load_digits_images()[0]
    pulled = []

    def sampler():
        for start in range(0, 1797, 100):
            pulled.append(start)
            yield images[start : start + 100], None  # (images, labels) tuples are accepted

    stats = feature_statistics(sampler(), extractor, max_images=250, batch_size=64)
    assert stats.count == 250 and pulled == [0, 100, 200]
    direct = feature_statistics([images[:250]], extractor)
    np.testing.assert_allclose(stats.mu, direct.mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, direct.sigma, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Inception: built offline, parity with pytorch-fid's own path.


def _random_inception_state_dict() -> dict[str, torch.Tensor]:
    """Weights with the shapes of pytorch-fid's FID Inception (its patched blocks have the
    parameters of torchvision's), drawn so activations stay O(1) through the 94 layers."""
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, value in net.state_dict().items():
        if name.endswith("conv.weight"):
            fan_in = value[0].numel()
            value = torch.randn(value.shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif name.endswith("bn.running_var"):
            value = torch.rand(value.shape, generator=g) + 0.5
        elif name.endswith(("bn.running_mean", "bn.bias")):
            value = 0.1 * torch.randn(value.shape, generator=g)
        state[name] = value
    return state


@pytest.fixture(scope="module")
def inception_state() -> dict[str, torch.Tensor]:
    return _random_inception_state_dict()


@pytest.fixture(scope="module")
def inception(inception_state) -> InceptionFeatures:
    return InceptionFeatures(inception_state, "random-test")


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("attempted network access")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.slow
def test_inception_features_match_pytorch_fid_path(inception, inception_state, tmp_path, monkeypatch):
    """Our streaming statistics == pytorch-fid's statistics of the PNGs a sampler would have
    written (same network; its own PNG loader, batching and get_activations). The stream
    mixes float batches in [-1, 1], a uint8 batch and a grayscale image (saved as an "L"
    PNG, which pytorch-fid converts to RGB). Few images: a 299x299 Inception pass costs
    1-2 s of CPU per image here."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    pixels[5] = pixels[5, :, :, :1]  # grayscale: equal channels
    files = []
    for i, image in enumerate(pixels):
        files.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(image[:, :, 0] if i == 5 else image).save(files[-1])

    # pytorch-fid's own network and path, its weight fetch pointed at the same state dict.
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *a, **k: inception_state)
    theirs_net = InceptionV3([3])
    mu_ref, sigma_ref = calculate_activation_statistics(
        files, theirs_net, batch_size=4, dims=2048, device="cpu", num_workers=0
    )

    # Ours: float images that quantise to those PNG values (x = (v - 127.5) / 127.5 gives
    # floor(127.5 x + 128) = v), streamed in uneven batches.
    as_uint8 = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    floats = ((as_uint8.double() - 127.5) / 127.5).float()
    stream = iter([floats[0:2], as_uint8[2:5], floats[5:6, :1]])
    stats = feature_statistics(stream, inception, batch_size=2)
    scale = np.abs(mu_ref).max()
    assert scale > 1e-3  # non-degenerate random features
    np.testing.assert_allclose(stats.mu, mu_ref, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(stats.sigma, sigma_ref, rtol=1e-4, atol=1e-5 * np.abs(sigma_ref).max())
    assert stats.count == 6 and stats.extractor == inception.fingerprint


def test_fid_from_batches():
    """The streaming FID entry point, with the (cheap) digits extractor standing in."""
    extractor = digits_feature_extractor()
    images = load_digits_images()[0]
    reference = feature_statistics([images[:900]], extractor)
    value = fid_from_batches(iter(images[900:].split(128)), reference, extractor=extractor)
    assert value == pytest.approx(feature_statistics([images[900:]], extractor).frechet_distance(reference))
    same = fid_from_batches([images[:900]], images[:900], extractor=extractor)
    assert abs(same) < 1e-9 * np.trace(reference.sigma)
    with pytest.raises(ValueError, match="different feature extractors"):
        fid_from_batches([images], GaussianStats(reference.mu, reference.sigma, extractor="x"), extractor=extractor)


def test_inception_from_local_file_never_downloads(inception_state, inception, tmp_path, monkeypatch):
    _no_network(monkeypatch)
    path = tmp_path / INCEPTION_WEIGHTS_NAME
    torch.save(inception_state, path)
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(path))
    with pytest.warns(UserWarning, match="not pytorch-fid's"):
        extractor = inception_feature_extractor(device="cpu")
    assert extractor.fingerprint.startswith("pytorch-fid-inception-v3-pool3/sha256:")
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())
    for (name, ours), (_, direct) in zip(extractor.state_dict().items(), inception.state_dict().items(), strict=True):
        assert torch.equal(ours, direct), name


def test_missing_inception_weights_message(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as info:
        inception_feature_extractor()
    message = str(info.value)
    for needle in (
        INCEPTION_WEIGHTS_NAME,
        pytorch_fid.inception.FID_WEIGHTS_URL,
        INCEPTION_WEIGHTS_ENV,
        "--inception-weights",
        "never downloaded",
    ):
        assert needle in message
    with pytest.raises(FileNotFoundError, match="weights_path argument"):
        inception_feature_extractor(tmp_path / "nowhere.pth")


# ---------------------------------------------------------------------------------------
# FD_digits and memorisation.


def test_shipped_digits_feature_net():
    assert DIGITS_ASSET.stat().st_size < 200_000
    extractor = digits_feature_extractor()
    assert sum(p.numel() for p in extractor.parameters()) == 38_282
    assert extractor.fingerprint.startswith("digits-featnet/sha256:")
    with safe_open(DIGITS_ASSET, "pt") as f:
        assert float(f.metadata()["heldout_accuracy"]) > 0.97
    images, labels = load_digits_images()
    assert images.shape == (1797, 1, 8, 8) and images.min() == -1 and images.max() == 1
    with torch.no_grad():
        assert (extractor.logits(images).argmax(1) == labels).float().mean() > 0.98
        # (B, 64) and (B, 1, 16, 16) (2x2 average-pooled) inputs.
        features = extractor(images[:5])
        torch.testing.assert_close(extractor(images[:5].flatten(1)), features)
        upsampled = images[:5].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        torch.testing.assert_close(extractor(upsampled), features)
    with pytest.raises(ValueError, match="digits must be"):
        extractor(torch.zeros(2, 3, 8, 8))


def test_digits_training_is_seeded():
    state = torch.random.get_rng_state()
    net_a, accuracy = train_digits_feature_net(seed=3, epochs=1)
    net_b, _ = train_digits_feature_net(seed=3, epochs=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    for a, b in zip(net_a.parameters(), net_b.parameters(), strict=True):
        assert torch.equal(a, b)
    assert accuracy > 0.7 and isinstance(net_a, DigitsFeatureNet)


def test_fd_digits_orders_corruptions():
    images = load_digits_images()[0]
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    half_a, half_b = images[order[:898]], images[order[898:]]
    assert fd_digits(images) == pytest.approx(0.0, abs=1e-6)
    clean = fd_digits(half_a, half_b)
    blurred = fd_digits(torch.nn.functional.avg_pool2d(half_a, 3, 1, 1, count_include_pad=False), half_b)
    noise = fd_digits(torch.rand(898, 1, 8, 8) * 2 - 1, half_b)
    assert 0 < clean < 40 < 200 < blurred < noise
    reference = feature_statistics([half_b], digits_feature_extractor())
    assert fd_digits(half_a.split(100), reference) == pytest.approx(clean, rel=1e-5)


def test_memorisation_rate():
    images = load_digits_images()[0]
    train, held_out = images[:1000], images[1000:]
    assert memorisation_rate(train[:100], train) == 1.0
    assert memorisation_rate(torch.rand(200, 1, 8, 8) * 2 - 1, train) == 0.0
    copies = torch.cat([train[:30] + 0.01 * torch.randn(30, 1, 8, 8), held_out[:70]])
    assert memorisation_rate(copies, train) == pytest.approx(0.3, abs=0.02)
    distances = nearest_neighbour_distances(held_out[:3], train, chunk_size=2)
    expected = torch.cdist(held_out[:3].flatten(1).double(), train.flatten(1).double()).amin(1) / 8
    torch.testing.assert_close(distances, expected)
    # The documented default: 2 of the 1,797 real digits have another digit within 0.1.
    flat = images.flatten(1).double()
    pairwise = torch.cdist(flat, flat) / 8
    pairwise.fill_diagonal_(math.inf)
    assert int((pairwise.amin(1) < DIGITS_COPY_THRESHOLD).sum()) == 2
    with pytest.raises(ValueError, match="same elements"):
        memorisation_rate(torch.zeros(2, 63), train)
