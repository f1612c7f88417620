"""Input-pipeline throughput: DALI vs a torch DataLoader (PIL decode) on the same data.

Builds one image set (crops of scikit-image's bundled photos, PNG, ``--size`` px square,
RGB) in the three image formats (folder, zip, WebDataset tar shards), then times full
epochs of

- ``dali``:        ``build_dali_pipeline`` in epoch order (folder -> fn.readers.file,
                   tar -> fn.readers.webdataset, zip -> external_source),
- ``dali+noise1st``: DALI fed by ``NoiseFirstBatchSampler`` through external_source,
- ``torch``:       ``make_torch_loader`` (torch DataLoader, PIL decode in workers),

each with a centre crop to ``--crop``, random flip, [-1, 1] NCHW float32 output. Reports
the median images/s over ``--repeats`` epochs (after one warm-up epoch) and the DALI/torch
ratio. ``--gpu`` decodes with ``device="mixed"`` (nvJPEG/nvImageCodec) and moves the torch
batches to the GPU for a like-for-like comparison.

``--train`` instead times ``ambient_fast.loops.train`` itself (noise-level-first batches, the
ambient loss, Adam, EMA) on the folder set at its stored size, reading through the three
training inputs: the in-memory cache (``cache="on"``), the DALI stream and the torch
DataLoader stream (``num_workers=--threads``), in interleaved rounds; steady-state training
images/s (the first log interval, with pipeline start-up, left out) and the ratios.

    python benchmarks/bench_data.py --n 4096 --size 64 --crop 56 --batch 256 --threads 2
    python benchmarks/bench_data.py --gpu --threads 8
    python benchmarks/bench_data.py --train --n 4096 --size 64 --batch 256 --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_images(root: Path, n: int, size: int, seed: int) -> dict[str, Path]:
    """``n`` random ``size``-px crops of skimage's photos in folder, zip and tar formats."""
    from skimage import data as skdata

    from ambient_fast.data import Sample, write_dataset

    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        photo = photos[i % len(photos)]
        top = int(rng.integers(0, photo.shape[0] - size))
        left = int(rng.integers(0, photo.shape[1] - size))
        sigma_min = 0.0 if rng.random() < 0.1 else 1.2
        samples.append(
            Sample(
                index=i,
                key=f"{i // 1000:05d}/img{i:08d}",
                array=np.ascontiguousarray(photo[top : top + size, left : left + size]),
                sigma_min=sigma_min,
                label=i % 10,
            )
        )
    paths = {}
    for fmt in ("folder", "zip", "webdataset"):
        chunk = 1024 if fmt == "webdataset" else 4096
        wds_samples = (
            samples
            if fmt != "webdataset"
            else [
                Sample(index=s.index, key=s.key.replace("/", "_"), array=s.array, sigma_min=s.sigma_min, label=s.label)
                for s in samples
            ]
        )
        paths[fmt] = write_dataset(root / fmt, fmt, wds_samples, chunk_size=chunk)
    return paths


def time_epochs(make_loader, repeats: int, device: str) -> tuple[float, list[float]]:
    """Median images/s over ``repeats`` timed epochs after one warm-up epoch."""
    loader = make_loader()
    rates = []
    for epoch in range(repeats + 1):
        count = 0
        start = time.perf_counter()
        for batch in loader:
            images = batch.images.to(device, non_blocking=True) if device != "cpu" else batch.images
            count += images.shape[0]
        if device != "cpu":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if epoch > 0:
            rates.append(count / elapsed)
    return statistics.median(rates), rates


def bench_training(path: Path, args: argparse.Namespace, device: str) -> dict:
    """Interleaved rounds of ``train()`` per input backend; median steady-state images/s."""
    from ambient_fast.loops.train import train

    backends = {
        "cache": dict(cache="on"),
        "dali": dict(cache="off", stream="dali", loader_threads=args.threads),
        "torch": dict(cache="off", stream="torch", loader_workers=args.threads),
    }
    steps = max(8, args.train_steps)
    rates: dict[str, list[float]] = {name: [] for name in backends}
    losses: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        for name, kwargs in backends.items():
            with tempfile.TemporaryDirectory() as tmp:
                result = train(
                    path, tmp, network=args.network, batch_size=args.batch, total_images=steps * args.batch,
                    log_every=steps // 4, checkpoint_images=steps * args.batch, progress=False, device=device,
                    resume=False, **kwargs,
                )
            assert result.input_backend == name
            steady = [r["images_per_second"] for r in result.log[1:]]
            rates[name].append(statistics.mean(steady))
            losses[name] = [r["loss"] for r in result.log]
            print(f"round {round_} {name:6s} {rates[name][-1]:9.0f} img/s", flush=True)
    same = all(losses[name] == losses["cache"] for name in backends)
    row = {name: statistics.median(r) for name, r in rates.items()}
    row.update({f"{name}_runs": r for name, r in rates.items()}, same_loss_curves=same)
    print()
    print("| input | training img/s (median) | runs | / cache |")
    print("|---|---:|---|---:|")
    for name in backends:
        print(f"| {name} | {row[name]:.0f} | {[round(r) for r in rates[name]]} | {row[name] / row['cache']:.2f} |")
    print(f"identical loss curves across inputs: {same}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096, help="images in the set")
    parser.add_argument("--size", type=int, default=64, help="stored image side (px)")
    parser.add_argument("--crop", type=int, default=56, help="model resolution (centre crop, px)")
    parser.add_argument("--batch", type=int, default=256, help="batch size")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads = torch DataLoader workers")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per configuration")
    parser.add_argument("--formats", default="folder,zip,webdataset")
    parser.add_argument("--gpu", action="store_true", help="decode on the GPU (DALI device='mixed')")
    parser.add_argument("--data", type=Path, default=None, help="reuse/build the image set here")
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    parser.add_argument("--train", action="store_true", help="time train() per input backend instead of epochs")
    parser.add_argument("--rounds", type=int, default=3, help="--train: interleaved rounds")
    parser.add_argument("--train-steps", type=int, default=16, help="--train: optimiser steps per run")
    parser.add_argument("--network", default="mlp-small", help="--train: network preset")
    args = parser.parse_args()

    from ambient_fast.data import build_dali_pipeline, make_noise_first_sampler, make_torch_loader, open_dataset

    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    root = args.data or Path(tempfile.mkdtemp(prefix="bench_data_"))
    if all((root / f / "manifest.json").is_file() for f in ("folder", "zip", "webdataset")):
        paths = {f: root / f for f in ("folder", "zip", "webdataset")}
    else:
        t0 = time.perf_counter()
        paths = build_images(root, args.n, args.size, seed=0)
        print(f"built {args.n} {args.size}px PNGs in 3 formats in {time.perf_counter() - t0:.1f}s at {root}")

    meta = {
        "machine": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    if args.train:
        torch.set_num_threads(args.threads)
        row = bench_training(paths["folder"], args, device)
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "train": row}, indent=1))
        return

    common = dict(resolution=args.crop, crop="center", flip=True)
    dali_device = "mixed" if args.gpu else "cpu"
    results = []
    for fmt in args.formats.split(","):
        dataset = open_dataset(paths[fmt])
        configs = {
            "dali": lambda dataset=dataset: build_dali_pipeline(
                dataset, batch_size=args.batch, device=dali_device, num_threads=args.threads, **common
            ),
            "dali+noise1st": lambda dataset=dataset: build_dali_pipeline(
                dataset,
                batch_sampler=make_noise_first_sampler(dataset, args.batch),
                device=dali_device,
                num_threads=args.threads,
                **common,
            ),
            # spawn: this process also runs DALI's thread pools, which a fork would inherit.
            "torch": lambda dataset=dataset: make_torch_loader(
                dataset,
                batch_size=args.batch,
                num_workers=args.threads,
                pin_memory=args.gpu,
                multiprocessing_context="spawn",
                **common,
            ),
        }
        row = {"format": fmt}
        for name, make in configs.items():
            median, rates = time_epochs(make, args.repeats, device)
            row[name] = median
            row[name + "_runs"] = rates
            print(f"{fmt:10s} {name:14s} median {median:9.0f} img/s   runs {[round(r) for r in rates]}", flush=True)
        row["ratio_dali_torch"] = row["dali"] / row["torch"]
        results.append(row)

    print()
    header = ["format", f"DALI {dali_device} (img/s)", "DALI + noise-first (img/s)", "torch DataLoader+PIL (img/s)"]
    print("| " + " | ".join(header + ["DALI / torch"]) + " |")
    print("|---|---:|---:|---:|---:|")
    for row in results:
        rates = " | ".join(f"{row[name]:.0f}" for name in ("dali", "dali+noise1st", "torch"))
        print(f"| {row['format']} | {rates} | {row['ratio_dali_torch']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
