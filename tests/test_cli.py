"""Command failures: one line naming the option or path, exit 2 (usage) or 1 (runtime),
and nothing left behind (or a state the rerun continues)."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest

from ambient_fast.cli import main
from ambient_fast.data import Sample, corrupt_dataset, open_dataset, write_dataset
from ambient_fast.data.writer import DatasetWriter


@pytest.fixture
def digits(tmp_path) -> Path:
    """12 grayscale 8x8 PNGs, half corrupt (sigma_min 0.5)."""
    rng = np.random.default_rng(0)
    samples = [
        Sample(index=i, key=f"{i:02d}.png", array=rng.integers(0, 256, (8, 8), dtype=np.uint8),
               sigma_min=0.5 * (i % 2), sigma_max=0.0)
        for i in range(12)
    ]
    return write_dataset(tmp_path / "data", "folder", samples)


_PROGRESS_BAR = re.compile(r"^[\w ]+: +\d+%\|")  # a tqdm line ("write:   0%|     | 0/12 ...")


def _fail(capsys, argv: list[str], code: int) -> str:
    """Run the CLI, expect exit ``code`` and exactly one stderr line besides usage and
    progress bars; return it."""
    with pytest.raises(SystemExit) as exc:
        status = main(argv)
        raise SystemExit(status)
    assert exc.value.code == code, argv
    lines = [line for line in capsys.readouterr().err.splitlines() if line and not line.startswith(" ")]
    lines = [line for line in lines if not line.startswith("usage:") and not _PROGRESS_BAR.match(line)]
    assert len(lines) == 1, lines
    return lines[0]


def _tree(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


@pytest.mark.parametrize("dry_run", [False, True])
def test_train_unknown_network_lists_the_known_ones(capsys, tmp_path, digits, dry_run):
    argv = ["train", "--data", str(digits), "--out", str(tmp_path / "runs"), "--network", "nosuchnet"]
    line = _fail(capsys, argv + ["--dry-run"] * dry_run, 2)
    assert "argument --network: unknown network 'nosuchnet'" in line and "mlp-small" in line and "unet-tiny" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("dry_run", [False, True])
def test_train_bad_network_kwargs_are_named(capsys, tmp_path, digits, dry_run):
    argv = ["train", "--data", str(digits), "--out", str(tmp_path / "runs"), "--network", "mlp-small"]
    line = _fail(capsys, argv + ["--network-kwargs", '{"nosuch": 3}'] + ["--dry-run"] * dry_run, 2)
    assert "argument --network-kwargs" in line and "'nosuch'" in line and "hidden" in line
    line = _fail(capsys, argv + ["--network-kwargs", '{"hidden": -1}'] + ["--dry-run"] * dry_run, 2)
    assert "argument --network-kwargs" in line and "hidden" in line
    assert not (tmp_path / "runs").exists()


def test_failed_train_leaves_no_run_folder(capsys, tmp_path, digits):
    # Every sample is corrupt once the clean ones are left out: mode=clean has nothing to train on.
    only_corrupt = write_dataset(
        tmp_path / "corrupt-only", "folder",
        [Sample(index=i, key=f"{i}.png", array=np.zeros((8, 8), np.uint8), sigma_min=1.0, sigma_max=0.0)
         for i in range(3)],
    )
    line = _fail(capsys, ["train", "--data", str(only_corrupt), "--out", str(tmp_path / "runs"), "--mode", "clean",
                          "--no-progress"], 1)
    assert line.startswith("ambient-fast train: error: ") and "sigma_min = 0" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_train_data_errors_name_the_option(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _fail(capsys, ["train", "--data", str(empty), "--dry-run"], 2)
    assert "argument --data" in line and str(empty) in line


def test_run_files_are_0644(tmp_path, digits, capsys):
    old = os.umask(0o022)
    try:
        assert main(["train", "--data", str(digits), "--out", str(tmp_path / "runs"), "--network", "mlp-small",
                     "--total-images", "16", "--batch-size", "8", "--no-progress", "--device", "cpu"]) == 0
    finally:
        os.umask(old)
    (run,) = (tmp_path / "runs").iterdir()
    for name in ("config.json", "log.jsonl", "denoiser.safetensors", "training-state.safetensors"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name


def _disk_full(monkeypatch, after: int = 0) -> None:
    """The writer's ``after+1``-th chunk fails as on a full disk (no file name, as from ``write()``)."""
    original = DatasetWriter.write_chunk
    calls = {"n": 0}

    def write_chunk(self, samples):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, samples)

    monkeypatch.setattr(DatasetWriter, "write_chunk", write_chunk)


def test_corrupt_disk_full_is_one_line_and_leaves_nothing(capsys, monkeypatch, tmp_path, digits):
    _disk_full(monkeypatch)
    dst = tmp_path / "out"
    argv = ["corrupt", "--src", str(digits), "--dst", str(dst), "--corruption", "blur", "--sigma-blur", "0.6"]
    line = _fail(capsys, argv, 1)
    assert line == f"ambient-fast corrupt: error: cannot write {dst}: No space left on device"
    assert not dst.exists()


def test_corrupt_rerun_continues_an_interrupted_version(capsys, monkeypatch, tmp_path, digits):
    params = dict(fraction=0.5, sigma_blur=0.6, chunk_size=4)
    reference = corrupt_dataset(digits, tmp_path / "reference", "blur", **params)
    _disk_full(monkeypatch, after=1)  # one chunk committed, then the disk is full
    with pytest.raises(OSError):
        corrupt_dataset(digits, tmp_path / "out", "blur", **params)
    assert (tmp_path / "out" / ".chunks").is_dir()
    monkeypatch.undo()
    argv = ["corrupt", "--src", str(digits), "--dst", str(tmp_path / "out"), "--corruption", "blur",
            "--sigma-blur", "0.6", "--fraction", "0.5"]
    capsys.readouterr()
    assert main(argv) == 0
    done, ref = open_dataset(tmp_path / "out"), open_dataset(reference)
    assert done.keys == ref.keys and np.array_equal(done.sigma_min, ref.sigma_min)
    assert all(done.read_bytes(i) == ref.read_bytes(i) for i in range(len(ref)))
    # The bar counts samples and starts at the 4 the interrupted run committed.
    counts = re.findall(r"corrupt: +\d+%\|[^|]*\| (\d+)/(\d+)", capsys.readouterr().err)
    assert counts[0] == ("4", "12") and counts[-1] == ("12", "12"), counts


def _truncate(dataset: Path, name: str) -> Path:
    path = dataset / name
    path.write_bytes(path.read_bytes()[:20])
    return path


def test_corrupt_bad_sample_is_one_line_and_leaves_nothing(capsys, tmp_path, digits):
    bad = _truncate(digits, "00.png")
    dst = tmp_path / "out"
    line = _fail(capsys, ["corrupt", "--src", str(digits), "--dst", str(dst), "--corruption", "blur",
                          "--sigma-blur", "0.6"], 1)
    assert line.startswith("ambient-fast corrupt: error: ") and str(bad) in line
    assert not dst.exists()


def test_annotate_bad_sample_is_one_line_and_leaves_nothing(capsys, tmp_path, digits):
    bad = _truncate(digits, "03.png")
    dst = tmp_path / "out"
    line = _fail(capsys, ["annotate", "--src", str(digits), "--dst", str(dst), "--fixed", "1.0"], 1)
    assert line.startswith("ambient-fast annotate: error: ") and str(bad) in line
    assert not dst.exists()


def test_annotate_classifier_shows_each_phase_to_its_end(capsys, tmp_path, digits):
    """Classifier steps, then the 6 corrupt samples evaluated, then the 12 written; or nothing."""
    argv = ["annotate", "--src", str(digits), "--classifier", "--steps", "3", "--batch-size", "4",
            "--num-sigmas", "4", "--trials", "1", "--device", "cpu", "--cache", "on"]
    assert main([*argv, "--dst", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    for label, total in (("classifier", 3), ("annotate", 6), ("write", 12)):
        counts = re.findall(rf"(?:^|\r){label}: +\d+%\|[^|]*\| (\d+)/(\d+)", err, flags=re.M)
        assert counts and counts[-1] == (str(total), str(total)), (label, err)
    assert main([*argv, "--dst", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "%|" not in capsys.readouterr().err


def test_annotate_read_only_destination(capsys, monkeypatch, tmp_path, digits):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "out" / ".chunks"))

    monkeypatch.setattr(Path, "mkdir", refuse)
    line = _fail(capsys, ["annotate", "--src", str(digits), "--dst", str(tmp_path / "out"), "--fixed", "1.0"], 1)
    assert line == f"ambient-fast annotate: error: cannot access {tmp_path / 'out' / '.chunks'}: Permission denied"


def test_model_folder_gets_a_clear_message(capsys, tmp_path, digits):
    run = tmp_path / "run"
    run.mkdir()
    (run / "denoiser.safetensors").write_bytes(b"")
    line = _fail(capsys, ["fid", "--model", str(run), "--ref", str(digits)], 2)
    assert "argument --model" in line and "is a folder" in line and "denoiser.safetensors" in line


def test_help_examples_keep_their_line_continuations(capsys):
    for command in ("corrupt", "restore", "loop"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        continued = [line for line in text.splitlines() if line.rstrip().endswith("\\")]
        assert continued, command
        for line in continued:  # the next line is indented: the example goes on
            following = text.splitlines()[text.splitlines().index(line) + 1]
            assert following.startswith("      "), (command, line, following)


def test_usage_errors_exit_2(capsys, tmp_path):
    assert _fail(capsys, ["train", "--lr", "-1"], 2).endswith("argument --lr: must be > 0 and finite, got -1")
    assert "--num-sigmas" in _fail(capsys, ["annotate", "--num-sigmas", "1"], 2)
    assert "--seed" in _fail(capsys, ["corrupt", "--seed", "-3"], 2)
