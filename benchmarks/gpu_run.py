"""Stage runner behind ``benchmarks/run_gpu.sh``: check and time everything in one device command.

    python3 benchmarks/gpu_run.py {check,bench,all} OUTDIR [--dry-run] [--budget S] [--only a,b] [--skip a,b]

Stages run in order, each as its own process with its own time limit (its budget, cut to what
is left of the total); once the total budget is spent the remaining stages are skipped, not
started. A stage whose tool, module or device is missing is skipped with the reason. Output is
unbuffered and every stage writes its rows as they are measured, so a stage (or the whole
command) killed at its limit still leaves what it measured.

Files: each stage writes ``WORK/<stage>.log`` (its output), and its ``.json`` / ``.md`` rows;
OUTDIR gets four files, refreshed after every stage and every 15 s while one runs (the device
tool returns at most 8 files from its output folder):

- ``summary.json`` / ``summary.md``: every stage's status, seconds, reason, the environment;
- ``results.md``: the stages' measured tables, in stage order;
- ``stages.tar.gz``: WORK (all logs and JSON).

``--dry-run`` runs the same logic on CPU with tiny sizes (CI: ``tests/test_gpu_script.py``):
stages that need CUDA or a missing tool or module are skipped as they would be on a machine
without them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
DEFAULT_BUDGET = 510.0  # seconds: under the device's 9-minute target with room to write results
DRY_BUDGET = 240.0
MIN_START = 10.0  # a stage is not started with less than this left of the total
MAX_PACKED = 4 << 20  # bytes: larger stage files stay out of stages.tar.gz
REFRESH = 15.0  # seconds between refreshes of OUTDIR while a stage runs
# Where ``run_gpu.sh dali-part`` installs DALI, and where the carried wheels in .whl/ go.
DALI_SITE = Path(os.environ.get("AMBIENT_DALI_STORE", "/var/tmp/ambient_fast_dali")) / "site"
SITE = Path("/tmp/ambient_fast_site")
INSTALL = """set -e
if compgen -G ".whl/*.whl" >/dev/null; then
    {python} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target {site} .whl/*.whl
    echo "installed: $(ls .whl)"
fi
AMBIENT_FAST_BUILD_JOBS=$(nproc) {python} setup.py -q build_ext --inplace
{python} -c "import ambient_fast._C, ambient_fast; print('ambient_fast', ambient_fast.__version__, 'with _C')"
"""


@dataclass
class Context:
    outdir: Path
    work: Path
    dry_run: bool
    python: str = sys.executable

    def script(self, name: str, *args: str) -> list[str]:
        """A ``benchmarks/`` script with WORK as its output folder, ``--dry-run`` when dry."""
        return [self.python, str(BENCH / name), str(self.work), *args, *(["--dry-run"] if self.dry_run else [])]


@dataclass
class Stage:
    """One step: ``command(ctx)`` run with at most ``seconds`` (``dry_seconds`` in a dry run)."""

    name: str
    group: str
    seconds: float
    command: Callable[[Context], list[str]]
    needs: tuple[str, ...] = ()  # "cuda", "module:NAME", "tool:NAME"; checked in this order
    dry_needs: tuple[str, ...] | None = None  # in a dry run (None: the same as needs)
    dry_seconds: float = 90.0
    gpu_only: bool = False  # skipped in a dry run (it would only repeat CPU CI)
    env: dict[str, str] = field(default_factory=dict)  # added to the stage's environment
    notes: str = ""
    result: dict = field(default_factory=dict)


STEP_OPS = "euler,heun,churn,ancestral"


def bench_kernels(ctx: Context, name: str, ops: str) -> list[str]:
    """``benchmarks/bench_kernels.py`` for some ops, fp32 and bf16 (``--json`` when the script has it).

    Most of its time is ``torch.compile`` of the references (one graph per op, size, dtype and
    pass), so the loss and the steps are separate stages: a budget cut loses the later one only.
    """
    script = BENCH / "bench_kernels.py"
    args = [ctx.python, str(script), "--out", str(ctx.work / f"{name}.md"), "--ops", ops]
    if "--json" in script.read_text():
        args += ["--json", str(ctx.work / f"{name}.json")]
    dtypes = ["--dtypes", "fp32"] if ctx.dry_run else ["--dtypes", "fp32,bf16"]
    return args + dtypes + (["--smoke", "--warmup", "1", "--reps", "2"] if ctx.dry_run else [])


def pytest_stage(ctx: Context, name: str, *targets: str, marker: str | None) -> list[str]:
    args = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={ctx.work / (name + '.xml')}"]
    # One test module that cannot import (a wheel left behind) must not hide every other result.
    args.append("--continue-on-collection-errors")
    return args + (["-m", marker] if marker else []) + list(targets)


def sanitizer(ctx: Context) -> list[str]:
    launch = ctx.script("gpu_sanitize.py")
    if ctx.dry_run:
        return launch
    return ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "9", "--print-limit", "20", *launch]


def dali(ctx: Context) -> list[str]:
    data = ctx.work.parent / ".gpu_run_dali_images"  # outside WORK: not packed into stages.tar.gz
    args = [
        ctx.python,
        str(BENCH / "bench_data.py"),
        "--gpu",
        "--data",
        str(data),
        "--json",
        str(ctx.work / "dali.json"),
    ]
    return args + ["--n", "2048", "--size", "64", "--crop", "56", "--batch", "256", "--threads", "8", "--repeats", "3"]


STAGES = [
    Stage(
        "install",
        "setup",
        120,
        lambda c: ["bash", "-c", INSTALL.format(python=c.python, site=SITE)],
        gpu_only=True,
        notes="wheels from .whl/ into a site folder; the C++ extension built in place",
    ),
    Stage("env", "setup", 30, lambda c: c.script("gpu_common.py"), dry_seconds=60),
    Stage(
        "gpu_tests",
        "check",
        180,
        lambda c: (
            pytest_stage(c, "gpu_tests", "tests", marker="gpu")
            if not c.dry_run
            else pytest_stage(c, "gpu_tests", "tests/test_restoration_gpu.py", marker="gpu")
        ),
        notes="every @pytest.mark.gpu test, kernels un-interpreted; includes the fused-loss training step "
        "compiled by Inductor with fullgraph=True (test_compile_training_step_fullgraph[cuda]) and graph "
        "replay == eager on small denoisers",
    ),
    Stage(
        "sanitizer",
        "check",
        75,
        sanitizer,
        needs=("cuda", "tool:compute-sanitizer"),
        dry_needs=(),
        # Without the caching allocator every tensor is its own allocation, so memcheck sees an
        # access past a tensor's end (inside a cached block it would land in a neighbour).
        env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
        notes="compute-sanitizer memcheck over one launch of each kernel (gpu_sanitize.py)",
    ),
    Stage(
        "graph_check",
        "check",
        75,
        lambda c: c.script("gpu_check.py"),
        notes="CUDA-graph restoration == eager bit for bit at CIFAR-10 size (gpu_check.py)",
    ),
    Stage(
        "kernels_loss",
        "bench",
        150,
        lambda c: bench_kernels(c, "kernels_loss", "loss"),
        notes="copy bandwidth; fused loss fwd and fwd+bwd vs eager vs torch.compile (bench_kernels.py)",
    ),
    Stage(
        "restore",
        "bench",
        150,
        lambda c: c.script("gpu_restore.py"),
        notes="CIFAR-10 UNet, K=18: anchors' restorer vs eager / compiled / compiled+graphs; sampler overhead",
    ),
    Stage(
        "train",
        "bench",
        120,
        lambda c: c.script("gpu_train.py"),
        notes="CIFAR-10 training step: EDM-style eager fp32 vs compile + bf16 + fused loss",
    ),
    Stage(
        "kernels_steps",
        "bench",
        120,
        lambda c: bench_kernels(c, "kernels_steps", STEP_OPS),
        notes="solver steps vs eager vs torch.compile (bench_kernels.py)",
    ),
    Stage(
        "kernel_tests",
        "check",
        90,
        lambda c: pytest_stage(c, "kernel_tests", "tests/test_kernels_triton.py", marker=None),
        needs=("cuda",),
        gpu_only=True,
        notes="the whole kernel test file on CUDA (CI runs it interpreted)",
    ),
    Stage("dali", "bench", 60, dali, needs=("module:nvidia.dali", "cuda"), notes="DALI mixed (GPU) decode images/s"),
    Stage(
        "latent",
        "bench",
        60,
        lambda c: [
            c.python,
            str(BENCH / "bench_latent.py"),
            "--out",
            str(c.work / "latent.md"),
            *(["--smoke"] if c.dry_run else []),
        ],
        needs=("module:diffusers", "cuda"),
        notes="latent restoration (bench_latent.py)",
    ),
    Stage(
        "compat",
        "bench",
        120,
        lambda c: [c.python, str(BENCH / "bench_compat.py"), "--gpu", "--write", str(c.work / "compat.md")],
        needs=("cuda",),
        notes="compat layer vs anchor-style EDM training step and sampler (bench_compat.py --gpu)",
    ),
]
GROUPS = {"check": ("setup", "check"), "bench": ("setup", "bench"), "all": ("setup", "check", "bench")}


def missing(need: str, env: dict[str, str], cuda: bool | None) -> str | None:
    """Why ``need`` is not met here, or None."""
    kind, _, name = need.partition(":")
    if kind == "cuda":
        return None if cuda else "needs a CUDA device"
    if kind == "tool":
        return None if shutil.which(name, path=env.get("PATH")) else f"{name} not found"
    if kind == "module":
        probe = subprocess.run(
            [sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True, timeout=120
        )
        return None if probe.returncode == 0 else f"{name} not importable ({probe.stderr.strip().splitlines()[-1:]})"
    raise ValueError(f"unknown requirement {need!r}")


def cuda_available(env: dict[str, str]) -> bool:
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=300).returncode == 0


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ctx = Context(args.outdir, args.work, args.dry_run)
        self.start = time.monotonic()
        self.stages = [s for s in STAGES if s.group in GROUPS[args.mode]]
        if args.only:
            self.stages = [s for s in self.stages if s.name in args.only or s.group == "setup"]
        self.stages = [s for s in self.stages if s.name not in args.skip]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        paths = [str(ROOT), str(SITE), str(DALI_SITE), self.env.get("PYTHONPATH", "")]
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        if args.dry_run:
            self.env["TRITON_INTERPRET"] = "1"  # kernels on CPU tensors in Triton's interpreter
        self.cuda: bool | None = None
        self.lock = threading.Lock()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def run(self) -> int:
        self.refresh()
        for stage in self.stages:
            self.run_stage(stage)
            self.refresh()
        failed = [s.name for s in self.stages if s.result.get("status") in ("failed", "timeout")]
        # Last in the output: the device tool returns only the output's tail.
        print("\n" + (self.args.outdir / "summary.md").read_text(), flush=True)
        print(
            f"=== done in {self.elapsed():.0f} s; failed: {failed or 'none'}; results in {self.args.outdir}", flush=True
        )
        return 1 if failed else 0

    def run_stage(self, stage: Stage) -> None:
        left = self.args.budget - self.elapsed()
        result = stage.result
        result.update(name=stage.name, group=stage.group, notes=stage.notes)
        if left < MIN_START:
            result.update(
                status="skipped", reason=f"total budget spent ({self.elapsed():.0f} of {self.args.budget:.0f} s)"
            )
        elif self.args.dry_run and stage.gpu_only:
            result.update(status="skipped", reason="GPU only (dry run)")
        else:
            needs = stage.dry_needs if self.args.dry_run and stage.dry_needs is not None else stage.needs
            for need in needs:
                if need == "cuda" and self.cuda is None:
                    self.cuda = cuda_available(self.env)
                reason = missing(need, self.env, self.cuda)
                if reason:
                    result.update(status="skipped", reason=reason)
                    break
        if result.get("status") == "skipped":
            print(f"=== {stage.name}: skipped ({result['reason']})", flush=True)
            return
        limit = min(stage.dry_seconds if self.args.dry_run else stage.seconds, left)
        command = stage.command(self.ctx)
        result.update(status="running", limit_s=round(limit), command=" ".join(command))
        print(
            f"=== {stage.name} (limit {limit:.0f} s, {self.elapsed():.0f} s elapsed): {' '.join(command)}", flush=True
        )
        self.refresh()
        began = time.monotonic()
        status, rc = self.execute(command, self.ctx.work / f"{stage.name}.log", limit, stage.env)
        result.update(status=status, rc=rc, seconds=round(time.monotonic() - began, 1))
        if status != "passed":  # the log's last words, for triage from the summary alone
            lines = [ln for ln in (self.ctx.work / f"{stage.name}.log").read_text(errors="replace").splitlines() if ln]
            result["reason"] = f"rc {rc}: {lines[-1][:200] if lines else '(no output)'}"
        junit = self.ctx.work / f"{stage.name}.xml"
        if junit.exists():
            result["tests"] = junit_counts(junit)
        print(f"=== {stage.name}: {status} (rc {rc}) in {result['seconds']} s", flush=True)

    def execute(self, command: list[str], log_path: Path, limit: float, env: dict[str, str]) -> tuple[str, int | None]:
        """Run with output to the terminal and ``log_path``; kill the process group at ``limit``."""
        with open(log_path, "w") as log:
            try:
                proc = subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env={**self.env, **env},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    text=True,
                    bufsize=1,
                )
            except OSError as err:
                log.write(f"could not start: {err}\n")
                return "failed", None

            def pump() -> None:
                for line in proc.stdout:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                    log.write(line)
                    log.flush()

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            deadline = time.monotonic() + limit
            status = None
            while status is None:
                try:
                    proc.wait(timeout=min(REFRESH, max(0.1, deadline - time.monotonic())))
                    status = "passed" if proc.returncode == 0 else "failed"
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        status = "timeout"
                    else:
                        self.refresh()
            reader.join(timeout=5)
            if status == "timeout":
                log.write(f"\n!!! killed at its {limit:.0f} s limit\n")
            return status, proc.returncode

    def refresh(self) -> None:
        """Rewrite OUTDIR's four files from the stage results and WORK (atomically each)."""
        with self.lock:
            out, work = self.args.outdir, self.ctx.work
            summary = {
                "mode": self.args.mode,
                "dry_run": self.args.dry_run,
                "budget_s": self.args.budget,
                "elapsed_s": round(self.elapsed(), 1),
                "environment": read_json(work / "env.json"),
                "stages": [s.result or {"name": s.name, "group": s.group, "status": "pending"} for s in self.stages],
            }
            write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
            write(out / "summary.md", summary_markdown(summary))
            tables = [work / f"{s.name}.md" for s in self.stages]
            parts = [path.read_text() for path in tables if path.exists()]
            write(out / "results.md", "\n".join(parts) if parts else "(no results yet)\n")
            tmp = out / "stages.tar.gz.tmp"
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(work, arcname="stages", filter=small_files)
            os.replace(tmp, out / "stages.tar.gz")


def small_files(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Keep stages.tar.gz far under the device tool's 16 MiB per returned file."""
    return info if info.size <= MAX_PACKED else None


def junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return {}
    suites = [root] if root.tag == "testsuite" else list(root)
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def summary_markdown(summary: dict) -> str:
    env = (summary.get("environment") or {}).get("meta", {})
    lines = [
        f"## GPU run ({summary['mode']}{', dry run' if summary['dry_run'] else ''})",
        "",
        f"{env.get('device', '?')}; torch {env.get('torch', '?')}, triton {env.get('triton', '?')}; "
        f"{env.get('date', '?')}; {summary['elapsed_s']:.0f} s of a {summary['budget_s']:.0f} s budget",
        "",
        "| stage | group | status | seconds | tests (pass/fail/skip) | reason / what |",
        "|---|---|---|---:|---|---|",
    ]
    for s in summary["stages"]:
        t = s.get("tests")
        tests = (
            f"{t['tests'] - t['failures'] - t['errors'] - t['skipped']}/{t['failures'] + t['errors']}/{t['skipped']}"
            if t
            else ""
        )
        lines.append(
            f"| {s['name']} | {s['group']} | {s['status']} | {s.get('seconds', '')} | {tests} "
            f"| {s.get('reason') or s.get('notes', '')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=tuple(GROUPS))
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (what CI runs)")
    parser.add_argument(
        "--budget", type=float, default=None, help=f"total seconds (default {DEFAULT_BUDGET:.0f}; dry {DRY_BUDGET:.0f})"
    )
    parser.add_argument("--work", type=Path, default=None, help="stage files (default: a folder beside OUTDIR)")
    parser.add_argument("--only", default="", help="comma list of stages to run (reruns); install and env always run")
    parser.add_argument("--skip", default="", help="comma list of stages to leave out")
    args = parser.parse_args(argv)
    names = {s.name for s in STAGES}
    args.only, args.skip = ({v for v in getattr(args, k).split(",") if v} for k in ("only", "skip"))
    unknown = (args.only | args.skip) - names
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {[s.name for s in STAGES]}")
    args.budget = args.budget if args.budget is not None else (DRY_BUDGET if args.dry_run else DEFAULT_BUDGET)
    args.outdir.mkdir(parents=True, exist_ok=True)
    # Stage files stay out of OUTDIR (the device tool returns at most 8 files from there).
    args.work = args.work or args.outdir.resolve().parent / f".{args.outdir.resolve().name}-stages"
    shutil.rmtree(args.work, ignore_errors=True)  # this run's files only
    args.work.mkdir(parents=True)
    if importlib.util.find_spec("torch") is None:
        print("gpu_run: torch is not importable here", file=sys.stderr)
        return 2
    return Runner(args).run()


if __name__ == "__main__":
    sys.exit(main())
