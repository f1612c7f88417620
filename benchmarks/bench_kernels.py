"""Fused Triton kernels vs their plain-PyTorch references, eager and under torch.compile.

Ops (SPEC 2 and 4): the per-sample ambient loss (forward, and forward + backward w.r.t.
``pred``) and the sampler's update steps (Euler, Heun, churn, ancestral), at the three
benchmark sizes B=512x3x32x32, 64x4x64x64 and 8x3x512x512, in fp32 and bf16.

Each row reports the median of many CUDA-event timings after warm-up (the L2 cache is
flushed before every repetition, so tensors come from HBM), the bytes the op must move
at least, the resulting GB/s and its fraction of the measured device copy bandwidth
(``dst.copy_(src)`` on 1 GiB). "Must move" counts each input read once and each output written
once: loss fwd 3 reads; loss fwd+bwd 3 reads + 1 gradient write (the Triton path moves 6
passes: its backward re-reads the gradient written by the forward and scales it); Euler and
churn 2 reads + 1 write; Heun and ancestral 3 reads + 1 write; plus the per-sample levels.
Every implementation's output is checked against the eager reference before it is timed.

Usage::

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels_gpu.md   # CUDA, full sizes
    python benchmarks/bench_kernels.py --smoke --out /tmp/bench_kernels_smoke.md  # CPU sanity (CI)

``--smoke`` uses tiny sizes and few repetitions; on a machine without CUDA it runs the Triton
kernels in Triton's interpreter and times with ``time.perf_counter`` (the numbers only show that
the script works).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

SIZES = [(512, 3, 32, 32), (64, 4, 64, 64), (8, 3, 512, 512)]
SMOKE_SIZES = [(3, 3, 8, 8)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
IMPLS = ("eager", "compile", "triton")
OPS = ("loss", "euler", "heun", "churn", "ancestral")
COPY_BYTES = 1 << 30  # copy-bandwidth probe: large enough that launch overhead is noise
FLUSH_BYTES = 256 << 20  # written before every timed repetition: larger than any GPU's L2


@dataclass
class Case:
    """One timed configuration: callables per implementation and the minimum bytes moved."""

    op: str
    shape: tuple[int, ...]
    dtype: str
    phase: str
    impls: dict[str, Callable[[], object]]
    bytes_moved: int


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="markdown file to write the results table to")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few repetitions (CPU sanity)")
    parser.add_argument(
        "--dtypes", default=None, help=f"comma list of {sorted(DTYPES)} (default fp32,bf16; smoke fp32)"
    )
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma list of {list(OPS)}")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {list(IMPLS)}")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10, smoke 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls (default 100, smoke 3)")
    args = parser.parse_args(argv)
    if args.dtypes is None:
        args.dtypes = "fp32" if args.smoke else "fp32,bf16"
    for name, allowed in (("dtypes", DTYPES), ("ops", OPS), ("impls", IMPLS)):
        values = [v for v in getattr(args, name).split(",") if v]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            parser.error(f"--{name}: unknown {bad} (choose from {list(allowed)})")
        setattr(args, name, values)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 10)
    args.reps = args.reps if args.reps is not None else (3 if args.smoke else 100)
    if args.warmup < 0 or args.reps < 1:
        parser.error("--warmup must be >= 0 and --reps >= 1")
    return args


def median_seconds(fn: Callable[[], object], warmup: int, reps: int, flush: torch.Tensor | None) -> float:
    """Median time of ``fn``: CUDA events around each call with L2 flushed first, else perf_counter."""
    for _ in range(warmup):
        fn()
    if flush is None:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3


def copy_bandwidth(device: torch.device, nbytes: int, warmup: int, reps: int, flush: torch.Tensor | None) -> float:
    """Measured device copy bandwidth in bytes/s (one read and one write of ``nbytes``)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), warmup, reps, flush)
    return 2 * nbytes / seconds


def build_cases(shape: tuple[int, ...], dtype_name: str, ops: list[str], impls: list[str], device: torch.device):
    """The timed callables of every op at one size and dtype (inputs allocated once)."""
    from ambient_fast.core import solver_step as ref_step
    from ambient_fast.core.loss import LossConfig, per_sample_loss_reference
    from ambient_fast.kernels import solver_step as triton_step
    from ambient_fast.kernels.ambient_loss import ambient_loss_triton

    dtype = DTYPES[dtype_name]
    batch, numel = shape[0], torch.Size(shape).numel()
    elt = torch.empty((), dtype=dtype).element_size()
    tensors = [torch.randn(shape, device=device, dtype=dtype) for _ in range(3)]
    # Per-sample levels as the sampler passes them: columns of a float64 (B, K+1) grid table.
    table = torch.sort(torch.rand(batch, 3, device=device, dtype=torch.float64) * 10 + 0.1, descending=True).values
    level_bytes = 2 * batch * 8
    cases = []

    def variants(reference: Callable, fused: Callable) -> dict[str, Callable]:
        makers = {
            "eager": lambda: reference,
            "compile": lambda: torch.compile(reference, dynamic=False),
            "triton": lambda: fused,
        }
        return {name: makers[name]() for name in impls}

    if "loss" in ops:
        pred, y_t, y_tmin = tensors
        # Every row trains (noise-level-first batching): half clean, half corrupt and eligible.
        sigma = torch.exp(torch.randn(batch, device=device) * 1.2 - 1.2)
        sigma_min = torch.where(torch.arange(batch, device=device) % 2 == 0, 0.0, 0.5 * sigma)
        sigma_max = torch.zeros(batch, device=device)
        cfg = LossConfig()
        levels = (sigma, sigma_min, sigma_max)

        def reference_loss(p, a, b, s, sm, smax):
            return per_sample_loss_reference(p, a, b, s, sm, smax, None, cfg)

        def fused_loss(p, a, b, s, sm, smax):
            return ambient_loss_triton(p, a, b, s, sm, smax, None, cfg)

        loss_fns = variants(reference_loss, fused_loss)
        per_sample = 3 * batch * 4 + batch * 4  # levels read + loss written
        leaf = pred.detach().requires_grad_(True)
        upstream = torch.ones(batch, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)

        def forward(fn: Callable) -> Callable:
            def run():
                with torch.no_grad():
                    return fn(pred, y_t, y_tmin, *levels)

            return run

        def forward_backward(fn: Callable) -> Callable:
            return lambda: torch.autograd.grad(fn(leaf, y_t, y_tmin, *levels), leaf, upstream)[0]

        fwd = {k: forward(f) for k, f in loss_fns.items()}
        fwd_bwd = {k: forward_backward(f) for k, f in loss_fns.items()}
        cases.append(Case("loss", shape, dtype_name, "fwd", fwd, 3 * numel * elt + per_sample))
        cases.append(Case("loss", shape, dtype_name, "fwd+bwd", fwd_bwd, 4 * numel * elt + per_sample))

    x, denoised, third = tensors
    steps = {
        "euler": ((x, denoised, table[:, 0], table[:, 1]), 2),
        "heun": ((x, denoised, third, table[:, 0], table[:, 1]), 3),
        "churn": ((x, third, table[:, 1], table[:, 0], 1.007), 2),
        "ancestral": ((x, denoised, third, table[:, 0], table[:, 1]), 3),
    }
    for op, (args, reads) in steps.items():
        if op not in ops:
            continue
        fns = variants(getattr(ref_step, f"{op}_step"), getattr(triton_step, f"{op}_step_triton"))
        calls = {k: (lambda f=f, a=args: f(*a)) for k, f in fns.items()}
        cases.append(Case(op, shape, dtype_name, "fwd", calls, (reads + 1) * numel * elt + level_bytes))
    return cases


def check_against_eager(case: Case) -> None:
    """Loose sanity check of every implementation against the eager reference (tests are tight)."""
    reference = case.impls.get("eager")
    if reference is None:
        return
    want = reference().double()
    scale = want.abs().max().item() or 1.0
    tol = 1e-4 if case.dtype in ("fp32", "fp64") else 2e-2
    for name, fn in case.impls.items():
        got = fn().double()
        err = (got - want).abs().max().item()
        if not err <= tol * scale:
            raise AssertionError(f"{case.op} {case.phase} {case.shape} {case.dtype} {name}: max error {err:.3g}")


def markdown(rows: list[dict], header: list[str]) -> str:
    lines = [
        *header,
        "",
        "| op | shape | dtype | pass | impl | median (us) | MB moved | GB/s | % copy BW | vs eager |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['op']} | {'x'.join(map(str, row['shape']))} | {row['dtype']} | {row['phase']} "
            f"| {row['impl']} | {row['seconds'] * 1e6:.1f} | {row['bytes'] / 1e6:.2f} | {row['gbps']:.1f} "
            f"| {row['fraction'] * 100:.1f} | {row['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            print("bench_kernels: no CUDA device; use --smoke for the CPU sanity run", file=sys.stderr)
            return 2
        # Must precede the first import of the kernels (Triton reads it when they are defined).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # One thread: on shared CI cores OpenMP barriers stall compiled CPU kernels (measured 12 ms
        # per call at 2 threads vs 40 us at 1); CPU numbers only show that the script works.
        torch.set_num_threads(1)
    import triton

    torch._dynamo.config.recompile_limit = 64  # one compiled variant per op, size and dtype
    torch.manual_seed(0)
    device = torch.device("cuda" if cuda else "cpu")
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device) if cuda else None
    copy_bytes = COPY_BYTES if cuda else 32 << 20
    bandwidth = copy_bandwidth(device, copy_bytes, args.warmup, max(args.reps, 10), flush)
    cpu_name = platform.processor() or platform.machine()
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({cpu_name}), Triton interpreter"
    print(f"device: {device_name}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")

    rows = []
    for shape in SMOKE_SIZES if args.smoke else SIZES:
        for dtype_name in args.dtypes:
            for case in build_cases(shape, dtype_name, args.ops, args.impls, device):
                check_against_eager(case)
                timings = {name: median_seconds(fn, args.warmup, args.reps, flush) for name, fn in case.impls.items()}
                for name, seconds in timings.items():
                    gbps = case.bytes_moved / seconds / 1e9
                    row = dict(
                        op=case.op, shape=case.shape, dtype=case.dtype, phase=case.phase, impl=name,
                        seconds=seconds, bytes=case.bytes_moved, gbps=gbps, fraction=gbps * 1e9 / bandwidth,
                        speedup=timings.get("eager", seconds) / seconds,
                    )
                    rows.append(row)
                    print(
                        f"{case.op:9s} {str(case.shape):18s} {case.dtype} {case.phase:7s} {name:7s} "
                        f"{seconds * 1e6:10.1f} us {gbps:8.1f} GB/s {row['fraction'] * 100:5.1f}% copy BW"
                    )
    header = [
        f"### Kernel benchmarks: {device_name}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}; measured copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s ({copy_bytes >> 20} MiB copy); median of {args.reps} after {args.warmup} "
        f"warm-up calls{', L2 flushed before each' if cuda else ' (perf_counter)'}.",
        f"Command: `python benchmarks/bench_kernels.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
    ]
    with open(args.out, "w") as f:
        f.write(markdown(rows, header))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
