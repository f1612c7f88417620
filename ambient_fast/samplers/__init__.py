"""EDM samplers with per-sample grids, and restoration by posterior sampling (SPEC 4, 5)."""

from .edm import METHODS, sample
from .restore import restoration_grid, restore

__all__ = ["METHODS", "restoration_grid", "restore", "sample"]
