"""``restore_dataset`` on image folders: outputs, determinism, resume, refusals, safety.

A small EDM-layout folder of 8x8 grayscale PNGs (a quarter clean) with ``annotations.jsonl``,
``dataset.json`` labels and an extra file, restored with a tiny UNet. Helpers here are
shared by the other ``test_restoration_*`` files.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ambient_fast.core.precond import EDMPrecond
from ambient_fast.data import open_dataset, verify_version
from ambient_fast.nn import build_network
from ambient_fast.restoration import ArgumentsChanged, restore_dataset, staging_folder

SIGMA_CORRUPT = 1.2


pytestmark = pytest.mark.usefixtures("single_thread")


def make_png_dataset(root: Path, n: int = 24, *, seed: int = 0) -> Path:
    """EDM-layout folder: ``00000/img%08d.png`` 8x8 grayscale, every 4th sample clean, the
    others at sigma_min 1.2 (sample 5 at 0.4), labels in ``dataset.json``, a README."""
    rng = np.random.default_rng(seed)
    lines, labels = [], []
    for i in range(n):
        name = f"{i // 1000:05d}/img{i:08d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / name)
        level = 0.0 if i % 4 == 0 else (0.4 if i == 5 else SIGMA_CORRUPT)
        lines.append(json.dumps({"filename": name, "sigma_min": level, "sigma_max": 0.0}))
        labels.append([name, i % 10])
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    (root / "README.txt").write_text("test data\n")
    return root


def make_denoiser(seed: int = 0) -> EDMPrecond:
    """EDM-preconditioned ``unet-tiny`` with seeded random weights (branches scaled up so
    the network is not near-identity)."""
    torch.manual_seed(seed)
    net = build_network("unet-tiny")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return EDMPrecond(net).eval()


def tree_bytes(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """``{relative path: bytes}`` of every file under ``root`` except the names in ``skip``."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in skip
    }


def kill_after_first_shard(child: subprocess.Popen, dst: Path, *, timeout: float, max_delay: float) -> int:
    """SIGKILL ``child`` (a restoration into ``dst``) at a random point after its first committed
    shard; returns the shards committed by then (the version writer's chunk records)."""

    def committed() -> int:
        return len(list((staging_folder(dst) / ".chunks").glob("chunk-*.json")))

    try:
        deadline = time.monotonic() + timeout
        while committed() < 1:
            assert child.poll() is None, child.stderr.read().decode()[-4000:]
            assert time.monotonic() < deadline, "the child never committed a shard"
            time.sleep(0.02)
        time.sleep(random.Random(os.getpid()).uniform(0.0, max_delay))  # a random point after that
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert not dst.exists(), "the run finished before the kill; make the child slower"
    return committed()


FAST = dict(num_steps=6, backend="torch", progress=False, num_workers=2)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_png_dataset(tmp_path / "src")


def test_outputs_annotations_and_byte_identical_clean_samples(tmp_path: Path, src: Path) -> None:
    before = tree_bytes(src)
    report = restore_dataset(make_denoiser(), src, tmp_path / "dst", batch_size=4, shard_size=8, **FAST)
    dst = tmp_path / "dst"
    assert tree_bytes(src) == before, "the source was modified"
    assert not staging_folder(dst).exists()
    assert (report.num_samples, report.num_restored, report.num_copied, report.nfe_per_sample) == (24, 18, 6, 11)
    verify_version(dst)
    out, orig = open_dataset(dst), open_dataset(src)
    assert out.keys == orig.keys and out.format == "folder"
    np.testing.assert_array_equal(out.labels, orig.labels)
    clean = orig.sigma_min == 0
    np.testing.assert_array_equal(out.sigma_min, np.where(clean, 0.0, orig.sigma_min / 8))
    for i, key in enumerate(orig.keys):
        if clean[i]:
            assert (dst / key).read_bytes() == (src / key).read_bytes()
        else:
            assert (dst / key).read_bytes() != (src / key).read_bytes()
            assert out.decode(i).shape == (8, 8, 1)
    assert (dst / "README.txt").read_bytes() == b"test data\n"
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["params"]["num_steps"] == 6 and manifest["restoration"]["num_restored"] == 18


def test_sigma_out_stops_early_and_keeps_lower_samples(tmp_path: Path, src: Path) -> None:
    """Stopping at sigma_out = 0.5: samples above it are annotated 0.5; sample 5 (0.4) is
    already below it and is copied through with its annotation (SPEC 5)."""
    report = restore_dataset(make_denoiser(), src, tmp_path / "dst", batch_size=4, sigma_out=0.5, **FAST)
    out, orig = open_dataset(tmp_path / "dst"), open_dataset(src)
    assert report.num_restored == 17 and report.nfe_per_sample == 12
    want = np.where(orig.sigma_min > 0.5, 0.5, orig.sigma_min)
    np.testing.assert_array_equal(out.sigma_min, want)
    assert (tmp_path / "dst" / orig.keys[5]).read_bytes() == (src / orig.keys[5]).read_bytes()


def test_output_does_not_depend_on_batch_size_or_shards(tmp_path: Path, src: Path) -> None:
    """Per-sample determinism through the whole pipeline: batch 3 (padded last batch) and
    batch 16 give the same sample files and annotations."""
    denoiser = make_denoiser()
    restore_dataset(denoiser, src, tmp_path / "a", batch_size=3, shard_size=6, **FAST)
    restore_dataset(denoiser, src, tmp_path / "b", batch_size=16, **FAST)
    assert tree_bytes(tmp_path / "a", skip=("manifest.json",)) == tree_bytes(tmp_path / "b", skip=("manifest.json",))


class CrashAfter(torch.nn.Module):
    """Wraps a denoiser and raises after ``calls`` evaluations (a crash mid-run)."""

    def __init__(self, inner: torch.nn.Module, calls: int) -> None:
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("simulated crash")
        return self.inner(x, sigma)


def test_resume_after_crash_equals_clean_run_and_refuses_changed_arguments(tmp_path: Path, src: Path) -> None:
    denoiser = make_denoiser()
    opts = dict(batch_size=2, shard_size=4, model_fingerprint="tiny-0", **FAST)
    restore_dataset(denoiser, src, tmp_path / "clean", **opts)
    dst = tmp_path / "dst"
    with pytest.raises(RuntimeError, match="simulated crash"):
        restore_dataset(CrashAfter(denoiser, 11 * 5).eval(), src, dst, **opts)  # dies in the 6th batch
    assert not dst.exists() and staging_folder(dst).exists()
    chunks = staging_folder(dst) / ".chunks"
    assert sorted(chunks.glob("chunk-*.json")), "the crash came before any shard was committed"
    (chunks / ".chunk-000099.json.x.tmp").write_text('{"chunk": 99, "samp')  # a record torn by a kill mid-write
    with pytest.raises(ArgumentsChanged, match=r"num_steps \(--num-steps\): was 6, now 7") as err:
        restore_dataset(denoiser, src, dst, **{**opts, "num_steps": 7})
    assert "seed" not in str(err.value)
    with pytest.raises(ArgumentsChanged, match=r"seed \(--seed\): was 0, now 3"):
        restore_dataset(denoiser, src, dst, **opts, seed=3)
    report = restore_dataset(denoiser, src, dst, **opts)
    assert 0 < report.shards_resumed < report.shards_total
    assert tree_bytes(dst) == tree_bytes(tmp_path / "clean")
    again = restore_dataset(denoiser, src, dst, **opts)
    assert again.already_complete


def test_restart_discards_an_unfinished_run(tmp_path: Path, src: Path) -> None:
    denoiser = make_denoiser()
    opts = dict(batch_size=2, shard_size=4, model_fingerprint="tiny-0", **FAST)
    with pytest.raises(RuntimeError):
        restore_dataset(CrashAfter(denoiser, 30).eval(), src, tmp_path / "dst", **opts)
    report = restore_dataset(denoiser, src, tmp_path / "dst", **{**opts, "num_steps": 5}, restart=True)
    assert report.shards_resumed == 0 and report.nfe_per_sample == 9


def test_all_clean_dataset_is_copied(tmp_path: Path) -> None:
    src = make_png_dataset(tmp_path / "src", n=8)
    lines = [json.loads(line) for line in (src / "annotations.jsonl").read_text().splitlines()]
    (src / "annotations.jsonl").write_text("".join(json.dumps({**e, "sigma_min": 0.0}) + "\n" for e in lines))
    report = restore_dataset(make_denoiser(), src, tmp_path / "dst", **FAST)
    assert (report.num_restored, report.num_copied) == (0, 8)
    for key in open_dataset(src).keys:
        assert (tmp_path / "dst" / key).read_bytes() == (src / key).read_bytes()


def test_dry_run_writes_nothing(tmp_path: Path, src: Path) -> None:
    report = restore_dataset(make_denoiser(), src, tmp_path / "dst", dry_run=True, **FAST)
    assert report.dry_run and report.num_restored == 18
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_refusals(tmp_path: Path, src: Path) -> None:
    denoiser = make_denoiser()
    with pytest.raises(ValueError, match="outside src"):
        restore_dataset(denoiser, src, src / "restored", **FAST)
    with pytest.raises(ValueError, match="outside src"):
        restore_dataset(denoiser, src, src, **FAST)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        restore_dataset(denoiser, src, tmp_path / "taken", **FAST)
    with pytest.raises(ValueError, match="training mode"):
        restore_dataset(make_denoiser().train(), src, tmp_path / "dst", **FAST)
    for bad in (
        dict(num_steps=0),
        dict(method="ddim"),
        dict(seed=-1),
        dict(rho_ambient=0.5),
        dict(sigma_out=float("nan")),
        dict(shard_size=0),
        dict(state_dtype="float16"),
        dict(output_codec="gif"),
        dict(output_codec="jpeg"),
        dict(on_bad_sample="ignore"),
        dict(grid="linear"),
        dict(max_pixels=0),
        dict(reader="opencv"),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            restore_dataset(denoiser, src, tmp_path / "dst", **{**FAST, **bad})
    assert not (tmp_path / "dst").exists()


def test_untrusted_dataset_symlinks_are_refused(tmp_path: Path, src: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    os.symlink(outside, src / "link.txt")
    with pytest.raises(ValueError, match="symlink"):
        restore_dataset(make_denoiser(), src, tmp_path / "dst", **FAST)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("fmt", ["zip", "webdataset"])
def test_archive_formats_keep_their_format_captions_and_clean_bytes(tmp_path: Path, fmt: str) -> None:
    """Zip and WebDataset versions come out in their own format (assembled by the data
    package's writer): restored samples re-annotated, clean samples' bytes and every
    sample's caption and label carried through."""
    from ambient_fast.data import Sample, write_dataset

    rng = np.random.default_rng(1)
    samples = [
        Sample(
            index=i,
            key=f"s{i:04d}",
            array=rng.integers(0, 256, (8, 8, 1), dtype=np.uint8),
            sigma_min=0.0 if i % 3 == 0 else SIGMA_CORRUPT,
            label=i % 10,
            caption=f"digit {i}",
        )
        for i in range(10)
    ]
    src = write_dataset(tmp_path / "src", fmt, samples)
    report = restore_dataset(make_denoiser(), src, tmp_path / "dst", batch_size=4, **FAST)
    assert report.num_restored == 6
    verify_version(tmp_path / "dst")
    out, orig = open_dataset(tmp_path / "dst"), open_dataset(src)
    assert out.format == fmt and out.keys == orig.keys
    np.testing.assert_array_equal(out.sigma_min, np.where(orig.sigma_min > 0, SIGMA_CORRUPT / 8, 0.0))
    for i in range(len(orig)):
        assert out.caption(i) == orig.caption(i) and out.read(i).label == orig.read(i).label
        same = out.read_bytes(i) == orig.read_bytes(i)
        assert same == (orig.sigma_min[i] == 0)
