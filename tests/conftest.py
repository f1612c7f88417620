"""Shared test setup.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is set
here, before the package is imported, unless a CUDA device is present (then the kernels run
for real). Every test is seeded; ``gpu``-marked tests skip cleanly without CUDA.
"""

import os
import random

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def single_thread():
    """One intra-op thread for tests that run many small ops: on a shared 2-core machine
    OpenMP's barriers make each small op up to ~1000x slower than single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
