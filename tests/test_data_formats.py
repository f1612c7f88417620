"""Dataset formats, sidecar annotations, versions, and path safety (ambient_fast.data)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ambient_fast.data import (
    AnnotationError,
    DatasetError,
    DatasetFormatError,
    DatasetWriter,
    Sample,
    UnsafePathError,
    open_dataset,
    read_annotations,
    verify_version,
    write_annotations,
    write_dataset,
)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def tree_checksums(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def make_samples(n: int = 7, shape=(6, 5, 3), wds_keys: bool = False) -> list[Sample]:
    rng = np.random.default_rng(1)
    samples = []
    for i in range(n):
        key = f"s{i:04d}" if wds_keys else f"{i // 4:05d}/img{i:08d}.png"
        samples.append(
            Sample(
                index=i,
                key=key,
                array=rng.integers(0, 256, shape, dtype=np.uint8),
                sigma_min=float(rng.random()) * (i % 2),
                sigma_max=float(rng.random()) * 0.1,
                label=int(i % 3),
                caption=f"caption {i} \u00e9",
                metadata={"i": i, "tags": ["a", "b"]},
                extras={"seg.npy": bytes([i, 1, 2])} if wds_keys else {},
            )
        )
    return samples


@pytest.mark.parametrize("fmt", ["folder", "zip", "webdataset"])
@pytest.mark.parametrize("channels", [1, 3])
def test_image_formats_round_trip(tmp_path, fmt, channels):
    samples = make_samples(shape=(6, 5, channels), wds_keys=fmt == "webdataset")
    root = write_dataset(tmp_path / fmt, fmt, samples, chunk_size=3)
    verify_version(root)
    dataset = open_dataset(root)
    assert dataset.format == fmt and len(dataset) == len(samples)
    assert dataset.sample_shape == (channels, 6, 5)
    assert dataset.sigma_min.dtype == np.float64
    for i, expected in enumerate(samples):
        got = dataset.read(i)
        assert got.key == expected.key
        np.testing.assert_array_equal(got.array, expected.array)
        assert got.sigma_min == expected.sigma_min and got.sigma_max == expected.sigma_max  # exact float64
        assert got.label == expected.label
        if fmt == "webdataset":
            assert got.caption == expected.caption and got.metadata == expected.metadata
            assert got.extras["seg.npy"] == expected.extras["seg.npy"]
    manifest = dataset.manifest
    assert manifest["format"] == fmt and manifest["counts"]["samples"] == len(samples)
    assert manifest["counts"]["chunks"] == 3


@pytest.mark.parametrize("container", ["safetensors", "npy"])
@pytest.mark.parametrize("shape,dtype", [((4, 3), np.float32), ((2, 5, 7), np.float64), ((1, 3, 3), np.uint8)])
def test_tensor_format_round_trip(tmp_path, container, shape, dtype):
    rng = np.random.default_rng(2)
    samples = [
        Sample(
            index=i, key=f"protein/{i:03d}", array=(rng.random(shape) * 100).astype(dtype), sigma_min=0.25 * i, label=i
        )
        for i in range(5)
    ]
    root = write_dataset(tmp_path / "t", "tensors", samples, chunk_size=2, tensor_container=container)
    dataset = open_dataset(root)
    assert dataset.format == "tensors" and dataset.sample_shape == shape
    for i, expected in enumerate(samples):
        got = dataset.read(i)
        assert got.key == expected.key and got.label == i and got.sigma_min == 0.25 * i
        np.testing.assert_array_equal(got.array, expected.array)
        assert got.array.dtype == dtype


def test_plain_npy_file_gets_row_keys(tmp_path):
    coords = np.random.default_rng(0).standard_normal((6, 11, 3)).astype(np.float32)  # (N, L, 3)
    np.save(tmp_path / "coords.npy", coords)
    dataset = open_dataset(tmp_path)
    assert dataset.keys[0] == "coords.npy/00000000" and dataset.sample_shape == (11, 3)
    np.testing.assert_array_equal(dataset.read(4).array, coords[4])


def _edm_folder(root: Path, n: int = 5) -> list[np.ndarray]:
    """An EDM dataset_tool-style folder, written by hand (not by our writer)."""
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(n)]
    (root / "00000").mkdir(parents=True)
    for i, image in enumerate(images):
        (root / f"00000/img{i:08d}.png").write_bytes(png_bytes(image))
    (root / "dataset.json").write_text(json.dumps({"labels": [[f"00000/img{i:08d}.png", i % 2] for i in range(n)]}))
    return images


def test_existing_edm_folder_and_zip_read_unchanged(tmp_path):
    images = _edm_folder(tmp_path / "edm")
    lines = [
        {"filename": "00000/img00000000.png", "sigma_min": 1.2, "sigma_max": 0},
        {"filename": "00000/img00000001.png", "annotation": 0.15},
        {"filename": "00000/img00000002.png", "sigma": 0.0},
        {"filename": "00000/img00000003.png", "sigma_min": 0.0, "sigma_max": 0.55},
        {"filename": "00000/img00000004.png", "sigma_min": 300, "sigma_max": 1.0},
    ]
    (tmp_path / "edm/annotations.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    archive = tmp_path / "edm.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted((tmp_path / "edm").rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(tmp_path / "edm").as_posix())
    for path, fmt in ((tmp_path / "edm", "folder"), (archive, "zip")):
        dataset = open_dataset(path)
        assert dataset.format == fmt
        np.testing.assert_array_equal(dataset.sigma_min, [1.2, 0.15, 0.0, 0.0, 300.0])
        np.testing.assert_array_equal(dataset.sigma_max, [0.0, 0.0, 0.0, 0.55, 1.0])
        np.testing.assert_array_equal(dataset.labels, [0, 1, 0, 1, 0])
        for i, image in enumerate(images):
            np.testing.assert_array_equal(dataset.read(i).array, image)


def test_existing_webdataset_shards_read_unchanged(tmp_path):
    rng = np.random.default_rng(4)
    shard_dir = tmp_path / "wds"
    shard_dir.mkdir()
    expected = {}
    for shard in range(2):
        with tarfile.open(shard_dir / f"{shard:06d}.tar", "w") as tar:
            for j in range(3):
                key = f"sample{shard}{j}"
                image = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="JPEG", quality=90)
                meta = json.dumps({"url": f"http://x/{key}", "w": 5}, indent=2).encode()  # odd formatting kept
                for ext, payload in (
                    ("jpg", buffer.getvalue()),
                    ("txt", f"a photo {key}".encode()),
                    ("json", meta),
                    ("cls", b"7"),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                expected[key] = (buffer.getvalue(), meta)
    dataset = open_dataset(shard_dir)
    assert dataset.format == "webdataset" and list(dataset.keys) == sorted(expected)
    np.testing.assert_array_equal(dataset.labels, [7] * 6)
    sample = dataset.read(4)
    assert sample.caption == f"a photo {sample.key}" and sample.metadata["w"] == 5
    assert sample.data == expected[sample.key][0] and sample.extras["json"] == expected[sample.key][1]
    # Carried through untouched into a new version.
    out = write_dataset(tmp_path / "v1", "webdataset", (dataset.read(i) for i in range(len(dataset))), parent=dataset)
    copy = open_dataset(out)
    for i in range(len(dataset)):
        a, b = dataset.read(i), copy.read(i)
        assert (a.key, a.data, a.extras, a.caption) == (b.key, b.data, b.extras, b.caption)


# ---- annotations -------------------------------------------------------------------------


def _sidecar(root: Path, lines: list) -> None:
    (root / "annotations.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")


def test_sidecar_missing_ids_refused_naming_them(tmp_path):
    _edm_folder(tmp_path)
    _sidecar(tmp_path, [{"filename": "00000/img00000000.png", "sigma_min": 1.0}])
    with pytest.raises(AnnotationError, match=r"4 of 5 samples have no annotation: 00000/img00000001\.png"):
        open_dataset(tmp_path)
    # A per-dataset default fills the gaps (dataset.json or the open_dataset argument).
    info = json.loads((tmp_path / "dataset.json").read_text())
    info["annotation_default"] = {"sigma_min": 0.5, "sigma_max": 0.0}
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    np.testing.assert_array_equal(open_dataset(tmp_path).sigma_min, [1.0, 0.5, 0.5, 0.5, 0.5])
    np.testing.assert_array_equal(open_dataset(tmp_path, default_sigma_min=0.0).sigma_min, [1.0, 0, 0, 0, 0])


@pytest.mark.parametrize(
    "bad,pattern",
    [
        ({"sigma_min": -0.1}, r"line 2 00000/img00000001\.png: sigma_min=-0\.1"),
        ({"sigma_min": float("nan")}, r"line 2 00000/img00000001\.png: sigma_min=nan"),
        ({"annotation": "high"}, r"annotation='high'"),
        ({"sigma_min": 1.0, "sigma_max": -2}, r"sigma_max=-2"),
        ({"sigma_min": float("inf")}, r"sigma_min=inf"),
    ],
)
def test_sidecar_invalid_values_refused(tmp_path, bad, pattern):
    _edm_folder(tmp_path)
    lines = [{"filename": f"00000/img{i:08d}.png", "sigma_min": 0.0} for i in range(5)]
    lines[1] = {"filename": "00000/img00000001.png", **bad}
    _sidecar(tmp_path, lines)
    with pytest.raises(AnnotationError, match=pattern):
        open_dataset(tmp_path)


def test_sidecar_unknown_and_duplicate_entries_refused(tmp_path):
    _edm_folder(tmp_path)
    lines = [{"filename": f"00000/img{i:08d}.png", "sigma_min": 0.0} for i in range(5)]
    _sidecar(tmp_path, lines + [{"filename": "00000/ghost.png", "sigma_min": 1.0}])
    with pytest.raises(AnnotationError, match=r"does not hold: 00000/ghost\.png"):
        open_dataset(tmp_path)
    _sidecar(tmp_path, lines + [lines[2]])
    with pytest.raises(AnnotationError, match=r"duplicate entries: line 6 00000/img00000002\.png"):
        open_dataset(tmp_path)
    _sidecar(tmp_path, lines[:4] + ['{"filename": "00000/img00000004.png", "probabilities": [0.1]}'])
    with pytest.raises(AnnotationError, match=r"line 5 .*converted to sigma_min"):
        open_dataset(tmp_path)


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "00000/../../x.png", "C:/x.png", "a\\..\\b.png"])
def test_sidecar_unsafe_filenames_refused(tmp_path, name):
    _edm_folder(tmp_path)
    _sidecar(tmp_path, [{"filename": name, "sigma_min": 1.0}])
    with pytest.raises(UnsafePathError, match=r"line 1: filename"):
        open_dataset(tmp_path)


def test_write_and_read_annotations_exact(tmp_path):
    keys = ["a.png", "b/c.png"]
    values = [0.1 + 0.2, 1.0 / 3.0]
    write_annotations(tmp_path / "annotations.jsonl", keys, values, [0.0, 0.55])
    assert read_annotations(tmp_path / "annotations.jsonl") == {"a.png": (values[0], 0.0), "b/c.png": (values[1], 0.55)}
    with pytest.raises(AnnotationError, match="b/c.png"):
        write_annotations(tmp_path / "x.jsonl", keys, [0.0, -1.0])
    assert not (tmp_path / "x.jsonl").exists()


# ---- untrusted archives and folders ------------------------------------------------------


@pytest.mark.parametrize("member", ["../evil.png", "/abs/evil.png", "a/../../evil.png"])
def test_zip_with_unsafe_member_refused(tmp_path, member):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("00000/img00000000.png", png_bytes(np.zeros((4, 4, 3), np.uint8)))
        z.writestr(member, png_bytes(np.zeros((4, 4, 3), np.uint8)))
    with pytest.raises(
        UnsafePathError, match=r"zip member of .*bad\.zip.*" + member.split("/")[-1].replace(".", r"\.")
    ):
        open_dataset(archive)


@pytest.mark.parametrize("member", ["../evil.png", "/abs/evil.png"])
def test_tar_with_unsafe_member_refused(tmp_path, member):
    shard = tmp_path / "000000.tar"
    payload = png_bytes(np.zeros((4, 4, 3), np.uint8))
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(UnsafePathError, match=r"tar member of .*000000\.tar"):
        open_dataset(tmp_path)


def test_tar_link_members_and_compressed_shards_refused(tmp_path):
    (tmp_path / "links").mkdir()
    with tarfile.open(tmp_path / "links/000000.tar", "w") as tar:
        info = tarfile.TarInfo("x.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(UnsafePathError, match=r"x\.png: link member"):
        open_dataset(tmp_path / "links")
    (tmp_path / "gz").mkdir()
    with tarfile.open(tmp_path / "gz/000000.tar", "w:gz") as tar:
        payload = png_bytes(np.zeros((4, 4, 3), np.uint8))
        info = tarfile.TarInfo("k.png")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(DatasetFormatError, match="gzip-compressed tar"):
        open_dataset(tmp_path / "gz")


def test_folder_symlink_outside_root_refused(tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes(np.zeros((4, 4, 3), np.uint8)))
    _edm_folder(tmp_path / "ds")
    os.symlink(outside, tmp_path / "ds/00000/img00000099.png")
    with pytest.raises(UnsafePathError, match=r"img00000099\.png.*outside the dataset root"):
        open_dataset(tmp_path / "ds")


@pytest.mark.parametrize("key", ["../escape.png", "/tmp/abs.png", "a/../../escape.png"])
def test_writer_refuses_unsafe_keys_and_writes_nothing_outside(tmp_path, key):
    before = tree_checksums(tmp_path)
    writer = DatasetWriter(tmp_path / "out", "folder")
    with pytest.raises(UnsafePathError, match="sample key"):
        writer.write_chunk([Sample(index=0, key=key, array=np.zeros((4, 4, 3), np.uint8))])
    after = {k: v for k, v in tree_checksums(tmp_path).items() if not k.startswith("out")}
    assert after == before
    assert not (tmp_path / "escape.png").exists()


# ---- versions: never over a source, atomic chunks, resume, checksums ---------------------


def test_versions_never_touch_the_source(tmp_path):
    _edm_folder(tmp_path / "src")
    before = tree_checksums(tmp_path / "src")
    source = open_dataset(tmp_path / "src")
    with pytest.raises(DatasetError, match="inside or around its source"):
        DatasetWriter(tmp_path / "src/v1", "folder", parent=source)
    with pytest.raises(DatasetError, match="not empty"):
        DatasetWriter(tmp_path / "src", "folder")
    out = write_dataset(tmp_path / "v1", "folder", (source.read(i) for i in range(len(source))), parent=source)
    with pytest.raises(DatasetError, match="already holds a complete dataset version"):
        DatasetWriter(out, "folder", resume=True)
    assert tree_checksums(tmp_path / "src") == before
    manifest = verify_version(out)
    assert manifest["parent"]["path"] == str((tmp_path / "src").resolve())
    # Clean samples pass through byte for byte.
    assert (out / "00000/img00000003.png").read_bytes() == (tmp_path / "src/00000/img00000003.png").read_bytes()


def test_chunked_writer_resumes_after_a_crash(tmp_path):
    samples = make_samples(n=9)
    writer = DatasetWriter(tmp_path / "v", "folder", params={"loop": 1})
    writer.write_chunk(samples[:4])
    writer.write_chunk(samples[4:6])
    # Simulate a crash mid-chunk: an uncommitted file with no chunk record, no close().
    (tmp_path / "v/00009").mkdir()
    (tmp_path / "v/00009/partial.png").write_bytes(b"half")
    del writer
    with pytest.raises(DatasetError, match="unfinished dataset version"):
        open_dataset(tmp_path / "v")
    with pytest.raises(DatasetError, match="not empty"):
        DatasetWriter(tmp_path / "v", "folder")
    resumed = DatasetWriter(tmp_path / "v", "folder", resume=True)
    assert resumed.completed_keys == {s.key for s in samples[:6]}
    with pytest.raises(DatasetError, match="written twice"):
        resumed.write_chunk(samples[5:7])
    resumed.write_chunk(samples[6:])
    root = resumed.close()
    assert not (root / "00009/partial.png").exists() and not (root / ".chunks").exists()
    dataset = open_dataset(root)
    assert list(dataset.keys) == [s.key for s in samples]
    np.testing.assert_array_equal(dataset.sigma_min, [s.sigma_min for s in samples])
    assert dataset.manifest["params"] == {"loop": 1}
    verify_version(root)
    (root / "00000/img00000001.png").write_bytes(png_bytes(np.zeros((6, 5, 3), np.uint8)))
    with pytest.raises(DatasetError, match=r"00000/img00000001\.png.*checksum"):
        verify_version(root)


def test_writer_refuses_invalid_levels_before_writing(tmp_path):
    writer = DatasetWriter(tmp_path / "v", "webdataset")
    bad = Sample(index=0, key="k0", array=np.zeros((4, 4, 3), np.uint8), sigma_min=float("nan"))
    with pytest.raises(AnnotationError, match="k0"):
        writer.write_chunk([bad])
    assert not list((tmp_path / "v").glob("*.tar"))
