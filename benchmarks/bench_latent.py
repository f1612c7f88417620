"""Latent text-to-image restoration throughput: VAE + text encoder + guided sampling.

What is timed, per resolution (256 px -> 32x32 latents, 512 px -> 64x64), for one batch of
``B`` captioned images at ``sigma_min = 2.0`` (the anchors' text-to-image level), CFG on
(scale 3.5, one network call of 2B rows), Heun on a 15-step per-sample grid (29 network
evaluations, the count the anchors' truncated global grid has at 2.0):

- ``text``: caption encoding (conditional rows; the unconditional row is cached);
- ``vae_encode`` / ``vae_decode``: the VAE in its compute dtype;
- ``sampling``, one row per mode:
  ``latent-eager`` (:func:`ambient_fast.latent.restore_latents`, what
  ``restore_latent_shards`` runs), and the restoration engine
  (:class:`ambient_fast.restoration.sampler.RestorationSampler`) around the same
  :class:`~ambient_fast.latent.GuidedDenoiser`: ``engine-eager``, ``engine-compiled``
  (``torch.compile`` of the per-step function, ``fullgraph=True``) and ``engine-graph``
  (compiled + the whole K-step loop captured in one CUDA graph).

Each mode's output is checked against ``latent-eager`` before it is timed. Reported: median
seconds per stage, images/s of the whole pipeline with that sampling mode, network
evaluations/s (rows through the denoiser network), and each stage's share of the time.

Models are random-weight configs built in code (nothing is downloaded): a small SD-style
UNet (channels 128/256/512, cross-attention 768), the Stable Diffusion VAE architecture, and a
CLIP ViT-L/14-sized text encoder with a character-level tokenizer; or ``--diffusers PATH``, a
local pipeline folder.

Usage::

    python benchmarks/bench_latent.py --out benchmarks/results/latent_gpu.md          # CUDA
    python benchmarks/bench_latent.py --smoke --out /tmp/bench_latent_smoke.md       # CPU sanity
"""

from __future__ import annotations

import argparse
import platform
import statistics
import string
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ambient_fast.core.noise import derive_seeds
from ambient_fast.latent import (
    CaptionEncoder,
    DiffusersDenoiser,
    GuidedDenoiser,
    LatentCodec,
    LatentComponents,
    default_dtype,
    load_components,
    restore_latents,
)
from ambient_fast.restoration.sampler import RestorationSampler, SamplerConfig, float_codec

SIGMA_MIN = 2.0  # anchors' text-to-image level (ANCHORS 1.3, 3.3)
GUIDANCE = 3.5  # anchors' restoration CFG scale
NUM_STEPS = 15  # Heun steps left on the anchors' global grid at 2.0 -> 29 evaluations
RESOLUTIONS = (256, 512)
MODES = ("latent-eager", "engine-eager", "engine-compiled", "engine-graph")


@dataclass
class Row:
    resolution: int
    mode: str
    text: float
    vae_encode: float
    sampling: float
    vae_decode: float
    batch: int
    evaluations: int

    @property
    def total(self) -> float:
        return self.text + self.vae_encode + self.sampling + self.vae_decode


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="markdown file to write the results to")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 16 px, eager modes only (CPU sanity)")
    parser.add_argument("--diffusers", default=None, help="local diffusers pipeline folder instead of random configs")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 16; smoke 2)")
    parser.add_argument("--modes", default=None, help=f"comma list of {list(MODES)} (default all on CUDA)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5; smoke 1)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.batch = args.batch or (2 if args.smoke else 16)
    args.reps = args.reps or (1 if args.smoke else 5)
    default_modes = MODES if cuda and not args.smoke else ("latent-eager", "engine-eager")
    args.modes = args.modes.split(",") if args.modes else list(default_modes)
    bad = [m for m in args.modes if m not in MODES]
    if bad or args.batch < 1 or args.reps < 1:
        parser.error(f"unknown modes {bad}, or batch/reps < 1")
    if not cuda and any(m in ("engine-compiled", "engine-graph") for m in args.modes):
        parser.error("compiled and CUDA-graph modes need a CUDA device")
    args.resolutions = (16,) if args.smoke else RESOLUTIONS
    return args


def char_tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def random_components(smoke: bool, device: torch.device, dtype: torch.dtype) -> LatentComponents:
    """Random-weight models of realistic (or, for ``smoke``, tiny) size."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    width = 16 if smoke else 768
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=100 if smoke else 49408, hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=2 if smoke else 12, num_attention_heads=2 if smoke else 12,
        max_position_embeddings=16 if smoke else 77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=4, cross_attention_dim=width,
        layers_per_block=1 if smoke else 2, block_out_channels=(8, 16) if smoke else (128, 256, 512),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D") if smoke
        else ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D") if smoke
        else ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2 if smoke else 8, norm_num_groups=8 if smoke else 32,
    )
    vae_channels = (8, 8, 8, 8) if smoke else (128, 256, 512, 512)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
        layers_per_block=1 if smoke else 2, norm_num_groups=8 if smoke else 32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    unet, vae, text_encoder = (m.to(device, dtype).eval().requires_grad_(False) for m in (unet, vae, text_encoder))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    encoder = CaptionEncoder([char_tokenizer(16 if smoke else 77)], [text_encoder])
    return LatentComponents(DiffusersDenoiser.from_scheduler(unet, scheduler), LatentCodec(vae), encoder)


def median_seconds(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``reps`` calls after one untimed call (synchronised)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def engine(
    mode: str, guided: GuidedDenoiser, shape: tuple[int, ...], batch: int, device: torch.device
) -> RestorationSampler:
    """The restoration engine around ``guided`` in one of the ``engine-*`` modes."""
    compiled = mode in ("engine-compiled", "engine-graph")
    config = SamplerConfig(
        num_steps=NUM_STEPS,
        compile="default" if compiled else "none",
        cuda_graph=mode == "engine-graph",
        state_dtype=torch.float32,
    )
    return RestorationSampler(guided, shape, batch, config, codec=float_codec(torch.float32), device=device)


@torch.no_grad()
def bench_resolution(components: LatentComponents, resolution: int, args: argparse.Namespace,
                     device: torch.device) -> list[Row]:
    batch = args.batch
    g = torch.Generator().manual_seed(resolution)
    images = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8, generator=g).to(device)
    captions = [f"a photo of object {i} on a table" for i in range(batch)]
    sizes = torch.tensor([[resolution, resolution]]).expand(batch, 2)
    sigma = torch.full((batch,), SIGMA_MIN, dtype=torch.float64, device=device)
    ids = torch.arange(batch)
    seeds = derive_seeds(ids, 0)  # what the engine derives from (run seed 0, sample id)
    encoder, codec = components.caption_encoder, components.codec

    text = median_seconds(lambda: encoder(captions, sizes), args.reps, device)
    vae_encode = median_seconds(lambda: codec.encode(images), args.reps, device)
    latents = codec.encode(images)
    guided = GuidedDenoiser(components.denoiser, encoder(captions, sizes), encoder.unconditional(sizes), GUIDANCE)

    def latent_eager() -> torch.Tensor:
        return restore_latents(guided, latents, sigma, seeds, schedule="per_sample", num_steps=NUM_STEPS,
                               state_dtype=torch.float32)

    reference = latent_eager()
    vae_decode = median_seconds(lambda: codec.decode(reference), args.reps, device)
    evaluations = (2 * NUM_STEPS - 1) * 2 * batch  # Heun to 0, CFG doubles the rows
    rows = []
    for mode in args.modes:
        if mode == "latent-eager":
            run = latent_eager
        else:
            sampler = engine(mode, guided, tuple(latents.shape[1:]), batch, device)
            raw = latents.to("cpu", torch.float32)

            def run(sampler=sampler, raw=raw) -> torch.Tensor:
                return sampler.restore(raw, ids, sigma.cpu(), sigma_floor=0.002)

        error = float((run().to(device) - reference).abs().max())
        if error > 5e-2 * max(1.0, float(reference.abs().max())):
            raise AssertionError(f"{mode} at {resolution} px differs from latent-eager by {error}")
        rows.append(Row(resolution, mode, text, vae_encode, median_seconds(run, args.reps, device),
                        vae_decode, batch, evaluations))
    return rows


def markdown(rows: list[Row], args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    lines = [
        "# Latent text-to-image restoration throughput",
        "",
        f"Device: {name}; torch {torch.__version__}; compute dtype {str(dtype).removeprefix('torch.')}; "
        f"batch {args.batch}; sigma_min {SIGMA_MIN}; CFG {GUIDANCE} (2B rows per call); Heun, "
        f"{NUM_STEPS} steps ({2 * NUM_STEPS - 1} evaluations); median of {args.reps}.",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        "| px | latents | mode | text s | VAE enc s | sampling s | VAE dec s | images/s | network rows/s "
        "| text % | VAE % | sampling % |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        def share(part: float, total: float = r.total) -> str:
            return f"{100 * part / total:.1f}"

        lines.append(
            f"| {r.resolution} | {r.resolution // 8}x{r.resolution // 8} | {r.mode} | {r.text:.4f} | "
            f"{r.vae_encode:.4f} | {r.sampling:.4f} | {r.vae_decode:.4f} | {r.batch / r.total:.2f} | "
            f"{r.evaluations / r.sampling:.0f} | {share(r.text)} | {share(r.vae_encode + r.vae_decode)} | "
            f"{share(r.sampling)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = default_dtype(device)
    if args.smoke:
        torch.set_num_threads(1)
    if args.diffusers:
        components = load_components(args.diffusers, device=device, dtype=dtype)
    else:
        components = random_components(args.smoke, device, dtype)
    rows = [row for res in args.resolutions for row in bench_resolution(components, res, args, device)]
    text = markdown(rows, args, device, dtype)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
