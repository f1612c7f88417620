"""The loop orchestrator and the demo, end to end: a killed `loop` resumes and finishes with
the numbers of an uninterrupted run; the same-compute control restores nothing; the stop rule
tolerates a one-loop dip; the reference is the clean versions of the corrupted samples;
`demo --quick` runs; the CLI validates and dry-runs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ambient_fast.cli import main
from ambient_fast.data import demo_dataset, load_dataset_tensors, write_dataset
from ambient_fast.data.dataset import Sample
from ambient_fast.loops.dataloop import madness_start, run_dataloop, stop_rule
from ambient_fast.loops.demo import DEMO_MINUTES
from ambient_fast.loops.evaluate import clean_reference

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
    assert "fd_digits against clean versions of the 1,743 corrupted samples" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["reference"].startswith("clean versions of the 1,743 corrupted samples")
    assert [r["loop"] for r in metrics["loops"]] == [1, 2]
    for r in metrics["loops"]:  # every restored version is scored against the clean versions
        assert r["data_value"] > 0 and 0 < r["data_mse"] < 0.16  # below the corrupt input's 0.4^2
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
    assert set(table["baselines"]) == {"ambient loss (= loop 1)", "clean only (54 images)"}
    loop, control = (
        table["loops"]["dataloop (fine-tune, sigma_min/8)"],
        table["loops"]["control (fine-tune on the original data)"],
    )
    assert [r["loop"] for r in loop] == [r["loop"] for r in control] == [1, 2]
    assert loop[0]["fd"] == control[0]["fd"]  # loop 1 of both chains is the same ambient model
    assert all("data_fd" in r and "data_mse" in r for r in loop) and not any("data_fd" in r for r in control)
    assert "| ambient loss (= loop 1) |" in out and "restored data FD / MSE" in out
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


def test_control_trains_on_the_original_data_and_restores_nothing(digits, tmp_path):
    _, data, clean = digits
    torch.set_num_threads(1)
    result = run_dataloop(
        data,
        tmp_path / "control",
        loops=2,
        init="previous",
        train_on="original",
        reference=clean,
        eval_samples=64,
        train_kwargs=dict(network="mlp-small", total_images=512, batch_size=128),
        device="cpu",
        report=False,
        progress=False,
    )
    assert [r["stages"] for r in result.loops] == [["train", "evaluate"]] * 2
    assert [r["trained_on"] for r in result.loops] == [str(data)] * 2
    assert not any((tmp_path / "control" / f"loop-{k}" / "data").exists() for k in (1, 2))
    assert result.reference.startswith("clean versions of the 1,743 corrupted samples")


def test_stop_rule_tolerates_a_one_loop_dip_and_records_the_madness_regime():
    dip = [67.7, 72.2, 51.3]  # from scratch, measured: loop 2 worse, loop 3 the gain
    assert stop_rule(dip[:2], 1) and not stop_rule(dip[:2], 2) and not stop_rule(dip, 2)
    assert madness_start(dip, 2) is None
    worse = [67.7, 42.6, 45.0, 44.0]  # best at loop 2, then two loops without beating it
    assert stop_rule(worse, 2) and madness_start(worse, 2) == 3
    assert not stop_rule(worse, None) and madness_start(worse, None) is None
    assert not stop_rule([1.0, None, 3.0], 1)  # loops without a metric never stop the run


def test_loop_default_patience_is_two_and_rho_is_renamed(digits, capsys):
    _, data, clean = digits
    assert main(["loop", "--data", str(data), "--ref", str(clean), "--rho-ambient", "4", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    config = json.loads(plan[plan.index("{") : plan.rindex("}") + 1])
    assert config["patience"] == 2 and config["restore_kwargs"]["rho_ambient"] == 4.0
    assert config["train_on"] == "restored"
    with pytest.raises(SystemExit) as exit_info:
        main(["loop", "--data", str(data), "--rho", "8", "--dry-run"])
    assert exit_info.value.code == 2
    assert "argument --rho: renamed --rho-ambient" in capsys.readouterr().err


def test_loop_dry_run_checks_data_network_reader_reference_and_start_model(digits, tmp_path, capsys):
    """Each wrong input is refused by ``--dry-run`` in one line naming its option."""
    _, data, clean = digits
    empty = tmp_path / "empty"
    empty.mkdir()
    other = write_dataset(tmp_path / "big", "tensors", [Sample(index=0, key="a", array=torch.zeros(2, 4, 4).numpy())])
    not_a_model = tmp_path / "model.safetensors"
    not_a_model.write_bytes(b"not safetensors")
    base = ["loop", "--data", str(data), "--dry-run"]
    cases = [
        (["--network", "unet-nope"], "argument --network: unknown network 'unet-nope'"),
        (["--data", str(other), "--cache", "off", "--stream", "dali"], "argument --stream: "),  # tensors: no DALI
        (["--network-kwargs", '{"hidden": 64, "nope": 1}'], "argument --network-kwargs: unknown key(s) 'nope'"),
        (["--data", str(other), "--use-labels"], "argument --use-labels: "),  # no class labels
        (["--ref", str(other)], "argument --ref: samples are (2, 4, 4), the data's are (1, 8, 8)"),
        (["--ref", str(empty)], "argument --ref: "),  # a folder that is no dataset
        (["--start-model", str(not_a_model)], "argument --start-model: "),
        (["--start-model", str(tmp_path / "missing.safetensors")], "argument --start-model: checkpoint not found"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err, (extra, err)
    assert main([*base, "--ref", str(clean)]) == 0 and "nothing was written" in capsys.readouterr().out


def test_reference_is_the_clean_versions_where_the_reference_has_them(digits, tmp_path):
    _, data, clean = digits
    original, full = load_dataset_tensors(data), load_dataset_tensors(clean)
    ref = clean_reference(data, clean)
    corrupt = original.sigma_min > 0
    assert int(corrupt.sum()) == 1743 and torch.equal(ref.corrupt, corrupt)
    assert torch.equal(ref.images, full.images[original.ids[corrupt]]) and ref.clean_versions is ref.images
    # A reference without the corrupted samples' keys: scored against all of it.
    other = write_dataset(
        tmp_path / "other",
        "folder",
        [Sample(index=i, key=f"x/{i}.png", array=torch.zeros(8, 8, 1, dtype=torch.uint8).numpy()) for i in range(5)],
    )
    ref = clean_reference(data, other)
    assert ref.clean_versions is None and len(ref.images) == 5 and ref.description.startswith("all 5 samples")


def test_one_demo_time_in_help_readme_and_docs():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for doc in ("README.md", "docs/demo_results.md"):
        with open(os.path.join(root, doc)) as f:
            assert DEMO_MINUTES in f.read(), doc
    from ambient_fast.commands import demo as demo_command

    assert DEMO_MINUTES in demo_command.__doc__ and DEMO_MINUTES in demo_command.HELP
