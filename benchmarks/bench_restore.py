"""Restoration throughput: ``restore_dataset`` vs the anchors' restorer, and sampler overhead.

One command per machine::

    python benchmarks/bench_restore.py --mode cpu            # this repo's CPU numbers
    python benchmarks/bench_restore.py --mode readers        # DALI CPU reader vs PIL reader (CPU)
    python benchmarks/bench_restore.py --mode gpu --out bench_restore_gpu.json   # H100/H200

(the full GPU sweep, with max-autotune compilation, can outlast a 10-minute device call:
split it with ``--networks``, ``--modes`` and ``--steps``, one ``--out`` file per call).

CPU mode: the digits demo (``ambient_fast.data.demo_dataset``, 1,797 8x8 images, 97%
blurred, sigma_min 1.0) restored with the demo-size ``unet-digits`` network at the anchors'
settings (18-level grid, Heun, 35 NFE): the anchors' loop (one image at a time, float64 state,
``benchmarks/baseline_anchor_restorer.py``) on the first ``--baseline-images`` corrupt images
vs ``restore_dataset`` on all of them. Both include PNG decode, encode and write. Agreement:
the same images restored by both, compared in model space (ours: float32 state) and as
written uint8 PNGs.

Readers mode (issue 12): 4,096 JPEG 64x64 RGB samples (quality 90) in 8 WebDataset shards
with captions, all at sigma_min 1.2, restored end to end (read, decode, sample, PNG encode,
tar write) with a small pixel UNet (``unet-tiny`` at 3 channels without attention) and a
one-point grid (NFE 1: the reader's share is what is measured), by the
DALI CPU reader and by the PIL reader in interleaved rounds; also the readers' decode alone
(the same batches, DALI's ``DALIImageDecoder`` vs PIL ``decode_image``). The ratio is read
from the best round of each.

GPU mode: for an EDM-CIFAR-10-size UNet (``unet-cifar10``, 3x32x32, 55.7 M parameters) and a
small latent-size UNet (4x32x32), batches 256-1024, K = 8/18/32 (Heun to 0: NFE 2K-1) and the
execution modes

- ``eager``: Python loop, fused step kernels;
- ``graph``: the whole K-step loop captured as one CUDA graph;
- ``compile+graph``: per-step function ``torch.compile(mode="max-autotune-no-cudagraphs")``
  inside our graph;
- ``reduce-overhead``: per-step function compiled with Inductor's CUDA-graph trees;

it reports images/s and NFE/s of the sampler on device-resident batches, the network-only
time at the same NFE (NFE forward passes in the same mode, graph-captured where the mode
captures), and the *sampler overhead* ``(end-to-end - network-only) / end-to-end`` (target
< 5%). Then the dataset-level rate (PNG folder in, PNG folder out, all overlapped) for the
best mode, and the anchors' loop on the same GPU and network for the >= 100x target.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline_anchor_restorer import anchor_restore_folder, anchor_restore_image  # noqa: E402

from ambient_fast.core.noise import STREAM_RESTORE, derive_seeds, sample_normal  # noqa: E402
from ambient_fast.core.precond import EDMPrecond  # noqa: E402
from ambient_fast.data import open_dataset  # noqa: E402
from ambient_fast.nn import build_network  # noqa: E402
from ambient_fast.restoration import RestorationSampler, SamplerConfig, float_codec, restore_dataset  # noqa: E402

MODES = {
    "eager": dict(compile="none", cuda_graph=False),
    "graph": dict(compile="none", cuda_graph=True),
    "compile+graph": dict(compile="max-autotune-no-cudagraphs", cuda_graph=True),
    "reduce-overhead": dict(compile="reduce-overhead", cuda_graph=False),
}
AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def random_denoiser(name: str, seed: int = 0, **kwargs) -> EDMPrecond:
    """EDM-preconditioned network with seeded weights (speed does not depend on training);
    residual branches are perturbed so the network is far from the identity."""
    torch.manual_seed(seed)
    net = build_network(name, dropout=0.0, **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return EDMPrecond(net).eval().requires_grad_(False)


def synthetic_folder(root: Path, n: int, shape: tuple[int, int, int], sigma_min: float = 1.2) -> Path:
    """An EDM folder of ``n`` random PNGs ``(C, H, W)``, all annotated ``sigma_min``."""
    from ambient_fast.data import Sample, write_dataset

    rng = np.random.default_rng(0)
    c, h, w = shape
    samples = (
        Sample(
            index=i,
            key=f"{i // 1000:05d}/img{i:08d}.png",
            array=rng.integers(0, 256, (h, w, c), dtype=np.uint8),
            sigma_min=sigma_min,
        )
        for i in range(n)
    )
    return write_dataset(root, "folder", samples, chunk_size=4096)


# ---------------------------------------------------------------------------------------------
# CPU


def demo_subset(root: Path, n: int) -> Path:
    """The first ``n`` samples of the blurred digits demo as their own folder version."""
    from ambient_fast.data import demo_dataset, write_dataset

    demo = open_dataset(demo_dataset(root / "demo", corruption="blur"))
    return write_dataset(root / f"demo-{n}", "folder", (demo.read(i) for i in range(n)), parent=demo)


def bench_cpu(args: argparse.Namespace) -> dict:
    """Interleaved rounds (anchor loop, then ours per precision); the best round of each is
    reported, the least disturbed by other load on a shared machine."""
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_restore_"))
    try:
        src = demo_subset(work, args.images)
        source = open_dataset(src)
        denoiser = random_denoiser("unet-digits")
        corrupt = np.flatnonzero(source.sigma_min > 0)[: args.baseline_images]
        anchor: list[dict] = []
        ours: dict[str, list] = {p: [] for p in args.precisions}
        for round_ in range(args.rounds):
            out = work / f"anchor-{round_}"
            cpu_start = time.process_time()
            base = anchor_restore_folder(denoiser, src, out, num_steps=18, seed=0, limit=args.baseline_images)
            base["cpu_seconds_per_image"] = (time.process_time() - cpu_start) / base["images"]
            anchor.append(base)
            for precision in args.precisions:
                dst = work / f"ours-{precision}-{round_}"
                cpu_start = time.process_time()
                report = restore_dataset(
                    denoiser,
                    src,
                    dst,
                    num_steps=18,
                    batch_size=args.batch_size,
                    precision=precision,
                    num_workers=args.workers,
                    progress=False,
                    seed=0,
                )
                ours[precision].append((report, (time.process_time() - cpu_start) / report.restored_this_run, dst))
        best_anchor = max(anchor, key=lambda r: r["images_per_second"])
        result = {
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), shared CPU",
            "network": f"unet-digits ({count_parameters(denoiser.net):,} parameters), 1x8x8",
            "dataset": f"digits demo, first {args.images} samples ({int((source.sigma_min > 0).sum())} blurred)",
            "rounds": args.rounds,
            "anchor_images": best_anchor["images"],
            "anchor_images_per_second": best_anchor["images_per_second"],
            "anchor_cpu_seconds_per_image": min(r["cpu_seconds_per_image"] for r in anchor),
            "ours": [],
        }
        for precision, runs in ours.items():
            report, _, dst = max(runs, key=lambda r: r[0].images_per_second)
            cpu_per_image = min(r[1] for r in runs)
            row = {
                "precision": precision,
                "batch_size": args.batch_size,
                "nfe_per_image": report.nfe_per_sample,
                "images": report.restored_this_run,
                "images_per_second": report.images_per_second,
                "nfe_per_second": report.nfe_per_second,
                "speedup": report.images_per_second / result["anchor_images_per_second"],
                "cpu_seconds_per_image": cpu_per_image,
                "speedup_cpu_time": result["anchor_cpu_seconds_per_image"] / cpu_per_image,
                **compare_with_anchor(denoiser, source, corrupt, dst, work / "anchor-0", precision),
            }
            result["ours"].append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def compare_with_anchor(
    denoiser, source, indices: np.ndarray, ours_dir: Path, anchor_dir: Path, precision: str
) -> dict:
    """Restore the same images with both (same start noise): max |difference| in model space
    (ours float32 state and ``precision``, anchor float64 state, fp32 network) and between
    the written uint8 PNGs."""
    images = torch.stack([torch.from_numpy(source.decode(int(i)).transpose(2, 0, 1).copy()) for i in indices])
    model = images.double() / 127.5 - 1
    sigma = torch.from_numpy(source.sigma_min[indices])
    ids = torch.from_numpy(indices)
    sampler = RestorationSampler(
        denoiser,
        tuple(images.shape[1:]),
        len(indices),
        SamplerConfig(num_steps=18, amp_dtype=AMP[precision]),
        codec=float_codec(torch.float64),
    )
    ours = sampler.restore(model, ids, sigma, seed=0)
    latents = sample_normal(derive_seeds(ids, 0), tuple(images.shape[1:]), stream=STREAM_RESTORE, dtype=torch.float64)
    anchor = torch.stack(
        [anchor_restore_image(denoiser, model[j], float(sigma[j]), latents[j]) for j in range(len(ids))]
    )
    ours_png = open_dataset(ours_dir)
    anchor_png = [np.asarray(Image.open(anchor_dir / source.keys[int(i)])) for i in indices]
    png_diff = max(
        int(np.abs(ours_png.decode(int(i))[:, :, 0].astype(int) - a.astype(int)).max())
        for i, a in zip(indices, anchor_png, strict=True)
    )
    return {
        "max_abs_diff_model_space": float((ours - anchor).abs().max()),
        "max_abs_diff_png_levels": png_diff,
        "compared_images": len(indices),
    }


# ---------------------------------------------------------------------------------------------
# GPU


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_sampler(
    denoiser, shape, batch: int, k: int, mode: str, precision: str, repeats: int, device: str = "cuda"
) -> dict:
    """Sampler throughput on device-resident batches (no file IO)."""
    config = SamplerConfig(num_steps=k, amp_dtype=AMP[precision], **MODES[mode])
    sampler = RestorationSampler(denoiser, shape, batch, config, codec=float_codec(torch.float32), device=device)
    host = sampler.new_host_batch()
    host.raw.normal_()
    ids = torch.arange(batch)
    from ambient_fast.restoration import GridSpec
    from ambient_fast.restoration.sampler import fill_host_batch

    fill_host_batch(host, ids, torch.full((batch,), 1.2, dtype=torch.float64), grid=GridSpec("per_sample", k), seed=0)
    for _ in range(2):  # capture / compile / autotune, then one clean replay
        sampler.submit(host)
        host.wait()
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        sampler.submit(host)
    host.wait()
    _sync()
    seconds = (time.perf_counter() - start) / repeats
    return {
        "seconds_per_batch": seconds,
        "images_per_second": batch / seconds,
        "nfe_per_second": batch * config.nfe / seconds,
        "nfe": config.nfe,
    }


def time_forward(
    denoiser, shape, batch: int, nfe: int, mode: str, precision: str, repeats: int, device: str = "cuda"
) -> float:
    """Seconds for ``nfe`` network evaluations at ``batch``, in the same execution mode."""
    x = torch.randn(batch, *shape, device=device)
    sigma = torch.full((batch,), 0.5, dtype=torch.float64, device=device)
    amp = AMP[precision]

    @torch.no_grad()
    def forward(inp):
        if amp is None:
            return denoiser(inp, sigma)
        with torch.autocast(torch.device(device).type, dtype=amp):
            return denoiser(inp, sigma).float()

    compile_mode = MODES[mode]["compile"]
    if compile_mode != "none":
        forward = torch.compile(forward, mode=compile_mode, fullgraph=True, dynamic=False)

    def run():
        out = x
        for _ in range(nfe):
            if compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            out = forward(x)
        return out

    for _ in range(3):
        run()
    _sync()
    if MODES[mode]["cuda_graph"]:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            run()
        run = graph.replay  # noqa: F811
    run()
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    _sync()
    return (time.perf_counter() - start) / repeats


def gpu_networks(names: list[str]) -> dict[str, tuple[EDMPrecond, tuple[int, int, int]]]:
    nets = {
        "cifar10": lambda: (random_denoiser("unet-cifar10"), (3, 32, 32)),
        "latent": lambda: (
            random_denoiser(
                "unet", channels=4, model_channels=64, channel_mult=(1, 2, 2), num_blocks=2, attention_levels=(1,)
            ),
            (4, 32, 32),
        ),
    }
    return {name: nets[name]() for name in names}


def bench_gpu(args: argparse.Namespace) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "precision": args.precision,
        "tf32": args.tf32,
        "sampler": [],
        "dataset": [],
        "anchor": [],
    }
    for name, (denoiser, shape) in gpu_networks(args.networks).items():
        denoiser = denoiser.cuda()
        params = count_parameters(denoiser.net)
        for batch in args.batch_sizes:
            for k in args.steps:
                for mode in args.modes:
                    row = {"network": name, "parameters": params, "batch": batch, "K": k, "mode": mode}
                    try:
                        timing = time_sampler(denoiser, shape, batch, k, mode, args.precision, args.repeats)
                        forward = time_forward(
                            denoiser, shape, batch, timing["nfe"], mode, args.precision, args.repeats
                        )
                        row.update(
                            timing,
                            network_seconds=forward,
                            overhead=(timing["seconds_per_batch"] - forward) / timing["seconds_per_batch"],
                        )
                    except Exception as err:  # noqa: BLE001 - record and go on with the sweep
                        row["error"] = f"{type(err).__name__}: {err}"
                    results["sampler"].append(row)
                    print(json.dumps(row), flush=True)
        work = Path(tempfile.mkdtemp(prefix="bench_restore_gpu_"))
        try:
            src = synthetic_folder(work / "src", args.dataset_images, shape) if shape[0] in (1, 3) else None
            if src is not None:
                for mode in args.dataset_modes:
                    report = restore_dataset(
                        denoiser,
                        src,
                        work / f"out-{mode}",
                        num_steps=18,
                        batch_size=max(args.batch_sizes),
                        precision=args.precision,
                        progress=False,
                        num_workers=args.workers,
                        **MODES[mode],
                    )
                    row = {
                        "network": name,
                        "mode": mode,
                        "images": report.restored_this_run,
                        "images_per_second": report.images_per_second,
                        "nfe_per_second": report.nfe_per_second,
                    }
                    results["dataset"].append(row)
                    print(json.dumps(row), flush=True)
                base = anchor_restore_folder(denoiser, src, work / "anchor", num_steps=18, limit=args.baseline_images)
                best = max((r["images_per_second"] for r in results["dataset"] if r["network"] == name), default=0.0)
                row = {"network": name, **base, "speedup_of_best_dataset_mode": best / base["images_per_second"]}
                results["anchor"].append(row)
                print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return results


# ---------------------------------------------------------------------------------------------
# Readers (CPU): DALI CPU pipeline vs PIL


def jpeg_shards(root: Path, n: int, shards: int, size: int, quality: int = 90) -> Path:
    """``n`` random-texture JPEG ``size x size`` RGB samples with captions in ``shards`` tars."""
    import io
    import tarfile

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per = -(-n // shards)
    lines = []
    base = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as archive:
            for i in range(s * per, min(n, (s + 1) * per)):
                # smooth content (upsampled noise) + fine noise, so the JPEGs have realistic sizes
                img = np.kron(np.roll(base, i, axis=0), np.ones((4, 4, 1), dtype=np.uint8))
                img = np.clip(img.astype(int) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(img).save(buffer, format="JPEG", quality=quality)
                for name, data in ((f"s{i:06d}.jpg", buffer.getvalue()), (f"s{i:06d}.txt", f"sample {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
                lines.append(json.dumps({"filename": f"s{i:06d}", "sigma_min": 1.2}))
    (root / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return root


def bench_readers(args: argparse.Namespace) -> dict:
    """End-to-end restore images/s and decode-only images/s, DALI CPU reader vs PIL, interleaved."""
    import os

    from ambient_fast.data import decode_image
    from ambient_fast.data.dali_pipeline import DALIImageDecoder

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_readers_"))
    try:
        src = jpeg_shards(work / "src", args.reader_images, args.reader_shards, args.reader_size)
        source = open_dataset(src)
        denoiser = random_denoiser("unet-tiny", channels=3, attention_levels=())
        encoded = [source.read_bytes(i) for i in range(len(source))]
        batch = args.batch_size
        decoder = DALIImageDecoder(batch, 3, (args.reader_size, args.reader_size), num_threads=args.workers)
        rows: dict[str, list[dict]] = {"dali": [], "pil": []}
        decode: dict[str, list[float]] = {"dali": [], "pil": []}
        for round_ in range(args.rounds):
            for reader in ("dali", "pil"):
                start = time.perf_counter()
                for a in range(0, len(encoded), batch):
                    chunk = encoded[a : a + batch]
                    if reader == "dali":
                        decoder.decode(chunk)
                    else:
                        from concurrent.futures import ThreadPoolExecutor

                        with ThreadPoolExecutor(args.workers) as pool:
                            list(pool.map(lambda d: decode_image(d, "bench", 3), chunk))
                decode[reader].append(len(encoded) / (time.perf_counter() - start))
                dst = work / f"{reader}-{round_}"
                wall = time.perf_counter()
                report = restore_dataset(
                    denoiser,
                    src,
                    dst,
                    num_steps=args.reader_steps,
                    batch_size=batch,
                    reader=reader,
                    num_workers=args.workers,
                    shard_size=len(source) // args.reader_shards,
                    progress=False,
                )
                wall = time.perf_counter() - wall
                rows[reader].append(
                    {
                        "images_per_second": report.images_per_second,
                        "wall_images_per_second": report.restored_this_run / wall,
                        "nfe_per_sample": report.nfe_per_sample,
                    }
                )
                shutil.rmtree(dst)
        best = {r: max(v, key=lambda x: x["images_per_second"]) for r, v in rows.items()}
        result = {
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), {args.workers} IO threads",
            "load_average": os.getloadavg(),
            "network": f"unet-tiny at 3 channels, no attention ({count_parameters(denoiser.net):,} parameters)",
            "dataset": f"{len(source)} JPEG {args.reader_size}x{args.reader_size} RGB q90 in {args.reader_shards} "
            f"WebDataset shards ({sum(map(len, encoded)) / len(encoded):.0f} B mean), all at sigma_min 1.2",
            "rounds": args.rounds,
            "batch_size": batch,
            "restore": {r: {"best": best[r], "rounds": rows[r]} for r in rows},
            "restore_ratio_dali_over_pil": best["dali"]["images_per_second"] / best["pil"]["images_per_second"],
            "decode_images_per_second": {r: max(v) for r, v in decode.items()},
            "decode_ratio_dali_over_pil": max(decode["dali"]) / max(decode["pil"]),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("auto", "cpu", "gpu", "readers"), default="auto")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--workers", type=int, default=4, help="IO threads of restore_dataset")
    parser.add_argument("--baseline-images", type=int, default=32, help="images the anchors' loop restores")
    cpu = parser.add_argument_group("cpu")
    cpu.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: shared CI machines)")
    cpu.add_argument("--batch-size", type=int, default=512)
    cpu.add_argument("--images", type=int, default=1024, help="demo samples restored by ours per round")
    cpu.add_argument("--rounds", type=int, default=3)
    cpu.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=tuple(AMP))
    rd = parser.add_argument_group("readers")
    rd.add_argument("--reader-images", type=int, default=4096)
    rd.add_argument("--reader-shards", type=int, default=8)
    rd.add_argument("--reader-size", type=int, default=64)
    rd.add_argument("--reader-steps", type=int, default=1, help="grid points (Heun to 0: NFE 2K-1)")
    gpu = parser.add_argument_group("gpu")
    gpu.add_argument("--networks", nargs="+", default=["cifar10", "latent"], choices=("cifar10", "latent"))
    gpu.add_argument("--batch-sizes", nargs="+", type=int, default=[256, 1024])
    gpu.add_argument("--steps", nargs="+", type=int, default=[8, 18, 32])
    gpu.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    gpu.add_argument("--dataset-modes", nargs="+", default=["graph"], choices=list(MODES))
    gpu.add_argument("--dataset-images", type=int, default=8192)
    gpu.add_argument("--precision", choices=tuple(AMP), default="bf16")
    gpu.add_argument("--tf32", action="store_true", help="allow TF32 (fp32 precision only)")
    gpu.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    mode = args.mode if args.mode != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    result = {"gpu": bench_gpu, "readers": bench_readers}.get(mode, bench_cpu)(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
