"""Sampler method names: one name, one algorithm (SPEC 4, 5).

- ``"euler"``, ``"heun"``: EDM Algorithm 1 (deterministic).
- ``"churn"``: EDM Algorithm 2, stochastic Heun with churn (``S_churn``, ``S_tmin``, ...).
- ``"sde"``: exact-Gaussian ancestral steps of the reverse SDE (samples the posterior).

``"stochastic"`` once meant churn in :func:`~ambient_fast.sample` and the SDE in
:func:`~ambient_fast.restore` (and the restoration engine and CLI); it stays accepted there, with
that old meaning, as a deprecated alias that warns.
"""

from __future__ import annotations

import warnings

__all__ = ["RESTORE_ALIASES", "RESTORE_METHODS", "SAMPLE_ALIASES", "SAMPLE_METHODS", "resolve_method"]

SAMPLE_METHODS = ("euler", "heun", "churn", "sde")
SAMPLE_ALIASES = {"stochastic": "churn"}  # deprecated: sample(method="stochastic") was EDM churn
RESTORE_METHODS = ("heun", "euler", "sde")
RESTORE_ALIASES = {"stochastic": "sde"}  # deprecated: restore(method="stochastic") was the reverse SDE


def resolve_method(method: str, methods: tuple[str, ...], aliases: dict[str, str], where: str) -> str:
    """The canonical name of ``method`` for ``where`` (a deprecated alias warns once per call)."""
    if method in methods:
        return method
    if method in aliases:
        new = aliases[method]
        warnings.warn(
            f"{where}: method={method!r} is deprecated, use method={new!r} (the same algorithm)",
            DeprecationWarning,
            stacklevel=4,
        )
        return new
    raise ValueError(f"{where}: method must be one of {methods}, got {method!r}")
