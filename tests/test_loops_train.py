"""Training loop: exact resume, DDP == one process, modes, checkpoints, CLI validation."""

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ambient_fast.cli import main
from ambient_fast.data import Sample, write_dataset
from ambient_fast.loops.train import load_training_state, train
from ambient_fast.nn import load_denoiser

SMALL = dict(
    network="mlp-small", batch_size=32, log_every=1, lr_rampup_images=64, ema_halflife_images=500, progress=False
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # robust timing on shared CPUs; results do not depend on it
    yield
    torch.set_num_threads(threads)


def _data(n: int = 96, clean: int = 8):
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1
    sigma_min = torch.full((n,), 0.8, dtype=torch.float64)
    sigma_min[:clean] = 0
    return images, sigma_min, torch.zeros(n, dtype=torch.float64), torch.arange(n), None


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_denoiser(path).state_dict()


def test_resume_gives_identical_weights(tmp_path):
    data = _data()
    full = train(data, tmp_path / "full", total_images=32 * 10, checkpoint_images=32 * 4, **SMALL)
    # "Killed" after the checkpoint at step 4, then resumed to the same length.
    train(data, tmp_path / "cut", total_images=32 * 4, checkpoint_images=32 * 4, **SMALL)
    resumed = train(data, tmp_path / "cut", total_images=32 * 10, checkpoint_images=32 * 4, **SMALL)
    assert resumed.steps == full.steps == 10
    a, b = _weights(full.denoiser_path), _weights(resumed.denoiser_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (
        load_training_state(tmp_path / "full" / "training-state.safetensors"),
        load_training_state(tmp_path / "cut" / "training-state.safetensors"),
    )
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert sa["sampler"] == sb["sampler"] and sa["step"] == sb["step"] == 10
    assert [r["loss"] for r in full.log] == [r["loss"] for r in resumed.log]


def test_resume_refuses_changed_options(tmp_path):
    data = _data()
    train(data, tmp_path / "r", total_images=64, **SMALL)
    with pytest.raises(ValueError, match="lr"):
        train(data, tmp_path / "r", total_images=128, **{**SMALL, "lr": 5e-4})


def test_checkpoint_holds_the_whole_state(tmp_path):
    train(_data(), tmp_path / "r", total_images=96, **SMALL)
    state = load_training_state(tmp_path / "r" / "training-state.safetensors")
    assert {"model", "ema", "optimizer", "step", "images", "rng", "sampler", "config", "scaler"} <= set(state)
    assert state["config"]["mode"] == "ambient" and state["images"] == 96
    assert state["optimizer"]["state"]  # Adam moments are there


@pytest.mark.parametrize("mode", ["clean", "plain", "contraction", "ambient"])
def test_modes_train(tmp_path, mode):
    result = train(_data(), tmp_path / mode, total_images=64, mode=mode, **SMALL)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.log)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precisions_train(tmp_path, precision):
    result = train(_data(), tmp_path / precision, total_images=64, precision=precision, **SMALL)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.log)
    assert all(v.dtype == torch.float32 for v in _weights(result.denoiser_path).values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        train(_data(), out, total_images=32 * 6, device="cpu", **SMALL)
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_ddp_matches_one_process(tmp_path):
    single = train(_data(), tmp_path / "one", total_images=32 * 6, device="cpu", **SMALL)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, start_method="spawn")
    from ambient_fast.runtime import read_jsonl

    two = read_jsonl(tmp_path / "two" / "log.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in single.log]
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in two]), torch.tensor([r["loss"] for r in single.log]), rtol=1e-4, atol=1e-5
    )
    a, b = _weights(single.denoiser_path), _weights(tmp_path / "two" / "denoiser.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_cli_validation_names_the_option(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tmp_path), "--lr", "-1"])
    assert "--lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tmp_path / "missing")])
    assert "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["loop", "--data", str(tmp_path), "--patience", "0"])
    assert "--patience" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tmp_path), "--network-kwargs", "[1]"])
    assert "--network-kwargs" in capsys.readouterr().err
    bad = {
        "--jobs": ["demo", "--jobs", "0"],
        "--seeds": ["demo", "--seeds", "1", "1"],
        "--quality": [
            "corrupt",
            "--src",
            str(tmp_path),
            "--dst",
            str(tmp_path / "x"),
            "--corruption",
            "blur",
            "--quality",
            "5",
        ],
        "--sigma-blur": ["corrupt", "--src", str(tmp_path), "--dst", str(tmp_path / "x"), "--corruption", "blur"],
        "--preset": ["annotate", "--src", str(tmp_path), "--dst", str(tmp_path / "x"), "--preset", "blur:0.7"],
        "--model": ["fid", "--model", str(tmp_path / "missing.safetensors"), "--ref", str(tmp_path)],
        "--shape": ["bench", "--shape", "1,x"],
        "--buffer": ["train", "--data", str(tmp_path), "--buffer", "0.1", "--s-max", "3"],
    }
    for flag, argv in bad.items():
        with pytest.raises(SystemExit):
            main(argv)
        assert flag in capsys.readouterr().err, flag


def test_dry_run_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    write_dataset(
        data,
        "folder",
        [Sample(index=i, key=f"{i}.png", array=rng.integers(0, 256, (8, 8), dtype=np.uint8), sigma_min=0.5 * (i % 2),
                sigma_max=0.0) for i in range(4)],
    )
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "runs"), "--dry-run"]) == 0
    assert main(["loop", "--data", str(data), "--ref", str(data), "--out", str(tmp_path / "runs"), "--dry-run"]) == 0
    assert main(["demo", "--out", str(tmp_path / "demo"), "--dry-run"]) == 0
    assert "nothing was written" in capsys.readouterr().out
    assert sorted(p for p in tmp_path.rglob("*")) == before
