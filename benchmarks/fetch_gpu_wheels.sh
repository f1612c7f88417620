#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the pure-Python wheels the GPU image lacks, into
# .whl/ (git-ignored), for benchmarks/run_gpu.sh to install there with --no-index.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl pytorch-fid diffusers
ls -la .whl
