"""Equivalence of ``ambient_fast.compat`` with the anchors' EDM / Ambient-o / Dataloops code.

The references below are written here from ANCHORS.md in plain PyTorch (no anchor code is
copied): the per-element ambient loss through ``x_tn_hat``, ``w_amb`` and ``lambda_EDM``
(ANCHORS 1.1), the training loops' ``sigma_tn`` rules (1.2, 1.3), EDM's ``EDMLoss``, EDM's
Heun / stochastic sampler with float64 state (3.1) and the Dataloops per-sample restorer
(3.2). Tolerances:

- loss, three-way (STYLE): ``|compat_fp32 - ref_fp64| <= 2 |ref_fp32 - ref_fp64| + atol``,
  atol = 1e-6 of the loss scale (the fp32 rounding of the anchors' own formula bounds ours);
  parameter gradients and the other fp32-vs-fp32 comparisons (per-sample fast path, anchor
  signature, uncertainty weighting): rtol 1e-4 / 2e-5, atol 1e-5 of the largest value
  (sums of ~200 fp32 terms in a different order);
- samplers and restorer with the reference step ops (``backend="torch"``, the compat
  default): bit-identical (``torch.equal``) to EDM's ``edm_sampler`` as EDM computes it
  (Python-float gamma, 0-dim float64 levels) and to Dataloops' ``edm_restorer`` with its
  dtypes (float32 roots of the levels for float32 images, float32 gamma), with float64 and
  float32 networks alike; with the fused backends (C++, Triton interpreted): 1e-9 absolute
  and relative on O(1) images (float64 loops that differ in the order of float64 operations
  or FMA contraction; a last-bit difference at sigma = 80 is amplified by up to 80/0.002 in
  the step that lands on 0.002). A float32 churn factor moves the images by ~1e-8, so both
  checks see it;
- plain EDM (no annotations): bit-identical to EDM's ``EDMLoss`` for the same seed.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from ambient_fast import EDMPrecond
from ambient_fast.compat import (
    CROP_PATCH_TO_SIGMA_MAX,
    AmbientEDMLoss,
    Annotation,
    EDMAmbientLoss,
    SigmaLogVariance,
    StackedRandomGenerator,
    annotation_arrays,
    classifier_sigma_min,
    crop_sigma_max,
    edm_restorer,
    edm_sampler,
    ewm_mean,
    nature_sigma,
    read_annotations,
    restore_with_annotations,
    write_annotations,
)

SIGMA_DATA = 0.5
BACKENDS = ["torch", "auto"]
# The GPU kernels, run by Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1).
WITH_TRITON = [*BACKENDS, pytest.param("triton", id="triton-interpreted")]


# ----------------------------------------------------------------------------------------
# Random small networks.


class TinyUNetish(nn.Module):
    """F(x_in, c_noise, labels): two convs with a c_noise-conditioned bias."""

    def __init__(self, channels: int = 3, width: int = 8, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.emb = nn.Linear(1, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x, c_noise, labels=None):
        h = torch.nn.functional.silu(self.conv_in(x) + self.emb(c_noise.reshape(-1, 1)).reshape(x.shape[0], -1, 1, 1))
        return self.conv_out(h)


class EDMNet(nn.Module):
    """EDM-like preconditioned net: ``net(x, sigma, class_labels, augment_labels=None)``.

    Accepts any sigma shape with B elements (or one), like EDM's ``EDMPrecond``; optional
    ``sigma_min``/``sigma_max``/``round_sigma`` attributes as EDM's preconditioners.
    """

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.precond = EDMPrecond(TinyUNetish(seed=seed).to(dtype), sigma_data=SIGMA_DATA)

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        out = self.precond(x, sigma, class_labels)
        if augment_labels is not None:
            out = out + 0.01 * augment_labels.reshape(x.shape[0], 1, 1, 1).to(out.dtype)
        return out


class RoundedNet(EDMNet):
    """A net with EDM's ``sigma_min``/``sigma_max`` clamp and an iDDPM-like ``round_sigma``."""

    sigma_min = 0.01
    sigma_max = 20.0

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma)
        return torch.round(sigma * 64) / 64 + (sigma * 64 < 0.5) * sigma  # keep tiny levels > 0


def net_pair(seed: int = 0) -> tuple[EDMNet, EDMNet]:
    """The same random net in float32 and float64."""
    net32 = EDMNet(seed)
    net64 = copy.deepcopy(net32).double()
    return net32, net64


# ----------------------------------------------------------------------------------------
# References written from ANCHORS.md.


def ref_ambient_loss(net, x_tn, sigma_tn, sigma_t, z, labels=None, augment_labels=None):
    """ANCHORS 1.1, per element: lambda_EDM * w_amb * |x_tn_hat - x_tn|^2."""
    s = sigma_t.reshape(-1, 1, 1, 1).to(x_tn.dtype)
    sm = sigma_tn.reshape(-1, 1, 1, 1).to(x_tn.dtype)
    x_t = x_tn + z.to(x_tn.dtype) * torch.sqrt(s**2 - sm**2)
    kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
    denoised = net(x_t, s, labels, **kwargs)
    r2 = (sm / s) ** 2
    x_tn_hat = (1 - r2) * denoised + r2 * x_t
    lam = (SIGMA_DATA**2 + s**2) / (s**2 * SIGMA_DATA**2)
    w_amb = s**4 / (s**2 - sm**2) ** 2
    return lam * w_amb * (x_tn_hat - x_tn) ** 2, denoised, x_t


def ref_sigma_tn(sigma_t, sigma_min, sigma_max, rule):
    """The training loops' sigma_tn (ANCHORS 1.2, 1.3)."""
    if rule == "dataloops":
        return torch.where(sigma_t < sigma_max, torch.zeros_like(sigma_min), sigma_min)
    if rule == "omni":
        m = torch.minimum(sigma_min, sigma_max).to(sigma_t.dtype)
        return torch.where(m > sigma_t, torch.zeros_like(m), m)
    return torch.where(sigma_t <= sigma_min, torch.zeros_like(sigma_min), sigma_min)


def ref_edm_loss(net, images, labels=None, augment_pipe=None):
    """EDM's EDMLoss.__call__ (Karras et al. 2022), global RNG."""
    rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
    sigma = (rnd_normal * 1.2 + -1.2).exp()
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
    n = torch.randn_like(y) * sigma
    kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
    denoised = net(y + n, sigma, labels, **kwargs)
    return weight * ((denoised - y) ** 2)


def ref_edm_sampler(
    net,
    latents,
    randn_like,
    num_steps=18,
    sigma_min=0.002,
    sigma_max=80.0,
    rho=7.0,
    S_churn=0.0,
    S_min=0.0,
    S_max=float("inf"),
    S_noise=1.0,
):
    """EDM generate.py::edm_sampler (Algorithm 2) as EDM computes it: Python-float bounds and
    gamma, 0-dim float64 levels, ``t_hat = round(t + gamma t)``, float64 state (ANCHORS 3.1)."""
    sigma_min = max(sigma_min, getattr(net, "sigma_min", 0.0))
    sigma_max = min(sigma_max, getattr(net, "sigma_max", float("inf")))
    round_sigma = getattr(net, "round_sigma", torch.as_tensor)
    idx = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + idx / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([round_sigma(t), torch.zeros(1, dtype=torch.float64)])
    x = latents.to(torch.float64) * t[0]
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = round_sigma(t_cur + gamma * t_cur)
        x_hat = x + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x)
        denoised = net(x_hat, t_hat, None).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next, None).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


def ref_edm_restorer(
    x,
    sigma_start,
    sigma_end,
    net,
    latents,
    randn_like,
    num_steps=18,
    sigma_min=0.002,
    rho=7.0,
    S_churn=0.0,
    S_min=0.0,
    S_max=float("inf"),
    S_noise=1.0,
    add_noise=True,
):
    """Dataloops restore.py::edm_restorer with its dtypes (ANCHORS 3.2): the bounds clamped in
    sigma's dtype and cast to the images' dtype (float32 for PNG datasets), so the rho-root
    terms are float32 while the step fractions are float64; gamma from ``torch.where`` on
    Python scalars (float32); per-sample (B,) float64 levels; clean images copied back."""
    sigma_min = max(sigma_min, getattr(net, "sigma_min", 0.0))
    round_sigma = getattr(net, "round_sigma", torch.as_tensor)
    lo = torch.max(sigma_end, torch.full_like(sigma_end, sigma_min)).to(x.dtype)
    hi = torch.max(sigma_start, torch.full_like(sigma_start, sigma_min)).to(x.dtype)
    idx = torch.arange(num_steps, dtype=torch.float64)
    root_hi, root_lo = hi[None, :] ** (1 / rho), lo[None, :] ** (1 / rho)  # float32 for float32 images
    t = (root_hi + idx[:, None] / (num_steps - 1) * (root_lo - root_hi)) ** rho
    t = torch.cat([round_sigma(t), sigma_end.to(x.dtype)[None, :]], 0)
    col = (-1, 1, 1, 1)
    state = x + latents.to(torch.float64) * t[0].view(col) * float(add_noise)
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        gamma = torch.where((S_min <= t_cur) & (t_cur <= S_max), min(S_churn / num_steps, math.sqrt(2) - 1), 0.0)
        t_hat = round_sigma(t_cur + gamma * t_cur)
        x_hat = state + (t_hat**2 - t_cur**2).sqrt().view(col) * S_noise * randn_like(state)
        denoised = net(x_hat, t_hat, None).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat.view(col)
        x_next = x_hat + (t_next - t_hat).view(col) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next, None).to(torch.float64)
            d_prime = (x_next - denoised) / t_next.view(col)
            x_next = x_hat + (t_next - t_hat).view(col) * (0.5 * d_cur + 0.5 * d_prime)
        state = x_next
    clean = sigma_start == 0
    state[clean] = x[clean].to(torch.float64)
    return state


def per_row_randn_like(seeds):
    """Independent stand-in for EDM's StackedRandomGenerator.randn_like."""
    gens = [torch.Generator().manual_seed(int(s) % (1 << 32)) for s in seeds]
    return lambda x: torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in gens])


def assert_three_way(fast, ref32, ref64, atol):
    fast, ref32, ref64 = fast.double(), ref32.double(), ref64.double()
    err = (fast - ref64).abs()
    bound = 2 * (ref32 - ref64).abs() + atol
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), f"|fast-ref64|={err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g}"


# ----------------------------------------------------------------------------------------
# Loss.


def _annotated_batch(seed: int, batch: int = 7):
    """Images, per-sample levels that cover clean, corrupt, locality and ineligible rows."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 8, 8, generator=g) * 0.5
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(batch, generator=g))
    sigma_min = torch.where(
        torch.rand(batch, generator=g) < 0.6, 0.05 + 1.5 * torch.rand(batch, generator=g), torch.zeros(batch)
    )
    sigma_max = torch.where(
        torch.rand(batch, generator=g) < 0.3, 2 * torch.rand(batch, generator=g), torch.zeros(batch)
    )
    # Make sure every regime is present: eligible corrupt, locality-clean, clean.
    sigma_min[0], sigma_max[0], sigma[0] = 0.8, 0.0, 1.7
    sigma_min[1], sigma_max[1], sigma[1] = 1.2, 0.6, 0.3
    sigma_min[2], sigma_max[2] = 0.0, 0.0
    noise = torch.randn(images.shape, generator=g)
    return images, sigma, sigma_min, sigma_max, noise


@pytest.mark.parametrize("rule", ["dataloops", "omni", "edm2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigma_tn_rules_match_training_loops(rule, seed):
    _, sigma, sigma_min, sigma_max, _ = _annotated_batch(seed, batch=64)
    torch.testing.assert_close(
        nature_sigma(sigma, sigma_min, sigma_max, rule), ref_sigma_tn(sigma, sigma_min, sigma_max, rule), rtol=0, atol=0
    )


@pytest.mark.parametrize("rule", ["dataloops", "omni", "edm2"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_element_loss_matches_anchor_formula(rule, seed, backend):
    """EDMAmbientLoss (B,C,H,W) == the anchors' loop + AmbientEDMLoss, on random nets/inputs."""
    images, sigma, sigma_min, sigma_max, noise = _annotated_batch(seed)
    net32, net64 = net_pair(seed)
    loss_fn = EDMAmbientLoss(sigma_tn_rule=rule, backend=backend)
    g = torch.Generator().manual_seed(100 + seed)
    fast = loss_fn(
        net=net32, images=images, sigma=sigma, sigma_min=sigma_min, sigma_max=sigma_max, noise=noise, generator=g
    )
    z = torch.randn(images.shape, generator=torch.Generator().manual_seed(100 + seed))
    sigma_tn = ref_sigma_tn(sigma, sigma_min, sigma_max, rule)
    trained = (sigma_tn == 0) | (sigma > sigma_tn)
    # The anchors' sampler never yields untrained rows; compare on trained rows, and ours is 0 elsewhere.
    assert bool((fast[~trained] == 0).all())
    ref32, _, _ = ref_ambient_loss(net32, images + noise * sigma_tn[:, None, None, None], sigma_tn, sigma, z)
    ref64, _, _ = ref_ambient_loss(
        net64,
        (images.double() + noise.double() * sigma_tn.double()[:, None, None, None]),
        sigma_tn.double(),
        sigma.double(),
        z.double(),
    )
    assert fast.shape == images.shape and fast.dtype == torch.float32
    scale = float(ref64[trained].detach().abs().max())
    assert_three_way(fast[trained], ref32[trained], ref64[trained], atol=1e-6 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_element_gradients_match_anchor_formula(backend):
    images, sigma, sigma_min, sigma_max, noise = _annotated_batch(5)
    sigma = torch.maximum(sigma, 1.3 * sigma_min)  # every row trains (the anchors' sampler guarantees it)
    sigma[1] = 0.3  # below sigma_max: trained as clean
    net_fast, _ = net_pair(5)
    net_ref = copy.deepcopy(net_fast)
    loss_fn = EDMAmbientLoss(sigma_tn_rule="dataloops", backend=backend)
    loss = loss_fn(
        net=net_fast,
        images=images,
        sigma=sigma,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        noise=noise,
        generator=torch.Generator().manual_seed(9),
    )
    loss.sum().mul(1 / images.shape[0]).backward()
    z = torch.randn(images.shape, generator=torch.Generator().manual_seed(9))
    sigma_tn = ref_sigma_tn(sigma, sigma_min, sigma_max, "dataloops")
    ref, _, _ = ref_ambient_loss(net_ref, images + noise * sigma_tn[:, None, None, None], sigma_tn, sigma, z)
    ref.sum().mul(1 / images.shape[0]).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5 * float(ref.detach().abs().max()))
    for (name, p_fast), p_ref in zip(net_fast.named_parameters(), net_ref.parameters(), strict=True):
        torch.testing.assert_close(
            p_fast.grad, p_ref.grad, rtol=1e-4, atol=1e-5 * float(p_ref.grad.abs().max()), msg=name
        )


@pytest.mark.parametrize("backend", WITH_TRITON)
def test_per_sample_fast_path_sums_to_per_element(backend):
    """reduction="per_sample" (fused op) gives the per-element loss summed per sample, and its gradients."""
    images, sigma, sigma_min, sigma_max, noise = _annotated_batch(7)
    net_a, _ = net_pair(7)
    net_b = copy.deepcopy(net_a)
    kwargs = dict(images=images, sigma=sigma, sigma_min=sigma_min, sigma_max=sigma_max, noise=noise)
    per_element = EDMAmbientLoss(backend=backend)(net=net_a, generator=torch.Generator().manual_seed(3), **kwargs)
    per_sample = EDMAmbientLoss(reduction="per_sample", backend=backend)(
        net=net_b, generator=torch.Generator().manual_seed(3), **kwargs
    )
    assert per_sample.shape == (images.shape[0],)
    torch.testing.assert_close(per_sample, per_element.sum(dim=(1, 2, 3)), rtol=2e-5, atol=1e-4)
    per_element.sum().backward()
    per_sample.sum().backward()
    for p_a, p_b in zip(net_a.parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(p_b.grad, p_a.grad, rtol=1e-4, atol=1e-5 * float(p_a.grad.abs().max()))


def test_plain_edm_is_bit_identical_to_edm_loss():
    """Without annotations EDMAmbientLoss is EDM's EDMLoss: same draws, same numbers."""
    net = EDMNet(3)
    images = torch.randn(6, 3, 8, 8)

    def augment(x):
        return torch.flip(x, dims=[3]), torch.arange(x.shape[0], dtype=torch.float32)

    for pipe in (None, augment):
        torch.manual_seed(11)
        ours = EDMAmbientLoss()(net=net, images=images, labels=None, augment_pipe=pipe)
        torch.manual_seed(11)
        ref = ref_edm_loss(net, images, None, pipe)
        assert torch.equal(ours, ref)


def test_augment_before_nature_noise_and_frozen_noise_from_ids():
    """x_tn = augment(images) + sigma_tn * n_i; sample_ids give the same n_i every call."""
    images, sigma, sigma_min, _, _ = _annotated_batch(4)
    sigma = torch.maximum(sigma, 1.5 * sigma_min + 0.1)
    net = EDMNet(4)

    def augment(x):
        return -x, torch.ones(x.shape[0])

    loss_fn = EDMAmbientLoss()
    ids = torch.arange(10, 10 + images.shape[0])
    a = loss_fn(
        net=net,
        images=images,
        augment_pipe=augment,
        sigma=sigma,
        sigma_min=sigma_min,
        sample_ids=ids,
        generator=torch.Generator().manual_seed(1),
    )
    b = loss_fn(
        net=net,
        images=images,
        augment_pipe=augment,
        sigma=sigma,
        sigma_min=sigma_min,
        sample_ids=ids,
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(a, b)
    from ambient_fast.core.noise import STREAM_NATURE, derive_seeds, sample_normal

    frozen = sample_normal(derive_seeds(ids, 0), images.shape[1:], stream=STREAM_NATURE)
    z = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    ref, _, _ = ref_ambient_loss(
        net,
        -images + frozen * sigma_min[:, None, None, None],
        sigma_min,
        sigma,
        z,
        augment_labels=torch.ones(images.shape[0]),
    )
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5 * float(ref.detach().abs().max()))
    with pytest.raises(ValueError, match="frozen per-image noise"):
        loss_fn(net=net, images=images, sigma=sigma, sigma_min=sigma_min)


@pytest.mark.parametrize("reduction", ["none", "per_sample"])
def test_anchor_signature_loss(reduction):
    """AmbientEDMLoss: the anchors' call (net, x0, x_tn, sigma_tn, sigma_t, ...) and 4 returns."""
    images, sigma, sigma_min, _, noise = _annotated_batch(8)
    sigma = torch.maximum(sigma, 1.2 * sigma_min)
    x_tn = images + noise * sigma_min[:, None, None, None]
    net = EDMNet(8)
    loss, x0_pred, sigma_t, x_t = AmbientEDMLoss(reduction=reduction, backend="torch")(
        net=net,
        x0=images,
        x_tn=x_tn,
        sigma_tn=sigma_min,
        sigma_t=sigma,
        labels=None,
        augment_labels=None,
        cls_labels=torch.zeros(7),
        generator=torch.Generator().manual_seed(2),
    )
    z = torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    ref, ref_pred, ref_x_t = ref_ambient_loss(net, x_tn, sigma_min, sigma, z)
    torch.testing.assert_close(x_t, ref_x_t)
    torch.testing.assert_close(x0_pred, ref_pred)
    assert sigma_t.shape == (7, 1, 1, 1)
    expected = ref if reduction == "none" else ref.sum(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected, rtol=2e-5, atol=1e-5 * float(expected.detach().abs().max()))


@pytest.mark.parametrize("reduction", ["none", "per_sample"])
def test_uncertainty_weighting_edm2(reduction):
    """loss = (w / exp(u(sigma))) err + u(sigma); gradients reach u's parameters."""
    images, sigma, sigma_min, _, noise = _annotated_batch(9)
    sigma = torch.maximum(sigma, 1.2 * sigma_min)
    net = EDMNet(9)
    logvar = SigmaLogVariance(hidden_channels=16)
    with torch.no_grad():
        logvar.head[-1].weight.normal_()  # leave the zero init: exercise a non-trivial u(sigma)
        logvar.head[-1].bias.fill_(0.3)
    loss_fn = EDMAmbientLoss(reduction=reduction, uncertainty=logvar, backend="torch")
    assert any(p is logvar.head[-1].weight for p in loss_fn.parameters())
    loss = loss_fn(
        net=net,
        images=images,
        sigma=sigma,
        sigma_min=sigma_min,
        noise=noise,
        generator=torch.Generator().manual_seed(4),
    )
    z = torch.randn(images.shape, generator=torch.Generator().manual_seed(4))
    err, _, _ = ref_ambient_loss(net, images + noise * sigma_min[:, None, None, None], sigma_min, sigma, z)
    u = logvar(sigma).detach().reshape(-1, 1, 1, 1)
    ref = err / u.exp() + u
    expected = ref if reduction == "none" else ref.sum(dim=(1, 2, 3))
    torch.testing.assert_close(loss.detach(), expected, rtol=2e-5, atol=1e-5 * float(expected.detach().abs().max()))
    loss.sum().backward()
    assert logvar.head[-1].weight.grad is not None and bool(logvar.head[-1].weight.grad.abs().sum() > 0)
    # Zero-initialised head: u = 0, the plain loss.
    assert torch.equal(SigmaLogVariance()(sigma), torch.zeros_like(sigma))


def test_uncertainty_from_net_return_logvar():
    """uncertainty="net": EDM2's net(x, sigma, labels, return_logvar=True) -> (D, logvar)."""

    class LogvarNet(EDMNet):
        def forward(self, x, sigma, class_labels=None, return_logvar=False):
            out = super().forward(x, sigma, class_labels)
            lv = torch.log(sigma.reshape(-1)) * 0.5
            return (out, lv.reshape(-1, 1, 1, 1)) if return_logvar else out

    images, sigma, _, _, _ = _annotated_batch(10)
    net = LogvarNet(10)
    loss = EDMAmbientLoss(uncertainty="net")(
        net=net, images=images, sigma=sigma, generator=torch.Generator().manual_seed(6)
    )
    z = torch.randn(images.shape, generator=torch.Generator().manual_seed(6))
    err, _, _ = ref_ambient_loss(net, images, torch.zeros(7), sigma, z)
    lv = (torch.log(sigma) * 0.5).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(loss, err / lv.exp() + lv, rtol=2e-5, atol=1e-5)


def test_untrainable_rows_are_zero_not_nan():
    images = torch.randn(3, 3, 8, 8)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    sigma_min = torch.tensor([1.0, 1.0, 1.0])  # sigma < sm, sigma == sm, sigma > sm
    for reduction in ("none", "per_sample"):
        loss = EDMAmbientLoss(reduction=reduction, sigma_tn_rule="dataloops", backend="torch")(
            net=EDMNet(0), images=images, sigma=sigma, sigma_min=sigma_min, noise=torch.randn_like(images)
        )
        per_row = loss.reshape(3, -1).sum(dim=1)
        assert bool(torch.isfinite(loss).all())
        assert per_row[0] == 0 and per_row[1] == 0 and per_row[2] > 0


def test_loss_compiles_fullgraph():
    """The per-element path traces as one graph (no breaks) and matches eager."""
    images, sigma, sigma_min, _, noise = _annotated_batch(12)
    net = EDMNet(12)
    loss_fn = EDMAmbientLoss(validate=False)

    def step(x, s, sm, n, z_seed_images):
        return loss_fn(net=net, images=x, sigma=s, sigma_min=sm, noise=n)

    torch.manual_seed(0)
    eager = step(images, sigma, sigma_min, noise, None)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    out = compiled(images, sigma, sigma_min, noise, None)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Sampler.


def test_stacked_random_generator_is_per_row():
    rnd = StackedRandomGenerator("cpu", [3, 7])
    x = rnd.randn([2, 4], dtype=torch.float64)
    assert torch.equal(x[1], torch.randn(4, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    assert torch.equal(StackedRandomGenerator("cpu", [7]).randn([1, 4], dtype=torch.float64)[0], x[1])


def assert_edm_bits(ours, ref, backend):
    """The reference step ops give EDM's bits; the fused ones agree to float64 rounding."""
    if backend == "torch":
        assert torch.equal(ours, ref), f"max |diff| {float((ours - ref).abs().max()):.3g}"
    else:
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_steps", [2, 5, 18])
def test_edm_sampler_deterministic_matches_reference(backend, num_steps):
    _, net64 = net_pair(1)
    latents = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = edm_sampler(net64, latents, num_steps=num_steps, backend=backend)
    ref = ref_edm_sampler(net64, latents, torch.randn_like, num_steps=num_steps)
    assert ours.dtype == torch.float64
    assert_edm_bits(ours, ref, backend)


def test_edm_sampler_float32_net_is_edm_bit_for_bit():
    """A float32 network sees the same float64 states cast down: same bits as EDM as well."""
    net32, _ = net_pair(2)
    latents = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = edm_sampler(net32, latents)
    assert torch.equal(ours, ref_edm_sampler(net32, latents, torch.randn_like))


@pytest.mark.parametrize("backend", WITH_TRITON)
@pytest.mark.parametrize("S_churn", [40, 80])
def test_edm_sampler_stochastic_same_seed_same_images(backend, S_churn):
    """EDM's ImageNet-64 churn settings with per-image generators: EDM's images.

    S_churn 40 / 80 over 12 steps gives gamma = 40/12 -> sqrt(2) - 1 (capped) and 80/12 (capped
    too), a value that float32 rounds; a float32 gamma moves the levels by ~4e-9 relative and
    the images by ~1e-8, which the bitwise check sees."""
    _, net64 = net_pair(3)
    seeds = [0, 5, 9]
    latents = StackedRandomGenerator("cpu", seeds).randn([3, 3, 8, 8])
    settings = dict(num_steps=12, S_churn=S_churn, S_min=0.05, S_max=50, S_noise=1.003)
    rnd = StackedRandomGenerator("cpu", seeds)
    ours = edm_sampler(net64, latents, randn_like=rnd.randn_like, backend=backend, **settings)
    ref = ref_edm_sampler(net64, latents, per_row_randn_like(seeds), **settings)
    assert_edm_bits(ours, ref, backend)
    # Batch independence: image 1 alone gives the same result.
    alone = edm_sampler(
        net64, latents[1:2], randn_like=StackedRandomGenerator("cpu", [5]).randn_like, backend=backend, **settings
    )
    torch.testing.assert_close(alone[0], ours[1], rtol=1e-12, atol=1e-12)


def test_churn_gamma_is_float64_as_edm():
    """A gamma below the cap (S_churn / N = 0.1) is not a float32 value: the levels keep it exactly."""
    from ambient_fast.compat.generate import _churn_levels

    levels = torch.tensor([3.0, 1.0, 0.01], dtype=torch.float64)
    churned = _churn_levels(levels, 10, 1.0, 0.05, 50.0)
    assert churned.tolist() == [3.0 + 0.1 * 3.0, 1.0 + 0.1 * 1.0, 0.01]
    anchor32 = _churn_levels(levels, 10, 1.0, 0.05, 50.0, gamma_dtype=torch.float32)
    gamma32 = float(torch.tensor(0.1, dtype=torch.float32))
    assert anchor32.tolist() == [3.0 + gamma32 * 3.0, 1.0 + gamma32 * 1.0, 0.01] != churned.tolist()


def test_edm_sampler_rng_stream_matches_edm():
    """EDM draws randn_like(x) every step, even deterministic: the global RNG ends where EDM's does."""
    _, net64 = net_pair(4)
    latents = torch.randn(2, 3, 8, 8)
    torch.manual_seed(5)
    edm_sampler(net64, latents, num_steps=6)
    after_ours = torch.randn(3)
    torch.manual_seed(5)
    ref_edm_sampler(net64, latents, torch.randn_like, num_steps=6)
    assert torch.equal(after_ours, torch.randn(3))
    torch.manual_seed(5)
    fast = edm_sampler(net64, latents, num_steps=6, exact_rng=False)
    assert torch.equal(fast, ref_edm_sampler(net64, latents, torch.randn_like, num_steps=6))


def test_edm_sampler_clamps_and_rounds_like_edm():
    net = RoundedNet(5).double()
    latents = torch.randn(2, 3, 8, 8)
    settings = dict(num_steps=7, S_churn=3.0)
    torch.manual_seed(1)
    ours = edm_sampler(net, latents, **settings)
    torch.manual_seed(1)
    assert torch.equal(ours, ref_edm_sampler(net, latents, torch.randn_like, **settings))


# ----------------------------------------------------------------------------------------
# Restorer.


def _restore_inputs(seed, batch=4):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 8, 8, generator=g).clamp(-1, 1)
    # Annotations as the anchors' script reads them: a float32 tensor of the JSON values.
    sigma_start = torch.tensor([1.2, 0.0, 0.15, 2.4, 0.001, 0.7][:batch], dtype=torch.float32)
    seeds = list(range(10, 10 + batch))
    latents = StackedRandomGenerator("cpu", seeds).randn([batch, 3, 8, 8])
    return images, sigma_start, seeds, latents


@pytest.mark.parametrize("backend", WITH_TRITON)
@pytest.mark.parametrize("churn", [{}, dict(S_churn=40, S_min=0.01, S_max=1.0, S_noise=1.003)])
def test_edm_restorer_anchor_arithmetic_is_restore_py_bit_for_bit(backend, churn):
    """Float32 images and levels (a PNG dataset): the anchors' float32 grid and gamma, their bits."""
    _, net64 = net_pair(6)
    images, sigma_start, seeds, latents = _restore_inputs(7, batch=6)
    ours = edm_restorer(
        images,
        sigma_start,
        torch.zeros(6),
        net64,
        latents,
        randn_like=StackedRandomGenerator("cpu", seeds).randn_like,
        backend=backend,
        **churn,
    )
    ref = ref_edm_restorer(images, sigma_start, torch.zeros(6), net64, latents, per_row_randn_like(seeds), **churn)
    assert_edm_bits(ours, ref, backend)
    assert torch.equal(ours[1], images[1].double())  # clean image passes through


def test_edm_restorer_float64_arithmetic_is_the_exact_grid():
    """arithmetic="float64": the grid of the float64 levels; it differs from the anchors' float32 grid."""
    _, net64 = net_pair(6)
    images, sigma_start, seeds, latents = _restore_inputs(8)
    exact = edm_restorer(
        images,
        sigma_start,
        torch.zeros(4),
        net64,
        latents,
        randn_like=StackedRandomGenerator("cpu", seeds).randn_like,
        arithmetic="float64",
    )
    # The float64 reference: restore.py's formula on float64 images and levels is the exact grid.
    ref = ref_edm_restorer(
        images.double(),
        sigma_start.double(),
        torch.zeros(4, dtype=torch.float64),
        net64,
        latents,
        per_row_randn_like(seeds),
    )
    torch.testing.assert_close(exact, ref, rtol=1e-12, atol=1e-12)
    anchor = edm_restorer(
        images,
        sigma_start,
        torch.zeros(4),
        net64,
        latents,
        randn_like=StackedRandomGenerator("cpu", seeds).randn_like,
    )
    assert not torch.equal(anchor, exact)
    torch.testing.assert_close(anchor, exact, rtol=1e-5, atol=1e-5)


def test_edm_restorer_options():
    """add_noise=False starts from x (stored-noisy datasets); sigma_end > 0 ends on sigma_end."""
    _, net64 = net_pair(7)
    images = torch.randn(2, 3, 8, 8)
    sigma_start = torch.tensor([1.0, 0.5])
    latents = torch.randn(2, 3, 8, 8)
    for add_noise in (False, True):
        for end in (torch.zeros(2), torch.tensor([0.3, 0.1])):
            ours = edm_restorer(images, sigma_start, end, net64, latents, add_noise=add_noise, num_steps=4)
            ref = ref_edm_restorer(
                images, sigma_start, end, net64, latents, torch.randn_like, num_steps=4, add_noise=add_noise
            )
            assert torch.equal(ours, ref)
    ours = edm_restorer(images, sigma_start, torch.zeros(2), net64, latents, add_noise=False, num_steps=4)
    start_only = edm_restorer(images, sigma_start, torch.zeros(2), net64, torch.zeros_like(latents), num_steps=4)
    assert torch.equal(ours, start_only)  # no noise added: the same as zero latents
    with pytest.raises(ValueError, match="arithmetic"):
        edm_restorer(images, sigma_start, torch.zeros(2), net64, latents, arithmetic="float32")


def test_restore_with_annotations_batch_independent():
    _, net64 = net_pair(8)
    images = torch.randn(3, 3, 8, 8).clamp(-1, 1)
    sigma_tn = torch.tensor([1.2, 0.0, 0.002], dtype=torch.float64)
    names = ["img00000000.png", "img00000001.png", "img00000002.png"]
    restored, annotations = restore_with_annotations(net64, images, sigma_tn, names, [0, 1, 2], num_steps=5)
    assert restored.dtype == images.dtype
    assert list(annotations) == names
    # The anchors' script: float32 levels divided in float32, written as Python floats.
    assert [a.sigma_min for a in annotations.values()] == [0.15000000596046448, 0.0, 0.0002500000118743628]
    assert all(a.sigma_max == 0.0 for a in annotations.values())
    _, exact = restore_with_annotations(net64, images, sigma_tn, names, [0, 1, 2], num_steps=5, arithmetic="float64")
    assert [a.sigma_min for a in exact.values()] == [1.2 / 8, 0.0, 0.002 / 8]
    assert torch.equal(restored[1], images[1])
    single, _ = restore_with_annotations(net64, images[2:], sigma_tn[2:], names[2:], [2], num_steps=5)
    assert torch.equal(single[0], restored[2])


# ----------------------------------------------------------------------------------------
# Annotations.


def test_ewm_mean_matches_recursion():
    x = np.random.default_rng(0).random((3, 50))
    alpha = 2 / 33
    expected = np.empty_like(x)
    expected[:, 0] = x[:, 0]
    for t in range(1, 50):
        expected[:, t] = alpha * x[:, t] + (1 - alpha) * expected[:, t - 1]
    np.testing.assert_allclose(ewm_mean(x, 32), expected, rtol=1e-14)


@pytest.mark.parametrize("crossing", [0, 40, 150])
def test_classifier_trajectory_known_crossing(crossing):
    """A step trajectory 1 -> 0 at index k: the EMA (1 - a)^(j+1) falls below 0.55 at j = ceil(ln .55 / ln(1-a)) - 1."""
    levels = np.sort(np.exp(1.2 * np.random.default_rng(1).standard_normal(200) - 1.2))
    trials = np.ones((200, 4))
    trials[crossing:] = 0.0
    trials[crossing:, 0] = 0.02  # trial noise that the mean absorbs
    alpha = 2 / 33
    j = math.ceil(math.log(0.55) / math.log(1 - alpha)) - 1
    shuffled = np.random.default_rng(2).permutation(levels)  # sigmas.txt order does not matter
    # crossing 0: the trajectory starts below 0.55, so the first level is the answer.
    expected = levels[crossing + j] if crossing > 0 else levels[0]
    assert float(classifier_sigma_min(trials, shuffled)) == expected
    never = np.ones((200, 4))
    assert float(classifier_sigma_min(never, levels)) == levels[-1]
    batch = classifier_sigma_min(np.stack([trials, never]), levels)
    assert batch.shape == (2,) and batch[1] == levels[-1]


def test_crop_sigma_max_table():
    assert crop_sigma_max({4: [0.9, 0.8], 8: [0.3, 0.1], 16: [0.1]}) == CROP_PATCH_TO_SIGMA_MAX[4]
    assert crop_sigma_max({32: [0.26], 64: [0.25]}) == 0.55
    assert crop_sigma_max({8: [0.1], 16: [0.2]}) == 0.01  # none above 0.25: patch size 1
    with pytest.raises(ValueError, match="no sigma_max"):
        crop_sigma_max({12: [0.9]})


def test_read_all_annotation_forms(tmp_path):
    levels = np.linspace(0.01, 5.0, 64)
    (tmp_path / "sigmas.txt").write_text("\n".join(repr(float(v)) for v in levels[::-1]) + "\n")
    trajectory = np.ones((64, 4))
    trajectory[20:] = 0.0
    j = math.ceil(math.log(0.55) / math.log(1 - 2 / 33)) - 1
    lines = [
        {"filename": "00000/img00000000.png", "sigma_min": 1.2, "sigma_max": 0.0},
        {"filename": "00000/img00000001.png", "sigma_min": 0.0, "sigma_max": 0.0},
        {"filename": "00000/img00000002.png", "annotation": 1.6},
        {"filename": "00000/img00000003.png", "sigma": 0.15},
        {"filename": "00000/img00000004.png", "probabilities": trajectory.tolist()},
        {"filename": "00000/img00000005.png", "crop_predictions_8": [0.5, 0.4], "crop_predictions_32": [0.1]},
    ]
    (tmp_path / "annotations.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    got = read_annotations(tmp_path)
    assert got == {
        "00000/img00000000.png": (1.2, 0.0),
        "00000/img00000001.png": (0.0, 0.0),
        "00000/img00000002.png": (1.6, 0.0),
        "00000/img00000003.png": (0.15, 0.0),
        "00000/img00000004.png": (float(np.float32(levels[20 + j])), 0.0),  # sigmas.txt is read as float32
        "00000/img00000005.png": (300.0, 0.15),
    }
    names = [f"00000/img{i:08d}.png" for i in range(7)]
    sigma_min, sigma_max = annotation_arrays(got, names)
    assert sigma_min[6] == 0 and sigma_max[5] == 0.15 and sigma_min[4] == np.float32(levels[20 + j])


def test_annotation_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(3)
    original = {f"img{i:08d}.png": Annotation(float(rng.random() * 2), float(rng.random())) for i in range(20)}
    write_annotations(tmp_path, original)
    assert read_annotations(tmp_path) == original  # float64 values round-trip exactly
    assert read_annotations(tmp_path / "missing") == {}
    (tmp_path / "annotations.jsonl").write_text(json.dumps({"filename": "a.png", "probabilities": [[1.0]] * 3}) + "\n")
    from ambient_fast.data.errors import AnnotationError

    with pytest.raises(AnnotationError, match="sigmas.txt"):
        read_annotations(tmp_path)
    with pytest.raises(AnnotationError, match="S = 4 levels"):
        read_annotations(tmp_path, sigmas=[0.1, 0.2, 0.3, 0.4])
    assert read_annotations(tmp_path, sigmas=[0.3, 0.1, 0.2]) == {"a.png": (0.3, 0.0)}
    (tmp_path / "annotations.jsonl").write_text(
        json.dumps({"filename": "a.png", "sigma_min": 1.0, "sigma_max": 0})
        + "\n"
        + json.dumps({"filename": "a.png", "sigma": 2.0})
        + "\n"
    )
    from ambient_fast.data import read_annotations as strict_read_annotations

    with pytest.raises(AnnotationError, match="duplicate"):
        strict_read_annotations(tmp_path / "annotations.jsonl")  # the engine's reader keeps refusing


def test_duplicate_lines_last_wins_with_one_warning(tmp_path):
    """A rerun of the anchors' restore/annotate scripts appends: the last line per name wins, one warning."""
    levels = np.linspace(0.05, 3.0, 16)
    (tmp_path / "sigmas.txt").write_text("\n".join(repr(float(v)) for v in levels))
    trajectory = np.ones((16, 2))
    trajectory[5:] = 0.0
    first_run = [
        {"filename": "img00000000.png", "sigma_min": 1.2, "sigma_max": 0.0},
        {"filename": "img00000001.png", "probabilities": trajectory.tolist()},
        {"filename": "img00000002.png", "sigma_min": 0.0, "sigma_max": 0.0},
    ]
    rerun = [
        {"filename": "img00000000.png", "sigma_min": 0.15, "sigma_max": 0.0},
        {"filename": "img00000001.png", "annotation": 0.4},
    ]
    (tmp_path / "annotations.jsonl").write_text("\n".join(json.dumps(x) for x in first_run + rerun) + "\n")
    with pytest.warns(UserWarning, match=r"2 duplicate line\(s\) \(first at line 1\)") as record:
        got = read_annotations(tmp_path)
    assert len(record) == 1
    assert got == {"img00000000.png": (0.15, 0.0), "img00000001.png": (0.4, 0.0), "img00000002.png": (0.0, 0.0)}
    # The last line may also be a raw form: the classifier line wins over an earlier fixed one.
    (tmp_path / "annotations.jsonl").write_text("\n".join(json.dumps(x) for x in rerun + first_run[1:2]) + "\n")
    with pytest.warns(UserWarning, match="1 duplicate"):
        got = read_annotations(tmp_path)
    j = math.ceil(math.log(0.55) / math.log(1 - 2 / 33)) - 1
    assert got["img00000001.png"] == (float(np.float32(levels[min(5 + j, 15)])), 0.0)


def test_sigmas_txt_is_read_as_float32(tmp_path):
    """The anchors put sigmas.txt into a float32 tensor: levels are float32 values (0.1 -> 0.10000000149...)."""
    from ambient_fast.compat import read_sigmas

    (tmp_path / "sigmas.txt").write_text("0.3\n0.1\n2.5\n")
    got = read_sigmas(tmp_path / "sigmas.txt")
    assert got.dtype == np.float64
    assert got.tolist() == [0.10000000149011612, 0.30000001192092896, 2.5]
    trajectory = np.array([[1.0], [0.0], [0.0]])  # confused from the second level on
    assert float(classifier_sigma_min(trajectory, got, ema_span=1)) == 0.30000001192092896


# ----------------------------------------------------------------------------------------
# Data side: noise-first InfiniteSampler, WithSigma, frozen noise, dataset folders.


def _levels_fixture(n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    sigma_min = np.where(rng.random(n) < 0.9, 1.2, 0.0)
    sigma_max = np.where(rng.random(n) < 0.1, 0.5, 0.0)
    return sigma_min, sigma_max


def ref_anchor_scan(sigma_min, sigma_max, buffer, seed, rank, world, count, window_size=0.5):
    """The anchors' InfiniteSampler scan (ANCHORS 1.2 on EDM's windowed shuffle), first ``count`` pairs.

    Written from the description: shuffled order from RandomState(seed); rank takes the steps
    congruent to it; a kept sigma until an eligible image; after each step a swap of
    order[i] with order[(i - randint(window)) % N]. Sigmas from RandomState(seed * world + rank)."""
    n = len(sigma_min)
    order = list(range(n))
    shuffle_rng = np.random.RandomState(seed)
    shuffle_rng.shuffle(order)
    window = int(round(n * window_size))
    sigma_rng = np.random.RandomState(seed * world + rank)
    sigma = math.exp(sigma_rng.normal(0, 1) * 1.2 - 1.2)
    out, step = [], 0
    while len(out) < count:
        pos = step % n
        if step % world == rank:
            image = order[pos]
            if sigma > sigma_min[image] * buffer or sigma < sigma_max[image]:
                out.append((image, sigma))
                sigma = math.exp(sigma_rng.normal(0, 1) * 1.2 - 1.2)
        if window >= 2:
            other = (pos - shuffle_rng.randint(window)) % n
            order[pos], order[other] = order[other], order[pos]
        step += 1
    return out


@pytest.mark.parametrize("s_max", [4.0, None])
def test_infinite_sampler_pairs_are_eligible_and_infinite(s_max):
    from ambient_fast.compat import InfiniteSampler

    sigma_min, sigma_max = _levels_fixture()
    sampler = InfiniteSampler(None, seed=3, s_max=s_max, sigma_min=sigma_min, sigma_max=sigma_max)
    buffer = 1.0 if s_max is None else math.sqrt(1 + 1 / (s_max - 1))
    assert math.isclose(sampler.buffer_factor, buffer)
    it = iter(sampler)
    pairs = [next(it) for _ in range(5000)]  # 25 nominal passes over 200 images: never stops
    index = np.array([i for i, _ in pairs])
    sigma = np.array([s for _, s in pairs])
    eligible = (sigma_min[index] == 0) | (sigma > buffer * sigma_min[index]) | (sigma < sigma_max[index])
    assert eligible.all()
    assert abs(np.log(sigma).mean() - (-1.2)) < 0.06 and abs(np.log(sigma).std() - 1.2) < 0.06  # 5000 draws: s.e. 0.017
    again = iter(InfiniteSampler(None, seed=3, s_max=s_max, sigma_min=sigma_min, sigma_max=sigma_max))
    assert [next(again) for _ in range(300)] == pairs[:300]


@pytest.mark.parametrize(("rank", "world"), [(0, 1), (0, 2), (1, 2), (2, 3)])
def test_infinite_sampler_is_the_anchors_scan(rank, world):
    """Same order, same window swaps, same skip rule, rank slots as the anchors' sampler."""
    from ambient_fast.compat import InfiniteSampler

    sigma_min, sigma_max = _levels_fixture(97)
    sampler = InfiniteSampler(
        None, rank=rank, num_replicas=world, seed=4, s_max=4, sigma_min=sigma_min, sigma_max=sigma_max
    )
    it = iter(sampler)
    ours = [next(it) for _ in range(1500)]
    assert ours == ref_anchor_scan(sigma_min, sigma_max, math.sqrt(4 / 3), 4, rank, world, 1500)
    with pytest.raises(ValueError, match="shuffle=False"):
        InfiniteSampler(None, shuffle=False, sigma_min=sigma_min)
    with pytest.raises(ValueError, match="image 3"):
        InfiniteSampler(None, sigma_min=[0.0, 0.0, 0.0, -1.0])


def test_infinite_sampler_per_image_count_spread_is_the_scans_not_poisson():
    """Coverage law: a scan visits each image about once per pass, so draw counts spread far less
    than with replacement (Poisson, sd = sqrt(mean)); the window swaps keep it from being exact."""
    from ambient_fast.compat import InfiniteSampler

    n = 200
    clean = iter(InfiniteSampler(None, seed=3, s_max=4, sigma_min=np.zeros(n)))
    counts = np.bincount([next(clean)[0] for _ in range(40 * n)], minlength=n)
    assert counts.mean() == 40 and 1.5 < counts.std() < 0.7 * math.sqrt(40)  # scan: sd ~3.1; Poisson: 6.3
    sigma_min, sigma_max = _levels_fixture(n)
    mixed = iter(InfiniteSampler(None, seed=3, s_max=4, sigma_min=sigma_min, sigma_max=sigma_max))
    counts = np.bincount([next(mixed)[0] for _ in range(40 * n)], minlength=n)
    always = (sigma_min == 0) & (sigma_max == 0)  # clean images: eligible at every visit
    mean, sd = counts[always].mean(), counts[always].std()
    assert sd < 0.7 * math.sqrt(mean)  # ~6.4 vs Poisson ~13


def test_infinite_sampler_redraws_a_sigma_no_image_accepts():
    """All images corrupt: the anchors' scan would loop forever on a low sigma; ours redraws it."""
    from ambient_fast.compat import InfiniteSampler

    it = iter(InfiniteSampler(None, seed=0, s_max=4, sigma_min=np.full(10, 0.5)))
    sigmas = np.array([next(it)[1] for _ in range(300)])
    assert (sigmas > 0.5 * math.sqrt(4 / 3)).all()
    with pytest.raises(ValueError, match="no image is eligible"):
        InfiniteSampler(None, s_max=4, sigma_min=np.full(10, 300.0))  # crop sentinels without sigma_max


def test_with_sigma_dataloader_carries_sigma_with_the_item():
    """The sigma travels with its image through a DataLoader: no shared dict keyed by filename."""
    from ambient_fast.compat import InfiniteSampler, WithSigma

    sigma_min, sigma_max = _levels_fixture(64)

    class AnchorLikeDataset(torch.utils.data.Dataset):
        _image_fnames = [f"00000/img{i:08d}.png" for i in range(64)]
        annotations = {
            name: (float(lo), float(hi))
            for name, lo, hi in zip(_image_fnames, sigma_min, sigma_max, strict=True)
            if lo or hi
        }

        def __len__(self):
            return 64

        def __getitem__(self, idx):
            return {"image": torch.full((3, 4, 4), float(idx)), "filename": self._image_fnames[idx]}

    dataset = AnchorLikeDataset()
    sampler = InfiniteSampler(dataset, seed=5, s_max=4)
    loader = torch.utils.data.DataLoader(WithSigma(dataset), sampler=sampler, batch_size=8)
    expected = iter(InfiniteSampler(dataset, seed=5, s_max=4))
    batches = iter(loader)
    for _ in range(3):
        batch = next(batches)
        pairs = [next(expected) for _ in range(8)]
        assert batch["index"].tolist() == [i for i, _ in pairs]
        assert batch["sigma_t"].tolist() == [s for _, s in pairs]
        assert batch["image"][:, 0, 0, 0].tolist() == [float(i) for i, _ in pairs]
    assert WithSigma([(1, 2)])[(0, 0.5)] == (1, 2, 0.5)


def test_anchor_nature_noise_matches_reseeded_numpy_without_touching_global_rng():
    from ambient_fast.compat import anchor_nature_noise

    state = np.random.get_state()
    noise = anchor_nature_noise([0, 7, 123], (3, 4, 4))
    assert np.random.get_state()[1].tolist() == state[1].tolist()
    for row, idx in zip(noise, [0, 7, 123], strict=True):
        np.random.seed(idx)
        assert torch.equal(row, torch.from_numpy(np.random.randn(3, 4, 4)).float())
    np.random.set_state(state)


def test_open_anchor_dataset_with_raw_annotation_forms(tmp_path):
    from PIL import Image

    from ambient_fast.compat import InfiniteSampler, open_anchor_dataset

    names = [f"00000/img{i:08d}.png" for i in range(5)]
    (tmp_path / "00000").mkdir()
    for i, name in enumerate(names):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / name)
    levels = np.linspace(0.05, 3.0, 16)
    (tmp_path / "sigmas.txt").write_text("\n".join(repr(float(v)) for v in levels))
    trajectory = np.ones((16, 2))
    trajectory[3:] = 0.0
    lines = [
        {"filename": names[0], "sigma_min": 1.2, "sigma_max": 0.0},
        {"filename": names[1], "probabilities": trajectory.tolist()},
        {"filename": names[2], "crop_predictions_16": [0.9], "crop_predictions_32": [0.2]},
        {"filename": names[3], "annotation": 0.4},
    ]  # names[4] unannotated: clean
    (tmp_path / "annotations.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    dataset = open_anchor_dataset(tmp_path)
    assert list(dataset.keys) == names
    j = math.ceil(math.log(0.55) / math.log(1 - 2 / 33)) - 1
    np.testing.assert_array_equal(dataset.sigma_min, [1.2, np.float32(levels[min(3 + j, 15)]), 300.0, 0.4, 0.0])
    np.testing.assert_array_equal(dataset.sigma_max, [0.0, 0.0, 0.2, 0.0, 0.0])
    assert dataset.annotation_path == str(tmp_path / "annotations.jsonl")
    pairs = iter(InfiniteSampler(dataset, s_max=4))
    for _ in range(200):
        index, sigma = next(pairs)
        assert (
            dataset.sigma_min[index] == 0
            or sigma > 1.1547 * dataset.sigma_min[index]
            or sigma < dataset.sigma_max[index]
        )


def test_levels_must_have_one_value_per_sample():
    """No silent broadcasting of levels (the released ambient_utils loss mixed samples that way)."""
    images = torch.randn(3, 3, 8, 8)
    with pytest.raises(ValueError, match="one level per sample"):
        AmbientEDMLoss()(net=EDMNet(0), x_tn=images, sigma_tn=torch.zeros(1), sigma_t=torch.ones(3))
    with pytest.raises(ValueError, match="one level per sample"):
        EDMAmbientLoss()(net=EDMNet(0), images=images, sigma=torch.ones(2))
