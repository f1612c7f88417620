"""Stored-noise bookkeeping (``ambient_fast.data.nature_noise``): one detection from the
manifest serves training, the dataloop and ``ambient-fast restore``, whose start noise
follows the manifest and refuses a contradicting ``--start-noise``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ambient_fast.cli import main
from ambient_fast.data import corrupt_dataset, open_dataset
from ambient_fast.data.nature_noise import detect_nature_noise, resolve_start_noise, stored_noise_reason
from ambient_fast.restoration import save_denoiser
from tests.test_restoration_dataset import make_denoiser, make_png_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def datasets(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(blur-annotated PNGs, the same corrupted by unclipped noise std 0.4, a denoiser)."""
    pngs = make_png_dataset(tmp_path / "png", n=8)
    noisy = corrupt_dataset(pngs, tmp_path / "noisy", "noise", fraction=0.5, std=0.4, selection="exact")
    model = save_denoiser(tmp_path / "model.safetensors", make_denoiser(), name="unet-tiny")
    return pngs, noisy, model


def test_detection_reads_the_manifest(datasets) -> None:
    pngs, noisy, _ = datasets
    assert detect_nature_noise(noisy) == "stored" and "unclipped noise" in stored_noise_reason(noisy)
    assert detect_nature_noise(pngs) == "fixed" and stored_noise_reason(pngs) is None
    assert detect_nature_noise([]) == "fixed"  # in-memory tensors carry no manifest
    stopped = {"restoration": {}, "params": {"sigma_out": 0.05}}
    assert "sigma_out = 0.05" in stored_noise_reason(stopped)
    assert stored_noise_reason({"restoration": {}, "params": {"sigma_out": 0.0}}) is None
    assert stored_noise_reason({"corruption": {"kind": "noise", "clipped": True}}) is None


def test_start_noise_follows_the_manifest(datasets) -> None:
    pngs, noisy, _ = datasets
    assert resolve_start_noise(noisy) == ("none", None)
    assert resolve_start_noise(pngs) == ("fresh", None)
    assert resolve_start_noise(pngs, "training") == ("training", None)
    with pytest.raises(ValueError, match="'fresh' contradicts the data: its manifest records an unclipped noise"):
        resolve_start_noise(noisy, "fresh")
    value, warning = resolve_start_noise(pngs, "none")
    assert value == "none" and "does not say it is stored noisy" in warning


def test_restore_cli_takes_the_start_noise_from_the_manifest(datasets, tmp_path, capsys) -> None:
    pngs, noisy, model = datasets
    assert (
        main(["restore", "--model", str(model), "--src", str(noisy), "--dst", str(tmp_path / "r1"), "--no-progress"])
        == 0
    )
    assert open_dataset(tmp_path / "r1").manifest["params"]["start_noise"] == "none"
    assert json.loads(capsys.readouterr().out)["num_restored"] == 4

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "restore",
                "--model",
                str(model),
                "--src",
                str(noisy),
                "--dst",
                str(tmp_path / "r2"),
                "--start-noise",
                "fresh",
            ]
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --start-noise: 'fresh' contradicts the data" in err
    assert len(err.strip().splitlines()[-1]) > 0 and not (tmp_path / "r2").exists()

    dst = tmp_path / "r3"
    assert (
        main(
            [
                "restore",
                "--model",
                str(model),
                "--src",
                str(pngs),
                "--dst",
                str(dst),
                "--start-noise",
                "none",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "ambient-fast restore: warning: start noise 'none'" in capsys.readouterr().err
    assert open_dataset(dst).manifest["params"]["start_noise"] == "none"
