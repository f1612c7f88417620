"""Per-sample reproducible Gaussian noise and the ambient noisy pair (SPEC 2 and 5).

``sample_normal(seeds, shape, stream)`` is a counter-based generator: element j of sample i
is a pure function of ``(seed_i, stream, j)``, computed with integer hashing and Box-Muller
in plain tensor ops. So a sample's noise does not depend on the batch it lands in, on the
rank that processes it, or on the device (CPU and CUDA give the same bits up to the final
float rounding), and it is captureable in a CUDA graph (no generator state on the host).

Streams keep the uses apart: the frozen per-sample training noise (``STREAM_NATURE``), the
restoration start noise (``STREAM_RESTORE``) and per-step sampler noise
(``STREAM_STEP + k``) never share bits for the same seed.
"""

from __future__ import annotations

import math

import torch

from .validation import active, check_finite, check_sigma_pair, check_tensor, first_bad_index

__all__ = [
    "sample_normal",
    "derive_seeds",
    "noisy_pair",
    "STREAM_NATURE",
    "STREAM_RESTORE",
    "STREAM_TRAIN_ETA",
    "STREAM_CLASSIFIER_EVAL",
    "STREAM_GENERATE",
    "STREAM_STEP",
]

# The registry of streams: every use of sample_normal in the package takes one of these.
STREAM_NATURE = 0  # frozen per-sample noise that makes y_tmin (same every epoch)
STREAM_RESTORE = 1  # fresh restoration start noise (SPEC 5 step 1)
STREAM_TRAIN_ETA = 8  # training's extra noise y_t - y_tmin, seeded per batch slot (rank-invariant)
STREAM_CLASSIFIER_EVAL = 9  # noise of the sigma_min classifier's evaluation passes
STREAM_GENERATE = 10  # start noise of evaluation samples
STREAM_STEP = 16  # per-step sampler noise: STREAM_STEP + step index

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """32-bit integer finaliser (lowbias32) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _uniform01(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in (0, 1) from a per-row key ``(B, 1)`` and counters ``(1, n)``."""
    h = _mix32((key + _mix32(counter)) & _MASK32)
    h = _mix32(h ^ key)
    return (h.to(torch.float64) + 0.5) * (1.0 / 2**32)


def sample_normal(
    seeds: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    *,
    stream: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal noise ``(B, *shape)`` where row i depends only on ``(seeds[i], stream)``.

    Args:
        seeds: int tensor ``(B,)`` (sample ids, or ids mixed with a run seed).
        shape: per-sample shape (e.g. ``(3, 32, 32)``).
        stream: which independent stream (see module constants).
        dtype, device: of the result (default device: that of ``seeds``).
    """
    if seeds.dim() != 1:
        raise ValueError(f"seeds must be 1-D (B,), got shape {tuple(seeds.shape)}")
    device = seeds.device if device is None else torch.device(device)
    numel = math.prod(shape)
    seeds64 = seeds.to(device=device, dtype=torch.int64)
    lo = seeds64 & _MASK32
    hi = (seeds64 >> 32) & _MASK32
    key = _mix32((_mix32(lo) ^ _mix32(hi + 0x9E3779B9) ^ _mix32(torch.full_like(lo, stream) + 0x632BE5AB)) & _MASK32)
    key = key.reshape(-1, 1)
    half = (numel + 1) // 2
    counter = torch.arange(half, device=device, dtype=torch.int64).reshape(1, -1) * 2
    u1 = _uniform01(key, counter)
    u2 = _uniform01(key, counter + 1)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    normal = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :numel]
    return normal.to(dtype).reshape(seeds.shape[0], *shape)


def derive_seeds(sample_ids: torch.Tensor, run_seed: int) -> torch.Tensor:
    """Per-sample seeds from ``(run_seed, sample id)``: int64 ``(B,)``, distinct per run seed."""
    ids = sample_ids.to(torch.int64)
    return (ids & _MASK32) | ((_mix32(torch.full_like(ids, run_seed) & _MASK32) ^ ((ids >> 32) & _MASK32)) << 32)


def noisy_pair(
    y0: torch.Tensor,
    sigma: torch.Tensor,
    sigma_min: torch.Tensor,
    schedule: str = "ve",
    *,
    sample_ids: torch.Tensor | None = None,
    noise_seed: int = 0,
    generator: torch.Generator | None = None,
    eta_seeds: torch.Tensor | None = None,
    stored: bool = False,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Form ``(y_t, y_tmin)`` from dataset samples (SPEC 2).

    VE: ``y_tmin = y0 + sm n``, ``y_t = y_tmin + sqrt(s^2 - sm^2) eta``.
    VP: ``y_tmin = sqrt(1 - sm^2) y0 + sm n``,
    ``y_t = k y_tmin + sqrt(s^2 - k^2 sm^2) eta`` with ``k = sqrt((1 - s^2)/(1 - sm^2))``,
    so ``y_t`` has exactly the VP marginal at ``s`` given ``y0``.

    Args:
        y0: ``(B, ...)`` dataset samples (clean or corrupt), finite, ``B >= 1``.
        sigma: ``(B,)`` training level ``s``; must satisfy ``s >= sm`` for each sample
            (pass ``sigma_min * eligible`` to train ineligible rows at the clean level;
            ``s < sm`` is a ValueError, as the pair would silently be ``y_t == y_tmin``).
        sigma_min: ``(B,)`` per-sample nature-noise level ``sm`` (0 = clean).
        schedule: ``"ve"`` or ``"vp"``.
        sample_ids: ``(B,)`` ints (exactly one per sample). When given, ``n`` is the fixed realisation of each sample
            (same id -> same noise, every epoch, any batch); otherwise ``n`` is fresh.
        noise_seed: run-level seed mixed into the fixed noise.
        generator: for the fresh noise (``eta``, and ``n`` without ids).
        eta_seeds: int ``(B,)``: draw ``eta`` from these seeds (stream ``STREAM_TRAIN_ETA``)
            instead of ``generator``, e.g. one seed per global batch slot, so a slot's noise
            does not depend on which rank holds it.
        stored: the dataset stores samples already noisy at ``sm`` (``y_tmin = y0``, no
            nature noise added), as the anchors' ``/npy`` datasets do.
        validate: check ``y0`` and the levels (host syncs); training loops that validated
            their data at load time pass False. Types and shapes are checked always.

    Returns:
        ``(y_t, y_tmin)``, each shaped and typed like ``y0``.
    """
    if schedule not in ("ve", "vp"):
        raise ValueError(f"schedule must be 've' or 'vp', got {schedule!r}")
    check_tensor("y0", y0)
    if y0.dim() < 1 or y0.shape[0] < 1:
        raise ValueError(f"y0: expected a batch (B, ...) with B >= 1, got {tuple(y0.shape)}")
    batch = y0.shape[0]
    for name, ids in (("sample_ids", sample_ids), ("eta_seeds", eta_seeds)):
        if ids is not None:
            check_tensor(name, ids, f"of shape ({batch},)")
            if ids.shape != (batch,):
                raise ValueError(f"{name}: expected one id per sample, shape ({batch},), got {tuple(ids.shape)}")
    if active(validate):
        check_sigma_pair(sigma, sigma_min, y0, schedule)
        bad = first_bad_index(sigma < sigma_min)
        if bad >= 0:
            raise ValueError(
                f"sigma: must be >= sigma_min (the pair adds noise from sigma_min up to sigma); sample {bad} has "
                f"sigma={float(sigma[bad]):.6g} < sigma_min={float(sigma_min[bad]):.6g}. Form the pair of a row that "
                "does not train at sigma_min = 0 (e.g. sigma_min * eligible(sigma, sigma_min))"
            )
        check_finite("y0", y0)
    view = (-1,) + (1,) * (y0.dim() - 1)
    s = sigma.to(torch.float32 if y0.dtype != torch.float64 else torch.float64).reshape(view)
    sm = sigma_min.to(s.dtype).reshape(view)
    y = y0.to(s.dtype)
    if stored:
        y_tmin = y
    else:
        if sample_ids is not None:
            seeds = derive_seeds(sample_ids.to(y0.device), noise_seed)
            nature = sample_normal(seeds, y0.shape[1:], stream=STREAM_NATURE, dtype=s.dtype)
        else:
            nature = torch.randn(y0.shape, device=y0.device, dtype=s.dtype, generator=generator)
        y_tmin = y + sm * nature if schedule == "ve" else torch.sqrt(1 - sm * sm) * y + sm * nature
    if eta_seeds is not None:
        eta = sample_normal(eta_seeds.to(y0.device), y0.shape[1:], stream=STREAM_TRAIN_ETA, dtype=s.dtype)
    else:
        eta = torch.randn(y0.shape, device=y0.device, dtype=s.dtype, generator=generator)
    if schedule == "ve":
        y_t = y_tmin + torch.sqrt(torch.clamp(s * s - sm * sm, min=0)) * eta
    else:
        k = torch.sqrt((1 - s * s) / (1 - sm * sm))
        y_t = k * y_tmin + torch.sqrt(torch.clamp(s * s - k * k * sm * sm, min=0)) * eta
    return y_t.to(y0.dtype), y_tmin.to(y0.dtype)
