"""Resume after a real kill: a restoration subprocess is killed with SIGKILL at a random
point mid-run, restarted with the same arguments, and must produce byte-identical output to
an uninterrupted run (SPEC 5; ``restoration/resume.py``: the writer's chunk records are the journal)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ambient_fast.restoration import restore_dataset, staging_folder
from tests.test_restoration_dataset import FAST, kill_after_first_shard, make_denoiser, make_png_dataset, tree_bytes

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


def test_killed_run_resumes_to_identical_output(tmp_path: Path) -> None:
    src = make_png_dataset(tmp_path / "src")
    restore_dataset(make_denoiser(), src, tmp_path / "clean", **OPTS)
    dst = tmp_path / "dst"
    script = textwrap.dedent(CHILD.format(tests=str(Path(__file__).parent), src=str(src), dst=str(dst)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    done = kill_after_first_shard(child, dst, timeout=120, max_delay=0.6)
    report = restore_dataset(make_denoiser(), src, dst, **OPTS)
    assert report.shards_resumed >= done >= 1
    assert tree_bytes(dst) == tree_bytes(tmp_path / "clean")
    assert not staging_folder(dst).exists()
