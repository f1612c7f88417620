"""Latent text-to-image restoration on the one engine (issues #9, #12): adapter, guidance, the
latent stages around the captured sampler vs the reference per sample, the driver (JPEG caption
shards in and out, torchrun ranks, a real kill and resume), the CLI.

Ground truth: a conditional Gaussian ``x0 | c ~ N(mu(c), Sigma)`` whose exact VP eps (v, sample)
predictor is written below as a tiny module with the diffusers call signature
``model(sample, timestep, encoder_hidden_states).sample``; its EDM-space exact denoiser is
``mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu)`` (SPEC 7). End-to-end tests use tiny randomly
initialised diffusers/transformers models built from configs and saved as a local pipeline
folder; the tokenizer is a character-level CLIP BPE (one token per character) built offline.
"""

from __future__ import annotations

import io
import json
import os
import string
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ambient_fast.core.noise import STREAM_RESTORE, derive_seeds, sample_normal
from ambient_fast.data import Sample, dali_available, open_dataset, to_uint8_image, write_dataset
from ambient_fast.latent import (
    Conditioning,
    DiffusersDenoiser,
    GuidedDenoiser,
    LatentCodec,
    load_components,
    sigma_to_timestep,
    vp_log_sigmas,
)
from ambient_fast.latent.vae import to_uint8
from ambient_fast.restoration import restore_dataset, staging_folder
from ambient_fast.restoration.latent_stages import LatentBatch, LatentSettings, latent_restoration, latent_sampler
from ambient_fast.restoration.sampler import RestorationSampler, SamplerConfig
from ambient_fast.restoration.stages import GridSpec, float_codec
from ambient_fast.samplers import restore
from ambient_fast.samplers.edm import sample

from .gaussian import random_spd
from .test_restoration_dataset import kill_after_first_shard, tree_bytes

T = 1000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sd_alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's schedule (scaled_linear 0.00085 -> 0.012, 1000 steps)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def wide_alphas_cumprod() -> torch.Tensor:
    """A linear schedule whose grid spans sigma ~0.001 .. ~150 (covers 0.002 .. 80)."""
    betas = torch.linspace(1e-6, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


class GaussianVPModel(nn.Module):
    """Exact VP predictor of ``x0 | c ~ N(W mean_L(c), Sigma)`` on ``(B, 4, 2, 2)`` latents.

    Timesteps are continuous: ``alphas_cumprod`` is linearly interpolated in ``t`` (the
    model's own extension between its training timesteps, independent of the adapter's).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str, cond_dim: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dim = 16
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64))
        self.proj = nn.Parameter(torch.randn(self.dim, cond_dim, dtype=torch.float64, generator=g), requires_grad=False)
        self.register_buffer("cov", random_spd(self.dim, g))
        self.prediction = prediction

    def mean(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return encoder_hidden_states.to(torch.float64).mean(1) @ self.proj.T

    def edm_denoise(self, x: torch.Tensor, sigma: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Closed-form ``E[x0 | x0 + sigma eps = x, c]`` (SPEC 7), float64."""
        mu = self.mean(encoder_hidden_states)
        eig, vec = torch.linalg.eigh(self.cov)
        z = (x.reshape(x.shape[0], -1).to(torch.float64) - mu) @ vec
        shrink = eig / (eig + sigma.to(torch.float64).reshape(-1, 1) ** 2)
        return (mu + (z * shrink) @ vec.T).reshape(x.shape)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        t = timestep.to(torch.float64).clamp(0, T - 1)
        lo = t.floor().long().clamp(max=T - 2)
        w = t - lo
        ab = (1 - w) * self.alphas_cumprod[lo] + w * self.alphas_cumprod[lo + 1]
        a, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
        x0 = self.edm_denoise(sample / a, (s / a).flatten(), encoder_hidden_states)
        eps = (sample - a * x0) / s
        out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[self.prediction]
        return SimpleNamespace(sample=out)


def random_conditioning(batch: int, length: int = 3, dim: int = 8, seed: int = 1) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning({"encoder_hidden_states": torch.randn(batch, length, dim, dtype=torch.float64, generator=g)})


# ---------------------------------------------------------------------------------------
# Adapter: the diffusers VP network seen as an EDM denoiser (SPEC 1).


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("mapping", ["nearest", "interpolated"])
def test_adapter_is_exact_on_the_model_grid(prediction, mapping):
    ab = sd_alphas_cumprod()
    model = GaussianVPModel(ab, prediction)
    denoiser = DiffusersDenoiser(model, ab, prediction, timestep_mapping=mapping)
    steps = torch.tensor([0, 1, 17, 250, 500, 731, 998, 999])
    sigma = vp_log_sigmas(ab)[steps].exp()
    cond = random_conditioning(len(steps))
    x = torch.randn(len(steps), 4, 2, 2, dtype=torch.float64) * (1 + sigma.view(-1, 1, 1, 1))
    got = denoiser(x, sigma, cond)
    want = model.edm_denoise(x, sigma, cond.kwargs["encoder_hidden_states"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_adapter_interpolated_error_is_second_order(prediction):
    """Off the grid (log-midpoints), nearest is off by half a step; interpolation by far less.

    The adapter interpolates t linearly in log sigma, the model extends its schedule
    linearly in alpha_bar: both agree on the grid and differ at second order in the step,
    so the interpolated error is at least 10x below the nearest-step error (typically 100x;
    the ratio is largest at the first timesteps, where sigma ~ sqrt(t) curves most).
    """
    ab = sd_alphas_cumprod()
    model = GaussianVPModel(ab, prediction)
    log_sigmas = vp_log_sigmas(ab)
    steps = torch.arange(5, T - 1, 37)
    sigma = (0.5 * (log_sigmas[steps] + log_sigmas[steps + 1])).exp()
    cond = random_conditioning(len(steps))
    x = torch.randn(len(steps), 4, 2, 2, dtype=torch.float64) * (1 + sigma.view(-1, 1, 1, 1))
    want = model.edm_denoise(x, sigma, cond.kwargs["encoder_hidden_states"])
    err = {}
    for mapping in ("nearest", "interpolated"):
        denoiser = DiffusersDenoiser(model, ab, prediction, timestep_mapping=mapping)
        err[mapping] = (denoiser(x, sigma, cond) - want).abs().amax(dim=(1, 2, 3))
    assert bool((err["nearest"] > 0).all())
    ratio = (err["interpolated"] / err["nearest"]).detach()
    assert float(ratio.max()) < 0.1 and float(ratio.median()) < 0.02, ratio
    assert float(err["interpolated"].max()) < 1e-4


def test_sigma_to_timestep_mapping():
    ab = sd_alphas_cumprod()
    log_sigmas = vp_log_sigmas(ab)
    on_grid = log_sigmas[torch.tensor([0, 3, 400, 999])].exp()
    for mapping in ("nearest", "interpolated"):
        torch.testing.assert_close(
            sigma_to_timestep(on_grid, log_sigmas, mapping), torch.tensor([0.0, 3, 400, 999], dtype=torch.float64)
        )
    mid = (0.25 * log_sigmas[10] + 0.75 * log_sigmas[11]).exp().reshape(1)
    interpolated = sigma_to_timestep(mid, log_sigmas, "interpolated")
    torch.testing.assert_close(interpolated, torch.tensor([10.75], dtype=torch.float64))
    assert float(sigma_to_timestep(mid, log_sigmas, "nearest")) == 11.0
    outside = torch.tensor([1e-4, 1e3], dtype=torch.float64)
    assert sigma_to_timestep(outside, log_sigmas, "interpolated").tolist() == [0.0, 999.0]
    dense = torch.logspace(-3, 2, 500, dtype=torch.float64)
    assert bool((sigma_to_timestep(dense, log_sigmas).diff() >= 0).all())


def test_adapter_sigma_table_stays_float64_when_cast():
    ab = sd_alphas_cumprod()
    denoiser = DiffusersDenoiser(GaussianVPModel(ab, "epsilon"), ab).to(torch.float32)
    table = denoiser.edm.vp_net.log_sigmas
    assert table.dtype == torch.float64 and torch.equal(table, vp_log_sigmas(ab))
    assert denoiser.model.proj.dtype == torch.float32


def test_adapter_reads_the_scheduler_config():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
    )
    model = GaussianVPModel(torch.as_tensor(scheduler.alphas_cumprod), "v_prediction")
    from_object = DiffusersDenoiser.from_scheduler(model, scheduler)
    from_config = DiffusersDenoiser.from_scheduler(model, dict(scheduler.config))
    assert from_object.prediction_type == from_config.prediction_type == "v_prediction"
    ab0 = float(scheduler.alphas_cumprod[0])
    assert from_config.sigma_min == pytest.approx(((1 - ab0) / ab0) ** 0.5)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiffusersDenoiser.from_scheduler(model, {"_class_name": "FlowMatchEulerDiscreteScheduler"})


# ---------------------------------------------------------------------------------------
# Classifier-free guidance and per-sample conditioning.


def test_guidance_scale_one_is_the_conditional_model():
    ab = sd_alphas_cumprod()
    denoiser = DiffusersDenoiser(GaussianVPModel(ab, "epsilon"), ab)
    cond, uncond = random_conditioning(3, seed=1), random_conditioning(3, seed=2)
    x, sigma = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.tensor([0.1, 1.0, 5.0], dtype=torch.float64)
    assert torch.equal(GuidedDenoiser(denoiser, cond, uncond, 1.0)(x, sigma), denoiser(x, sigma, cond))


def test_guidance_is_one_batched_call_equal_to_separate_passes():
    ab = sd_alphas_cumprod()
    calls = []

    class Counting(GaussianVPModel):
        def forward(self, sample, timestep, encoder_hidden_states):
            calls.append(sample.shape[0])
            return super().forward(sample, timestep, encoder_hidden_states)

    denoiser = DiffusersDenoiser(Counting(ab, "epsilon"), ab)
    cond, uncond = random_conditioning(3, seed=1), random_conditioning(3, seed=2)
    x, sigma = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.tensor([0.1, 1.0, 5.0], dtype=torch.float64)
    guided = GuidedDenoiser(denoiser, cond, uncond, 3.5)(x, sigma)
    assert calls == [6]
    d_cond, d_uncond = denoiser(x, sigma, cond), denoiser(x, sigma, uncond)
    torch.testing.assert_close(guided, d_uncond + 3.5 * (d_cond - d_uncond), rtol=0, atol=1e-12)


def test_mixed_conditioning_batch_gives_each_sample_its_own():
    ab = sd_alphas_cumprod()
    model = GaussianVPModel(ab, "epsilon")
    denoiser = DiffusersDenoiser(model, ab)
    cond, uncond = random_conditioning(4, seed=1), random_conditioning(4, seed=2)
    x, sigma = torch.randn(4, 4, 2, 2, dtype=torch.float64), torch.tensor([0.3, 0.3, 2.0, 7.0], dtype=torch.float64)
    batched = GuidedDenoiser(denoiser, cond, uncond, 2.0)(x, sigma)
    for i in range(4):
        row = torch.tensor([i])
        alone = GuidedDenoiser(denoiser, cond.select(row), uncond.select(row), 2.0)(x[row], sigma[row])
        torch.testing.assert_close(batched[row], alone, rtol=0, atol=1e-12)
    assert not torch.allclose(batched[0], batched[1])  # same x and sigma, different captions


def test_guided_update_keeps_buffers_in_place():
    ab = sd_alphas_cumprod()
    denoiser = DiffusersDenoiser(GaussianVPModel(ab, "epsilon"), ab)
    guided = GuidedDenoiser(denoiser, random_conditioning(2, seed=1), random_conditioning(2, seed=2), 3.0)
    address = guided.conditioning.kwargs["encoder_hidden_states"].data_ptr()
    new_cond, new_uncond = random_conditioning(2, seed=3), random_conditioning(2, seed=4)
    guided.update(new_cond, new_uncond)
    assert guided.conditioning.kwargs["encoder_hidden_states"].data_ptr() == address
    x, sigma = torch.randn(2, 4, 2, 2, dtype=torch.float64), torch.tensor([0.5, 1.5], dtype=torch.float64)
    torch.testing.assert_close(guided(x, sigma), GuidedDenoiser(denoiser, new_cond, new_uncond, 3.0)(x, sigma))
    with pytest.raises(ValueError, match="rows"):
        guided.update(random_conditioning(3), random_conditioning(3))


def test_conditioning_structure():
    cond = Conditioning({"a": torch.arange(3.0), "added": {"b": torch.ones(3, 2), "c": None}})
    assert cond.batch_size == 3
    both = Conditioning.interleave([cond, cond.select(torch.tensor([2, 0, 1]))])
    assert both.batch_size == 6 and both.kwargs["added"]["c"] is None
    assert both.kwargs["a"].tolist() == [0, 2, 1, 0, 2, 1]
    flat = both.flatten()
    assert sorted(flat) == ["a", "added/b"]
    rebuilt = both.with_tensors({name: t + 1 for name, t in flat.items()})
    assert rebuilt.kwargs["a"].tolist() == [1, 3, 2, 1, 3, 2] and rebuilt.kwargs["added"]["c"] is None
    other = Conditioning({"a": torch.tensor([9.0, 8.0, 7.0]), "added": {"b": torch.zeros(3, 2), "c": None}})
    rebuilt.copy_rows_(other, 1, 2)  # rows 1, 3, 5: the second of each pair
    assert rebuilt.kwargs["a"].tolist() == [1, 9, 2, 8, 3, 7]
    with pytest.raises(ValueError, match="batch size"):
        Conditioning({"a": torch.ones(2), "b": torch.ones(3)})


# ---------------------------------------------------------------------------------------
# Grids and the latent restoration loop (SPEC 5, ANCHORS 3.3).


def anchor_t2i_grid(sigma_tn: float, steps: int = 30) -> list[float]:
    """ANCHORS 3.3 written literally: global grid, last t >= sigma_tn overwritten, truncated."""
    ramp = np.arange(steps) / (steps - 1)
    t = list((80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7) + [0.0]
    last = max(i for i, v in enumerate(t) if v >= sigma_tn)
    t[last] = sigma_tn
    return t[last:]


def scaled_denoiser(x, sigma):
    """Closed-form D of N(0, I) data (SPEC 7): ``x / (1 + sigma^2)``."""
    return x / (1 + sigma.view(-1, *([1] * (x.dim() - 1))).to(x.dtype) ** 2)


def test_global_grid_in_the_engine_costs_the_anchors_evaluations():
    """sigma_tn = 2.0 keeps 15 steps (ANCHORS 3.3): the captured loop makes 2*15 - 1 network calls."""
    assert len(anchor_t2i_grid(2.0)) - 1 == 15
    calls = []

    def denoiser(x, sigma):
        calls.append(x.shape[0])
        return scaled_denoiser(x, sigma)

    grid = GridSpec("global", 30)
    steps = grid.steps(np.array([2.0, 2.0]))
    config = SamplerConfig(num_steps=steps)
    sampler = RestorationSampler(denoiser, (4, 2, 2), 2, config, codec=float_codec(torch.float32))
    sampler.restore(torch.zeros(2, 4, 2, 2), torch.tensor([0, 1]), torch.tensor([2.0, 2.0]), grid=grid)
    assert steps == 15 and calls == [2] * 29


def test_global_grid_mixed_levels_match_each_alone():
    """A batch mixing levels (shorter rows left-padded with zero-length steps) gives each sample
    exactly its own run's result."""
    grid = GridSpec("global", 30)
    levels = torch.tensor([2.0, 0.3, 1.2], dtype=torch.float64)
    y0 = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    ids = torch.tensor([5, 6, 7])

    def run(rows):
        steps = grid.steps(levels[rows].numpy())
        config = SamplerConfig(num_steps=steps, state_dtype=torch.float64, backend="torch")
        sampler = RestorationSampler(scaled_denoiser, (4, 2, 2), len(rows), config, codec=float_codec(torch.float64))
        return sampler.restore(y0[rows], ids[rows], levels[rows], seed=3, grid=grid)

    batched = run([0, 1, 2])
    for i in range(3):
        assert torch.equal(batched[i : i + 1], run([i]))


def test_guided_adapter_restoration_recovers_the_data_distribution():
    """Exact VP model -> adapter -> deterministic global-grid restoration: N(mu, Sigma + sm^2)
    is transported back to N(mu, Sigma) (SPEC 7), per caption."""
    ab = wide_alphas_cumprod()
    model = GaussianVPModel(ab, "epsilon")
    denoiser = DiffusersDenoiser(model, ab)
    n, sm = 4000, 1.5
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 3, 8, dtype=torch.float64, generator=g).expand(n, 3, 8)
    cond = Conditioning({"encoder_hidden_states": hidden})
    mu = model.mean(cond.kwargs["encoder_hidden_states"][:1])[0]
    chol = torch.linalg.cholesky(model.cov)
    x0 = mu + torch.randn(n, 16, dtype=torch.float64, generator=g) @ chol.T
    guided = GuidedDenoiser(denoiser, cond, cond, 1.0)
    levels = torch.full((n,), sm, dtype=torch.float64)
    grid = GridSpec("global", 30)
    eps = torch.randn(n, 4, 2, 2, dtype=torch.float64, generator=g)
    start = x0.reshape(n, 4, 2, 2) + sm * eps
    out = sample(guided, eps, grid.table(levels, grid.steps(levels.numpy())), start=start)
    flat = out.reshape(n, -1)
    centred = flat - flat.mean(0)
    cov = centred.T @ centred / (n - 1)
    assert float((flat.mean(0) - mu).abs().max()) < 0.08
    assert float((cov - model.cov).abs().max()) < 0.1  # the data's own Monte-Carlo error here: 0.048


# ---------------------------------------------------------------------------------------
# Tiny diffusers pipeline (random weights, built offline) and the end-to-end path.


def tiny_tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ".,!?'-":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_text_encoder(hidden: int = 16, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=projection or hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=16,
    ).eval()


def tiny_unet(**extra):
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    return UNet2DConditionModel(**{**config, **extra}).eval()


def save_pipeline(root: Path, class_name: str, parts: dict[str, object]) -> Path:
    index = {"_class_name": class_name}
    for name, part in parts.items():
        part.save_pretrained(root / name)
        library = "transformers" if type(part).__module__.startswith("transformers") else "diffusers"
        index[name] = [library, type(part).__name__]
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory) -> Path:
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    parts = {
        "unet": tiny_unet(),
        "vae": tiny_vae(),
        "text_encoder": tiny_text_encoder(),
        "tokenizer": tiny_tokenizer(),
        "scheduler": DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    }
    return save_pipeline(tmp_path_factory.mktemp("sd"), "StableDiffusionPipeline", parts)


def test_caption_encoder_rows_follow_their_captions(sd_pipeline):
    components = load_components(sd_pipeline)
    encoder = components.caption_encoder
    assert encoder.layout == "single" and encoder.dtype == torch.float32
    sizes = torch.tensor([[16, 16]] * 3)
    hidden = encoder(["a cat", "a dog", "a cat"], sizes).kwargs["encoder_hidden_states"]
    assert hidden.shape == (3, 16, 16)
    torch.testing.assert_close(hidden[0], hidden[2])
    assert not torch.allclose(hidden[0], hidden[1])
    alone = encoder(["a dog"], sizes[:1]).kwargs["encoder_hidden_states"]
    torch.testing.assert_close(hidden[1:2], alone, rtol=1e-5, atol=1e-6)
    empty = encoder([""], sizes[:1]).kwargs["encoder_hidden_states"]
    torch.testing.assert_close(encoder.unconditional(sizes).kwargs["encoder_hidden_states"], empty.expand(3, -1, -1))


def test_latent_codec_scaling_and_posterior_sample():
    vae = tiny_vae()
    codec = LatentCodec(vae, shift_factor=0.25, batch_size=2)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    x = images.float() / 127.5 - 1
    mean = vae.encode(x).latent_dist.mean
    z = codec.encode(images)
    torch.testing.assert_close(z, (mean - 0.25) * vae.config.scaling_factor, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(codec.decode(z), vae.decode(mean).sample, rtol=1e-4, atol=1e-5)
    seeds = torch.tensor([4, 5, 6])
    sampled = codec.encode(images, sample=True, seeds=seeds)
    assert not torch.allclose(sampled, z)
    decoded = codec.decode(z)
    for row in range(3):  # the batched device quantiser is the data package's per-image one
        assert np.array_equal(to_uint8(decoded)[row].permute(1, 2, 0).numpy(), to_uint8_image(decoded[row]))
    alone = codec.encode(images[1:2], sample=True, seeds=seeds[1:2])
    torch.testing.assert_close(sampled[1:2], alone, rtol=1e-5, atol=1e-6)


def reference_restoration(components, images, captions, levels, seeds, *, grid, method, guidance):
    """The reference: VAE encode, captions, :class:`GuidedDenoiser`, ``samplers.restore`` (per_sample
    grid) or ``samplers.sample`` on the same per-sample table (global grid), VAE decode."""
    sizes = torch.tensor(images.shape[2:]).expand(len(captions), 2)
    encoder = components.caption_encoder
    guided = GuidedDenoiser(components.denoiser, encoder(captions, sizes), encoder.unconditional(sizes), guidance)
    latents = components.codec.encode(images).to(torch.float64)
    if grid.schedule == "per_sample":
        out = restore(guided, latents, levels, num_steps=grid.num_steps, method=method, seeds=seeds, backend="torch")
    else:
        eps = sample_normal(seeds, latents.shape[1:], stream=STREAM_RESTORE, dtype=torch.float64)
        table = grid.table(levels, grid.steps(levels.numpy()))
        start = latents + levels.view(-1, 1, 1, 1) * eps
        out = sample(guided, eps, table, method=method, seeds=seeds, start=start)
    return to_uint8(components.codec.decode(out))


@pytest.mark.parametrize(
    "schedule, method, guidance",
    [("per_sample", "heun", 3.5), ("per_sample", "sde", 3.5), ("global", "heun", 3.5), ("global", "euler", 1.0)],
)
def test_latent_engine_equals_the_reference_per_sample(sd_pipeline, schedule, method, guidance):
    """The engine with latent stages (VAE + captions around the captured loop, CFG over the
    static interleaved buffers, a padded static batch) restores every sample as the reference
    restores it alone."""
    components = load_components(sd_pipeline)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=g)
    captions = ["a cat", "a dog", "red bus"]
    levels = torch.tensor([2.0, 0.7, 1.3], dtype=torch.float64)
    ids = torch.tensor([4, 9, 11])
    seeds = derive_seeds(ids, 5)
    grid = GridSpec(schedule, 4 if schedule == "per_sample" else 30)
    config = SamplerConfig(
        num_steps=grid.steps(levels.numpy()), method=method, state_dtype=torch.float64, backend="torch"
    )
    sampler = latent_sampler(components, (16, 16), 4, config, LatentSettings(guidance_scale=guidance))
    context = LatentBatch(components.caption_encoder.tokenize(captions), seeds)
    got = sampler.restore(images, ids, levels, seed=5, grid=grid, context=context)
    assert got.dtype == torch.uint8 and got.shape == images.shape
    batched = reference_restoration(components, images, captions, levels, seeds, grid=grid, method=method,
                                    guidance=guidance)
    assert torch.equal(got, batched)
    for i in range(3):  # per sample; CPU conv kernels round batch-dependently (~1e-6), hence 1 grey level
        rows = slice(i, i + 1)
        alone = reference_restoration(components, images[rows], captions[rows], levels[rows], seeds[rows],
                                      grid=grid, method=method, guidance=guidance)
        assert int((got[rows].int() - alone.int()).abs().max()) <= 1
    assert float((got.float() - images.float()).abs().mean()) > 10  # restoration changed the images


def test_guidance_changes_the_restoration(sd_pipeline):
    """The guidance scale reaches the captured loop (w = 1 and w = 3.5 differ), and each row's
    own caption conditions it (swapping two captions swaps nothing else)."""
    components = load_components(sd_pipeline)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    ids, levels = torch.tensor([0, 1]), torch.tensor([1.5, 1.5], dtype=torch.float64)
    grid = GridSpec("per_sample", 3)

    def run(captions, guidance):
        sampler = latent_sampler(components, (16, 16), 2, SamplerConfig(num_steps=3), LatentSettings(guidance))
        context = LatentBatch(components.caption_encoder.tokenize(captions), derive_seeds(ids, 0))
        return sampler.restore(images, ids, levels, grid=grid, context=context)

    base = run(["a cat", "a dog"], 3.5)
    assert not torch.equal(base, run(["a cat", "a dog"], 1.0))
    swapped = run(["a dog", "a cat"], 3.5)
    assert not torch.equal(base[0], swapped[0])


def test_vae_posterior_sample_is_seeded_per_sample(sd_pipeline):
    """``encode_sample``: the engine's VAE posterior draw is the codec's, seeded by each sample's
    own seed (the restoration then equals the reference started from those latents)."""
    components = load_components(sd_pipeline)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    ids, levels = torch.tensor([3, 8]), torch.tensor([1.0, 1.0], dtype=torch.float64)
    seeds = derive_seeds(ids, 0)
    grid = GridSpec("per_sample", 3)
    sampler = latent_sampler(components, (16, 16), 2, SamplerConfig(num_steps=3, state_dtype=torch.float64),
                             LatentSettings(guidance_scale=1.0, encode_sample=True))
    context = LatentBatch(components.caption_encoder.tokenize(["a", "b"]), seeds)
    got = sampler.restore(images, ids, levels, grid=grid, context=context)
    sizes = torch.tensor([[16, 16]] * 2)
    cond = components.caption_encoder(["a", "b"], sizes)
    guided = GuidedDenoiser(components.denoiser, cond, cond, 1.0)
    latents = components.codec.encode(images, sample=True, seeds=seeds).to(torch.float64)
    want = to_uint8(components.codec.decode(restore(guided, latents, levels, num_steps=3, seeds=seeds)))
    assert int((got.int() - want.int()).abs().max()) <= 1
    mean_only = latent_sampler(components, (16, 16), 2, SamplerConfig(num_steps=3, state_dtype=torch.float64),
                               LatentSettings(guidance_scale=1.0))
    assert not torch.equal(got, mean_only.restore(images, ids, levels, grid=grid, context=context))


@pytest.mark.gpu
def test_latent_graph_replay_equals_eager_on_gpu(sd_pipeline):
    """On CUDA (bf16 models): the loop captured once and replayed over two batches with other
    captions and images equals the eager engine batch by batch (the static conditioning is
    refilled per batch, the graph never recaptured)."""
    components = load_components(sd_pipeline, device="cuda")
    grid = GridSpec("global", 30)
    levels = torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)
    config = dict(num_steps=grid.steps(levels.numpy()), state_dtype=torch.float32)
    graph = latent_sampler(components, (16, 16), 4, SamplerConfig(**config, cuda_graph=True))
    eager = latent_sampler(components, (16, 16), 4, SamplerConfig(**config, cuda_graph=False))
    g = torch.Generator().manual_seed(4)
    outputs = []
    for captions in (["a cat", "a dog", "a bus"], ["red", "green", "blue"]):
        images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=g)
        ids = torch.arange(3)
        context = LatentBatch(components.caption_encoder.tokenize(captions), derive_seeds(ids, 0))
        got = graph.restore(images, ids, levels, grid=grid, context=context)
        want = eager.restore(images, ids, levels, grid=grid, context=context)
        assert int((got.int() - want.int()).abs().max()) <= 1
        outputs.append(got)
    assert graph.graph is not None and not torch.equal(outputs[0], outputs[1])


# ---------------------------------------------------------------------------------------
# The one driver: JPEG caption shards in, restored shards out; ranks; a real kill and resume.

CAPTION_LEVELS = [2.0, 0.0, 1.0, 2.0, 0.5, 0.0, 2.0]  # scaled-latent units; 0 = clean, copied byte for byte


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_caption_shards(root: Path, levels: list[float], *, captions: bool = True) -> Path:
    """WebDataset shards of 16x16 JPEGs with captions, JSON metadata and an unknown member."""
    rng = np.random.default_rng(0)
    samples = [
        Sample(
            index=i,
            key=f"s{i:04d}",
            array=None,
            data=jpeg_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
            sigma_min=level,
            caption=f"photo {i} of a {'cat' if i % 2 else 'dog'}" if captions or i != 2 else None,
            metadata={"source": "test", "i": i},
            extras={"extra.bin": bytes([i, 255 - i])},
        )
        for i, level in enumerate(levels)
    ]
    return write_dataset(root, "webdataset", samples, chunk_size=4)


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory) -> Path:
    return write_caption_shards(tmp_path_factory.mktemp("captions") / "v0", CAPTION_LEVELS)


LATENT_RUN = dict(grid="global", num_steps=30, rho_ambient=2.0, batch_size=3, shard_size=4, progress=False,
                  reader="pil", num_workers=2, state_dtype="float64", backend="torch")


def latent_run(pipeline, src: Path, dst: Path, settings: LatentSettings | None = None, device="cpu", **overrides):
    """``restore_dataset`` on the latent stages (what ``ambient-fast restore --diffusers`` runs)."""
    kwargs = latent_restoration(pipeline, settings or LatentSettings(), seed=0, device=device)
    return restore_dataset(src=src, dst=dst, **kwargs, **{**LATENT_RUN, **overrides})


def read_version(root: Path) -> tuple[object, list[Sample]]:
    dataset = open_dataset(root)
    return dataset, [dataset.read(i) for i in range(len(dataset))]


def test_jpeg_caption_shards_in_restored_shards_out(sd_pipeline, caption_shards, tmp_path):
    """Keys, captions, metadata and unknown members pass through; clean JPEGs byte for byte;
    restored samples are PNG with the halved level, their latents stored, and each equals the
    reference restoration of that sample alone."""
    components = load_components(sd_pipeline)
    report = latent_run(components, caption_shards, tmp_path / "v1", LatentSettings(store_latents=True))
    assert report.num_restored == 5 and report.num_copied == 2
    src_set, src = read_version(caption_shards)
    out_set, out = read_version(tmp_path / "v1")
    assert out_set.keys == src_set.keys and out_set.format == "webdataset"
    grid = GridSpec("global", 30)
    for a, b in zip(src, out, strict=True):
        assert (b.caption, b.metadata, b.extras["extra.bin"]) == (a.caption, a.metadata, a.extras["extra.bin"])
        if a.sigma_min == 0:
            assert b.data == a.data and b.sigma_min == 0  # the JPEG, byte for byte
            continue
        assert b.data[:8] == b"\x89PNG\r\n\x1a\n" and b.sigma_min == a.sigma_min / 2
        latent = np.load(io.BytesIO(b.extras["latent.npy"]))
        assert latent.dtype == np.float16 and latent.shape == (4, 8, 8)
        image = torch.from_numpy(a.array).permute(2, 0, 1).unsqueeze(0).contiguous()
        alone = reference_restoration(
            components, image, [a.caption], torch.tensor([a.sigma_min], dtype=torch.float64),
            derive_seeds(torch.tensor([a.index]), 0), grid=grid, method="heun", guidance=3.5,
        )[0].permute(1, 2, 0).numpy()
        assert np.abs(b.array.astype(int) - alone.astype(int)).max() <= 1
        assert np.abs(b.array.astype(int) - a.array.astype(int)).mean() > 10
    assert out_set.manifest["params"]["stages"]["latent"]["guidance_scale"] == 3.5
    if dali_available():  # DALI decodes the latent path's batches too, to the same bytes
        latent_run(components, caption_shards, tmp_path / "dali", LatentSettings(store_latents=True), reader="dali")
        without_manifest = [
            {name: data for name, data in tree_bytes(tmp_path / run).items() if name != "manifest.json"}
            for run in ("dali", "v1")
        ]
        assert without_manifest[0] == without_manifest[1]  # the manifest records the reader


@pytest.mark.gpu
def test_latent_dataset_on_gpu_graph_equals_eager(sd_pipeline, caption_shards, tmp_path):
    """On CUDA the driver keeps batches in flight (stage of batch j+1 on the copy stream while
    batch j replays, double-buffered slots): one captured graph over every batch, the padded
    last one included, writes what the eager engine writes (to 1 grey level: bf16 models)."""
    for name, graph in (("graph", True), ("eager", False)):
        latent_run(sd_pipeline, caption_shards, tmp_path / name, device="cuda", cuda_graph=graph, batch_size=2,
                   shard_size=8, state_dtype="float32")
    _, graph_out = read_version(tmp_path / "graph")
    _, eager_out = read_version(tmp_path / "eager")
    for a, b in zip(graph_out, eager_out, strict=True):
        assert a.key == b.key and a.sigma_min == b.sigma_min
        assert np.abs(a.array.astype(int) - b.array.astype(int)).max() <= 1


def test_latent_run_takes_the_pixel_options(sd_pipeline, tmp_path):
    """The latent stages are built on the driver's pixel stages: --resolution/--resize and
    --output-codec apply to a latent run too."""
    rng = np.random.default_rng(1)
    samples = [
        Sample(index=i, key=f"k{i}", array=None, sigma_min=2.0, caption=f"c{i}",
               data=jpeg_bytes(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
        for i, size in enumerate([16, 24, 32])
    ]
    src = write_dataset(tmp_path / "src", "webdataset", samples, chunk_size=4)
    latent_run(sd_pipeline, src, tmp_path / "out", resize=True, resolution=(16, 16), output_codec="webp")
    _, out = read_version(tmp_path / "out")
    assert [s.array.shape for s in out] == [(16, 16, 3)] * 3
    assert all(s.data[:4] == b"RIFF" and s.data[8:12] == b"WEBP" for s in out)


def test_grayscale_dataset_is_restored_as_the_luma_of_its_rgb_replica(sd_pipeline, tmp_path):
    """A grayscale image enters the VAE as (g, g, g): the restored grayscale dataset keeps its
    shape and equals the BT.601 luma of the same run on the RGB replica (to 1 grey level, the
    RGB output's rounding), sample by sample; clean samples are copied byte for byte."""
    rng = np.random.default_rng(3)
    grey = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in CAPTION_LEVELS]

    def png(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    def shards(name: str, arrays: list[np.ndarray]) -> Path:
        samples = [
            Sample(index=i, key=f"s{i:04d}", array=None, data=png(a), sigma_min=level, caption=f"photo {i}")
            for i, (a, level) in enumerate(zip(arrays, CAPTION_LEVELS, strict=True))
        ]
        return write_dataset(tmp_path / name, "webdataset", samples, chunk_size=4)

    gray_src = shards("gray", grey)
    rgb_src = shards("rgb", [np.repeat(g[:, :, None], 3, axis=2) for g in grey])
    components = load_components(sd_pipeline)
    for src, dst in ((gray_src, "gray-out"), (rgb_src, "rgb-out")):
        latent_run(components, src, tmp_path / dst)
    _, gray_in = read_version(gray_src)
    _, gray_out = read_version(tmp_path / "gray-out")
    _, rgb_out = read_version(tmp_path / "rgb-out")
    restored = 0
    for a, g, c in zip(gray_in, gray_out, rgb_out, strict=True):
        assert g.key == c.key and g.sigma_min == c.sigma_min
        if a.sigma_min == 0:
            assert g.data == a.data
            continue
        assert a.array.shape == g.array.shape == (16, 16, 1) and c.array.shape == (16, 16, 3)
        luma = c.array.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        assert np.abs(g.array[..., 0] - luma).max() <= 1.0, np.abs(g.array[..., 0] - luma).max()
        assert np.abs(g.array.astype(int) - a.array.astype(int)).mean() > 10  # restored, not copied
        restored += 1
    assert restored == 5


def test_sample_without_caption_is_refused_by_key(sd_pipeline, tmp_path):
    src = write_caption_shards(tmp_path / "src", CAPTION_LEVELS, captions=False)
    with pytest.raises(ValueError, match="s0002.*no caption"):
        latent_run(sd_pipeline, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


TORCHRUN_CHILD = """
import sys
import torch
torch.set_num_threads(1)
from ambient_fast.runtime import init_runtime, shutdown
from ambient_fast.restoration.latent_stages import LatentSettings, latent_restoration
from ambient_fast.restoration import restore_dataset
from tests.test_latent import LATENT_RUN

ctx = init_runtime("cpu")
restore_dataset(src=sys.argv[2], dst=sys.argv[3], **latent_restoration(sys.argv[1], LatentSettings(), device="cpu"),
                **LATENT_RUN)
shutdown(ctx)
"""


def test_two_gloo_ranks_equal_one_process(sd_pipeline, caption_shards, tmp_path):
    """``torchrun --nproc-per-node 2`` (gloo, CPU) writes the same version, byte for byte."""
    latent_run(sd_pipeline, caption_shards, tmp_path / "one")
    script = tmp_path / "child.py"
    script.write_text(TORCHRUN_CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         str(sd_pipeline), str(caption_shards), str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")


KILL_CHILD = """
import sys, time
import torch
torch.set_num_threads(1)
from ambient_fast.restoration.latent_stages import LatentSettings, latent_restoration
from ambient_fast.restoration import restore_dataset
from tests.test_latent import LATENT_RUN


class Slow(torch.nn.Module):
    # 20 ms per network evaluation, so the run lasts several seconds and the kill lands mid-run.
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, sigma, cond):
        time.sleep(0.02)
        return self.inner(x, sigma, cond)


kwargs = latent_restoration(sys.argv[1], LatentSettings(), device="cpu")
kwargs["denoiser"] = Slow(kwargs["denoiser"]).eval()
restore_dataset(src=sys.argv[2], dst=sys.argv[3], **kwargs, **LATENT_RUN)
"""


def test_killed_latent_run_resumes_to_identical_output(sd_pipeline, tmp_path):
    """SIGKILL at a random point after the first committed shard, then a rerun: byte-identical
    to an uninterrupted run."""
    src = write_caption_shards(tmp_path / "src", CAPTION_LEVELS * 2)
    latent_run(sd_pipeline, src, tmp_path / "clean")
    dst = tmp_path / "dst"
    script = tmp_path / "child.py"
    script.write_text(KILL_CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    child = subprocess.Popen([sys.executable, str(script), str(sd_pipeline), str(src), str(dst)], env=env,
                             stderr=subprocess.PIPE)

    done = kill_after_first_shard(child, dst, timeout=300, max_delay=1.0)
    report = latent_run(sd_pipeline, src, dst)
    assert report.shards_resumed >= done >= 1
    assert tree_bytes(dst) == tree_bytes(tmp_path / "clean")
    assert not staging_folder(dst).exists()


def test_restore_command_restores_jpeg_caption_shards(sd_pipeline, caption_shards, tmp_path, capsys):
    """``ambient-fast restore --diffusers DIR``: the anchors' text-to-image defaults (30-point global
    grid -> 29 evaluations at 2.0, rho_ambient 2), JPEG caption shards in, restored shards out."""
    from ambient_fast.cli import main

    base = ["restore", "--diffusers", str(sd_pipeline), "--src", str(caption_shards), "--device", "cpu",
            "--batch-size", "3", "--shard-size", "4", "--workers", "2", "--no-progress", "--reader", "pil"]
    assert main([*base, "--dst", str(tmp_path / "dry"), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["num_restored"] == 5 and plan["nfe_per_sample"] == 29 and not (tmp_path / "dry").exists()
    with pytest.raises(SystemExit):
        main([*base, "--dst", str(tmp_path / "x"), "--model", str(sd_pipeline / "model_index.json")])
    assert "not allowed with --diffusers" in capsys.readouterr().err
    out = tmp_path / "restored"
    assert main([*base, "--dst", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_restored"] == 5 and report["arguments"]["grid"] == "global"
    _, source = read_version(caption_shards)
    _, restored = read_version(out)
    assert [s.key for s in restored] == [s.key for s in source]
    assert [(s.caption, s.metadata, s.extras["extra.bin"]) for s in restored] == [
        (s.caption, s.metadata, s.extras["extra.bin"]) for s in source
    ]
    assert [r.sigma_min for r in restored] == [s.sigma_min / 2 for s in source]
    assert all((r.data == s.data) == (s.sigma_min == 0) for r, s in zip(restored, source, strict=True))


# ---------------------------------------------------------------------------------------
# Other pipeline layouts: SDXL (two encoders, pooled + time ids) and PixArt (DiT, learned sigma).


def test_sdxl_layout(tmp_path):
    from diffusers import EulerDiscreteScheduler

    torch.manual_seed(0)
    unet = tiny_unet(
        cross_attention_dim=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 8,
    )
    parts = {
        "unet": unet,
        "vae": tiny_vae(),
        "text_encoder": tiny_text_encoder(16),
        "tokenizer": tiny_tokenizer(),
        "text_encoder_2": tiny_text_encoder(16, projection=8),
        "tokenizer_2": tiny_tokenizer(),
        "scheduler": EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    }
    components = load_components(save_pipeline(tmp_path / "xl", "StableDiffusionXLPipeline", parts))
    encoder = components.caption_encoder
    assert encoder.layout == "sdxl" and encoder.zero_unconditional
    sizes = torch.tensor([[16, 24], [16, 24]])
    cond = encoder(["a cat", "a dog"], sizes)
    assert cond.kwargs["encoder_hidden_states"].shape == (2, 16, 32)
    assert cond.kwargs["added_cond_kwargs"]["text_embeds"].shape == (2, 8)
    assert cond.kwargs["added_cond_kwargs"]["time_ids"][0].tolist() == [16, 24, 0, 0, 16, 24]
    uncond = encoder.unconditional(sizes)
    assert float(uncond.kwargs["encoder_hidden_states"].abs().max()) == 0
    sampler = latent_sampler(components, (16, 24), 2, SamplerConfig(num_steps=3), LatentSettings(guidance_scale=2.0))
    images = torch.randint(0, 256, (2, 3, 16, 24), dtype=torch.uint8)
    ids = torch.tensor([0, 1])
    context = LatentBatch(encoder.tokenize(["a cat", "a dog"]), ids)
    out = sampler.restore(images, ids, torch.tensor([1.0, 1.0]), grid=GridSpec("per_sample", 3), context=context)
    assert out.shape == images.shape and not torch.equal(out, images)


def test_pixart_layout_with_learned_sigma(tmp_path):
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=16,
        norm_num_groups=8,
    ).eval()
    parts = {
        "transformer": transformer,
        "vae": tiny_vae(),
        "text_encoder": tiny_text_encoder(16),
        "tokenizer": tiny_tokenizer(),
        "scheduler": DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    }
    components = load_components(save_pipeline(tmp_path / "pixart", "PixArtAlphaPipeline", parts), text_max_length=12)
    encoder = components.caption_encoder
    assert encoder.layout == "pixart" and encoder.max_length == 12
    cond = encoder(["a cat"], torch.tensor([[16, 16]]))
    assert cond.kwargs["encoder_attention_mask"].shape == (1, 12)
    assert cond.kwargs["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    x = torch.randn(1, 4, 8, 8)
    out = components.denoiser(x, torch.tensor([1.0]), cond)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
