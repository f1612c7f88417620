"""EDM samplers with per-sample grids, and restoration by posterior sampling (SPEC 4, 5)."""

from .edm import METHODS, sample
from .methods import RESTORE_ALIASES, RESTORE_METHODS, SAMPLE_ALIASES, SAMPLE_METHODS, resolve_method
from .restore import restoration_grid, restore

__all__ = [
    "METHODS",
    "RESTORE_ALIASES",
    "RESTORE_METHODS",
    "SAMPLE_ALIASES",
    "SAMPLE_METHODS",
    "resolve_method",
    "restoration_grid",
    "restore",
    "sample",
]
