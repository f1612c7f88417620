"""Noise-level-first batch sampling (SPEC 3): draw sigma, then a datapoint eligible at it.

For each batch slot, ``ln sigma ~ N(P_mean, P_std^2)`` (the EDM training distribution), then
a dataset index uniformly among the samples eligible at that sigma under SPEC 2's rule
(exactly :func:`ambient_fast.eligible`, decided in float64): ``sigma_min == 0``, or
``sigma > scale * sigma_min + shift`` (:func:`~ambient_fast.core.coefficients.eligibility_rule`),
or ``sigma < sigma_max`` (locality). If no sample is eligible at a drawn sigma, sigma is
redrawn, so the sigma marginal is the log-normal whenever the dataset has a clean sample
(conditioned on "something is eligible" otherwise). Sampling is with replacement. Levels are
float64; a pipeline that rounds sigma to float32 before the loss (whose mask is then decided
in float32) can disagree on a draw within one float32 ulp of its threshold.

How (O(n) memory, no per-sigma index lists; 10^8 samples take 16 bytes each, 40 with a
locality rule): the thresholds ``scale * sigma_min + shift`` (``-inf`` for clean samples) are
sorted once, so the samples eligible through the sigma_min rule are a prefix found by one
binary search; the locality rule is a suffix of the sorted ``sigma_max``. An index is drawn
uniformly from the union of the two sets by drawing from their disjoint concatenation and
rejecting a locality pick that the prefix already contains (acceptance >= 1/2).

The random stream is counter-based (SplitMix64 hashes of ``(seed, epoch, slot, counter)``,
spelled out in csrc/noise_first.cpp), so every slot is independent of thread count, batch
split and backend: the C++ kernel (``ambient_fast._C``, OpenMP) and the numpy implementation
here return the same bits. Global slot ``(batch * world_size + rank) * batch_size + j``: ranks
draw disjoint slots, and the union of the ranks' batches is the single-process batch of size
``world_size * batch_size`` (resuming with another world size but the same global batch
reproduces the same global stream).

The batch sampler yields ``(index, sigma)`` pairs together, so the dataset receives the
level it must be noised at with the index (no side channel keyed by file name).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..core.coefficients import eligibility_rule
from ..core.schedules import EDM_P_MEAN, EDM_P_STD

try:
    from .. import _C
except ImportError:  # not built (AMBIENT_FAST_NO_EXT=1 or no compiler): numpy serves
    _C = None

__all__ = ["NoiseFirstBatchSampler", "draw_noise_first", "BACKENDS"]

BACKENDS = ("auto", "cpp", "numpy")

# Sigma redraws per slot before giving up. With MIN_REACHABLE below, exhausting them has
# probability < (1 - 1e-3)^(2^20) ~ e^-1000.
MAX_ATTEMPTS = 1 << 20
# Smallest accepted probability that a sigma draw has any eligible sample; below it the
# configuration is rejected up front (the redraw loop would crawl).
MIN_REACHABLE = 1e-3

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_U64 = np.uint64


# ---- the stream (twin of csrc/noise_first.cpp; keep the operation order identical) ------


def _mix64_int(z: int) -> int:
    """SplitMix64 finaliser on a Python int (for the per-(seed, epoch) key)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream_key(seed: int, epoch: int) -> int:
    """64-bit key of the stream of ``(seed, epoch)``: ``mix64(mix64(seed) + (epoch + 1) G)``."""
    return _mix64_int(_mix64_int(seed) + (epoch + 1) * _GOLDEN)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _bits(slot_key: np.ndarray, counter: int) -> np.ndarray:
    return _mix64(slot_key + _U64(((counter + 1) * _GOLDEN) & _MASK64))


def _uniform_open(bits: np.ndarray) -> np.ndarray:
    """Uniform float64 in (0, 1) from the top 53 bits."""
    return ((bits >> _U64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _mulhi64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``floor(a * b / 2^64)`` for uint64 arrays, exactly (32-bit limbs)."""
    m32 = _U64(0xFFFFFFFF)
    a_lo, a_hi = a & m32, a >> _U64(32)
    b_lo, b_hi = b & m32, b >> _U64(32)
    lo_lo, hi_lo = a_lo * b_lo, a_hi * b_lo
    lo_hi, hi_hi = a_lo * b_hi, a_hi * b_hi
    carry = ((lo_lo >> _U64(32)) + (hi_lo & m32) + (lo_hi & m32)) >> _U64(32)
    return hi_hi + (hi_lo >> _U64(32)) + (lo_hi >> _U64(32)) + carry


def _log(x: np.ndarray) -> np.ndarray:
    """Natural log of positive normal float64 (fdlibm e_log.c), bitwise as in C++."""
    ln2_hi, ln2_lo = 6.93147180369123816490e-01, 1.90821492927058770002e-10
    lg1, lg2, lg3 = 6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01
    lg4, lg5, lg6 = 2.222219843214978396e-01, 1.818357216161805012e-01, 1.531383769920937332e-01
    lg7 = 1.479819860511658591e-01
    m, e = np.frexp(x)
    small = m < 0.70710678118654752440
    m = np.where(small, m * 2.0, m)
    k = (e - small).astype(np.float64)
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (lg2 + w * (lg4 + w * lg6))
    t2 = z * (lg1 + w * (lg3 + w * (lg5 + w * lg7)))
    r = t2 + t1
    hfsq = 0.5 * f * f
    return k * ln2_hi - ((hfsq - (s * (hfsq + r) + k * ln2_lo)) - f)


def _exp(x: np.ndarray) -> np.ndarray:
    """e^x for |x| < 700 (fdlibm e_exp.c), bitwise as in C++."""
    ln2_hi, ln2_lo, inv_ln2 = 6.93147180369123816490e-01, 1.90821492927058770002e-10, 1.44269504088896338700e00
    p1, p2, p3 = 1.66666666666666019037e-01, -2.77777777770155933842e-03, 6.61375632143793436117e-05
    p4, p5 = -1.65339022054652515390e-06, 4.13813679705723846039e-08
    k = np.rint(x * inv_ln2)
    hi = x - k * ln2_hi
    lo = k * ln2_lo
    r = hi - lo
    t = r * r
    c = r - t * (p1 + t * (p2 + t * (p3 + t * (p4 + t * p5))))
    y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi)
    return np.ldexp(y, k.astype(np.int32))


# Wichura (1988) AS241 PPND16 coefficients, highest degree first (as in C++).
_CENTRAL_NUM = (
    2.5090809287301226727e3, 3.3430575583588128105e4, 6.7265770927008700853e4, 4.5921953931549871457e4,
    1.3731693765509461125e4, 1.9715909503065514427e3, 1.3314166789178437745e2, 3.3871328727963666080e0,
)  # fmt: skip
_CENTRAL_DEN = (
    5.2264952788528545610e3, 2.8729085735721942674e4, 3.9307895800092710610e4, 2.1213794301586595867e4,
    5.3941960214247511077e3, 6.8718700749205790830e2, 4.2313330701600911252e1, 1.0,
)  # fmt: skip
_TAIL_NUM = (
    7.74545014278341407640e-4, 2.27238449892691845833e-2, 2.41780725177450611770e-1, 1.27045825245236838258e0,
    3.64784832476320460504e0, 5.76949722146069140550e0, 4.63033784615654529590e0, 1.42343711074968357734e0,
)  # fmt: skip
_TAIL_DEN = (
    1.05075007164441684324e-9, 5.47593808499534494600e-4, 1.51986665636164571966e-2, 1.48103976427480074590e-1,
    6.89767334985100004550e-1, 1.67638483018380384940e0, 2.05319162663775882187e0, 1.0,
)  # fmt: skip
_FAR_NUM = (
    2.01033439929228813265e-7, 2.71155556874348757815e-5, 1.24266094738807843860e-3, 2.65321895265761230930e-2,
    2.96560571828504891230e-1, 1.78482653991729133580e0, 5.46378491116411436990e0, 6.65790464350110377720e0,
)  # fmt: skip
_FAR_DEN = (
    2.04426310338993978564e-15, 1.42151175831644588870e-7, 1.84631831751005468180e-5, 7.86869131145613259100e-4,
    1.48753612908506148525e-2, 1.36929880922735805310e-1, 5.99832206555887937690e-1, 1.0,
)  # fmt: skip


def _horner(coefficients: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    """``((c0 x + c1) x + c2) x + ...``, the C++ evaluation order."""
    acc = coefficients[0] * x + coefficients[1]
    for c in coefficients[2:]:
        acc = acc * x + c
    return acc


def _ndtri(p: np.ndarray) -> np.ndarray:
    """Standard normal quantile (Wichura AS241 PPND16), bitwise as in C++."""
    q = p - 0.5
    out = np.empty_like(p)
    central = np.abs(q) <= 0.425
    qc = q[central]
    r = 0.180625 - qc * qc
    out[central] = qc * _horner(_CENTRAL_NUM, r) / _horner(_CENTRAL_DEN, r)
    tail = ~central
    qt, pt = q[tail], p[tail]
    r = np.sqrt(-_log(np.where(qt < 0, pt, 1.0 - pt)))
    near = r <= 5.0
    x = np.empty_like(r)
    x[near] = _horner(_TAIL_NUM, r[near] - 1.6) / _horner(_TAIL_DEN, r[near] - 1.6)
    x[~near] = _horner(_FAR_NUM, r[~near] - 5.0) / _horner(_FAR_DEN, r[~near] - 5.0)
    out[tail] = np.where(qt < 0, -x, x)
    return out


# ---- tables ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tables:
    """Sorted eligibility tables of one dataset (see the module docstring)."""

    threshold_sorted: np.ndarray  # (n,) float64 ascending: scale*sigma_min + shift, -inf if clean
    threshold_order: np.ndarray  # (n,) int64 dataset index of each sorted threshold
    threshold_by_index: np.ndarray | None  # (n,) float64 thresholds in dataset order (locality only)
    sigma_max_sorted: np.ndarray | None  # (n,) float64 ascending, None without locality
    sigma_max_order: np.ndarray | None  # (n,) int64

    @property
    def size(self) -> int:
        return int(self.threshold_sorted.shape[0])


def _as_levels(name: str, values: object) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(values, dtype=np.float64))
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise ValueError(f"{name}: expected a non-empty 1-D array (one level per sample), got shape {arr.shape}")
    bad = np.flatnonzero(np.isnan(arr) | (arr < 0))
    if bad.size:
        raise ValueError(f"{name}: must be >= 0 and not NaN; sample {bad[0]} has {arr[bad[0]]}")
    return arr


def _argsort(values: np.ndarray, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """Stable ascending sort: ``(sorted, order)`` (ties in index order; same on both backends)."""
    if backend == "cpp":
        return _C.sort_levels(values)
    order = np.argsort(values, kind="stable")
    return values[order], order


def _build_tables(
    sigma_min: np.ndarray, sigma_max: np.ndarray | None, scale: float, shift: float, backend: str
) -> _Tables:
    threshold = scale * sigma_min + shift
    threshold[sigma_min == 0] = -np.inf
    t_sorted, t_order = _argsort(threshold, backend)
    if sigma_max is None or not np.any(sigma_max > 0):
        return _Tables(t_sorted, t_order, None, None, None)
    m_sorted, m_order = _argsort(sigma_max, backend)
    return _Tables(t_sorted, t_order, threshold, m_sorted, m_order)


def _reachable(tables: _Tables, P_mean: float, P_std: float) -> float:
    """Probability that a log-normal sigma draw has at least one eligible sample."""

    def cdf(level: float) -> float:  # P(sigma <= level)
        if level <= 0:
            return 0.0
        if math.isinf(level):
            return 1.0
        return 0.5 * math.erfc(-(math.log(level) - P_mean) / (P_std * math.sqrt(2.0)))

    lowest_threshold = float(tables.threshold_sorted[0])
    highest_sigma_max = float(tables.sigma_max_sorted[-1]) if tables.sigma_max_sorted is not None else 0.0
    # Nothing is eligible exactly when highest_sigma_max <= sigma <= lowest_threshold.
    return 1.0 - max(0.0, cdf(lowest_threshold) - cdf(highest_sigma_max))


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpp" and _C is None:
        raise RuntimeError("backend='cpp' requested but the native extension ambient_fast._C is not built")
    if backend == "auto":
        return "cpp" if _C is not None else "numpy"
    return backend


# ---- draws -----------------------------------------------------------------------------


def _draw_numpy(
    tables: _Tables, key: int, first_slot: int, count: int, P_mean: float, P_std: float
) -> tuple[np.ndarray, np.ndarray]:
    """The stream of csrc/noise_first.cpp, vectorised over the slots still pending."""
    n = tables.size
    slots = _U64(first_slot) + np.arange(count, dtype=np.uint64)
    slot_keys = _mix64(_U64(key) ^ _mix64(slots + _U64(_GOLDEN)))
    indices = np.empty(count, dtype=np.int64)
    sigmas = np.empty(count, dtype=np.float64)
    pending = np.arange(count)
    for attempt in range(MAX_ATTEMPTS):
        if pending.size == 0:
            break
        keys = slot_keys[pending]
        sigma = _exp(P_mean + P_std * _ndtri(_uniform_open(_bits(keys, attempt << 32))))
        in_a = np.searchsorted(tables.threshold_sorted, sigma, side="left")
        in_l = (
            n - np.searchsorted(tables.sigma_max_sorted, sigma, side="right")
            if tables.sigma_max_sorted is not None
            else np.zeros_like(in_a)
        )
        total = in_a + in_l
        hit = total > 0
        slot, keys, sigma = pending[hit], keys[hit], sigma[hit]
        in_a, in_l, total = in_a[hit], in_l[hit], total[hit]
        trial = 1
        while slot.size:
            k = _mulhi64(_bits(keys, (attempt << 32) | trial), total.astype(np.uint64)).astype(np.int64)
            from_a = k < in_a
            index = np.empty_like(k)
            index[from_a] = tables.threshold_order[k[from_a]]
            accept = from_a.copy()
            from_l = ~from_a
            if from_l.any():  # locality picks: rejected when also in the prefix (counted there)
                index[from_l] = tables.sigma_max_order[n - in_l[from_l] + (k[from_l] - in_a[from_l])]
                accept[from_l] = ~(tables.threshold_by_index[index[from_l]] < sigma[from_l])
            indices[slot[accept]] = index[accept]
            sigmas[slot[accept]] = sigma[accept]
            keep = ~accept
            slot, keys, sigma = slot[keep], keys[keep], sigma[keep]
            in_a, in_l, total = in_a[keep], in_l[keep], total[keep]
            trial += 1
        pending = pending[~hit]
    if pending.size:
        raise RuntimeError(f"noise_first_draw: no eligible sample in {MAX_ATTEMPTS} sigma draws for some slot")
    return indices, sigmas


def _draw(
    tables: _Tables, key: int, first_slot: int, count: int, P_mean: float, P_std: float, backend: str
) -> tuple[np.ndarray, np.ndarray]:
    if backend == "cpp":
        return _C.noise_first_draw(
            tables.threshold_sorted,
            tables.threshold_order,
            tables.threshold_by_index,
            tables.sigma_max_sorted,
            tables.sigma_max_order,
            key,
            first_slot,
            count,
            P_mean,
            P_std,
            MAX_ATTEMPTS,
        )
    return _draw_numpy(tables, key, first_slot, count, P_mean, P_std)


class _NoiseFirst:
    """Validated configuration and tables shared by the function and the batch sampler."""

    def __init__(self, sigma_min, sigma_max, s_max, buffer, P_mean, P_std, backend) -> None:
        if not (P_std > 0 and math.isfinite(P_std) and math.isfinite(P_mean)):
            raise ValueError(f"need finite P_mean and P_std > 0, got P_mean={P_mean}, P_std={P_std}")
        self.backend = _resolve_backend(backend)
        self.scale, self.shift = eligibility_rule(s_max, buffer)
        sigma_min = _as_levels("sigma_min", sigma_min)
        bad = np.flatnonzero(~np.isfinite(sigma_min))
        if bad.size:
            raise ValueError(f"sigma_min: must be finite; sample {bad[0]} has {sigma_min[bad[0]]}")
        sigma_max = None if sigma_max is None else _as_levels("sigma_max", sigma_max)
        if sigma_max is not None and sigma_max.shape != sigma_min.shape:
            raise ValueError(f"sigma_max: shape {sigma_max.shape} differs from sigma_min's {sigma_min.shape}")
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.tables = _build_tables(sigma_min, sigma_max, self.scale, self.shift, self.backend)
        reachable = _reachable(self.tables, self.P_mean, self.P_std)
        if reachable < MIN_REACHABLE:
            raise ValueError(
                f"only a fraction {reachable:.2e} of sigma draws (ln sigma ~ N({P_mean}, {P_std}^2)) has any "
                f"eligible sample (need >= {MIN_REACHABLE}); add clean samples or lower sigma_min"
            )

    def draw(self, key: int, first_slot: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        return _draw(self.tables, key, first_slot, count, self.P_mean, self.P_std, self.backend)


def draw_noise_first(
    sigma_min: Sequence[float] | np.ndarray | torch.Tensor,
    n: int,
    *,
    sigma_max: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    s_max: float = 4.0,
    buffer: float | None = None,
    P_mean: float = EDM_P_MEAN,
    P_std: float = EDM_P_STD,
    seed: int = 0,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` noise-level-first ``(index, sigma)`` pairs (SPEC 3).

    Args:
        sigma_min: ``(N,)`` per-sample nature level >= 0 (0 = clean), any array-like.
        n: number of draws.
        sigma_max: ``(N,)`` locality levels (a sample also trains at ``sigma < sigma_max``
            as if clean); None = no locality rule.
        s_max, buffer: eligibility rule (:func:`~ambient_fast.core.coefficients.eligibility_rule`).
        P_mean, P_std: ``ln sigma ~ N(P_mean, P_std^2)``.
        seed: stream seed (the stream of epoch 0, slots ``0 .. n-1`` of the batch sampler).
        backend: ``"auto"`` (C++ when built, else numpy), ``"cpp"`` or ``"numpy"``; all give
            the same bits.

    Returns:
        ``(indices, sigmas)``: int64 ``(n,)`` dataset indices and float64 ``(n,)`` VE levels,
        each index eligible at its sigma.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    sampler = _NoiseFirst(sigma_min, sigma_max, s_max, buffer, P_mean, P_std, backend)
    return sampler.draw(stream_key(seed, 0), 0, n)


class NoiseFirstBatchSampler(torch.utils.data.Sampler[list[tuple[int, float]]]):
    """Batch sampler of ``(index, sigma)`` pairs, noise level first (SPEC 3).

    Use as ``DataLoader(dataset, batch_sampler=sampler)``; ``dataset[(index, sigma)]`` then
    receives the level each sample is trained at. Each rank yields ``batch_size`` pairs per
    batch (global batch ``world_size * batch_size``), ``len(self)`` batches per epoch.

    Args:
        sigma_min: ``(N,)`` per-sample nature level >= 0 (0 = clean).
        batch_size: pairs per batch on this rank.
        sigma_max: ``(N,)`` locality levels, or None.
        s_max, buffer: eligibility rule (SPEC 2; defaults as the anchors: s_max = 4).
        P_mean, P_std: ``ln sigma ~ N(P_mean, P_std^2)`` (EDM: -1.2, 1.2).
        seed: stream seed; the stream of epoch ``e`` is keyed by ``(seed, e)``.
        rank, world_size: this process's slots in the global batch.
        batches_per_epoch: batches per rank and epoch; default ``ceil(N / (world_size *
            batch_size))`` (one nominal pass over the dataset).
        backend: ``"auto"``, ``"cpp"`` or ``"numpy"`` (same bits).

    Resuming: ``state_dict()`` records the epoch and the number of batches this sampler's
    iterator has handed out; ``load_state_dict`` makes the next iterator continue from there,
    bit for bit. A ``DataLoader`` with workers fetches indices ahead of the training step, so
    for exact resumption save the state alongside the step counter the loop consumed, e.g.
    ``{"epoch": e, "next_batch": steps_done_in_epoch, ...}`` (or use torchdata's
    ``StatefulDataLoader``, which does this bookkeeping).
    """

    def __init__(
        self,
        sigma_min: Sequence[float] | np.ndarray | torch.Tensor,
        batch_size: int,
        *,
        sigma_max: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        s_max: float = 4.0,
        buffer: float | None = None,
        P_mean: float = EDM_P_MEAN,
        P_std: float = EDM_P_STD,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batches_per_epoch: int | None = None,
        backend: str = "auto",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if not 0 <= seed <= _MASK64:
            raise ValueError(f"seed must be in [0, 2^64), got {seed}")
        self._source = _NoiseFirst(sigma_min, sigma_max, s_max, buffer, P_mean, P_std, backend)
        size = self._source.tables.size
        if batches_per_epoch is None:
            batches_per_epoch = max(1, math.ceil(size / (world_size * batch_size)))
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.batches_per_epoch = seed, batches_per_epoch
        self._config = {
            "dataset_size": size,
            "global_batch_size": world_size * batch_size,
            "batches_per_epoch": batches_per_epoch,
            "seed": seed,
            "eligibility": [self._source.scale, self._source.shift],
            "P_mean": self._source.P_mean,
            "P_std": self._source.P_std,
        }
        self.epoch = 0
        self._next_batch = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's stream (call before each epoch, as with DistributedSampler)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch
        self._next_batch = 0

    def batch(self, batch_index: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``batch_index`` of the current epoch on this rank as arrays.

        Returns:
            ``(indices int64 (batch_size,), sigmas float64 (batch_size,))``.
        """
        first_slot = (batch_index * self.world_size + self.rank) * self.batch_size
        return self._source.draw(stream_key(self.seed, self.epoch), first_slot, self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, float]]]:
        start = self._next_batch if self._next_batch < self.batches_per_epoch else 0
        for batch_index in range(start, self.batches_per_epoch):
            indices, sigmas = self.batch(batch_index)
            self._next_batch = batch_index + 1
            yield list(zip(indices.tolist(), sigmas.tolist(), strict=True))

    def state_dict(self) -> dict:
        """``{"epoch", "next_batch", **config}``: everything needed to resume exactly."""
        return {"epoch": self.epoch, "next_batch": self._next_batch, **self._config}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["epoch"]``, batch ``state["next_batch"]``.

        The configuration in ``state`` (dataset size, global batch size, seed, eligibility
        rule, sigma distribution, batches per epoch) must match this sampler's; the world
        size may differ as long as the global batch size is the same.
        """
        mismatched = {k: (state.get(k), v) for k, v in self._config.items() if state.get(k) != v}
        if mismatched:
            raise ValueError(f"state_dict does not match this sampler (saved, current): {mismatched}")
        if not 0 <= state["next_batch"] <= self.batches_per_epoch:
            raise ValueError(f"next_batch must be in [0, {self.batches_per_epoch}], got {state['next_batch']}")
        self.epoch = int(state["epoch"])
        self._next_batch = int(state["next_batch"])
