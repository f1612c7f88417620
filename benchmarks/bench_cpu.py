"""Native CPU kernels (ambient_fast._C) vs eager PyTorch vs torch.compile (CPU inductor).

- Fused ambient loss (SPEC 2), forward and forward+backward, at B=128x3x32x32 and
  B=16x4x64x64 in float32 and bfloat16, plus 64x4x128x128 float32 (beyond the caches):
  ``cpu_ops.ambient_loss_cpp`` vs the eager reference ``per_sample_loss_reference`` vs
  ``torch.compile`` of that reference (``fullgraph=True``). Levels make every row train
  (no skipped rows in the C++ path's favour).
- Fused solver steps (SPEC 4), float32 and float64 (EDM's sampler state), same two shapes:
  ``*_step_cpp`` vs ``core.solver_step`` eager vs compiled.
- Noise-first sampler (SPEC 3): table build time and draw throughput (indices/s) at dataset
  sizes 10^6 and 10^8 (continuous sigma_min, the worst case for the binary searches), C++ vs
  numpy, and a check that both return the same bits.

Timing: every variant of a case is warmed up (compiles included), then the variants run
interleaved, ``--repeats`` rounds, and the median per call is reported, so the ratios come
from side-by-side measurements even on a shared, noisy machine. "launcher" is the Python
launcher of the C++ op called directly (validation + kernel, without the torch.library
dispatch). GB/s is the minimum traffic (each operand read or written once) divided by the
C++ op time; "% copy" compares with a ``Tensor.copy_`` moving the same number of bytes,
timed in the same rounds (working sets of a few MB are cache-resident, so DRAM bandwidth is
not the roof there).

Usage::

    python benchmarks/bench_cpu.py                       # everything (15-20 minutes on 2 cores)
    python benchmarks/bench_cpu.py --threads 1           # one core (steadier on a shared machine)
    python benchmarks/bench_cpu.py --sampler-sizes 1e6   # skip the 10^8 sampler case
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from ambient_fast.core import solver_step as ref_step
from ambient_fast.core.loss import LossConfig, per_sample_loss_reference
from ambient_fast.data import sampler as sampler_mod
from ambient_fast.kernels import cpu_ops

SHAPES = [(128, 3, 32, 32), (16, 4, 64, 64)]
# 64x4x128x128 float32: 50 MiB per loss call, beyond the caches (bandwidth-bound regime).
LOSS_CASES = [(dtype, shape) for dtype in (torch.float32, torch.bfloat16) for shape in SHAPES] + [
    (torch.float32, (64, 4, 128, 128))
]
HEADER = (
    "| op | shape | dtype | C++ op ms | launcher ms | eager ms | compile ms | eager/C++ | compile/C++ "
    "| C++ GB/s (% copy) |\n|---|---|---|---|---|---|---|---|---|---|"
)


def timed(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each entry, measured interleaved after one warm-up call."""
    for fn in calls.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def copy_of(traffic_bytes: int) -> Callable[[], object]:
    """A copy that reads and writes ``traffic_bytes`` in total: the case's bandwidth roof."""
    src = torch.randn(traffic_bytes // 8)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def report(name: str, shape: tuple[int, ...], dtype: torch.dtype, t: dict[str, float], traffic: int) -> None:
    gbs = traffic / t["cpp"] / 1e9
    launcher = f"{t['launcher'] * 1e3:.3f}" if "launcher" in t else "-"
    print(
        f"| {name} | {'x'.join(map(str, shape))} | {str(dtype)[6:]} | {t['cpp'] * 1e3:.3f} | {launcher} | "
        f"{t['eager'] * 1e3:.3f} | {t['compile'] * 1e3:.3f} | {t['eager'] / t['cpp']:.1f}x | "
        f"{t['compile'] / t['cpp']:.1f}x | {gbs:.1f} ({100 * t['copy'] / t['cpp']:.0f}%) |",
        flush=True,
    )


def bench_loss_case(dtype: torch.dtype, shape: tuple[int, ...], repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    batch = shape[0]
    pred, y_t, y_tmin = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(batch, generator=gen))
    sigma_min = torch.where(torch.arange(batch) % 2 == 0, torch.zeros(batch), 0.5 * sigma)  # every row trains
    levels = (sigma, sigma_min, torch.zeros(batch))
    cfg = LossConfig()
    options = (
        cfg.schedule,
        cfg.target,
        cfg.contraction,
        cfg.elig_scale,
        cfg.elig_shift,
        cfg.edm_weight,
        cfg.sigma_data,
    )

    def reference(p):
        return per_sample_loss_reference(p, y_t, y_tmin, *levels, None, cfg)

    def fused(p):
        return cpu_ops.ambient_loss_cpp(p, y_t, y_tmin, *levels, None, cfg)

    torch._dynamo.reset()  # each case compiles afresh (no recompile-limit carry-over)
    compiled = torch.compile(reference, fullgraph=True, dynamic=False)
    torch.testing.assert_close(fused(pred), reference(pred), rtol=1e-5, atol=1e-5)
    impls = {"cpp": fused, "eager": reference, "compile": compiled}

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(pred)

        return run

    def forward_backward(fn):
        def run():
            p = pred.detach().requires_grad_()
            fn(p).mean().backward()

        return run

    def launcher():
        cpu_ops._run_loss(pred, y_t, y_tmin, *levels, None, *options, with_grad=False)

    element_bytes = pred.numel() * pred.element_size()
    fwd = {name: forward(fn) for name, fn in impls.items()}
    report(
        "loss fwd",
        shape,
        dtype,
        timed({**fwd, "launcher": launcher, "copy": copy_of(3 * element_bytes)}, repeats),
        3 * element_bytes,
    )
    # Fused: 3 reads + gradient write forward, gradient read + write backward.
    fwd_bwd = {name: forward_backward(fn) for name, fn in impls.items()}
    report(
        "loss fwd+bwd", shape, dtype, timed({**fwd_bwd, "copy": copy_of(6 * element_bytes)}, repeats), 6 * element_bytes
    )


def bench_step_case(name: str, dtype: torch.dtype, shape: tuple[int, ...], repeats: int) -> None:
    gen = torch.Generator().manual_seed(1)
    x, denoised, denoised_next, noise = (torch.randn(shape, generator=gen).to(dtype) for _ in range(4))
    sigma = torch.exp(torch.randn(shape[0], generator=gen)).to(torch.float64)
    sigma_next, sigma_hat = 0.8 * sigma, 1.2 * sigma
    levels = {"sigma": sigma, "sigma_next": sigma_next}
    # reference, C++ op, arguments, launcher (kernel args, tensor inputs, levels)
    reference, fused, args, (kernel_args, inputs, step_levels) = {
        "euler": (
            ref_step.euler_step,
            cpu_ops.euler_step_cpp,
            (x, denoised, sigma, sigma_next),
            ({}, {"denoised": denoised}, levels),
        ),
        "heun": (
            ref_step.heun_step,
            cpu_ops.heun_step_cpp,
            (x, denoised, denoised_next, sigma, sigma_next),
            ({}, {"denoised": denoised, "denoised_next": denoised_next}, levels),
        ),
        "churn": (
            ref_step.churn_step,
            cpu_ops.churn_step_cpp,
            (x, noise, sigma, sigma_hat, 1.007),
            ({"S_noise": 1.007}, {"noise": noise}, {"sigma": sigma, "sigma_hat": sigma_hat}),
        ),
        "ancestral": (
            ref_step.ancestral_step,
            cpu_ops.ancestral_step_cpp,
            (x, denoised, noise, sigma, sigma_next),
            ({}, {"denoised": denoised, "noise": noise}, levels),
        ),
    }[name]
    torch._dynamo.reset()
    compiled = torch.compile(reference, fullgraph=True, dynamic=False)
    torch.testing.assert_close(fused(*args), reference(*args), rtol=1e-5, atol=1e-5)
    traffic = (len(inputs) + 2) * x.numel() * x.element_size()  # x, the inputs, the output
    calls = {
        "cpp": lambda: fused(*args),
        "launcher": lambda: cpu_ops._run_step(f"{name}_step", kernel_args, x, inputs, step_levels),
        "eager": lambda: reference(*args),
        "compile": lambda: compiled(*args),
        "copy": copy_of(traffic),
    }
    report(name, shape, dtype, timed(calls, repeats), traffic)


def bench_sampler_case(size: int, draws: int, repeats: int) -> None:
    rng = np.random.default_rng(2)
    sigma_min = rng.uniform(0.0, 2.0, size)
    sigma_min[rng.random(size) < 0.1] = 0.0
    key = sampler_mod.stream_key(0, 0)
    results = {}
    for backend in ("cpp", "numpy"):
        start = time.perf_counter()
        source = sampler_mod._NoiseFirst(sigma_min, None, 4.0, None, -1.2, 1.2, backend)
        build = time.perf_counter() - start
        seconds = timed({backend: lambda source=source: source.draw(key, 0, draws)}, repeats)[backend]
        results[backend] = (build, seconds, source.draw(key, 0, 1000))
    (build_c, draw_c, bits_c), (build_n, draw_n, bits_n) = results["cpp"], results["numpy"]
    same = all(np.array_equal(a, b) for a, b in zip(bits_c, bits_n, strict=True))
    print(
        f"| 10^{round(math.log10(size))} | {build_c:.2f} | {build_n:.2f} | {draws / draw_c / 1e6:.2f} | "
        f"{draws / draw_n / 1e6:.2f} | {draw_n / draw_c:.1f}x | {'yes' if same else 'NO'} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and OpenMP threads")
    parser.add_argument("--repeats", type=int, default=21, help="interleaved timing rounds (median)")
    parser.add_argument("--sampler-sizes", type=float, nargs="+", default=[1e6, 1e8], help="dataset sizes")
    parser.add_argument("--sampler-draws", type=int, default=1_000_000, help="indices drawn per timing")
    parser.add_argument("--skip", nargs="*", default=[], choices=["loss", "steps", "sampler"])
    args = parser.parse_args()
    if not cpu_ops.available():
        raise SystemExit(f"ambient_fast._C is not built: {cpu_ops.load_error()}")
    torch.set_num_threads(args.threads)  # also the kernels' OpenMP team (shared libgomp)

    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# _C: {sampler_mod._C.build_info()}")
    if "loss" not in args.skip:
        print(HEADER)
        for dtype, shape in LOSS_CASES:
            bench_loss_case(dtype, shape, args.repeats)
    if "steps" not in args.skip:
        print(HEADER)
        for dtype in (torch.float32, torch.float64):
            for shape in SHAPES:
                for name in ("euler", "heun", "churn", "ancestral"):
                    bench_step_case(name, dtype, shape, args.repeats)
    if "sampler" not in args.skip:
        print("| dataset | C++ build s | numpy build s | C++ M idx/s | numpy M idx/s | C++/numpy | same bits |")
        print("|---|---|---|---|---|---|---|")
        for size in args.sampler_sizes:
            bench_sampler_case(int(size), args.sampler_draws, max(3, args.repeats // 4))


if __name__ == "__main__":
    main()
