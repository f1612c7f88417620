"""``benchmarks/run_gpu.sh``, the one-command GPU run, works end to end on CPU (``--dry-run``).

It cannot be run for real here; these tests prove its logic: results appear as JSON and
markdown in OUTDIR, a stage killed at its limit leaves its partial output and later stages
are skipped once the total budget is spent, missing modules (DALI, diffusers: absent on the
GPU image) and missing CUDA skip their stages cleanly, and DALI's wheel parts are stored,
checked, reassembled and installed across commands.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"
# The stage runner as a module, without putting benchmarks/ on everyone's sys.path.
_spec = importlib.util.spec_from_file_location("gpu_run", ROOT / "benchmarks" / "gpu_run.py")
gpu_run = sys.modules.setdefault("gpu_run", importlib.util.module_from_spec(_spec))  # dataclasses look it up
_spec.loader.exec_module(gpu_run)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env


def _stages(out: Path) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}


@pytest.mark.slow  # about a minute on 2 idle cores (tiny networks; one launch of each kernel)
def test_dry_run_writes_results_and_skips_what_is_missing(tmp_path: Path) -> None:
    """The GPU image has neither DALI nor diffusers: shadow both so that they fail to import."""
    shadow = tmp_path / "shadow"
    for module in ("nvidia/dali", "diffusers"):
        (shadow / module).mkdir(parents=True)
        (shadow / module / "__init__.py").write_text("raise ImportError('not on this image')\n")
    (shadow / "nvidia" / "__init__.py").write_text("")
    out = tmp_path / "out"
    env = _env(PYTHONPATH=f"{shadow}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    only = "sanitizer,graph_check,restore,train,dali,latent,kernel_tests"
    result = subprocess.run(
        ["bash", str(SCRIPT), "all", "--dry-run", str(out), "--only", only, "--budget", "300"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.md", "stages.tar.gz", "summary.json", "summary.md"]
    stages = _stages(out)
    order = ["install", "env", "sanitizer", "graph_check", "restore", "train", "kernel_tests", "dali", "latent"]
    assert list(stages) == order
    assert stages["install"] == {**stages["install"], "status": "skipped", "reason": "GPU only (dry run)"}
    assert stages["kernel_tests"]["status"] == "skipped"
    for name in ("env", "sanitizer", "graph_check", "restore", "train"):
        assert stages[name]["status"] == "passed", stages[name]
    assert stages["dali"]["status"] == "skipped" and "nvidia.dali not importable" in stages["dali"]["reason"]
    assert stages["latent"]["status"] == "skipped" and "diffusers not importable" in stages["latent"]["reason"]
    # Measured rows: JSON in the tarball, tables in results.md.
    with tarfile.open(out / "stages.tar.gz") as tar:
        names = set(tar.getnames())
        sanitizer = json.load(tar.extractfile("stages/sanitizer.json"))
    assert {"stages/env.json", "stages/train.json", "stages/restore.json", "stages/sanitizer.log"} <= names
    assert sanitizer["rows"] and all(row["ok"] for row in sanitizer["rows"])
    calls = {row["call"] for row in sanitizer["rows"]}
    assert calls == {"ambient_loss fwd", "ambient_loss bwd", "sample stochastic", "sample sde"}
    results = (out / "results.md").read_text()
    for title in ("Training step", "One launch per kernel", "Restoration", "CUDA-graph restoration vs eager"):
        assert title in results
    assert "| dali | bench | skipped |" in (out / "summary.md").read_text()


def test_stage_killed_at_its_limit_keeps_output_and_budget_skips_the_rest(tmp_path: Path, monkeypatch) -> None:
    slow = "import time; print('measured row 1', flush=True); time.sleep(60)"
    stages = [
        gpu_run.Stage("first", "check", 60, lambda c: [sys.executable, "-c", slow], dry_seconds=60),
        gpu_run.Stage("second", "check", 60, lambda c: [sys.executable, "-c", "print('never')"]),
    ]
    monkeypatch.setattr(gpu_run, "STAGES", stages)
    out = tmp_path / "out"
    rc = gpu_run.main(["check", str(out), "--dry-run", "--budget", "13"])  # MIN_START is 10 s
    assert rc == 1
    first, second = _stages(out)["first"], _stages(out)["second"]
    assert first["status"] == "timeout" and first["seconds"] < 30
    assert second == {**second, "status": "skipped"} and "total budget spent" in second["reason"]
    with tarfile.open(out / "stages.tar.gz") as tar:
        assert b"measured row 1" in tar.extractfile("stages/first.log").read()


def _fake_wheel() -> bytes:
    """A minimal valid wheel that installs ``nvidia/dali/__init__.py`` and nvImageCodec's ``nvidia/__init__.py``."""
    files = {
        "nvidia/__init__.py": "",
        "nvidia/dali/__init__.py": "__version__ = 'fake'\n",
        "fake_dali-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: fake-dali\nVersion: 1.0\n",
        "fake_dali-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "fake_dali-1.0.dist-info/RECORD,,\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as whl:
        for name, text in {**files, "fake_dali-1.0.dist-info/RECORD": record}.items():
            whl.writestr(name, text)
    return buf.getvalue()


@pytest.mark.parametrize("corrupt", [False, True])
def test_dali_parts_reassemble_across_commands(tmp_path: Path, corrupt: bool) -> None:
    """Two commands, one part each (as fetch_gpu_wheels.sh --dali lays them out)."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        wheel = _fake_wheel()
        info = tarfile.TarInfo("./fake_dali-1.0-py3-none-any.whl")
        info.size = len(wheel)
        tar.addfile(info, io.BytesIO(wheel))
    data = tar_bytes.getvalue()
    half = len(data) // 2
    carried = tmp_path / "carried"
    parts = {"dali.tar.0": data[:half], "dali.tar.1": data[half:]}
    sums = subprocess.run(["sha256sum", "-"], input=data[:half], capture_output=True).stdout.decode().split()[0]
    sums2 = subprocess.run(["sha256sum", "-"], input=data[half:], capture_output=True).stdout.decode().split()[0]
    manifest = f"{sums}  dali.tar.0\n{sums2}  dali.tar.1\n"
    store = tmp_path / "store"
    env = _env(AMBIENT_DALI_STORE=str(store), AMBIENT_DALI_PARTS=str(carried))
    for k, (name, blob) in enumerate(parts.items(), start=1):
        folder = carried / str(k)
        folder.mkdir(parents=True)
        (folder / name).write_bytes(blob[:-1] + b"x" if corrupt and k == 2 else blob)
        (folder / "SHA256SUMS").write_text(manifest)
        result = subprocess.run(
            ["bash", str(SCRIPT), "dali-part", "--dry-run", str(tmp_path / f"out{k}")],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        # The next command carries only the next part.
        for old in (carried / str(k)).iterdir():
            old.unlink()
        if k == 1:
            assert result.returncode == 0, result.stderr
            assert "have 1 of 2 parts" in result.stdout
            assert not (store / "installed").exists()
    if corrupt:
        assert result.returncode == 1 and "corrupt" in result.stderr
        assert not (store / "parts" / "dali.tar.1").exists()  # dropped, to be carried again
        return
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (store / "installed").exists()
    assert (store / "site" / "nvidia" / "dali" / "__init__.py").exists()
    assert not (store / "site" / "nvidia" / "__init__.py").exists()  # nvidia/ stays a namespace package
    assert _stages(tmp_path / "out2")["dali"]["status"] == "skipped"  # dry run: no CUDA
