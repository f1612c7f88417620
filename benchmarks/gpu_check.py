"""CUDA-graph restoration equals eager restoration bit for bit, at CIFAR-10 size.

The restoration engine captures its whole K-step loop as one CUDA graph; replaying it runs the
kernels the eager loop launches on the same buffers, so the restored batch must be identical
to the last bit (``tests/test_restoration_gpu.py`` checks this on small denoisers; here the
EDM CIFAR-10 UNet, 55.7 M parameters, cuDNN convolutions, K = 18 Heun, fp32 and bf16
autocast). A dry run (CPU, no graphs) restores twice eagerly with the demo-size network and
checks that those agree.

    python benchmarks/gpu_check.py OUTDIR [--dry-run]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import Results, stage_args, sync  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__.splitlines()[0], argv, batch=(int, 64, "images per batch"))
    import torch
    from bench_restore import AMP, random_denoiser

    from ambient_fast.restoration import RestorationSampler, SamplerConfig, float_codec

    cuda = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if cuda else "cpu"
    name, shape, batch, steps = (
        ("unet-cifar10", (3, 32, 32), args.batch, 18) if cuda else ("unet-digits", (1, 8, 8), 4, 3)
    )
    torch.backends.cudnn.benchmark = False  # fixed algorithm choice: eager and replay use the same kernels
    denoiser = random_denoiser(name).to(device)
    results = Results(
        args.outdir,
        "graph_check",
        "CUDA-graph restoration vs eager (bit for bit)",
        ["network", "precision", "batch", "K", "first", "second", "identical", "max_abs_diff"],
    )
    raw = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(batch)
    sigma_min = torch.linspace(0.3, 2.0, batch, dtype=torch.float64)
    failures = 0
    for precision in ("fp32", "bf16"):
        outputs = {}
        pair = ("eager", "graph") if cuda else ("eager", "eager again")
        for label in pair:
            config = SamplerConfig(num_steps=steps, amp_dtype=AMP[precision], cuda_graph=label == "graph")
            sampler = RestorationSampler(
                denoiser, shape, batch, config, codec=float_codec(torch.float32), device=device
            )
            outputs[label] = sampler.restore(raw, ids, sigma_min, seed=3)
            sync()
        first, second = (outputs[k] for k in pair)
        identical = bool(torch.equal(first, second))
        failures += not identical
        results.add(
            network=name,
            precision=precision,
            batch=batch,
            K=steps,
            first=pair[0],
            second=pair[1],
            identical=identical,
            max_abs_diff=(first.double() - second.double()).abs().max().item(),
        )
    if not cuda:
        results.note("no CUDA (or dry run): graph capture not exercised; two eager runs compared")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
