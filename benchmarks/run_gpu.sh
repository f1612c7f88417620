#!/usr/bin/env bash
# Check and time everything on a GPU machine in one command (see benchmarks/RESULTS.md,
# "GPU run: how to").
#
#   bash benchmarks/run_gpu.sh [check|bench|all] [--dry-run] OUTDIR [gpu_run.py options]
#   bash benchmarks/run_gpu.sh dali-part [--dry-run] OUTDIR
#
# check|bench|all (default all): benchmarks/gpu_run.py runs the stages (install, env, GPU tests,
# compute-sanitizer, graph == eager, kernel / restoration / training benchmarks, DALI,
# latent), each with its own time budget inside a 510 s total (--budget S), skipping what is
# missing; OUTDIR gets summary.json, summary.md, results.md and stages.tar.gz, refreshed as
# results come in. Options after OUTDIR go to gpu_run.py (--only a,b reruns stages, --skip,
# --budget, --work).
#
# dali-part: stores the DALI parts carried in .dali/<k>/ (made here by
# benchmarks/fetch_gpu_wheels.sh --dali) under $AMBIENT_DALI_STORE (default
# /var/tmp/ambient_fast_dali, kept while the machine stays warm); once all parts are there
# it checks them, reassembles and installs DALI, then runs the dali stage.
#
# --dry-run: the same logic on CPU with tiny sizes (CI: tests/test_gpu_script.py).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
mode=all
dry=()
case ${1:-} in check|bench|all|dali-part) mode=$1; shift ;; esac
if [[ ${1:-} == --dry-run ]]; then dry=(--dry-run); shift; fi
if [[ $# -lt 1 || ${1:-} == -* ]]; then
    sed -n '2,20p' "$0" >&2
    exit 2
fi
outdir=$1
shift
mkdir -p "$outdir"

if [[ $mode != dali-part ]]; then
    exec "$py" benchmarks/gpu_run.py "$mode" "$outdir" "${dry[@]}" "$@"
fi

# --- dali-part --------------------------------------------------------------------------------
store=${AMBIENT_DALI_STORE:-/var/tmp/ambient_fast_dali}
mkdir -p "$store/parts"
shopt -s nullglob
carried=("${AMBIENT_DALI_PARTS:-.dali}"/*/dali.tar.*)
for part in "${carried[@]}"; do
    cp "$part" "$store/parts/"
    cp "$(dirname "$part")/SHA256SUMS" "$store/parts/SHA256SUMS"
    echo "stored $(basename "$part") ($(du -h "$part" | cut -f1))"
done
if [[ ! -f $store/parts/SHA256SUMS ]]; then
    echo "dali-part: no part carried and none stored; carry .dali/1 (see fetch_gpu_wheels.sh --dali)" >&2
    exit 2
fi
cd "$store/parts"
if ! sha256sum --quiet --check --ignore-missing SHA256SUMS; then
    echo "dali-part: a stored part is corrupt; removed, carry it again" >&2
    sha256sum --check --ignore-missing SHA256SUMS 2>/dev/null | grep -v ': OK$' | cut -d: -f1 | xargs -r rm -f
    exit 1
fi
missing=()
while read -r _ name; do [[ -f $name ]] || missing+=("$name"); done <SHA256SUMS
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "dali-part: have $(($(wc -l <SHA256SUMS) - ${#missing[@]})) of $(wc -l <SHA256SUMS) parts; next carry the folder of ${missing[0]}"
    exit 0
fi
if [[ ! -f $store/installed ]]; then
    rm -rf "$store/wheels" "$store/site"
    mkdir -p "$store/wheels"
    cat $(awk '{print $2}' SHA256SUMS | sort) | tar -xf - -C "$store/wheels" || exit 1
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$store/site" "$store"/wheels/*.whl || exit 1
    # nvImageCodec ships nvidia/__init__.py: without it nvidia/ stays a namespace package that
    # merges with the image's nvidia/ folders (CUDA libraries) instead of hiding them.
    rm -f "$store/site/nvidia/__init__.py"
    rm -rf "$store/wheels"
    touch "$store/installed"
fi
cd - >/dev/null
PYTHONPATH="$store/site${PYTHONPATH:+:$PYTHONPATH}" "$py" -c "import nvidia.dali as d; print('DALI', d.__version__)" || exit 1
export AMBIENT_DALI_STORE=$store
# nvJPEG came as a wheel too: its library is where the image's loader may not look.
export LD_LIBRARY_PATH="$store/site/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$py" benchmarks/gpu_run.py bench "$outdir" --only dali "${dry[@]}" "$@"
