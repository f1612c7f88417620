"""Resume after a real kill: a restoration subprocess is killed with SIGKILL at a random
point mid-run, restarted with the same arguments, and must produce byte-identical output to
an uninterrupted run (SPEC 5; ``restoration/resume.py``: the writer's chunk records are the journal)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ambient_fast.restoration import restore_dataset, staging_folder
from tests.test_restoration_dataset import FAST, make_denoiser, make_png_dataset, tree_bytes

OPTS = dict(batch_size=2, shard_size=4, model_fingerprint="tiny-0", **FAST)

CHILD = """
import sys, time
import torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_restoration_dataset import make_denoiser
from test_restoration_resume import OPTS
from ambient_fast.restoration import restore_dataset


class Slow(torch.nn.Module):
    # 20 ms per network evaluation, so the run lasts a few seconds and the kill lands mid-run.
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, sigma):
        time.sleep(0.02)
        return self.inner(x, sigma)


restore_dataset(Slow(make_denoiser()).eval(), {src!r}, {dst!r}, **OPTS)
"""


pytestmark = pytest.mark.usefixtures("single_thread")


def _journal_lines(dst: Path) -> int:
    """Committed shards: the version writer's chunk records (the journal)."""
    return len(list((staging_folder(dst) / ".chunks").glob("chunk-*.json")))


def test_killed_run_resumes_to_identical_output(tmp_path: Path) -> None:
    src = make_png_dataset(tmp_path / "src")
    restore_dataset(make_denoiser(), src, tmp_path / "clean", **OPTS)
    dst = tmp_path / "dst"
    script = textwrap.dedent(CHILD.format(tests=str(Path(__file__).parent), src=str(src), dst=str(dst)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _journal_lines(dst) < 1:  # at least one shard finished
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the child never finished a shard"
            time.sleep(0.02)
        time.sleep(random.Random(os.getpid()).uniform(0.0, 0.6))  # a random point after that
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert not dst.exists(), "the run finished before the kill; make the child slower"
    done = _journal_lines(dst)
    report = restore_dataset(make_denoiser(), src, dst, **OPTS)
    assert report.shards_resumed >= done >= 1
    assert tree_bytes(dst) == tree_bytes(tmp_path / "clean")
    assert not staging_folder(dst).exists()
