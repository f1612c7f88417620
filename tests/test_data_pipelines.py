"""DALI pipeline and torch fallback: same batch contract, same data, bad-file handling,
noise-first batching."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ambient_fast import eligible
from ambient_fast.data import (
    BadSampleError,
    Sample,
    build_dali_pipeline,
    dali_available,
    load_dataset_tensors,
    make_noise_first_sampler,
    make_torch_loader,
    open_dataset,
    write_dataset,
)

pytestmark = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI not installed")
N = 23


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    rng = np.random.default_rng(11)
    arrays = [rng.integers(0, 256, (11, 13, 3), dtype=np.uint8) for _ in range(N)]
    out = {}
    for fmt in ("folder", "zip", "webdataset"):
        samples = [
            Sample(
                index=i,
                key=f"img{i:05d}",
                array=arrays[i],
                sigma_min=0.0 if i % 3 == 0 else 0.4 + 0.05 * i,
                label=i % 5,
                caption=f"c{i}",
            )
            for i in range(N)
        ]
        out[fmt] = write_dataset(root / fmt, fmt, samples, chunk_size=10)
    return out


def collect(loader):
    return list(loader)


def assert_same_batches(torch_batches, dali_batches):
    assert len(torch_batches) == len(dali_batches) > 0
    for a, b in zip(torch_batches, dali_batches, strict=True):
        assert a.sample_ids.tolist() == b.sample_ids.tolist()
        assert a.images.shape == b.images.shape and a.images.dtype == b.images.dtype == torch.float32
        torch.testing.assert_close(b.images, a.images, rtol=0, atol=1e-6)
        assert torch.equal(a.sigma_min, b.sigma_min) and torch.equal(a.sigma_max, b.sigma_max)
        assert torch.equal(a.labels, b.labels) and a.captions == b.captions
        if a.sigma is None:
            assert b.sigma is None
        else:
            assert torch.equal(a.sigma, b.sigma)


@pytest.mark.parametrize("fmt", ["folder", "zip", "webdataset"])
@pytest.mark.parametrize("resolution,crop", [(None, None), ((9, 10), "center")])
@pytest.mark.parametrize("world_size", [1, 2])
def test_dali_cpu_matches_torch_fallback(datasets, fmt, resolution, crop, world_size):
    dataset = open_dataset(datasets[fmt])
    for rank in range(world_size):
        kwargs = dict(batch_size=4, resolution=resolution, crop=crop, rank=rank, world_size=world_size)
        dali = build_dali_pipeline(dataset, **kwargs)
        assert dali.mode == {"folder": "file", "zip": "external", "webdataset": "webdataset"}[fmt]
        assert_same_batches(collect(make_torch_loader(dataset, **kwargs)), collect(dali))
    # The shards of all ranks cover the dataset exactly once.
    ids = [
        int(i)
        for r in range(world_size)
        for b in build_dali_pipeline(dataset, batch_size=4, rank=r, world_size=world_size)
        for i in b.sample_ids
    ]
    assert sorted(ids) == list(range(N))


def test_batches_carry_exact_pixels_and_annotations(datasets):
    dataset = open_dataset(datasets["webdataset"])
    whole = load_dataset_tensors(dataset)
    for batch in build_dali_pipeline(dataset, batch_size=5, reader="external"):
        ids = batch.sample_ids
        torch.testing.assert_close(batch.images, whole.images[ids], rtol=0, atol=1e-6)
        assert torch.equal(batch.sigma_min, whole.sigma_min[ids].float())
        assert batch.captions == [f"c{int(i)}" for i in ids] and batch.labels.tolist() == (ids % 5).tolist()


def test_random_crop_and_flip_are_windows_of_the_image(datasets):
    dataset = open_dataset(datasets["folder"])
    whole = load_dataset_tensors(dataset).images
    for loader in (
        build_dali_pipeline(dataset, batch_size=8, resolution=8, crop="random", flip=True, seed=3),
        make_torch_loader(dataset, batch_size=8, resolution=8, crop="random", flip=True, seed=3),
    ):
        flips = 0
        for batch in loader:
            for image, index in zip(batch.images, batch.sample_ids, strict=True):
                full = whole[index]
                windows = [
                    (t, l, f)
                    for t in range(4)
                    for l in range(6)
                    for f in (0, 1)
                    if torch.allclose(image, (full.flip(-1) if f else full)[:, t : t + 8, l : l + 8], atol=1e-6)
                ]
                assert windows, "output is not a (flipped) crop of its source image"
                flips += windows[0][2]
        assert 0 < flips < len(dataset)


class _LocalNoiseFirstStandIn:
    """Minimal (index, sigma) batch sampler, used only if the real one is absent."""

    def __init__(self, sigma_min, batch_size, seed=0):
        self.sigma_min, self.batch_size, self.seed, self.epoch = np.asarray(sigma_min), batch_size, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 4

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(4):
            sigma = np.exp(-1.2 + 1.2 * rng.standard_normal(self.batch_size))
            yield [
                (int(rng.choice(np.flatnonzero((self.sigma_min == 0) | (s > 1.1547 * self.sigma_min)))), float(s))
                for s in sigma
            ]


def noise_first(dataset, batch_size, seed=0, **kwargs):
    try:
        return make_noise_first_sampler(dataset, batch_size, seed=seed, **kwargs)
    except ImportError:
        return _LocalNoiseFirstStandIn(dataset.sigma_min, batch_size, seed)


@pytest.mark.parametrize("fmt", ["folder", "zip", "webdataset"])
def test_noise_first_batches_identical_on_both_backends(datasets, fmt):
    dataset = open_dataset(datasets[fmt])
    dali = build_dali_pipeline(dataset, batch_sampler=noise_first(dataset, 6, seed=5))
    torch_loader = make_torch_loader(dataset, batch_sampler=noise_first(dataset, 6, seed=5))
    epochs = []
    for _ in range(2):
        torch_batches, dali_batches = collect(torch_loader), collect(dali)
        assert_same_batches(torch_batches, dali_batches)
        for batch in dali_batches:
            assert batch.sigma.dtype == torch.float32 and len(batch) == 6
            assert torch.equal(batch.sigma_min, torch.from_numpy(dataset.sigma_min[batch.sample_ids.numpy()]).float())
            assert eligible(batch.sigma.double(), batch.sigma_min.double()).all()
        epochs.append([b.sample_ids.tolist() for b in dali_batches])
    assert epochs[0] != epochs[1]  # the loader advances the sampler's epoch


def _corrupt_files(root: Path) -> dict[str, str]:
    """Truncate one PNG and replace another with a wrong-size image; returns key -> problem."""
    truncated, wrong = root / "img00003.png", root / "img00007.png"
    truncated.write_bytes(truncated.read_bytes()[:-40])
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(buffer, format="PNG")
    wrong.write_bytes(buffer.getvalue())
    return {"img00003.png": "truncated PNG", "img00007.png": "wrong size 5x5"}


@pytest.fixture
def broken_folder(tmp_path) -> Path:
    rng = np.random.default_rng(12)
    samples = [
        Sample(index=i, key=f"img{i:05d}.png", array=rng.integers(0, 256, (11, 13, 3), dtype=np.uint8))
        for i in range(12)
    ]
    root = write_dataset(tmp_path / "broken", "folder", samples)
    (root / "manifest.json").unlink()  # a plain user folder now
    _corrupt_files(root)
    return root


def test_scan_names_every_bad_file(broken_folder):
    found = open_dataset(broken_folder).scan("quick")
    assert sorted(found) == [3, 7]
    assert found[3].where.endswith("img00003.png") and "truncated PNG" in found[3].reason
    assert "wrong size 5x5" in found[7].reason


@pytest.mark.parametrize("backend", ["dali", "dali_external", "torch"])
def test_bad_files_skipped_with_count_or_fatal(broken_folder, backend, caplog):
    dataset = open_dataset(broken_folder)
    build = {
        "dali": lambda **kw: build_dali_pipeline(dataset, **kw),
        "dali_external": lambda **kw: build_dali_pipeline(dataset, reader="external", **kw),
        "torch": lambda **kw: make_torch_loader(dataset, **kw),
    }[backend]
    loader = build(batch_size=4)
    ids = [int(i) for b in loader for i in b.sample_ids]
    assert ids == [i for i in range(12) if i not in (3, 7)]
    assert sorted(loader.bad_samples) == [3, 7] and "img00003.png" in caplog.text
    with pytest.raises(BadSampleError, match=r"img00003\.png: truncated PNG"):
        collect(build(batch_size=4, on_bad_sample="raise"))
    # Per-sample checks also catch them when nothing was scanned up front (sampler order).
    sampler = [[(2, 0.5), (3, 0.7), (7, 0.9), (8, 1.1)]]
    checked = build(batch_size=None, batch_sampler=_Fixed(sampler)) if backend != "dali" else None
    if checked is not None:
        (batch,) = collect(checked)
        assert batch.sample_ids.tolist() == [2, 8] and batch.sigma.tolist() == pytest.approx([0.5, 1.1])
        assert sorted(checked.bad_samples) == [3, 7]


class _Fixed:
    def __init__(self, batches):
        self.batches, self.batch_size = batches, max(len(b) for b in batches)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def test_corruption_the_quick_check_misses_is_named_not_a_decoder_trace(tmp_path):
    rng = np.random.default_rng(13)
    samples = [
        Sample(index=i, key=f"img{i:05d}.png", array=rng.integers(0, 256, (11, 13, 3), dtype=np.uint8))
        for i in range(6)
    ]
    root = write_dataset(tmp_path / "d", "folder", samples)
    (root / "manifest.json").unlink()
    path = root / "img00002.png"
    data = bytearray(path.read_bytes())
    data[60:90] = b"\x00" * 30  # damage the compressed stream, keep header and IEND
    path.write_bytes(bytes(data))
    dataset = open_dataset(root)
    with pytest.raises(BadSampleError, match=r"img00002\.png.*scan='decode'"):
        collect(build_dali_pipeline(dataset, batch_size=3))
    loader = build_dali_pipeline(dataset, batch_size=3, scan="decode")
    assert [int(i) for b in loader for i in b.sample_ids] == [0, 1, 3, 4, 5]
    with pytest.raises(BadSampleError, match=r"img00002\.png: cannot decode"):
        load_dataset_tensors(dataset)
    assert load_dataset_tensors(dataset, on_bad_sample="skip").ids.tolist() == [0, 1, 3, 4, 5]


def test_digits_demo_through_both_pipelines(tmp_path_factory):
    from ambient_fast.data import demo_dataset

    # Shared per session with test_data_corrupt (demo_dataset reuses a complete folder).
    dataset = open_dataset(demo_dataset(tmp_path_factory.getbasetemp() / "ambient_fast_digits_demo", "blur"))
    sampler_args = dict(batches_per_epoch=3)
    try:
        dali = build_dali_pipeline(dataset, batch_sampler=make_noise_first_sampler(dataset, 64, **sampler_args))
        fallback = make_torch_loader(dataset, batch_sampler=make_noise_first_sampler(dataset, 64, **sampler_args))
    except ImportError:
        pytest.skip("ambient_fast.data.sampler not available")
    assert_same_batches(collect(fallback), collect(dali))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["folder", "webdataset"])
def test_dali_gpu_decode_matches_cpu(datasets, fmt):
    dataset = open_dataset(datasets[fmt])
    cpu = collect(build_dali_pipeline(dataset, batch_size=4, resolution=(9, 10)))
    gpu = collect(build_dali_pipeline(dataset, batch_size=4, resolution=(9, 10), device="mixed"))
    for a, b in zip(cpu, gpu, strict=True):
        assert b.images.is_cuda and a.sample_ids.tolist() == b.sample_ids.tolist()
        torch.testing.assert_close(b.images.cpu(), a.images, rtol=0, atol=1e-6)  # PNG decode is exact


def test_tar_member_names_with_spaces_fall_back_to_external_source(tmp_path):
    rng = np.random.default_rng(14)
    samples = [
        Sample(index=i, key=f"photo {i}", array=rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)) for i in range(5)
    ]
    dataset = open_dataset(write_dataset(tmp_path / "w", "webdataset", samples))
    dali = build_dali_pipeline(dataset, batch_size=2)
    assert dali.mode == "external"  # DALI's index format cannot hold names with spaces
    assert_same_batches(collect(make_torch_loader(dataset, batch_size=2)), collect(dali))
