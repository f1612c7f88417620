"""CPU benchmarks: the fused ops' C++ kernels (via the package's kernel bench) and the noise-first sampler.

- Fused ambient loss (SPEC 2) and solver steps (SPEC 4): a thin caller of
  ``ambient-fast bench kernels --device cpu`` (``ambient_fast.bench.kernels``): the public
  ``ambient_fast.ambient_loss`` with default checks and the sampler's step path vs the lean
  eager formula vs ``torch.compile`` of it, fwd and fwd+bwd, interleaved rounds.
- Noise-first sampler (SPEC 3): table build time and draw throughput (indices/s) at dataset
  sizes 10^6 and 10^8 (continuous sigma_min, the worst case for the binary searches), C++ vs
  numpy, and a check that both return the same bits.

Usage::

    python benchmarks/bench_cpu.py --threads 1                       # everything
    python benchmarks/bench_cpu.py --skip sampler --kernel-args --op loss --dtype fp32
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

from ambient_fast.bench.kernels import SHAPES, markdown_table, run_kernel_bench
from ambient_fast.cli import build_parser
from ambient_fast.data import sampler as sampler_mod


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
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenMP threads")
    parser.add_argument("--repeats", type=int, default=21, help="interleaved timing rounds (median)")
    parser.add_argument("--sampler-sizes", type=float, nargs="+", default=[1e6, 1e8], help="dataset sizes")
    parser.add_argument("--sampler-draws", type=int, default=1_000_000, help="indices drawn per timing")
    parser.add_argument("--skip", nargs="*", default=[], choices=["kernels", "sampler"])
    parser.add_argument(
        "--kernel-args", nargs=argparse.REMAINDER, default=[], help="options for `ambient-fast bench kernels`"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # also the kernels' OpenMP team (shared libgomp)
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# _C: {sampler_mod._C.build_info() if sampler_mod._C is not None else 'not built'}")
    if "kernels" not in args.skip:
        kernel = build_parser().parse_args(
            ["bench", "kernels", "--device", "cpu", "--threads", str(args.threads), "--rounds", str(args.repeats),
             *args.kernel_args]
        )
        result = run_kernel_bench(
            kernel.op, kernel.shape or SHAPES, kernel.dtype, torch.device("cpu"), rounds=kernel.rounds,
            warmup=kernel.warmup, with_compile=not kernel.no_compile,
        )
        print(markdown_table(result["rows"]), flush=True)
    if "sampler" not in args.skip:
        print("| dataset | C++ build s | numpy build s | C++ M idx/s | numpy M idx/s | C++/numpy | same bits |")
        print("|---|---|---|---|---|---|---|")
        for size in args.sampler_sizes:
            bench_sampler_case(int(size), args.sampler_draws, max(3, args.repeats // 4))


if __name__ == "__main__":
    main()
