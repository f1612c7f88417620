"""The reference math against closed-form Gaussian results (SPEC section 7).

These are what make the plain-PyTorch reference trustworthy; every fast path is then tested
against the reference. Tolerances are Monte-Carlo error bounds, derived in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch

import ambient_fast as af
from tests.gaussian import Gaussian, GaussianMixture, empirical_moments, random_spd

DIM = 3


@pytest.fixture
def gaussian() -> Gaussian:
    g = torch.Generator().manual_seed(1)
    return Gaussian(mu=torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64), cov=random_spd(DIM, g))


def _fit_linear_denoiser(y_t, y_tmin, sigma, sigma_min, *, schedule, target, mode="ambient"):
    """Least squares of h(y) = A y + beta on the public ambient loss (one exact Newton step).

    The loss is quadratic in (A, beta), so theta* = -H^-1 g at theta = 0 is its minimiser;
    gradient and Hessian come from autograd through ``ambient_fast.ambient_loss`` itself.
    """
    n, d = y_t.shape
    design = torch.cat([y_t, torch.ones(n, 1, dtype=y_t.dtype)], dim=1)

    def loss_of(theta):
        pred = design @ theta.reshape(d + 1, d)
        return af.ambient_loss(
            pred, y_t, y_tmin, sigma, sigma_min, schedule=schedule, target=target,
            weight=None, mode=mode, s_max=math.inf, backend="torch",
        )

    theta0 = torch.zeros((d + 1) * d, dtype=y_t.dtype)
    grad = torch.autograd.functional.jacobian(loss_of, theta0)
    hess = torch.autograd.functional.hessian(loss_of, theta0)
    theta = -torch.linalg.solve(hess, grad).reshape(d + 1, d)
    return theta[:d].T, theta[d]  # A (d, d) acting as A @ y, beta (d,)


def _clean_linear_denoiser(gaussian: Gaussian, s: float, schedule: str, target: str):
    """Closed-form E[target | x_t] = A x_t + beta of the clean distribution at level s."""
    eye = torch.eye(gaussian.dim, dtype=torch.float64)
    alpha = 1.0 if schedule == "ve" else math.sqrt(1 - s * s)
    gain = alpha * gaussian.cov @ torch.linalg.inv(alpha**2 * gaussian.cov + s * s * eye)
    beta = gaussian.mu - gain @ (alpha * gaussian.mu)
    if target == "x0":
        return gain, beta
    # eps = (x_t - alpha x0) / s
    return (eye - alpha * gain) / s, -alpha * beta / s


# Monte-Carlo error of the fit: with N samples the least-squares coefficients have standard
# error ~ sqrt(residual variance / (N var(y))). The residual variance of the ambient target is
# at most ~ (s^2/(s^2-sm^2)) * Var(x0 | y_t) + 1 ~ 3 here (eps rows: divided by ~s^2 and
# relative to entries of size 1/s), and var(y) >= 0.2, so with N = 400k the standard error is
# below 0.006; TOL = 0.03 is 5 standard errors. The plain loss is off by sm^2 (Sigma + s^2)^-1
# >= 0.09 for x0 rows (and more for eps rows), three TOLs away.
N_FIT = 400_000
TOL = 0.03


@pytest.mark.parametrize("schedule,s,sm", [("ve", 1.0, 0.5), ("vp", 0.7, 0.4)])
@pytest.mark.parametrize("target", ["x0", "eps"])
def test_ambient_residual_recovers_clean_denoiser(gaussian, schedule, target, s, sm):
    g = torch.Generator().manual_seed(2)
    x0 = gaussian.sample(N_FIT, g)
    sigma = torch.full((N_FIT,), s, dtype=torch.float64)
    sigma_min = torch.full((N_FIT,), sm, dtype=torch.float64)
    y_t, y_tmin = af.noisy_pair(x0, sigma, sigma_min, schedule, generator=g)
    clean_a, clean_b = _clean_linear_denoiser(gaussian, s, schedule, target)

    amb_a, amb_b = _fit_linear_denoiser(y_t, y_tmin, sigma, sigma_min, schedule=schedule, target=target)
    assert torch.allclose(amb_a, clean_a, atol=TOL), (amb_a, clean_a)
    assert torch.allclose(amb_b, clean_b, atol=TOL), (amb_b, clean_b)

    # The plain loss on the same corrupt data learns the corrupt distribution instead.
    plain_a, plain_b = _fit_linear_denoiser(
        y_t, y_tmin, sigma, sigma_min, schedule=schedule, target=target, mode="contraction"
    )
    assert (plain_a - clean_a).abs().max() > 3 * TOL
    if schedule == "ve" and target == "x0":
        eye = torch.eye(DIM, dtype=torch.float64)
        corrupt = gaussian.cov + sm * sm * eye
        expected = corrupt @ torch.linalg.inv(corrupt + (s * s - sm * sm) * eye)
        assert torch.allclose(plain_a, expected, atol=TOL)


def test_sigma_min_zero_is_the_plain_denoising_loss():
    g = torch.Generator().manual_seed(3)
    for schedule in ("ve", "vp"):
        for target in ("x0", "eps"):
            y0 = torch.randn(6, 5, dtype=torch.float64, generator=g)
            s = torch.rand(6, dtype=torch.float64, generator=g) * 0.8 + 0.1
            eps = torch.randn(6, 5, dtype=torch.float64, generator=g)
            alpha = torch.ones_like(s) if schedule == "ve" else torch.sqrt(1 - s * s)
            y_t = alpha[:, None] * y0 + s[:, None] * eps
            pred = torch.randn(6, 5, dtype=torch.float64, generator=g)
            want = ((pred - (y0 if target == "x0" else eps)) ** 2).mean(1)
            got = af.ambient_loss(
                pred, y_t, y0, s, torch.zeros_like(s), schedule=schedule, target=target,
                weight=None, reduction="none",
            )
            torch.testing.assert_close(got, want)


def test_edm_weight_matches_the_anchor_formula():
    """ANCHORS 1.1: lambda_EDM * s^4/(s^2-sm^2)^2 * |(1-r^2) D + r^2 y_t - y_tmin|^2, r = sm/s."""
    g = torch.Generator().manual_seed(4)
    b = 64
    d = torch.randn(b, 3, 4, 4, dtype=torch.float64, generator=g)
    y_t = torch.randn(b, 3, 4, 4, dtype=torch.float64, generator=g)
    y_tmin = torch.randn(b, 3, 4, 4, dtype=torch.float64, generator=g)
    sigma = torch.exp(torch.randn(b, dtype=torch.float64, generator=g))
    sigma_min = sigma * torch.rand(b, dtype=torch.float64, generator=g) * 0.8
    sigma_min[::5] = 0
    r2 = (sigma_min / sigma)[:, None, None, None] ** 2
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    w_amb = sigma**4 / (sigma**2 - sigma_min**2) ** 2
    anchor = lam * w_amb * (((1 - r2) * d + r2 * y_t - y_tmin) ** 2).mean(dim=(1, 2, 3))
    ours = af.ambient_loss(d, y_t, y_tmin, sigma, sigma_min, s_max=math.inf, reduction="none")
    torch.testing.assert_close(ours, anchor)


# Sampling with the exact denoiser: N samples give the mean to standard error sqrt(lambda/N)
# <= sqrt(1.5/20000) = 0.009 and covariance entries to about sqrt(2/N) lambda <= 0.015;
# tolerances 0.04 / 0.06 are over 4 standard errors, well above the discretisation error of
# 32 Heun steps (checked: < 0.005 in the moments).
N_SAMPLE = 20_000


@pytest.mark.parametrize("method,steps,extra", [
    ("heun", 32, {}),
    ("euler", 256, {}),
    ("churn", 64, {"S_churn": 30.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.0}),
    ("sde", 256, {}),
])
def test_sample_with_exact_gaussian_denoiser_reproduces_moments(gaussian, method, steps, extra):
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(N_SAMPLE, DIM, dtype=torch.float64, generator=g)
    sigmas = af.karras_sigmas(steps, 0.002, 80.0)
    x = af.sample(gaussian.denoise, noise, sigmas, method=method, generator=g, **extra)
    mean, cov = empirical_moments(x)
    assert torch.allclose(mean, gaussian.mu, atol=0.04), (mean, gaussian.mu)
    assert torch.allclose(cov, gaussian.cov, atol=0.06), (cov, gaussian.cov)


@pytest.fixture
def mixture() -> GaussianMixture:
    g = torch.Generator().manual_seed(6)
    return GaussianMixture(
        weights=torch.tensor([0.3, 0.7], dtype=torch.float64),
        mus=torch.tensor([[-1.5, 0.5, 0.0], [1.0, -0.5, 0.8]], dtype=torch.float64),
        covs=torch.stack([random_spd(DIM, g, 0.05, 0.3), random_spd(DIM, g, 0.05, 0.3)]),
    )


def test_sample_with_exact_mixture_denoiser_reproduces_moments(mixture):
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(N_SAMPLE, DIM, dtype=torch.float64, generator=g)
    x = af.sample(mixture.denoise, noise, af.karras_sigmas(40, 0.002, 80.0), method="heun")
    mean, cov = empirical_moments(x)
    want_mean, want_cov = mixture.moments()
    # Mixture variance along the mode axis is ~1.5; the same 4-SE argument gives 0.05 / 0.08.
    assert torch.allclose(mean, want_mean, atol=0.05), (mean, want_mean)
    assert torch.allclose(cov, want_cov, atol=0.08), (cov, want_cov)
    # The mode weights are right too: share of samples on the first component's side.
    assert abs(float((x[:, 0] < -0.25).double().mean()) - 0.3) < 0.02


N_POST = 20_000


def test_stochastic_restore_samples_the_gaussian_posterior(gaussian):
    sm = 0.8
    y = torch.tensor([1.2, -0.4, 0.9], dtype=torch.float64)
    y0 = y.expand(N_POST, DIM).clone()
    sigma_min = torch.full((N_POST,), sm, dtype=torch.float64)
    # start_noise = 0 conditions on x_sm = y exactly; the posterior is then sampled by the
    # reverse SDE. Posterior variances are <= 0.5: mean SE <= 0.005, cov SE <= 0.005.
    out = af.restore(
        gaussian.denoise, y0, sigma_min, 0.0, num_steps=200, method="sde",
        seeds=torch.arange(N_POST), start_noise=torch.zeros_like(y0),
    )
    mean, cov = empirical_moments(out)
    want_mean, want_cov = gaussian.posterior(y, sm)
    assert torch.allclose(mean, want_mean, atol=0.025), (mean, want_mean)
    assert torch.allclose(cov, want_cov, atol=0.025), (cov, want_cov)


def test_stochastic_restore_samples_the_mixture_posterior(mixture):
    sm = 1.0
    y = torch.tensor([-0.2, 0.0, 0.4], dtype=torch.float64)  # between the modes: bimodal posterior
    y0 = y.expand(N_POST, DIM).clone()
    out = af.restore(
        mixture.denoise, y0, torch.full((N_POST,), sm, dtype=torch.float64), 0.0,
        num_steps=200, method="sde", seeds=torch.arange(N_POST), start_noise=torch.zeros_like(y0),
    )
    mean, cov = empirical_moments(out)
    want_mean, want_cov = mixture.posterior_moments(y, sm)
    # Bimodal posterior: variance along the mode axis up to ~1.2 -> mean SE ~0.008.
    assert torch.allclose(mean, want_mean, atol=0.04), (mean, want_mean)
    assert torch.allclose(cov, want_cov, atol=0.06), (cov, want_cov)


def test_deterministic_restore_transports_to_the_data_marginal(gaussian):
    g = torch.Generator().manual_seed(8)
    y0 = gaussian.sample(N_POST, g)
    sigma_min = torch.full((N_POST,), 1.2, dtype=torch.float64)
    out = af.restore(gaussian.denoise, y0, sigma_min, 0.0, num_steps=32, seeds=torch.arange(N_POST))
    mean, cov = empirical_moments(out)
    assert torch.allclose(mean, gaussian.mu, atol=0.04)
    assert torch.allclose(cov, gaussian.cov, atol=0.06)
    # ...and not to the noisy marginal it started from (variance + 1.44 on every axis).
    assert float(torch.diagonal(cov - gaussian.cov).abs().max()) < 0.06


def test_vp_eps_model_wrapped_is_the_edm_denoiser(gaussian):
    """A VP eps-model that is exact for Gaussian data, wrapped by VPToEDM, equals the VE denoiser."""

    class ExactVPEps(torch.nn.Module):
        def forward(self, x_vp, s, labels=None):
            alpha = torch.sqrt(1 - s * s)[:, None]
            # E[x0 | x_vp] for x_vp = alpha x0 + s eps, then eps = (x_vp - alpha x0_hat) / s.
            eye = torch.eye(DIM, dtype=torch.float64)
            out = []
            for i in range(x_vp.shape[0]):
                a, si = float(alpha[i]), float(s[i])
                gain = a * gaussian.cov @ torch.linalg.inv(a * a * gaussian.cov + si * si * eye)
                x0 = gaussian.mu + gain @ (x_vp[i] - a * gaussian.mu)
                out.append((x_vp[i] - a * x0) / si)
            return torch.stack(out)

    wrapped = af.VPToEDM(ExactVPEps(), prediction="eps")
    g = torch.Generator().manual_seed(9)
    x = torch.randn(16, DIM, dtype=torch.float64, generator=g) * 2
    sigma = torch.exp(torch.randn(16, dtype=torch.float64, generator=g))
    torch.testing.assert_close(wrapped(x, sigma), gaussian.denoise(x, sigma))
