"""The loop orchestrator and the demo, end to end: a killed `loop` resumes and finishes with
the numbers of an uninterrupted run; `demo --quick` runs; the CLI validates and dry-runs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ambient_fast.cli import main
from ambient_fast.data import demo_dataset
from ambient_fast.loops.dataloop import run_dataloop

LOOP_ARGS = (
    "--loops 2 --network mlp-small --total-images 3072 --checkpoint-images 512 --batch-size 128 "
    "--eval-samples 200 --init previous --no-progress --device cpu"
).split()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    return root, demo_dataset(root, "noise", 0.03, 0), demo_dataset(root, None)


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ambient_fast.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_killed_loop_resumes_and_matches_an_uninterrupted_run(digits, tmp_path):
    _, data, clean = digits
    proc = _cli("loop", "--data", str(data), "--ref", str(clean), "--out", str(tmp_path / "runs"), *LOOP_ARGS)
    deadline = time.time() + 120
    while not list((tmp_path / "runs").glob("*/loop-1/train/training-state.safetensors")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the loop never wrote a checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not (run_dir / "metrics.json").exists()
    resumed = _cli("loop", "--resume", str(run_dir), "--no-progress")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["loop"] for r in metrics["loops"]] == [1, 2]
    assert metrics["best_loop"] in (1, 2) and (run_dir / "report.png").is_file()
    assert (run_dir / "loop-1" / "data" / "manifest.json").is_file()

    torch.set_num_threads(1)
    reference = run_dataloop(
        data,
        tmp_path / "uninterrupted",
        loops=2,
        init="previous",
        reference=clean,
        eval_samples=200,
        train_kwargs=dict(network="mlp-small", total_images=3072, checkpoint_images=512, batch_size=128),
        device="cpu",
        report=False,
        progress=False,
    )
    assert [r["value"] for r in reference.loops] == pytest.approx([r["value"] for r in metrics["loops"]], rel=1e-6)


def test_loop_refuses_to_overwrite_and_resume_checks_the_folder(digits, tmp_path):
    _, data, clean = digits
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "state.json").write_text("{}")
    with pytest.raises(FileExistsError, match="resume"):
        run_dataloop(data, tmp_path / "run", loops=1, reference=clean, progress=False)
    with pytest.raises(SystemExit):
        main(["loop", "--resume", str(tmp_path)])


def test_demo_quick_end_to_end(digits, tmp_path, capsys):
    root, _, _ = digits
    t0 = time.perf_counter()
    assert main(["demo", "--quick", "--out", str(tmp_path), "--data-root", str(root), "--corruptions", "noise"]) == 0
    out = capsys.readouterr().out
    (run_dir,) = tmp_path.iterdir()
    for name in ("demo.json", "table.md", "report.png", "config.json"):
        assert (run_dir / name).is_file(), name
    table = json.loads((run_dir / "demo.json").read_text())["table"]["noise"]
    assert {"ambient loss", "contraction only", "all data, plain loss", "clean only (54 images)"} <= set(table)
    assert any(row.startswith("loop") for row in table)
    assert "| ambient loss |" in out
    assert time.perf_counter() - t0 < 120


def test_classifier_reannotation_writes_a_new_version(digits, tmp_path):
    _, data, _ = digits
    from ambient_fast.data import load_dataset_tensors, open_dataset

    torch.set_num_threads(1)
    result = run_dataloop(
        data,
        tmp_path / "run",
        loops=1,
        reannotate="classifier",
        annotate_kwargs=dict(steps=30, num_sigmas=8, trials=1, batch_size=64),
        train_kwargs=dict(network="mlp-small", total_images=512, batch_size=128),
        device="cpu",
        report=False,
        progress=False,
    )
    (record,) = result.loops
    assert record["stages"] == ["train", "restore", "annotate"]
    restored, annotated = load_dataset_tensors(tmp_path / "run/loop-1/restored"), load_dataset_tensors(record["data"])
    assert torch.equal(restored.images, annotated.images)  # samples copied, only the annotation changes
    assert torch.equal(annotated.sigma_min == 0, restored.sigma_min == 0)
    assert open_dataset(record["data"]).manifest["creator"] == "ambient_fast.loops.annotate_classifier"
