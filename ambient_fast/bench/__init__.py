"""Benchmarks that ship with the package (``ambient-fast bench kernels``); the repository's
``benchmarks/`` scripts are thin callers of these."""
