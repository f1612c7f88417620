"""Corruptions, corrupted dataset versions, and the bundled digits demo."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from ambient_fast.data import (
    PRESET_SIGMA_MIN,
    Sample,
    apply_corruption,
    corrupt_dataset,
    corruption_sigma_min,
    demo_dataset,
    downsample_upsample,
    gaussian_blur,
    jpeg_compress,
    load_dataset_tensors,
    open_dataset,
    random_mask,
    select_corrupted,
    verify_version,
    write_dataset,
)


def tree_checksums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    # One folder per pytest session, shared with test_data_pipelines (demo_dataset reuses it).
    root = tmp_path_factory.getbasetemp() / "ambient_fast_digits_demo"
    demo_dataset(root, "blur")
    demo_dataset(root, "noise")
    return root


@pytest.fixture
def small_source(tmp_path) -> Path:
    rng = np.random.default_rng(5)
    samples = [
        Sample(index=i, key=f"00000/img{i:08d}.png", array=rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), label=i % 4)
        for i in range(40)
    ]
    return write_dataset(tmp_path / "src", "folder", samples)


def test_blur_matches_scipy_per_channel():
    x = np.random.default_rng(0).random((3, 9, 7))
    expected = np.stack([gaussian_filter(c, 0.8) for c in x])
    np.testing.assert_allclose(gaussian_blur(x, 0.8), expected, rtol=0, atol=1e-12)


def test_jpeg_and_other_corruptions_shapes_and_determinism():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = jpeg_compress(u8, 18)
    assert out.shape == u8.shape and out.dtype == np.uint8 and not np.array_equal(out, u8)
    np.testing.assert_array_equal(out, jpeg_compress(u8, 18))
    x = u8.transpose(2, 0, 1) / 255.0
    masked, kept = random_mask(x, np.random.default_rng(1), holes=2, hole_size=4)
    assert (~kept).sum() >= 16 and np.all(masked[:, ~kept] == 0) and np.array_equal(masked[:, kept], x[:, kept])
    again, _ = random_mask(x, np.random.default_rng(1), holes=2, hole_size=4)
    np.testing.assert_array_equal(masked, again)
    down = downsample_upsample(x, 2)
    assert down.shape == x.shape
    np.testing.assert_allclose(downsample_upsample(np.ones((1, 8, 8)), 4), 1.0)
    for kind, params in [("noise", {"std": 0.3}), ("mask", {"pixel_fraction": 0.5}), ("downsample", {"factor": 2})]:
        assert apply_corruption(kind, u8, params, np.random.default_rng(2)).shape == (3, 16, 16)


def test_sigma_min_presets_and_rules():
    assert corruption_sigma_min("blur", {"sigma_blur": 0.6}) == (1.2, "preset")
    assert corruption_sigma_min("blur", {"sigma_blur": 0.8}) == (1.9, "preset")
    assert corruption_sigma_min("jpeg", {"quality": 25}) == (1.3, "preset")
    assert corruption_sigma_min("noise", {"std": 0.3}) == (0.3, "noise std")
    assert corruption_sigma_min("blur", {"sigma_blur": 0.6}, 1.0) == (1.0, "user")
    assert len(PRESET_SIGMA_MIN) == 6
    with pytest.raises(ValueError, match="no preset sigma_min for blur"):
        corruption_sigma_min("blur", {"sigma_blur": 0.7})
    with pytest.raises(ValueError, match="pass sigma_min"):
        corruption_sigma_min("mask", {"holes": 1})
    with pytest.raises(ValueError, match="unknown"):
        corruption_sigma_min("blur", {"sigma_blur": 0.6, "radius": 2})


def test_selection_is_a_function_of_seed_and_key():
    keys = [f"k{i}" for i in range(2000)]
    chosen = select_corrupted(keys, 0.9, seed=3)
    assert abs(chosen.mean() - 0.9) < 0.03
    subset = select_corrupted(keys[::-1][:500], 0.9, seed=3)  # other order, other size: same fates
    np.testing.assert_array_equal(subset, chosen[::-1][:500])
    assert not np.array_equal(select_corrupted(keys, 0.9, seed=4), chosen)
    assert select_corrupted(keys, 0.9, seed=3, selection="exact").sum() == 1800


@pytest.mark.parametrize("kind,params,fmt", [("blur", {"sigma_blur": 0.6}, "folder"), ("jpeg", {"quality": 18}, "zip")])
def test_corrupt_dataset_version_ground_truth(tmp_path, small_source, kind, params, fmt):
    before = tree_checksums(small_source)
    first = corrupt_dataset(
        small_source, tmp_path / "a", kind, fraction=0.5, seed=7, format=fmt, chunk_size=16, **params
    )
    second = corrupt_dataset(small_source, tmp_path / "b", kind, fraction=0.5, seed=7, format=fmt, **params)
    assert tree_checksums(small_source) == before  # the source is never modified
    manifest_a, manifest_b = verify_version(first), verify_version(second)
    record = manifest_a["corruption"]
    assert record["corrupted_keys"] == manifest_b["corruption"]["corrupted_keys"]
    assert record["count"] == len(record["corrupted_keys"]) > 0 and record["params"] == params
    level = corruption_sigma_min(kind, params)[0]
    source, version = open_dataset(small_source), open_dataset(first)
    corrupted = set(record["corrupted_keys"])
    for i in range(len(source)):
        original, out = source.read(i), version.read(i)
        assert out.key == original.key and out.label == original.label
        if out.key in corrupted:
            assert out.sigma_min == level
            expected = apply_corruption(kind, original.array, params, None)
            np.testing.assert_array_equal(
                out.array, np.clip(np.rint(expected * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
            )
        else:
            assert out.sigma_min == 0.0 and out.data == original.data  # byte for byte
    assert [version.read(i).data for i in range(5)] == [open_dataset(second).read(i).data for i in range(5)]
    other = verify_version(
        corrupt_dataset(small_source, tmp_path / "c", kind, fraction=0.5, seed=8, format=fmt, **params)
    )
    assert other["corruption"]["corrupted_keys"] != record["corrupted_keys"]


def test_noise_version_is_float_and_exactly_gaussian(tmp_path, small_source):
    out = corrupt_dataset(small_source, tmp_path / "n", "noise", fraction=1.0, seed=0, std=0.4)
    noisy, clean = load_dataset_tensors(out), load_dataset_tensors(small_source)
    assert open_dataset(out).format == "tensors"
    residual = (noisy.images - clean.images).double()
    assert abs(residual.std().item() - 0.4) < 0.02 and abs(residual.mean().item()) < 0.02
    assert torch.all(noisy.sigma_min == 0.4)
    again = load_dataset_tensors(corrupt_dataset(small_source, tmp_path / "n2", "noise", fraction=1.0, seed=0, std=0.4))
    assert torch.equal(noisy.images, again.images)


def test_demo_dataset_one_call(demo_root):
    blurred = load_dataset_tensors(demo_dataset(demo_root, "blur"))  # reused, not rewritten
    assert blurred.images.shape == (1797, 1, 8, 8) and blurred.images.dtype == torch.float32
    assert blurred.images.min() == -1.0 and blurred.images.max() == 1.0
    assert int((blurred.sigma_min == 0).sum()) == 54 and set(blurred.sigma_min.unique().tolist()) == {0.0, 1.0}
    assert blurred.sigma_min.dtype == torch.float64 and torch.equal(blurred.ids, torch.arange(1797))
    clean = load_dataset_tensors(demo_dataset(demo_root, None))
    assert torch.equal(blurred.labels, clean.labels) and clean.labels[:3].tolist() == [0, 1, 2]
    is_clean = blurred.sigma_min == 0
    assert torch.equal(blurred.images[is_clean], clean.images[is_clean])
    assert not torch.equal(blurred.images[~is_clean], clean.images[~is_clean])
    noisy = load_dataset_tensors(demo_dataset(demo_root, "noise"))
    residual = noisy.images[noisy.sigma_min > 0] - clean.images[noisy.sigma_min > 0]
    assert abs(residual.std().item() - 0.2) < 0.005
    manifest = open_dataset(demo_dataset(demo_root, "blur")).manifest
    assert manifest["corruption"]["count"] == 1743 and manifest["parent"]["samples"] == 1797
