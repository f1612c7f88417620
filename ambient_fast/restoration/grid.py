"""Per-sample level tables of the restoration engine: the two grids (SPEC 5, ANCHORS 3.2-3.3).

Every batch carries a ``(B, K+1)`` float64 table of levels, one row per sample, all rows of
one width ``K + 1`` (the captured loop has ``K`` steps). Two ways to fill a row:

- ``"per_sample"`` (anchors' pixel restoration, ANCHORS 3.2; our default): a rho grid of
  ``num_steps`` points from the sample's own ``sigma_min`` down to ``sigma_floor``, then 0
  (:func:`ambient_fast.samplers.restoration_grid`); ``K = num_steps``.
- ``"global"`` (anchors' text-to-image restoration, ANCHORS 3.3): the global EDM grid
  ``t`` (``num_steps`` points from ``sigma_max`` 80 down to ``sigma_floor``, then 0),
  truncated at the sample's level: the last point with ``t_k >= sigma_min`` becomes
  ``sigma_min`` and the points before it are dropped (``sigma_min = 2.0`` on the 30-point
  grid: 15 steps left). Rows keep a common width by starting with zero-length steps at
  ``sigma_min`` (row = the last ``K + 1`` entries of ``min(sigma_min, t_k)``); a zero-length
  step leaves the state unchanged, so every row computes exactly the anchors' trajectory.
  ``K`` is the step count at the dataset's largest level (:func:`global_grid_steps`): a
  dataset of one level (the anchors' T2I sources) wastes no evaluation.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..core.schedules import karras_sigmas
from ..samplers.restore import RESTORE_SIGMA_FLOOR, restoration_grid

__all__ = ["GRIDS", "Grid", "GLOBAL_SIGMA_MAX", "global_grid", "global_grid_steps", "grid_table"]

Grid = Literal["per_sample", "global"]
GRIDS: tuple[str, ...] = ("per_sample", "global")
GLOBAL_SIGMA_MAX = 80.0  # top of the anchors' global grid (EDM sigma_max)


def global_grid(
    sigma_min: torch.Tensor,
    num_steps: int = 30,
    *,
    sigma_max: float = GLOBAL_SIGMA_MAX,
    sigma_floor: float = RESTORE_SIGMA_FLOOR,
    rho: float = 7.0,
) -> torch.Tensor:
    """``min(sigma_min_i, t_k)`` over the whole global grid: float64 ``(B, num_steps + 1)``.

    The first entry is ``sigma_min_i`` (a level above ``sigma_max`` starts there and steps
    to ``t_1``). Non-zero steps of row i are exactly the anchors' truncated grid (ANCHORS 3.3).
    """
    levels = sigma_min.to(torch.float64).reshape(-1, 1)
    table = torch.minimum(levels, karras_sigmas(num_steps, sigma_floor, sigma_max, rho).to(levels.device))
    table[:, 0] = levels[:, 0]
    return table


def global_grid_steps(
    sigma_min: float,
    num_steps: int = 30,
    *,
    sigma_max: float = GLOBAL_SIGMA_MAX,
    sigma_floor: float = RESTORE_SIGMA_FLOOR,
    rho: float = 7.0,
) -> int:
    """Steps the global grid keeps at level ``sigma_min`` > 0 (2.0 on the 30-point grid: 15)."""
    if not sigma_min > 0:
        raise ValueError(f"sigma_min must be > 0, got {sigma_min}")
    row = global_grid(torch.tensor([sigma_min]), num_steps, sigma_max=sigma_max, sigma_floor=sigma_floor, rho=rho)[0]
    return int((row[:-1] > row[1:]).sum())


def grid_table(
    sigma_min: torch.Tensor,
    sigma_out: float,
    num_steps: int,
    table_steps: int,
    *,
    grid: Grid = "per_sample",
    rho: float = 7.0,
    sigma_floor: float = RESTORE_SIGMA_FLOOR,
    sigma_max: float = GLOBAL_SIGMA_MAX,
) -> torch.Tensor:
    """Levels float64 ``(n, table_steps + 1)`` of ``n`` samples at ``sigma_min (n,)`` > 0.

    Args:
        sigma_out: common stop level; ``"global"`` integrates to 0 only (``sigma_out == 0``).
        num_steps: ``"per_sample"``: points per row (``table_steps`` must equal it);
            ``"global"``: points of the global grid (anchors: 30).
        table_steps: ``K``, the captured loop's step count; ``"global"``: at least
            :func:`global_grid_steps` of the largest level.
        grid, rho, sigma_floor, sigma_max: see the module docstring.
    """
    sm = sigma_min.to(torch.float64)
    if grid == "per_sample":
        if table_steps != num_steps:
            raise ValueError(f"per_sample grid: table_steps ({table_steps}) must equal num_steps ({num_steps})")
        return restoration_grid(sm, torch.full_like(sm, sigma_out), num_steps, rho=rho, sigma_floor=sigma_floor)
    if grid != "global":
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    if sigma_out != 0:
        raise ValueError(f"the global grid integrates to 0 (ANCHORS 3.3); sigma_out must be 0, got {sigma_out}")
    if not 1 <= table_steps <= num_steps:
        raise ValueError(f"global grid: table_steps must be in [1, {num_steps}], got {table_steps}")
    full = global_grid(sm, num_steps, sigma_max=sigma_max, sigma_floor=sigma_floor, rho=rho)
    kept = full[:, num_steps - table_steps :]
    short = torch.nonzero(kept[:, 0] != sm).flatten()
    if short.numel():
        row = int(short[0])
        need = global_grid_steps(float(sm[row]), num_steps, sigma_max=sigma_max, sigma_floor=sigma_floor, rho=rho)
        raise ValueError(
            f"global grid: level {float(sm[row])} needs {need} steps, the loop has {table_steps} "
            "(size table_steps with global_grid_steps of the largest level)"
        )
    return kept
