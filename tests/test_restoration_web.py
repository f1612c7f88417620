"""Web-scale inputs through the one restoration engine (issue 12 items 2-5).

JPEG WebDataset shards with captions, JSON and unknown members in -> shards out (PNG for
restored samples, the manifest's codec record), per-sample agreement with the reference
``samplers.restore``, the ``--dst`` lock, a same-size source change refused on resume,
hostile headers refused without allocating, truncated clean images never copied nor
accepted by ``verify_version``, bad samples skipped and named, size mismatch / ``--resize``,
DALI and PIL readers agreeing.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ambient_fast.core.noise import derive_seeds
from ambient_fast.data import BadSampleError, DatasetError, dali_available, open_dataset, verify_version
from ambient_fast.restoration import (
    ArgumentsChanged,
    SizeMismatch,
    SourceChanged,
    restore_dataset,
    save_denoiser,
    staging_folder,
)
from ambient_fast.restoration.lock import LEASE_SECONDS, DestinationLock, DestinationLocked, lock_path
from ambient_fast.samplers import restore as reference_restore
from tests.test_restoration_dataset import FAST, CrashAfter, make_denoiser, make_png_dataset, tree_bytes

pytestmark = pytest.mark.usefixtures("single_thread")

SIGMA = 1.2


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def make_jpeg_shards(root: Path, n: int = 12, shards: int = 2, *, size: int = 8, channels: int = 1) -> Path:
    """WebDataset tar shards of JPEG samples with a caption, JSON metadata and an unknown
    member; every third sample clean, the others at sigma_min 1.2 (sidecar beside the shards)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(3)
    lines = []
    per = -(-n // shards)
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as archive:
            for i in range(s * per, min(n, (s + 1) * per)):
                key = f"k{i:04d}"
                add(archive, f"{key}.jpg", jpeg(rng.integers(0, 256, (size, size, channels), dtype=np.uint8)))
                add(archive, f"{key}.txt", f"caption {i}".encode())
                add(archive, f"{key}.json", json.dumps({"url": f"http://x/{i}", "i": i}).encode())
                add(archive, f"{key}.weird_ext", bytes([i, 255, 0, 7]))
                lines.append(json.dumps({"filename": key, "sigma_min": 0.0 if i % 3 == 0 else SIGMA}))
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return root


def members(root: Path) -> dict[str, bytes]:
    out = {}
    for shard in sorted(root.glob("*.tar")):
        with tarfile.open(shard) as archive:
            for m in archive.getmembers():
                out[m.name] = archive.extractfile(m).read()
    return out


def test_jpeg_caption_shards_in_shards_out(tmp_path: Path) -> None:
    src = make_jpeg_shards(tmp_path / "src")
    before = tree_bytes(src)
    report = restore_dataset(make_denoiser(), src, tmp_path / "dst", batch_size=4, shard_size=5, **FAST)
    dst = tmp_path / "dst"
    assert tree_bytes(src) == before
    manifest = verify_version(dst)
    assert report.num_restored == 8 and report.num_copied == 4 and report.bad_samples_skipped == 0
    out, orig = open_dataset(dst), open_dataset(src)
    assert out.format == "webdataset" and out.keys == orig.keys
    assert sorted(p.name for p in dst.glob("*.tar")) == ["000000.tar", "000001.tar", "000002.tar"]  # 12 / 5
    got, want = members(dst), members(src)
    for i, key in enumerate(orig.keys):
        for ext in ("txt", "json", "weird_ext"):  # captions, JSON, unknown members: untouched
            assert got[f"{key}.{ext}"] == want[f"{key}.{ext}"]
        if i % 3 == 0:
            assert got[f"{key}.jpg"] == want[f"{key}.jpg"] and f"{key}.png" not in got  # clean: byte for byte
        else:
            assert f"{key}.jpg" not in got and got[f"{key}.png"].startswith(b"\x89PNG")  # restored: lossless PNG
            assert out.decode(i).shape == (8, 8, 1)
    np.testing.assert_array_equal(out.sigma_min, np.where(orig.sigma_min > 0, SIGMA / 8, 0.0))
    codec = manifest["restoration"]["codec"]
    assert codec["restored_as"] == "png" and codec["source_codecs"] == {"jpeg": 8} and codec["codec_changed"] == 8
    assert not codec["lossy_reencode"] and "losslessly" in codec["note"] and "losslessly" in report.codec_note
    assert manifest["restoration"]["num_restored"] == 8


def test_lossy_output_codec_is_recorded_as_a_corruption(tmp_path: Path) -> None:
    src = make_jpeg_shards(tmp_path / "src", n=6, shards=1)
    report = restore_dataset(make_denoiser(), src, tmp_path / "dst", batch_size=4, output_codec="jpeg:80", **FAST)
    codec = verify_version(tmp_path / "dst")["restoration"]["codec"]
    assert codec["restored_as"] == "jpeg:80" and codec["lossy_reencode"] and codec["codec_changed"] == 0
    assert "corruption" in codec["note"] and "corruption" in report.codec_note
    webp = restore_dataset(make_denoiser(), src, tmp_path / "webp", batch_size=4, output_codec="webp", **FAST)
    got = members(tmp_path / "webp")
    assert sum(name.endswith(".webp") for name in got) == 4 and "losslessly as webp" in webp.codec_note


def test_pixel_restoration_agrees_with_the_reference_per_sample(tmp_path: Path) -> None:
    """Every restored sample of a dataset run equals ``samplers.restore`` on that sample alone
    (float32 state, same seeds), to one uint8 level (float round-off between op orders)."""
    src = make_png_dataset(tmp_path / "src", n=14)
    denoiser = make_denoiser()
    restore_dataset(denoiser, src, tmp_path / "dst", batch_size=3, shard_size=5, seed=11, **FAST)
    orig, out = open_dataset(src), open_dataset(tmp_path / "dst")
    checked = 0
    for i in range(len(orig)):
        if orig.sigma_min[i] == 0:
            continue
        y0 = torch.from_numpy(orig.decode(i).transpose(2, 0, 1)).float()[None] / 127.5 - 1
        want = reference_restore(
            denoiser,
            y0,
            torch.tensor([orig.sigma_min[i]], dtype=torch.float64),
            num_steps=FAST["num_steps"],
            seeds=derive_seeds(torch.tensor([i]), 11),
            state_dtype=torch.float32,
            backend="torch",
        )[0]
        want_u8 = (want * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).numpy().transpose(1, 2, 0)
        diff = np.abs(out.decode(i).astype(int) - want_u8.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.05, (i, diff.max(), diff.mean())
        checked += 1
    assert checked == 10


# ------------------------------------------------------------------------------ the lock
def _lock_line(pid: int, since: float | None = None) -> str:
    since = time.gmtime(time.time() if since is None else since)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", since)
    return f"another restoration is writing here: pid {pid} on host {socket.gethostname()} since {when}\n"


def test_lock_second_run_gets_one_line_and_stale_lock_is_taken_over(tmp_path: Path) -> None:
    src = make_png_dataset(tmp_path / "src", n=8)
    model = save_denoiser(tmp_path / "m.safetensors", make_denoiser(), name="unet-tiny")
    dst = tmp_path / "dst"
    lock = tmp_path / ".dst.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        line = _lock_line(holder.pid)
        lock.write_text(line)
        argv = ["restore", "--model", str(model), "--src", str(src), "--dst", str(dst), "--num-steps", "2"]
        run = subprocess.run(
            [sys.executable, "-m", "ambient_fast.cli", *argv, "--no-progress", "--device", "cpu"],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert lines == [f"ambient-fast restore: {line.strip()}"], run.stderr
    assert not dst.exists() and lock.is_file()
    # The holder is dead now: its lock is stale and the next run takes it over, then removes it.
    report = restore_dataset(make_denoiser(), src, dst, **FAST)
    assert report.num_restored == 6 and not lock.exists() and (dst / "manifest.json").is_file()


def _foreign_lock(path: Path, age: float) -> str:
    """A lock line from another host, last refreshed ``age`` seconds ago (file mtime)."""
    host = f"node-that-is-not-{socket.gethostname()}"
    line = f"another restoration is writing here: pid 4242 on host {host} since 2026-12-05T00:00:00Z"
    path.write_text(line + "\n")
    then = time.time() - age
    os.utime(path, (then, then))
    return line


def test_foreign_host_lock_is_refused_while_refreshed_and_taken_over_after_its_lease(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    path = lock_path(dst)
    line = _foreign_lock(path, age=30.0)
    with pytest.raises(DestinationLocked) as refused:
        DestinationLock(dst).acquire()
    assert str(refused.value).startswith(line) and "refreshed 30 s ago" in str(refused.value)
    assert f"taken over once {LEASE_SECONDS:g} s pass without a refresh" in str(refused.value)
    assert path.read_text().strip() == line  # untouched
    _foreign_lock(path, age=LEASE_SECONDS + 5.0)
    with DestinationLock(dst) as lock:
        assert path.read_text().strip() == lock._line and socket.gethostname() in lock._line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no probe, mutex or lock left behind


def test_holder_refreshes_its_lease_and_never_removes_another_runs_lock(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    lock = DestinationLock(dst, lease=5.0, heartbeat=0.02)
    lock.acquire()
    path = lock_path(dst)
    os.utime(path, (time.time() - 100, time.time() - 100))
    deadline = time.time() + 2.0
    while time.time() - path.stat().st_mtime > 50 and time.time() < deadline:
        time.sleep(0.01)
    assert time.time() - path.stat().st_mtime < 5  # the heartbeat refreshed it
    with pytest.warns(RuntimeWarning, match="taken over by another run"):
        other = _foreign_lock(path, age=0.0)  # another run took over (our heartbeat had stalled)
        while not lock.lost and time.time() < deadline + 2.0:
            time.sleep(0.01)
    lock.release()
    assert lock.lost and path.read_text().strip() == other  # its lock stays


def test_one_of_many_concurrent_takers_of_a_stale_lock_wins(tmp_path: Path) -> None:
    import threading

    dst = tmp_path / "dst"
    for round_ in range(5):
        _foreign_lock(lock_path(dst), age=LEASE_SECONDS + 1.0)
        start, results = threading.Barrier(8), []

        def take(start: threading.Barrier = start, results: list = results) -> None:
            lock = DestinationLock(dst)
            start.wait()
            try:
                lock.acquire()
                results.append(lock)
            except DestinationLocked as err:
                results.append(str(err))

        threads = [threading.Thread(target=take) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [r for r in results if isinstance(r, DestinationLock)]
        assert len(winners) == 1, (round_, results)
        assert all(r.startswith(winners[0]._line) for r in results if isinstance(r, str))
        assert lock_path(dst).read_text().strip() == winners[0]._line
        winners[0].release()
        assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------ resume
def test_same_size_source_change_is_refused_naming_the_shard(tmp_path: Path) -> None:
    src = make_jpeg_shards(tmp_path / "src", n=12, shards=1)
    dst = tmp_path / "dst"
    opts = dict(batch_size=2, shard_size=4, model_fingerprint="tiny", **FAST)
    with pytest.raises(RuntimeError, match="simulated crash"):
        restore_dataset(CrashAfter(make_denoiser(), 11 * 2).eval(), src, dst, **opts)  # dies in the 3rd batch
    committed = sorted((staging_folder(dst) / ".chunks").glob("chunk-*.json"))
    assert committed and committed[0].name == "chunk-000000.json"
    # Rewrite sample k0001's caption in place with other bytes of the same length: names and
    # sizes (the cheap fingerprint) are unchanged, only the content digest can see it.
    shard = src / "00000.tar"
    data = shard.read_bytes()
    assert data.count(b"caption 1\x00") == 1
    shard.write_bytes(data.replace(b"caption 1\x00", b"CAPTION 1\x00"))
    with pytest.raises(SourceChanged, match=r"shard-000000 \(samples 'k0000'..'k0003'") as err:
        restore_dataset(make_denoiser(), src, dst, **opts)
    assert "--restart" in str(err.value)
    report = restore_dataset(make_denoiser(), src, dst, restart=True, **opts)
    assert report.shards_resumed == 0 and open_dataset(dst).caption(1) == "CAPTION 1"


def test_changed_arguments_still_refused_by_name(tmp_path: Path) -> None:
    src = make_jpeg_shards(tmp_path / "src", n=8, shards=1)
    dst = tmp_path / "dst"
    opts = dict(batch_size=2, shard_size=4, model_fingerprint="tiny", **FAST)
    with pytest.raises(RuntimeError):
        restore_dataset(CrashAfter(make_denoiser(), 11 * 2).eval(), src, dst, **opts)
    with pytest.raises(ArgumentsChanged, match=r"output_codec \(--output-codec\): was 'png', now 'webp'"):
        restore_dataset(make_denoiser(), src, dst, **{**opts, "output_codec": "webp"})


# ------------------------------------------------------------------------------ hostile input
def png_header_only(width: int, height: int) -> bytes:
    """A complete-looking PNG (IHDR ... IEND) whose header claims ``width x height`` pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


HUGE_CHILD = """
import resource, sys, threading, time, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from tests.test_restoration_dataset import make_denoiser
from ambient_fast.restoration import restore_dataset
from ambient_fast.data import BadSampleError

peak = [0]
done = threading.Event()


def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def watch():  # peak anonymous (allocated, not shared-library) memory, sampled every 2 ms
    while not done.is_set():
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.002)


threading.Thread(target=watch, daemon=True).start()
try:
    restore_dataset(make_denoiser(), {src!r}, {dst!r}, num_steps=2, batch_size=4, progress=False,
                    backend="torch", on_bad_sample="raise")
    print("NOT REFUSED")
except BadSampleError as err:
    print("REFUSED", err)
report = restore_dataset(make_denoiser(), {src!r}, {dst!r}, num_steps=2, batch_size=4, progress=False,
                         backend="torch")
done.set()
print("SKIPPED", report.bad_samples_skipped, report.bad_samples[0])
print("PEAK_ANON_KB", max(peak[0], anon_kb()))
print("RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_huge_header_is_refused_before_allocation(tmp_path: Path) -> None:
    """A 30000 x 30000 PNG header (a 1 KB file) is
    refused by --max-pixels before anything is allocated: the peak allocated memory of the
    whole process stays under 1 GB; with the default policy the sample is skipped and named,
    the rest restored."""
    src = make_png_dataset(tmp_path / "src", n=8)
    (src / "00000" / "img00000001.png").write_bytes(png_header_only(30000, 30000))  # first corrupt sample
    script = textwrap.dedent(
        HUGE_CHILD.format(root=str(Path(__file__).parents[1]), src=str(src), dst=str(tmp_path / "d"))
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    tags = ("REFUSED", "NOT", "SKIPPED", "PEAK_ANON_KB", "RSS_KB")
    out = dict(line.split(" ", 1) for line in run.stdout.splitlines() if line.split(" ", 1)[0] in tags)
    context = f"stdout: {run.stdout[-2000:]}\nstderr: {run.stderr[-2000:]}"
    assert "30000x30000" in out.get("REFUSED", "") and "max_pixels" in out["REFUSED"], context
    assert out.get("SKIPPED", "").startswith("1 shard-000000 00000/img00000001.png"), context
    # Peak allocated (anonymous) memory of the whole child, imports included (one 30000 x 30000
    # RGB sample alone would be 2.7 GB; the batch 10.8 GB). ru_maxrss also counts the shared
    # libraries' page-cache pages (torch's CUDA build: 0.6-1.3 GB, depending on the cache).
    assert int(out["PEAK_ANON_KB"]) < 1024 * 1024, context
    print(f"child: peak anonymous {int(out['PEAK_ANON_KB']) // 1024} MiB, ru_maxrss {int(out['RSS_KB']) // 1024} MiB")
    restored = open_dataset(tmp_path / "d")
    assert "00000/img00000001.png" not in restored.keys and len(restored) == 7


def test_truncated_clean_png_is_never_copied_nor_verified(tmp_path: Path) -> None:
    src = make_png_dataset(tmp_path / "src", n=8)
    clean = src / "00000" / "img00000004.png"  # sigma_min 0
    clean.write_bytes(clean.read_bytes()[:-20])
    with pytest.raises(BadSampleError, match="img00000004.png"):
        restore_dataset(make_denoiser(), src, tmp_path / "strict", on_bad_sample="raise", **FAST)
    report = restore_dataset(make_denoiser(), src, tmp_path / "dst", **FAST)
    assert report.bad_samples_skipped == 1 and "img00000004.png" in report.bad_samples[0]
    out = open_dataset(tmp_path / "dst")
    assert "00000/img00000004.png" not in out.keys and len(out) == 7
    manifest = verify_version(tmp_path / "dst")
    assert manifest["restoration"]["bad_samples"]["skipped"] == 1
    # A version holding a truncated image is refused by verify_version even when its checksum matches.
    victim = tmp_path / "dst" / "00000" / "img00000000.png"
    victim.write_bytes(victim.read_bytes()[:-20])
    from ambient_fast.data._io import sha256_file

    manifest["files"]["00000/img00000000.png"] = {"sha256": sha256_file(victim), "bytes": victim.stat().st_size}
    (tmp_path / "dst" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="img00000000.png"):
        verify_version(tmp_path / "dst")


def test_undecodable_corrupt_sample_is_skipped_and_named(tmp_path: Path) -> None:
    src = make_jpeg_shards(tmp_path / "src", n=9, shards=1)
    data = (src / "00000.tar").read_bytes()
    start = data.index(b"\xff\xd8", data.index(b"k0002.jpg"))
    broken = bytearray(data)
    broken[start + 2 : start + 40] = b"\x00" * 38  # k0002's JPEG header destroyed, tar sizes unchanged
    (src / "00000.tar").write_bytes(bytes(broken))
    report = restore_dataset(make_denoiser(), src, tmp_path / "dst", batch_size=4, **FAST)
    assert report.bad_samples_skipped == 1 and report.bad_samples[0].startswith("shard-000000 k0002:")
    assert report.num_restored == 5 and "k0002" not in open_dataset(tmp_path / "dst").keys


def test_size_mismatch_is_refused_naming_the_key_or_resized(tmp_path: Path) -> None:
    src = make_png_dataset(tmp_path / "src", n=8)
    Image.fromarray(np.full((12, 10), 7, dtype=np.uint8)).save(src / "00000" / "img00000006.png")
    with pytest.raises(SizeMismatch, match=r"'00000/img00000006.png'.*12x10.*8x8.*--resize"):
        restore_dataset(make_denoiser(), src, tmp_path / "refused", **FAST)
    restore_dataset(make_denoiser(), src, tmp_path / "dst", resize=True, **FAST)
    out = open_dataset(tmp_path / "dst")
    assert all(out.decode(i).shape == (8, 8, 1) for i in range(len(out)) if out.sigma_min[i] > 0)
    wide = restore_dataset(make_denoiser(), src, tmp_path / "r16", resize=True, resolution=(16, 16), **FAST)
    assert wide.num_restored == 6 and open_dataset(tmp_path / "r16").decode(1).shape == (16, 16, 1)


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_dali_and_pil_readers_write_the_same_version(tmp_path: Path) -> None:
    src = make_png_dataset(tmp_path / "src", n=12)
    opts = {**FAST, "batch_size": 4}
    dali = restore_dataset(make_denoiser(), src, tmp_path / "dali", **{**opts, "reader": "dali"})
    pil = restore_dataset(make_denoiser(), src, tmp_path / "pil", **{**opts, "reader": "pil"})
    assert (dali.reader, pil.reader) == ("dali", "pil")
    skip = ("manifest.json",)  # the manifest records which reader decoded
    assert tree_bytes(tmp_path / "dali", skip=skip) == tree_bytes(tmp_path / "pil", skip=skip)


def test_kill_between_manifest_and_rename_is_finished_by_the_rerun(tmp_path: Path) -> None:
    """A kill after the writer's manifest but before the final rename (or its ``.chunks``
    cleanup) leaves a complete version in ``.DST.partial``: the rerun only renames it."""
    src = make_png_dataset(tmp_path / "src", n=8)
    restore_dataset(make_denoiser(), src, tmp_path / "clean", **FAST)
    dst = tmp_path / "dst"
    staging = staging_folder(dst)
    os.rename(tmp_path / "clean", staging)
    (staging / ".chunks").mkdir()
    (staging / ".chunks" / "chunk-000000.json").write_text("{}")
    want = tree_bytes(staging, skip=(".chunks/chunk-000000.json",))
    report = restore_dataset(make_denoiser(), src, dst, **FAST)
    assert report.already_complete and not staging.exists() and tree_bytes(dst) == want
