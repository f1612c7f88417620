"""The anchors' stored-noise datasets: EDM folders ending in ``/npy`` (ANCHORS 1.4, 3.2).

One float ``(C, H, W)`` ``.npy`` per image, un-normalised, already noisy at its sigma_min:
the anchors' ``train.py`` sets ``normalize=False`` and ``add_noise=False`` for such a path
(``x_tn`` is the stored array), and ``restore.py`` starts restoration from it without fresh
noise. Checked here: the data layer reads them (and refuses hostile files, naming them),
the writer round-trips them, and the compat loss / restorer apply the anchors' semantics.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from ambient_fast import EDMPrecond
from ambient_fast.compat import EDMAmbientLoss, open_anchor_dataset, restore_with_annotations
from ambient_fast.data import Sample, open_dataset, verify_version, write_dataset
from ambient_fast.data.errors import BadSampleError, DatasetError, DatasetFormatError

SHAPE = (3, 4, 4)


def _npy_folder(tmp_path, n=5, dtype=np.float32, seed=0):
    """An anchors-style ``.../npy`` folder: ``00000/img{i:08d}.npy`` arrays + annotations.jsonl."""
    root = tmp_path / "cifar" / "npy"
    (root / "00000").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays = [(rng.standard_normal(SHAPE) * 1.3).astype(dtype) for _ in range(n)]
    names = [f"00000/img{i:08d}.npy" for i in range(n)]
    for name, array in zip(names, arrays, strict=True):
        np.save(root / name, array)
    levels = [1.2 if i % 2 == 0 else 0.0 for i in range(n)]
    (root / "annotations.jsonl").write_text(
        "".join(
            json.dumps({"filename": k, "sigma_min": s, "sigma_max": 0.0}) + "\n"
            for k, s in zip(names, levels, strict=True)
        )
    )
    return root, names, arrays, levels


def test_npy_folder_is_read_as_stored_noisy_rows(tmp_path):
    root, names, arrays, levels = _npy_folder(tmp_path)
    dataset = open_dataset(root)
    assert dataset.format == "npy" and dataset.stored_noisy and not dataset.is_image
    assert list(dataset.keys) == names
    assert dataset.sample_shape == SHAPE and dataset.dtype == np.float32
    np.testing.assert_array_equal(dataset.sigma_min, levels)
    for i, array in enumerate(arrays):
        row = dataset.read(i).array
        assert row.dtype == np.float32 and np.array_equal(row, array)  # un-normalised, as stored
    np.testing.assert_array_equal(dataset.rows([3, 1]), np.stack([arrays[3], arrays[1]]))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("pickle", "not a plain .npy array"),
        ("object", "not a plain .npy array"),
        ("ints", "expected a float array"),
        ("ndim", r"expected a \(C, H, W\) array"),
        ("nan", "non-finite"),
        ("shape", "differs from the dataset's"),
    ],
)
def test_hostile_npy_files_are_refused_naming_the_file(tmp_path, payload, reason):
    root, names, _, _ = _npy_folder(tmp_path)
    bad = root / names[2]
    if payload == "pickle":
        bad.write_bytes(pickle.dumps({"evil": 1}))
    elif payload == "object":
        np.save(bad, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif payload == "ints":
        np.save(bad, np.zeros(SHAPE, dtype=np.int32))
    elif payload == "ndim":
        np.save(bad, np.zeros((4, 4), dtype=np.float32))
    elif payload == "nan":
        array = np.zeros(SHAPE, dtype=np.float32)
        array[1, 2, 3] = np.inf
        np.save(bad, array)
    else:
        np.save(bad, np.zeros((3, 4, 5), dtype=np.float32))
    dataset = open_dataset(root)
    with pytest.raises(BadSampleError, match=reason) as info:
        dataset.row(2)
    assert info.value.where == str(bad)
    dataset.row(1)  # the other samples still read


def test_bad_first_npy_file_fails_at_open(tmp_path):
    root, names, _, _ = _npy_folder(tmp_path)
    (root / names[0]).write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DatasetFormatError, match="img00000000.npy"):
        open_dataset(root)


def test_npy_round_trip_through_the_writer(tmp_path):
    root, names, arrays, levels = _npy_folder(tmp_path, dtype=np.float64)
    source = open_dataset(root)
    dest = tmp_path / "restored-v1"  # any name: the manifest says "npy"
    write_dataset(dest, "npy", (source.read(i) for i in range(len(source))), chunk_size=2, parent=source)
    verify_version(dest)
    again = open_dataset(dest)
    assert again.format == "npy" and again.stored_noisy
    assert list(again.keys) == names
    np.testing.assert_array_equal(again.sigma_min, levels)
    for i, array in enumerate(arrays):
        row = again.row(i)
        assert row.dtype == np.float64 and np.array_equal(row, array)  # bit for bit
    # Keys without the extension get it; the writer refuses what the reader would refuse.
    other = tmp_path / "other"
    write_dataset(other, "npy", [Sample(index=0, key="a/b", array=np.ones(SHAPE, np.float32))])
    assert open_dataset(other).keys == ("a/b.npy",)
    for array in (np.ones(SHAPE, np.int64), np.full(SHAPE, np.nan, np.float32), np.ones((4, 4), np.float32)):
        with pytest.raises(DatasetError, match="finite float"):
            write_dataset(tmp_path / f"bad-{array.dtype}-{array.ndim}", "npy", [Sample(0, "x", array)])


class _Inner(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1).to(dtype)

    def forward(self, x, c_noise, labels=None):
        return self.conv(x) * (1 + c_noise.reshape(-1, 1, 1, 1))


class _Net(torch.nn.Module):
    """EDM-style ``net(x, sigma, class_labels)`` over a random conv."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.precond = EDMPrecond(_Inner(dtype))

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        return self.precond(x, sigma, class_labels)


def test_compat_loss_and_restorer_take_the_stored_sample_as_x_tn(tmp_path):
    """Training: x_tn = the stored array (no nature noise); restoration: no fresh start noise."""
    root, names, arrays, levels = _npy_folder(tmp_path)
    dataset = open_anchor_dataset(root)
    assert dataset.stored_noisy
    images = torch.from_numpy(dataset.rows(range(4)))
    sigma_min = torch.from_numpy(dataset.sigma_min[:4])
    sigma = torch.tensor([2.0, 0.5, 1.9, 0.3])
    net = _Net(torch.float32)
    loss_fn = EDMAmbientLoss(stored_noisy=True, backend="torch")
    ours = loss_fn(net=net, images=images, sigma=sigma, sigma_min=sigma_min, generator=torch.Generator().manual_seed(1))
    # With the stored sample as x_tn, the loss equals a loss given zero frozen noise.
    ref = EDMAmbientLoss(backend="torch")(
        net=net,
        images=images,
        sigma=sigma,
        sigma_min=sigma_min,
        noise=torch.zeros_like(images),
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(ours, ref)
    # Restoration of stored-noisy rows: add_noise=False gives the same as zero start latents.
    net64 = _Net(torch.float64)
    sigma_tn = torch.tensor(levels[:4])
    restored, annotations = restore_with_annotations(
        net64, images, sigma_tn, names[:4], [0, 1, 2, 3], add_noise=not dataset.stored_noisy, num_steps=4
    )
    from ambient_fast.compat import edm_restorer

    zero_start = edm_restorer(
        images, sigma_tn.float(), torch.zeros(4), net64, torch.zeros_like(images), num_steps=4
    ).to(images.dtype)
    assert torch.equal(restored, zero_start)
    assert torch.equal(restored[1], images[1])  # clean: unchanged
    assert annotations[names[0]].sigma_min == float(torch.tensor(1.2) / 8)
