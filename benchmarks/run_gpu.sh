#!/usr/bin/env bash
# Build, check and time everything on a GPU machine in one call (see benchmarks/RESULTS.md).
#
#   bash benchmarks/run_gpu.sh [check|bench|all]     (default: all)
#
# Written for the lent H100/H200 image (python3 with torch + triton + pybind11, no network):
# the package is installed without dependencies or build isolation; pytorch-fid and diffusers
# come from wheels in .whl/ (made here by benchmarks/fetch_gpu_wheels.sh and carried along).
# DALI's wheel (~200 MB) does not fit the transfer limit, so DALI GPU decode is checked only
# where nvidia.dali imports. Results land in $OUT (or benchmarks/out), a table per suite.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
out=${OUT:-benchmarks/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=python3
status=0
run() {  # run NAME CMD...: log to $out/NAME.log, keep going on failure, remember it
    local name=$1; shift
    echo "=== $name: $*"
    if ! "$@" 2>&1 | tee "$out/$name.log"; then echo "!!! $name FAILED"; status=1; fi
}

# Install: wheels first (if carried), then the package with its C++ extension.
if ls .whl/*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
run install $py -m pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"

if [[ $stage == check || $stage == all ]]; then
    # The kernels un-interpreted, graph capture, DALI mixed decode: every gpu-marked test, then
    # the full kernel suite on CUDA (CI only runs it under TRITON_INTERPRET=1).
    run gpu_tests $py -m pytest -q -m gpu tests -p no:cacheprovider
    run kernel_tests $py -m pytest -q tests/test_kernels_triton.py tests/test_restoration_gmm.py -p no:cacheprovider
    if command -v compute-sanitizer >/dev/null; then
        run sanitizer compute-sanitizer --tool memcheck --error-exitcode 9 \
            $py benchmarks/bench_kernels.py --smoke --out "$out/sanitizer_kernels.md"
    fi
fi

if [[ $stage == bench || $stage == all ]]; then
    run bench_kernels $py benchmarks/bench_kernels.py --out "$out/kernels.md"
    run bench_restore $py benchmarks/bench_restore.py --mode gpu --out "$out/restore.json"
    run bench_compat $py benchmarks/bench_compat.py --gpu --write "$out/compat.md"
    run bench_latent $py benchmarks/bench_latent.py --out "$out/latent.md"
    if $py -c "import nvidia.dali" 2>/dev/null; then
        run bench_data $py benchmarks/bench_data.py --gpu --json "$out/data.json"
    fi
fi
echo "=== done (status $status); results in $out"
exit $status
