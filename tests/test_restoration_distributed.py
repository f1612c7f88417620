"""Scale-out: ``torchrun --nproc-per-node 2 ambient-fast restore`` on CPU (gloo) writes the
same dataset version, byte for byte, as a single-process run of the same command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ambient_fast.cli import main
from ambient_fast.restoration import save_denoiser
from tests.test_restoration_dataset import make_denoiser, make_png_dataset, tree_bytes

pytestmark = pytest.mark.usefixtures("single_thread")


def test_two_gloo_ranks_equal_one_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_png_dataset(tmp_path / "src", n=30)
    model = save_denoiser(tmp_path / "model.safetensors", make_denoiser(), name="unet-tiny")
    args = [
        "restore",
        "--model",
        str(model),
        "--src",
        str(src),
        "--num-steps",
        "5",
        "--batch-size",
        "2",
        "--shard-size",
        "4",
        "--workers",
        "2",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main([*args, "--dst", str(tmp_path / "one")]) == 0
    assert json.loads(capsys.readouterr().out)["world_size"] == 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "ambient_fast.cli",
            *args,
            "--dst",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout)
    assert report["world_size"] == 2 and report["restored_per_rank"] == [12, 10]  # 6 shards, 3 per rank
    assert not (tmp_path / ".two.partial").exists()
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")
