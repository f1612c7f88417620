#!/usr/bin/env bash
# Download, here (where the package registry is reachable), the wheels the GPU machine's image
# lacks, for benchmarks/run_gpu.sh to install there with --no-index (see benchmarks/RESULTS.md,
# "GPU run: how to").
#
#   bash benchmarks/fetch_gpu_wheels.sh            # .whl/: diffusers, pytorch-fid (+ deps), ~7 MB
#   bash benchmarks/fetch_gpu_wheels.sh --dali     # also .dali/1 .. .dali/N: DALI in < 60 MiB parts
#
# The image (python 3.12, torch 2.11, triton 3.6, numpy, scipy, pillow, safetensors,
# transformers, huggingface-hub, hypothesis, scikit-*, matplotlib, tqdm, pybind11) has every
# other import of the package, its tests and benchmarks. Each device command carries at most
# 64 MiB with the working tree, so .whl/ goes with the main command and each DALI part
# (a split tar of DALI's wheels, ~235 MB) with a command of its own; every part folder holds
# the SHA256SUMS of all parts, so the machine can tell when it has them all.
#
# Env: PART_SIZE (split -b size, default 58M: 60.8 MB plus a ~1.5 MB working tree stays
# under 64 MiB), PIP (default: python3 -m pip).
set -euo pipefail
cd "$(dirname "$0")/.."
dali=0
for arg in "$@"; do
    case $arg in
        --dali) dali=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "fetch_gpu_wheels.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done
pip=${PIP:-python3 -m pip}
part_size=${PART_SIZE:-58M}
# The GPU image's interpreter: CPython 3.12 on manylinux x86-64 (pip matches each tag exactly).
platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
target=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]/#/--platform=}")

# Missing from the image, pinned to what this repository is tested with. diffusers also needs
# importlib_metadata (not in the image); the rest of its and pytorch-fid's needs are there.
BASE=(diffusers==0.42.1 pytorch-fid==0.3.0 importlib_metadata==10.2.0)
# DALI 2.4 (CUDA 13) and what it imports; nvImageCodec + nvJPEG for device="mixed" decode.
# Left out: nvTIFF / nvCOMP / nvJPEG2000 (TIFF, inflate, JPEG 2000: not used here, 35 MB).
DALI=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43
      astunparse==1.6.3 gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0)

rm -rf .whl && mkdir -p .whl
$pip download -q "${target[@]}" -d .whl "${BASE[@]}"
echo "== .whl/ ($(du -sh .whl | cut -f1)): carry it with every run_gpu.sh command"
ls -l .whl

if [[ $dali == 1 ]]; then
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    $pip download -q "${target[@]}" -d "$stage/wheels" "${DALI[@]}"
    (cd "$stage/wheels" && tar -cf ../dali.tar ./*.whl)
    (cd "$stage" && split -b "$part_size" -d -a 1 dali.tar dali.tar. && sha256sum dali.tar.? >SHA256SUMS)
    rm -rf .dali
    n=0
    for part in "$stage"/dali.tar.?; do
        n=$((n + 1))
        mkdir -p ".dali/$n"
        mv "$part" ".dali/$n/"
        cp "$stage/SHA256SUMS" ".dali/$n/"
    done
    echo "== .dali/: $n parts of DALI's wheels ($(du -sh .dali | cut -f1)); carry .dali/1 .. .dali/$n, one per command"
    ls -l .dali/*
fi
