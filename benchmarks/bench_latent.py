"""Latent text-to-image restoration: the one engine vs the old eager loop, and where the time goes.

One batch of ``B`` captioned images at ``sigma_min = 2.0`` (the anchors' text-to-image level),
CFG 3.5, Heun on the anchors' truncated global grid (30 points -> 15 steps left at 2.0, 29
network evaluations of 2B rows), per resolution. Modes, timed in interleaved rounds (so a
ratio survives a loaded machine):

- ``old-eager-loop``: **frozen baseline**, a copy of the deleted second engine's batch loop
  (``latent/restore.py``: ``LatentRestorer.restore_batch`` + ``restore_latents`` as of
  commit 145b9bb): VAE encode, caption encode, ``samplers.sample`` over the full 31-point
  global table (zero-length steps skipped on the host), VAE decode. Kept here only to
  measure against; nothing in the package runs it.
- ``engine-eager``: :class:`ambient_fast.restoration.RestorationSampler` with the latent
  stages (:mod:`ambient_fast.restoration.latent_stages`), what ``ambient-fast restore
  --diffusers`` runs: encode -> the K-step loop -> decode, eager.
- CUDA only: ``engine-compiled`` (``torch.compile`` of the per-step function,
  ``fullgraph=True``), ``engine-graph`` (the whole loop captured in one CUDA graph, eager
  steps inside), ``engine-compiled-graph`` (both).

Each mode's images are checked against the baseline's before timing. Reported per mode:
median seconds per batch, images/s, ratio to the baseline; and once per resolution the
stage times (host JPEG decode with PIL, tokenisation, text encoder, VAE encode, VAE decode)
and each stage's share of the ``engine-graph`` (CPU: ``engine-eager``) batch time, sampling
being the rest.

Models are random-weight configs built in code (nothing is downloaded): ``--size tiny`` the
tests' tiny pipeline (UNet 8/16 channels, 2-block VAE, 2-layer CLIP text encoder); ``--size
sd`` a Stable-Diffusion-shaped UNet (128/256/512, cross-attention 768), the SD VAE
architecture and a CLIP ViT-L/14-sized text encoder; or ``--diffusers PATH``.

Usage::

    python benchmarks/bench_latent.py --out /tmp/latent_cpu.md                     # CPU, tiny, 32 px
    python benchmarks/bench_latent.py --out /tmp/latent_gpu.md                     # CUDA: sd size, 256 px
    python benchmarks/bench_latent.py --resolutions 256,512 --out /tmp/latent_gpu.md  # and 512 px
    python benchmarks/bench_latent.py --smoke --out /tmp/latent_smoke.md           # wiring check (any device)
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import string
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from ambient_fast.core.noise import STREAM_RESTORE, derive_seeds, sample_normal
from ambient_fast.latent import (
    CaptionEncoder,
    DiffusersDenoiser,
    GuidedDenoiser,
    LatentCodec,
    LatentComponents,
    default_dtype,
    load_components,
)
from ambient_fast.latent.vae import to_uint8
from ambient_fast.restoration.latent_stages import LatentBatch, LatentSettings, latent_sampler
from ambient_fast.restoration.sampler import SamplerConfig, fill_host_batch
from ambient_fast.restoration.stages import GridSpec
from ambient_fast.samplers.edm import sample

SIGMA_MIN = 2.0  # anchors' text-to-image level (ANCHORS 1.3, 3.3)
GUIDANCE = 3.5  # anchors' restoration CFG scale
GLOBAL_POINTS = 30  # anchors' global grid: 15 Heun steps left at 2.0 -> 29 evaluations
MODES = ("old-eager-loop", "engine-eager", "engine-compiled", "engine-graph", "engine-compiled-graph")
CUDA_MODES = ("engine-compiled", "engine-graph", "engine-compiled-graph")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="markdown file to write the results to")
    parser.add_argument("--size", choices=("tiny", "sd"), default=None, help="model size (default: sd on CUDA)")
    parser.add_argument("--diffusers", default=None, help="local diffusers pipeline folder instead of random configs")
    parser.add_argument("--resolutions", default=None, help="comma list of image sizes (default 32 tiny / 256,512)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 8 tiny / 16)")
    parser.add_argument("--modes", default=None, help=f"comma list of {list(MODES)} (default: all the device runs)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (default 5)")
    parser.add_argument("--state-dtype", choices=("float32", "float64"), default="float32", help="sampler state")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--smoke", action="store_true", help="wiring check: tiny models, 16 px, batch 2, 1 round")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.smoke:
        args.size, args.resolutions, args.batch, args.rounds = "tiny", args.resolutions or "16", args.batch or 2, 1
    args.size = args.size or ("sd" if cuda else "tiny")
    args.batch = args.batch or (8 if args.size == "tiny" else 16)
    default_res = "32" if args.size == "tiny" else "256"
    args.resolutions = [int(r) for r in (args.resolutions or default_res).split(",")]
    args.modes = args.modes.split(",") if args.modes else [m for m in MODES if cuda or m not in CUDA_MODES]
    bad = [m for m in args.modes if m not in MODES]
    if bad or args.batch < 1 or args.rounds < 1:
        parser.error(f"unknown modes {bad}, or batch/rounds < 1")
    if not cuda and any(m in CUDA_MODES for m in args.modes):
        parser.error("compiled and CUDA-graph modes need a CUDA device")
    args.state_dtype = getattr(torch, args.state_dtype)
    return args


def char_tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def random_components(size: str, device: torch.device, dtype: torch.dtype) -> LatentComponents:
    """Random-weight models: the tests' tiny pipeline, or Stable-Diffusion-shaped ones."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tiny = size == "tiny"
    width = 16 if tiny else 768
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=100 if tiny else 49408, hidden_size=width, intermediate_size=(2 if tiny else 4) * width,
        num_hidden_layers=2 if tiny else 12, num_attention_heads=2 if tiny else 12,
        max_position_embeddings=16 if tiny else 77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=4, cross_attention_dim=width,
        layers_per_block=1 if tiny else 2, block_out_channels=(8, 16) if tiny else (128, 256, 512),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D") if tiny
        else ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D") if tiny
        else ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2 if tiny else 8, norm_num_groups=8 if tiny else 32,
    )
    vae_blocks = 2 if tiny else 4
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=(8,) * vae_blocks if tiny else (128, 256, 512, 512),
        layers_per_block=1 if tiny else 2, norm_num_groups=8 if tiny else 32,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks, up_block_types=("UpDecoderBlock2D",) * vae_blocks,
    )
    unet, vae, text_encoder = (m.to(device, dtype).eval().requires_grad_(False) for m in (unet, vae, text_encoder))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    encoder = CaptionEncoder([char_tokenizer(16 if tiny else 77)], [text_encoder])
    return LatentComponents(DiffusersDenoiser.from_scheduler(unet, scheduler), LatentCodec(vae), encoder)


# ----------------------------------------------------------------------------- frozen baseline
@torch.no_grad()
def old_eager_loop(
    components: LatentComponents,
    images: torch.Tensor,
    captions: list[str],
    sigma_min: torch.Tensor,
    seeds: torch.Tensor,
    state_dtype: torch.dtype,
) -> torch.Tensor:
    """FROZEN BASELINE (benchmark only): the deleted ``LatentRestorer.restore_batch`` +
    ``restore_latents`` loop of commit 145b9bb, every row restored, global grid."""
    latents = components.codec.encode(images)
    sizes = torch.tensor(images.shape[2:]).expand(images.shape[0], 2)
    cond = components.caption_encoder(captions, sizes).to(latents.device)
    uncond = components.caption_encoder.unconditional(sizes).to(latents.device)
    guided = GuidedDenoiser(components.denoiser, cond, uncond, GUIDANCE)
    seeds = seeds.to(latents.device)
    eps = sample_normal(seeds, latents.shape[1:], stream=STREAM_RESTORE, dtype=state_dtype)
    start = latents.to(state_dtype) + sigma_min.to(latents.device, state_dtype).view(-1, 1, 1, 1) * eps
    table = GridSpec("global", GLOBAL_POINTS).table(sigma_min, GLOBAL_POINTS)  # the full 31-point table
    restored = sample(guided, eps, table, method="heun", seeds=seeds, start=start)
    return to_uint8(components.codec.decode(restored.to(torch.float32)))


# ----------------------------------------------------------------------------- timing
def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], rounds: int, device: torch.device) -> float:
    fn()
    return statistics.median(timed(fn, device) for _ in range(rounds))


@torch.no_grad()
def bench_resolution(components: LatentComponents, res: int, args: argparse.Namespace, device: torch.device):
    batch = args.batch
    g = torch.Generator().manual_seed(res)
    images = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, generator=g)
    captions = [f"a photo of object {i} on a table" for i in range(batch)]
    sigma = torch.full((batch,), SIGMA_MIN, dtype=torch.float64)
    ids = torch.arange(batch)
    seeds = derive_seeds(ids, 0)
    grid = GridSpec("global", GLOBAL_POINTS)
    steps = grid.steps(sigma.numpy())
    context = LatentBatch(components.caption_encoder.tokenize(captions), seeds)
    if device.type == "cuda":  # as LatentStages.prepare does: pinned, so the copy does not wait
        context = LatentBatch(context.tokens.pin_memory(), context.seeds.pin_memory())

    runs: dict[str, Callable[[], torch.Tensor]] = {}
    for mode in args.modes:
        if mode == "old-eager-loop":
            dev_images = images.to(device)
            runs[mode] = lambda dev_images=dev_images: old_eager_loop(
                components, dev_images, captions, sigma, seeds, args.state_dtype
            )
            continue
        config = SamplerConfig(
            num_steps=steps,
            state_dtype=args.state_dtype,
            compile="default" if "compiled" in mode else "none",
            cuda_graph="graph" in mode if device.type == "cuda" else False,
        )
        sampler = latent_sampler(components, (res, res), batch, config, LatentSettings(guidance_scale=GUIDANCE))
        host = sampler.new_host_batch()  # what the driver does: one reused (pinned) host batch
        host.raw.copy_(images)
        host.context = context
        fill_host_batch(host, ids, sigma, grid=grid, seed=0)

        def run(sampler=sampler, host=host) -> torch.Tensor:
            sampler.submit(host)
            host.wait()
            return host.out.clone()

        runs[mode] = run

    reference = runs.get("old-eager-loop", next(iter(runs.values())))().cpu()
    agreement = {}
    for mode, run in runs.items():
        diff = (run().cpu().int() - reference.int()).abs()
        agreement[mode] = (float(diff.float().mean()), int(diff.max()))
        if agreement[mode][0] > 1.0:
            raise AssertionError(f"{mode} at {res} px differs from the baseline by {agreement[mode]} grey levels")
    times: dict[str, list[float]] = {mode: [] for mode in runs}
    for _ in range(args.rounds):  # interleaved rounds
        for mode, run in runs.items():
            times[mode].append(timed(run, device))
    medians = {mode: statistics.median(t) for mode, t in times.items()}

    # Stage times (the same calls the latent codec makes), once per resolution.
    jpegs = []
    for row in images:
        buffer = io.BytesIO()
        Image.fromarray(row.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    dev_images = images.to(device)
    sizes = torch.tensor([[res, res]]).expand(batch, 2)
    latents = components.codec.encode(dev_images)
    stages = {
        "host JPEG decode (PIL)": median_time(
            lambda: [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs], args.rounds, device
        ),
        "tokenize": median_time(lambda: components.caption_encoder.tokenize(captions), args.rounds, device),
        "text encoder": median_time(
            lambda: components.caption_encoder.encode(context.tokens, sizes), args.rounds, device
        ),
        "VAE encode": median_time(lambda: components.codec.encode(dev_images), args.rounds, device),
        "VAE decode": median_time(lambda: components.codec.decode(latents), args.rounds, device),
    }
    latent = "x".join(str(s) for s in latents.shape[2:])
    return {"res": res, "latent": latent, "steps": steps, "medians": medians, "agreement": agreement, "stages": stages}


def markdown(results: list[dict], args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"Device: {name}; torch {torch.__version__}; models `{args.diffusers or args.size}` in "
        f"{str(dtype).removeprefix('torch.')}; state {str(args.state_dtype).removeprefix('torch.')}; batch "
        f"{args.batch}; sigma_min {SIGMA_MIN}; CFG {GUIDANCE} (2B rows per call); Heun on the global grid "
        f"({GLOBAL_POINTS} points); medians of {args.rounds} interleaved rounds; threads {torch.get_num_threads()}.",
        f"Command: `python {' '.join(sys.argv)}`; load: `{load}`",
        "",
        "| px | latents | steps (NFE) | mode | s / batch | images/s | vs old-eager-loop | mean / max grey-level diff |",
        "|---:|---|---:|---|---:|---:|---:|---|",
    ]
    for r in results:
        base = r["medians"].get("old-eager-loop")
        for mode, seconds in r["medians"].items():
            ratio = f"{base / seconds:.2f}x" if base else "-"
            mean, worst = r["agreement"][mode]
            lines.append(
                f"| {r['res']} | {r['latent']} | {r['steps']} ({2 * r['steps'] - 1}) | {mode} | "
                f"{seconds:.4f} | {args.batch / seconds:.1f} | {ratio} | {mean:.3f} / {worst} |"
            )
    lines += ["", "| px | stage | s / batch | share of the engine's batch time |", "|---:|---|---:|---:|"]
    for r in results:
        whole_mode = next(m for m in ("engine-graph", "engine-eager") if m in r["medians"]) if any(
            m in r["medians"] for m in ("engine-graph", "engine-eager")) else None
        if whole_mode is None:
            continue
        whole = r["medians"][whole_mode] + r["stages"]["host JPEG decode (PIL)"] + r["stages"]["tokenize"]
        device_stages = sum(v for k, v in r["stages"].items() if k in ("text encoder", "VAE encode", "VAE decode"))
        for stage, seconds in r["stages"].items():
            lines.append(f"| {r['res']} | {stage} | {seconds:.4f} | {100 * seconds / whole:.1f}% |")
        sampling = max(0.0, r["medians"][whole_mode] - device_stages)
        lines.append(
            f"| {r['res']} | sampling ({whole_mode}, the rest) | {sampling:.4f} | {100 * sampling / whole:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = default_dtype(device)
    if args.diffusers:
        components = load_components(args.diffusers, device=device, dtype=dtype)
    else:
        components = random_components(args.size, device, dtype)
    results = [bench_resolution(components, res, args, device) for res in args.resolutions]
    text = markdown(results, args, device, dtype)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
