"""CUDA-graph capture of the restoration loop (``@pytest.mark.gpu``; skipped without CUDA).

The captured loop replays the kernels the eager loop launches, on the same static buffers,
so graph and eager results agree to the last bit for the same inputs (cuDNN's algorithm
choice is fixed with ``benchmark=False``, the default); compiled variants agree to float32
round-off. The dataset-level test runs many batches through one captured graph, including a
padded last batch, and compares with eager.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ambient_fast.data import open_dataset
from ambient_fast.restoration import IMAGE_UINT8, RestorationSampler, SamplerConfig, float_codec, restore_dataset
from tests.test_restoration_dataset import make_denoiser, make_png_dataset
from tests.test_restoration_gmm import make_gmm

pytestmark = pytest.mark.gpu


def _restore(denoiser, raw: torch.Tensor, batch: int, **config) -> torch.Tensor:
    codec = IMAGE_UINT8 if raw.dtype == torch.uint8 else float_codec(raw.dtype)
    sampler = RestorationSampler(
        denoiser, tuple(raw.shape[1:]), batch, SamplerConfig(**config), codec=codec, device="cuda"
    )
    n = raw.shape[0]
    sigma_min = torch.linspace(0.3, 2.0, n, dtype=torch.float64)
    return sampler.restore(raw, torch.arange(n), sigma_min, seed=5)


@pytest.mark.parametrize("method", ["heun", "euler", "sde"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
def test_graph_replay_equals_eager(method: str, state_dtype: torch.dtype) -> None:
    denoiser = make_denoiser().cuda()
    raw = torch.randint(0, 256, (13, 1, 8, 8), dtype=torch.uint8)
    config = dict(num_steps=7, method=method, state_dtype=state_dtype)
    eager = _restore(denoiser, raw, 16, cuda_graph=False, **config)
    graph = _restore(denoiser, raw, 16, cuda_graph=True, **config)
    assert torch.equal(graph, eager)


def test_graph_matches_cpu_reference() -> None:
    """Same math on both devices: the GMM denoiser in float64 gives the same restoration on
    CUDA (graph) as on the CPU (eager) to float64 round-off."""
    gmm = make_gmm()
    y = gmm.sample(40, torch.Generator().manual_seed(0))
    config = dict(num_steps=9, method="sde", state_dtype=torch.float64, backend="torch")
    cpu = RestorationSampler(gmm, (2,), 64, SamplerConfig(**config), codec=float_codec(torch.float64))
    gpu = RestorationSampler(
        gmm.cuda(), (2,), 64, SamplerConfig(cuda_graph=True, **config), codec=float_codec(torch.float64), device="cuda"
    )
    ids, sigma_min = torch.arange(40), torch.linspace(0.3, 2.0, 40, dtype=torch.float64)
    torch.testing.assert_close(
        gpu.restore(y, ids, sigma_min, seed=1), cpu.restore(y, ids, sigma_min, seed=1), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("compile_mode", ["default", "reduce-overhead"])
def test_compiled_matches_eager(compile_mode: str) -> None:
    denoiser = make_denoiser().cuda()
    raw = torch.randn(16, 1, 8, 8)
    eager = _restore(denoiser, raw, 16, num_steps=5, cuda_graph=False)
    compiled = _restore(denoiser, raw, 16, num_steps=5, compile=compile_mode)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_dataset_graph_equals_eager_over_many_batches(tmp_path: Path) -> None:
    """Ten batches (the last padded) replayed through one captured graph."""
    src = make_png_dataset(tmp_path / "src", n=52)
    denoiser = make_denoiser().cuda()
    opts = dict(num_steps=6, batch_size=4, progress=False)
    restore_dataset(denoiser, src, tmp_path / "graph", cuda_graph=True, **opts)
    restore_dataset(denoiser, src, tmp_path / "eager", cuda_graph=False, **opts)
    graph, eager = open_dataset(tmp_path / "graph"), open_dataset(tmp_path / "eager")
    for i in range(len(graph)):
        np.testing.assert_array_equal(graph.decode(i), eager.decode(i))


def test_dali_gpu_decode_into_staging_equals_pil(tmp_path: Path) -> None:
    """``reader="dali"`` on CUDA decodes with ``fn.decoders.image(device="mixed")`` straight into
    the device staging buffer (``HostBatch.raw_device``); PNGs decode exactly, so the version
    equals the PIL reader's (manifest aside: it records the reader)."""
    from ambient_fast.data import dali_available

    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    from tests.test_restoration_dataset import tree_bytes

    src = make_png_dataset(tmp_path / "src", n=20)
    denoiser = make_denoiser().cuda()
    opts = dict(num_steps=4, batch_size=4, progress=False)
    dali = restore_dataset(denoiser, src, tmp_path / "dali", reader="dali", **opts)
    restore_dataset(denoiser, src, tmp_path / "pil", reader="pil", **opts)
    assert dali.reader == "dali"
    skip = ("manifest.json",)
    assert tree_bytes(tmp_path / "dali", skip=skip) == tree_bytes(tmp_path / "pil", skip=skip)
