"""Training input: streaming (DALI, torch) equals the in-memory cache; memory stays bounded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ambient_fast.data import Sample, dali_available, open_dataset, write_dataset
from ambient_fast.data.stream import CACHE_BUDGET_BYTES, cache_bytes, choose_backend
from ambient_fast.loops.train import train
from ambient_fast.nn import load_denoiser

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI not installed")
TINY = dict(network="mlp", network_kwargs={"hidden": 16, "num_blocks": 1, "emb_channels": 16})
SMALL = dict(
    network="mlp-small", batch_size=16, log_every=1, lr_rampup_images=64, ema_halflife_images=500, progress=False,
    device="cpu",
)


def _write_pngs(path: Path, n: int, side: int) -> Path:
    """``n`` smooth RGB PNGs (side x side), every 4th clean, the rest at sigma_min 0.8."""
    rng = np.random.default_rng(3)
    block = side // 8
    write_dataset(
        path,
        "folder",
        (
            Sample(
                index=i,
                key=f"{i:05d}.png",
                array=np.kron(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), np.ones((block, block, 1), np.uint8)),
                sigma_min=0.0 if i % 4 == 0 else 0.8,
                sigma_max=0.0,
            )
            for i in range(n)
        ),
    )
    return path


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> Path:
    return _write_pngs(tmp_path_factory.mktemp("train_input") / "data", 40, 8)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _losses(result) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in result.log], dtype=torch.float64)


@pytest.mark.parametrize("mode", ["ambient", "clean"])
def test_streams_train_like_the_cache(pngs, tmp_path, mode):
    """Same seed, same batches: DALI (CPU) and the torch loader give the cache's loss curve
    and weights; 40 samples in batches of 16 cross epoch boundaries, and the DALI run is
    killed after 6 steps and resumed."""
    steps = 11
    cached = train(pngs, tmp_path / "cache", cache="on", total_images=16 * steps, mode=mode, **SMALL)
    assert cached.input_backend == "cache" and cached.steps == steps
    runs = {"torch": train(pngs, tmp_path / "torch", cache="off", stream="torch", loader_workers=0,
                           total_images=16 * steps, mode=mode, **SMALL)}
    if dali_available():
        cut = dict(cache="off", stream="dali", mode=mode, checkpoint_images=16 * 6, **SMALL)
        train(pngs, tmp_path / "dali", total_images=16 * 6, **cut)
        runs["dali"] = train(pngs, tmp_path / "dali", total_images=16 * steps, **cut)
    a = load_denoiser(cached.denoiser_path).state_dict()
    for name, run in runs.items():
        assert run.input_backend == name
        assert [r["step"] for r in run.log] == list(range(1, steps + 1)), name
        torch.testing.assert_close(_losses(run), _losses(cached), rtol=1e-6, atol=1e-6, msg=name)
        b = load_denoiser(run.denoiser_path).state_dict()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")


def test_cache_auto_follows_the_budget(pngs):
    dataset = open_dataset(pngs)
    size = cache_bytes(dataset)
    assert size == 40 * 3 * 8 * 8  # uint8 pixels
    assert choose_backend(dataset, "auto", size) == "cache"
    assert choose_backend(dataset, "auto", size - 1) == ("dali" if dali_available() else "torch")
    assert choose_backend(dataset, "off", CACHE_BUDGET_BYTES, "torch") == "torch"
    assert choose_backend(dataset, "on", 0) == "cache"
    with pytest.raises(ValueError, match="cache"):
        choose_backend(dataset, "sometimes")


_RSS_CHILD = r"""
import json, sys, torch
from ambient_fast.loops.train import train
torch.set_num_threads(1)
data, out, cache, budget = sys.argv[1:5]
result = train(data, out, cache=cache, cache_budget_bytes=int(budget), stream="torch", loader_workers=0,
               total_images=2048, batch_size=32, network="mlp",
               network_kwargs={"hidden": 16, "num_blocks": 1, "emb_channels": 16}, log_every=1000,
               checkpoint_images=10**9, progress=False, device="cpu")
peak = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(json.dumps({"peak_rss": peak, "backend": result.input_backend}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_streaming_memory_does_not_grow_with_the_dataset(tmp_path):
    """Peak RSS of a training process (64 steps of 32 images, one fresh process each): a set
    4x the cache budget streams (cache="auto") with the peak of a set 8x smaller, while
    caching the same two sets differs by their decoded sizes (the measurement can see a
    held dataset). The stream is the torch loader in the main process: DALI's own memory
    pools move its peak by tens of MB from run to run, which would hide the signal."""
    small, large = _write_pngs(tmp_path / "small", 256, 128), _write_pngs(tmp_path / "large", 2048, 128)
    decoded_small, decoded = cache_bytes(open_dataset(small)), cache_bytes(open_dataset(large))
    assert decoded == 2048 * 3 * 128 * 128  # 100 MB of uint8 pixels
    budget = decoded // 4
    difference = decoded - decoded_small

    def peak_rss(data: Path, cache: str) -> tuple[int, str]:
        out = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, str(data), str(tmp_path / f"run-{data.name}-{cache}"), cache,
             str(budget)],
            capture_output=True, text=True, check=True,
        ).stdout
        record = json.loads(out.strip().splitlines()[-1])
        return record["peak_rss"], record["backend"]

    streamed_large, backend = peak_rss(large, "auto")
    assert backend == "torch"
    streamed_small, _ = peak_rss(small, "off")
    cached_large, backend = peak_rss(large, "on")
    assert backend == "cache"
    cached_small, _ = peak_rss(small, "on")
    assert abs(streamed_large - streamed_small) < difference / 4, (streamed_large, streamed_small)
    assert cached_large - cached_small > 0.75 * difference, (cached_large, cached_small)
