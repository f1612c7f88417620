"""The grid option of the engine (``restoration.stages.GridSpec``): the anchors' truncated
global grid (ANCHORS 3.3) as fixed-width per-sample tables, checked against an independent
numpy transcription of the anchors' rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ambient_fast.restoration import GridSpec
from ambient_fast.samplers.restore import restoration_grid


def anchors_truncated_grid(sigma_tn: float, steps: int = 30, smax: float = 80.0, smin: float = 0.002) -> list[float]:
    """ANCHORS 3.3, written out: the global EDM grid + 0; take the last index with t >= sigma_tn,
    overwrite it with sigma_tn, drop everything before it."""
    i = np.arange(steps)
    t = (smax ** (1 / 7) + i / (steps - 1) * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
    t = np.append(t, 0.0)
    last = np.flatnonzero(t >= sigma_tn).max()
    out = t[last:].copy()
    out[0] = sigma_tn
    return out.tolist()


def test_global_grid_is_the_anchors_truncation_and_costs_their_steps() -> None:
    grid = GridSpec("global", 30)
    assert grid.steps(np.array([2.0])) == 15  # ANCHORS 3.3: sigma_tn = 2.0 leaves 15 steps
    table = grid.table(torch.tensor([2.0]), 15)
    np.testing.assert_allclose(table[0].numpy(), anchors_truncated_grid(2.0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("levels", [[0.05, 2.0, 7.5], [0.3, 0.3], [1.0, 79.0, 0.01]])
def test_mixed_levels_are_left_padded_with_zero_length_steps(levels: list[float]) -> None:
    grid = GridSpec("global", 30)
    steps = grid.steps(np.array(levels))
    table = grid.table(torch.tensor(levels, dtype=torch.float64), steps).numpy()
    assert table.shape == (len(levels), steps + 1)
    assert steps == max(len(anchors_truncated_grid(s)) - 1 for s in levels)
    for row, level in zip(table, levels, strict=True):
        want = anchors_truncated_grid(level)
        pad = steps + 1 - len(want)
        np.testing.assert_array_equal(row[:pad], level)  # zero-length steps at sigma_min: the state stays put
        np.testing.assert_allclose(row[pad:], want, rtol=1e-12, atol=0)


def test_per_sample_grid_is_the_restoration_grid() -> None:
    sm = torch.tensor([0.4, 1.2], dtype=torch.float64)
    grid = GridSpec("per_sample", 18)
    assert grid.steps(sm.numpy()) == 18
    torch.testing.assert_close(grid.table(sm, 18), restoration_grid(sm, torch.zeros(2), 18), rtol=0, atol=0)
    with pytest.raises(ValueError, match="sigma_out"):
        GridSpec("global", 30, sigma_out=0.1)
