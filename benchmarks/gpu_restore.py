"""Restoration images/s at CIFAR-10 size: the anchors' restorer vs the engine's execution modes.

EDM CIFAR-10 UNet (``unet-cifar10``, 55.7 M parameters, random weights: speed does not depend
on training), 3x32x32, K = 18 (Heun to 0, 35 network evaluations per image):

- ``anchor``: the anchors' loop (``benchmarks/baseline_anchor_restorer.py``): batch 1, float64
  state, fp32 network, one image at a time;
- the engine (``RestorationSampler``, device-resident batches of 256 and 512, bf16 autocast):
  ``eager`` (Python loop, fused steps), ``graph`` (the K-step loop as one CUDA graph),
  ``compiled`` (per-step function under ``torch.compile``), ``compiled+graph`` (both).

For eager and graph the sampler overhead is ``(end-to-end - network only) / end-to-end``, the
network timed alone for the same NFE in the same mode (target < 5%). Rows are written as they
are measured, fastest-to-measure first (compiling the UNet takes a minute or more), so a
budget cut loses only the last modes. Timing helpers are ``benchmarks/bench_restore.py``'s.

    python benchmarks/gpu_restore.py OUTDIR [--dry-run] [--batches 256,512] [--repeats 3]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import Results, stage_args, sync  # noqa: E402

# Execution modes beyond bench_restore's (whose compiled modes autotune for minutes).
EXTRA_MODES = {
    "compiled": dict(compile="default", cuda_graph=False),
    "compiled+graph": dict(compile="default", cuda_graph=True),
}


def main(argv: list[str] | None = None) -> int:
    args = stage_args(
        __doc__.splitlines()[0],
        argv,
        batches=(str, "256,512", "comma list of batch sizes"),
        repeats=(int, 3, "timed batches per mode"),
        anchor_images=(int, 4, "images the anchors' loop restores"),
        precision=(str, "bf16", "engine network precision: fp32 | bf16 | fp16"),
    )
    import bench_restore
    import torch
    from baseline_anchor_restorer import anchor_restore_image

    bench_restore.MODES.update(EXTRA_MODES)
    cuda = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if cuda else "cpu"
    if cuda:
        name, shape, steps = "unet-cifar10", (3, 32, 32), 18
        batches = [int(b) for b in args.batches.split(",")]
        plan = [("eager", b) for b in batches] + [("graph", b) for b in batches]
        plan += [("compiled", batches[-1]), ("compiled+graph", batches[-1])]
        repeats, anchor_images = args.repeats, args.anchor_images
    else:
        name, shape, steps = "unet-digits", (1, 8, 8), 3
        plan, repeats, anchor_images = [("eager", 4)], 1, 1
    torch.backends.cudnn.benchmark = cuda
    denoiser = bench_restore.random_denoiser(name).to(device)
    nfe = 2 * steps - 1
    results = Results(
        args.outdir,
        "restore",
        f"Restoration, {name} {'x'.join(map(str, shape))}, K={steps} (NFE {nfe})",
        [
            "mode",
            "batch",
            "precision",
            "images_per_second",
            "nfe_per_second",
            "seconds_per_batch",
            "network_seconds",
            "sampler_overhead",
            "vs_anchor",
        ],
    )

    # The anchors' restorer: one image at a time, float64 state (first image is a warm-up).
    image = torch.rand(*shape, device=device, dtype=torch.float64) * 2 - 1
    latents = torch.randn(*shape, device=device, dtype=torch.float64)
    anchor_restore_image(denoiser, image, 1.2, latents, num_steps=steps)
    sync()
    start = time.perf_counter()
    for _ in range(anchor_images):
        anchor_restore_image(denoiser, image, 1.2, latents, num_steps=steps)
    sync()
    anchor_rate = anchor_images / (time.perf_counter() - start)
    results.add(
        mode="anchor",
        batch=1,
        precision="fp32 net, fp64 state",
        images_per_second=anchor_rate,
        nfe_per_second=anchor_rate * nfe,
        vs_anchor=1.0,
    )

    failures = 0
    for mode, batch in plan:
        row = dict(mode=mode, batch=batch, precision=args.precision)
        try:
            timing = bench_restore.time_sampler(denoiser, shape, batch, steps, mode, args.precision, repeats, device)
            row.update(
                images_per_second=timing["images_per_second"],
                nfe_per_second=timing["nfe_per_second"],
                seconds_per_batch=timing["seconds_per_batch"],
                vs_anchor=timing["images_per_second"] / anchor_rate,
            )
            if mode in ("eager", "graph"):
                forward = bench_restore.time_forward(
                    denoiser, shape, batch, timing["nfe"], mode, args.precision, repeats, device
                )
                row.update(
                    network_seconds=forward,
                    sampler_overhead=(timing["seconds_per_batch"] - forward) / timing["seconds_per_batch"],
                )
        except Exception as err:  # noqa: BLE001 - record the failure and go on with the next mode
            failures += 1
            row["error"] = f"{type(err).__name__}: {err}"[:500]
        results.add(**row)
    if not cuda:
        results.note("dry run / no CUDA: tiny network, eager only (graph and compiled modes need CUDA)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
