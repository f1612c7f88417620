"""Micro-benchmark of the fused ops against eager PyTorch and torch.compile (``ambient-fast bench kernels``).

For each op (SPEC 2 loss, SPEC 4/5 solver steps), shape and dtype it times, side by side in
interleaved rounds (so the ratios survive a loaded machine):

- ``fused``: what users call. Loss: the public ``ambient_fast.ambient_loss`` with its default
  checks (``reduction="mean"``, EDM weight). Steps: the sampler's step path
  (``kernels.get_backend("auto", device).<op>_step``). C++ on CPU, Triton on CUDA.
- ``eager``: the lean eager formula with the per-sample coefficients precomputed as the public
  call would (loss: ``(w * ((pred + b y_t + c y_tmin)^2).flatten(1).mean(1)).mean()``).
- ``compile``: ``torch.compile(eager, fullgraph=True, dynamic=False)``.

Loss rows come as ``fwd`` (no grad) and ``fwd+bwd`` (``loss.backward()`` into ``pred.grad``).
Each row reports the median and the interquartile range over the rounds, the bytes the op must
move (each tensor input read once, each output written once: loss fwd 3 reads, fwd+bwd 3 reads
and 1 gradient write; Euler/churn 2 reads + 1 write; Heun/ancestral 3 + 1), GB/s, and the
fraction of a ``Tensor.copy_`` of the same number of bytes timed in the same rounds (the
bandwidth roof at that working-set size: cache-resident sizes are not DRAM-bound).
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

__all__ = ["DTYPES", "OPS", "SHAPES", "BenchRow", "markdown_table", "run_kernel_bench"]

OPS = ("loss", "euler", "heun", "churn", "ancestral")
SHAPES = [(128, 3, 32, 32), (16, 4, 64, 64), (64, 4, 128, 128)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass
class BenchRow:
    """One timed (op, shape, dtype, phase, implementation)."""

    op: str
    shape: list[int]
    dtype: str
    device: str
    phase: str
    impl: str
    median_us: float
    iqr_us: float
    bytes: int
    gbps: float
    copy_fraction: float
    vs_eager: float
    vs_compile: float | None


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":

        def cuda_time(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return cuda_time

    def cpu_time(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return cpu_time


def _interleaved(calls: dict[str, Callable[[], object]], rounds: int, warmup: int, device: torch.device) -> dict:
    """``{name: (median s, interquartile range s)}`` over ``rounds`` interleaved rounds."""
    timer = _timer(device)
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            samples[name].append(timer(fn))
    out = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
        out[name] = (statistics.median(values), q[2] - q[0])
    return out


def _copy_of(nbytes: int, device: torch.device) -> Callable[[], object]:
    """A copy that reads and writes ``nbytes`` in total (the case's bandwidth roof)."""
    src = torch.randn(max(nbytes // 8, 1), device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _loss_case(shape, dtype, device, with_compile):
    """``{phase: (calls, bytes)}`` of the loss at one shape and dtype."""
    import ambient_fast
    from ambient_fast.core.coefficients import ambient_coefficients
    from ambient_fast.core.schedules import lambda_edm

    gen = torch.Generator().manual_seed(0)
    batch = shape[0]
    pred, y_t, y_tmin = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    # Every row trains (noise-level-first batching): half clean, half corrupt and eligible.
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(batch, generator=gen)).to(device)
    sigma_min = torch.where(torch.arange(batch, device=device) % 2 == 0, 0.0, 0.5 * sigma)
    _, b, c = ambient_coefficients(sigma, sigma_min)
    view = (-1,) + (1,) * (len(shape) - 1)
    b, c, w = b.view(view), c.view(view), lambda_edm(sigma)

    def eager(p):
        return (w * ((p + b * y_t + c * y_tmin) ** 2).flatten(1).mean(1)).mean()

    def fused(p):
        return ambient_fast.ambient_loss(p, y_t, y_tmin, sigma, sigma_min)

    impls = {"fused": fused, "eager": eager}
    if with_compile:
        impls["compile"] = torch.compile(eager, fullgraph=True, dynamic=False)
    want = eager(pred).double().item()
    for name, fn in impls.items():
        got = fn(pred).double().item()
        if not math.isclose(got, want, rel_tol=1e-3 if dtype in (torch.float32, torch.float64) else 2e-2):
            raise AssertionError(f"loss {shape} {dtype} {name}: {got} != eager {want}")
    leaf = pred.detach().clone().requires_grad_(True)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(pred)

        return run

    def forward_backward(fn):
        def run():
            leaf.grad = None
            fn(leaf).backward()

        return run

    nbytes = pred.numel() * pred.element_size()
    return {
        "fwd": ({k: forward(f) for k, f in impls.items()}, 3 * nbytes),
        "fwd+bwd": ({k: forward_backward(f) for k, f in impls.items()}, 4 * nbytes),
    }


def _step_case(op, shape, dtype, device, with_compile):
    """``{"fwd": (calls, bytes)}`` of one solver step at one shape and dtype."""
    from ambient_fast.kernels import get_backend

    gen = torch.Generator().manual_seed(1)
    batch = shape[0]
    x, d, second = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    # Levels as the sampler passes them: columns of a float64 (B, K+1) table.
    table = torch.sort(torch.rand(batch, 3, generator=gen, dtype=torch.float64) * 10 + 0.1, descending=True).values
    table = table.to(device)
    sigma, sigma_next = table[:, 0], table[:, 1]
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    view = (-1,) + (1,) * (len(shape) - 1)
    s, sn = sigma.to(compute).view(view), sigma_next.to(compute).view(view)
    std_churn = torch.sqrt(torch.clamp((1.2 * s) ** 2 - s * s, min=0)) * 1.007  # sigma_hat = 1.2 sigma
    ratio2 = (sn / s) ** 2
    std_anc = sn * torch.sqrt(torch.clamp(1 - ratio2, min=0))
    fused_ops = get_backend("auto", device)
    cast = (lambda t: t) if compute == dtype else (lambda t: t.to(dtype))
    eager_fns = {
        "euler": lambda: cast(x + (sn - s) * (x - d) / s),
        "heun": lambda: cast(_heun(x, d, second, s, sn)),
        "churn": lambda: cast(x + std_churn * second),
        "ancestral": lambda: cast(d + ratio2 * (x - d) + std_anc * second),
    }
    fused_args = {
        "euler": (x, d, sigma, sigma_next),
        "heun": (x, d, second, sigma, sigma_next),
        "churn": (x, second, sigma, 1.2 * sigma, 1.007),
        "ancestral": (x, d, second, sigma, sigma_next),
    }[op]
    reads = {"euler": 2, "heun": 3, "churn": 2, "ancestral": 3}[op]
    fused_fn = getattr(fused_ops, f"{op}_step")
    calls = {"fused": lambda: fused_fn(*fused_args), "eager": eager_fns[op]}
    if with_compile:
        compiled = torch.compile(eager_fns[op], fullgraph=True, dynamic=False)
        calls["compile"] = compiled
    want = eager_fns[op]().double()
    for name, fn in calls.items():
        err = (fn().double() - want).abs().max().item()
        tol = (1e-4 if dtype in (torch.float32, torch.float64) else 2e-2) * max(want.abs().max().item(), 1.0)
        if not err <= tol:
            raise AssertionError(f"{op} {shape} {dtype} {name}: max error {err:.3g}")
    return {"fwd": (calls, (reads + 1) * x.numel() * x.element_size())}


def _heun(x, d, d_next, s, sn):
    slope = (x - d) / s
    x_euler = x + (sn - s) * slope
    return x + (sn - s) * 0.5 * (slope + (x_euler - d_next) / sn)


def run_kernel_bench(
    ops: list[str],
    shapes: list[tuple[int, ...]],
    dtypes: list[str],
    device: torch.device,
    *,
    rounds: int = 21,
    warmup: int = 3,
    with_compile: bool = True,
    progress: Callable[[BenchRow], None] | None = None,
) -> dict:
    """Time every (op, shape, dtype) and return ``{"meta": {...}, "rows": [BenchRow as dict]}``."""
    import triton

    from ambient_fast.kernels import _native

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    rows: list[BenchRow] = []
    for shape in shapes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for op in ops:
                if op == "loss":
                    cases = _loss_case(shape, dtype, device, with_compile)
                else:
                    cases = _step_case(op, shape, dtype, device, with_compile)
                for phase, (calls, nbytes) in cases.items():
                    timings = _interleaved({**calls, "copy": _copy_of(nbytes, device)}, rounds, warmup, device)
                    copy_s = timings.pop("copy")[0]
                    for impl, (median, iqr) in timings.items():
                        row = BenchRow(
                            op=op, shape=list(shape), dtype=dtype_name, device=device.type, phase=phase, impl=impl,
                            median_us=median * 1e6, iqr_us=iqr * 1e6, bytes=nbytes, gbps=nbytes / median / 1e9,
                            copy_fraction=copy_s / median, vs_eager=timings["eager"][0] / median,
                            vs_compile=timings["compile"][0] / median if "compile" in timings else None,
                        )
                        rows.append(row)
                        if progress is not None:
                            progress(row)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "native": _native.extension().build_info() if _native.available() else None,
        "rounds": rounds,
        "warmup": warmup,
    }
    return {"meta": meta, "rows": [asdict(r) for r in rows]}


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (speed-ups are of each implementation over eager / compile)."""
    lines = [
        "| op | shape | dtype | pass | impl | median us (IQR) | MB moved | GB/s | % copy | vs eager | vs compile |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs_compile = f"{r['vs_compile']:.2f}x" if r["vs_compile"] is not None else "-"
        lines.append(
            f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['phase']} | {r['impl']} "
            f"| {r['median_us']:.1f} ({r['iqr_us']:.1f}) | {r['bytes'] / 1e6:.2f} | {r['gbps']:.1f} "
            f"| {100 * r['copy_fraction']:.0f} | {r['vs_eager']:.2f}x | {vs_compile} |"
        )
    return "\n".join(lines) + "\n"
