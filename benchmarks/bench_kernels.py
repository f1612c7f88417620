"""Kernel micro-benchmarks into a markdown report: a thin caller of ``ambient-fast bench kernels``.

All measuring code lives in the package (``ambient_fast.bench.kernels``); this script adds the
report header (machine, date, versions, command, load) and writes the table to ``--out``.
On CUDA the fused column is the Triton kernel, on CPU the C++ kernel.

Usage::

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels_gpu.md           # CUDA
    python benchmarks/bench_kernels.py --out /tmp/k.md --op loss --dtype fp32 --rounds 31  # any `bench kernels` option
    python benchmarks/bench_kernels.py --smoke --out /tmp/k.md                              # sanity run
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from ambient_fast.bench.kernels import SHAPES, markdown_table, run_kernel_bench
from ambient_fast.cli import build_parser


def report(argv: list[str]) -> str:
    """Run ``ambient-fast bench kernels <argv>`` and return the markdown report."""
    import torch

    from ambient_fast.runtime import resolve_device

    args = build_parser().parse_args(["bench", "kernels", *argv])
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = run_kernel_bench(
        args.op, args.shape or SHAPES, args.dtype, device, rounds=args.rounds, warmup=args.warmup,
        with_compile=not args.no_compile, progress=lambda row: print(row, file=sys.stderr, flush=True),
    )
    meta = result["meta"]
    header = [
        f"### Kernel benchmarks: {meta['device']}, {meta['threads']} thread(s)",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {meta['torch']}, triton "
        f"{meta['triton']}; native build {meta['native']}; median and IQR of {meta['rounds']} interleaved rounds "
        f"after {meta['warmup']} warm-up rounds; load average at start {load}.",
        f"Command: `python benchmarks/bench_kernels.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    return "\n".join(header) + markdown_table(result["rows"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, few rounds, no compile (sanity run)")
    known, rest = parser.parse_known_args()
    if known.smoke:
        rest = ["--shape", "3,3,8,8", "--dtype", "fp32", "--rounds", "3", "--warmup", "1", "--no-compile", *rest]
    text = report(rest)
    with open(known.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
