"""One training step at CIFAR-10 size: EDM-style eager fp32 vs ``torch.compile`` + bf16 + fused loss.

The step is loss, backward and an Adam update on the EDM CIFAR-10 UNet (``unet-cifar10``,
batch 128 by default: EDM trains CIFAR-10 at 512 over 8 GPUs, 64 per GPU, and 512 on one
device could exceed its memory), ambient annotations as in ``benchmarks/bench_compat.py`` (whose
anchor-style loss, batch and network builders this reuses):

- ``EDM-style eager fp32``: the anchors' per-element loss written eagerly (``bench_compat``);
- ``ambient_fast eager fp32, fused loss``: ``compat.EDMAmbientLoss(reduction="per_sample")``,
  whose per-sample reduction is the fused Triton op;
- ``ambient_fast compile + bf16 + fused loss``: the same loss under ``torch.autocast(bf16)``
  compiled with ``fullgraph=True`` (a graph break fails the row: the fused op must be traced
  through, at the real network's size).

Variants are timed in interleaved rounds (median). Each variant's loss on the first batch is
compared with the anchor-style loss for the same fresh noise.

    python benchmarks/gpu_train.py OUTDIR [--dry-run] [--batch 128] [--repeats 10]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import Results, stage_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = stage_args(
        __doc__.splitlines()[0], argv, batch=(int, 128, "training batch"), repeats=(int, 10, "timed rounds")
    )
    import torch
    import torch._inductor.config
    from bench_compat import anchor_training_loss, make_net, time_variants, training_batch

    from ambient_fast.compat import EDMAmbientLoss

    # Compiled graphs draw their noise with torch's generator, as eager does: same seed, same numbers.
    torch._inductor.config.fallback_random = True
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    preset, batch, repeats, warmup = ("unet-cifar10", args.batch, args.repeats, 3) if cuda else ("unet-tiny", 4, 1, 1)
    torch.backends.cudnn.benchmark = cuda
    net = make_net(preset, device)
    images, noise, sigma, sigma_min, sigma_max = training_batch(batch, device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-5)
    fused = EDMAmbientLoss(reduction="per_sample", validate=False)
    data = dict(images=images, sigma=sigma, sigma_min=sigma_min, sigma_max=sigma_max, noise=noise)

    def anchor() -> torch.Tensor:
        # Per-sample sums, as EDMAmbientLoss(reduction="per_sample") returns them.
        return anchor_training_loss(net, images, noise, sigma, sigma_min, sigma_max).flatten(1).sum(1)

    def fused_fp32() -> torch.Tensor:
        return fused(net=net, **data)

    def fused_bf16() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fused(net=net, **data).float()

    variants = [("EDM-style eager fp32", anchor), ("ambient_fast eager fp32, fused loss", fused_fp32)]
    if cuda:
        variants.append(("ambient_fast compile + bf16 + fused loss", torch.compile(fused_bf16, fullgraph=True)))
    results = Results(
        args.outdir,
        "train",
        f"Training step (loss + backward + Adam), {preset}, batch {batch}",
        ["variant", "ms_per_step", "images_per_second", "speedup", "loss_rel_diff", "error"],
    )
    if not cuda:
        results.note("dry run / no CUDA: tiny network; the compiled bf16 variant runs on CUDA only")

    def step(loss_of):
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_of().mean().backward()
            optimizer.step()

        return run

    # Same fresh noise for every variant: compare each loss with the anchor-style one (first batch).
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(1)
    reference = anchor().mean().item()
    usable, rel = [], {}
    for name, fn in variants:
        try:
            torch.manual_seed(1)
            rel[name] = abs(fn().mean().item() - reference) / abs(reference)
            usable.append((name, fn))
        except Exception as err:  # noqa: BLE001 - a graph break or compile failure is a result
            results.add(variant=name, error=f"{type(err).__name__}: {err}"[:500])
    net.load_state_dict(state)
    timed = time_variants([(name, step(fn)) for name, fn in usable], device, warmup, repeats)
    base = timed[variants[0][0]][0]
    for name, (seconds, _) in timed.items():
        results.add(
            variant=name,
            ms_per_step=seconds * 1e3,
            images_per_second=batch / seconds,
            speedup=base / seconds,
            loss_rel_diff=rel[name],
        )
    return 0 if len(usable) == len(variants) else 1


if __name__ == "__main__":
    sys.exit(main())
