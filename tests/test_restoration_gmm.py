"""Restoration against closed forms (SPEC 5 and 7) with an exact Gaussian-mixture denoiser.

The data distribution is a 2-component mixture in d = 2 with diagonal covariances, so the
posterior mean ``E[x0 | x_sigma]`` is exact and cheap (elementwise), and the posterior
``p(x0 | x_sm = y)`` is a known mixture (mean and covariance below). The statistical tests go
through :func:`restore_dataset` on ``tensors``-format datasets: the whole engine, IO
included. The engine is also checked against the reference batch restorer
(:func:`ambient_fast.samplers.restore.restore`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ambient_fast.core.noise import derive_seeds
from ambient_fast.data import Sample, open_dataset, write_dataset
from ambient_fast.restoration import RestorationSampler, SamplerConfig, float_codec, restore_dataset
from ambient_fast.samplers.restore import restore

pytestmark = pytest.mark.usefixtures("single_thread")


class GaussianMixtureDenoiser(nn.Module):
    """Exact ``D(x, sigma) = E[x0 | x0 + sigma n = x]`` for ``x0 ~ sum_k w_k N(mu_k, diag(v_k))``.

    Per component ``E[x0 | x, k] = mu_k + v_k / (v_k + sigma^2) (x - mu_k)``, weighted by the
    responsibilities ``r_k(x) ~ w_k N(x; mu_k, diag(v_k + sigma^2))``. float64 inside, the
    output in ``x``'s dtype. Rows are independent (no cross-row reductions), so a sample's
    result does not depend on its batch.
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("log_w", torch.log(weights.double()))
        self.register_buffer("mu", means.double())  # (K, d)
        self.register_buffer("var", variances.double())  # (K, d)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x64 = x.double().reshape(x.shape[0], 1, -1)
        s2 = sigma.double().reshape(-1, 1, 1) ** 2
        total = self.var + s2  # (B, K, d)
        diff = x64 - self.mu
        log_p = self.log_w - 0.5 * (diff * diff / total + torch.log(total)).sum(-1)
        r = torch.softmax(log_p, dim=1)
        mean_k = self.mu + self.var / total * diff
        return (r.unsqueeze(-1) * mean_k).sum(1).reshape(x.shape).to(x.dtype)

    def posterior(self, y: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(d,)`` and covariance ``(d, d)`` of ``p(x0 | x_sigma = y)`` (SPEC 7)."""
        total = self.var + sigma**2
        diff = y.double() - self.mu
        r = torch.softmax(self.log_w - 0.5 * (diff * diff / total + torch.log(total)).sum(-1), dim=0)
        m = self.mu + self.var / total * diff  # (K, d)
        p = self.var - self.var**2 / total  # (K, d) diagonal posterior variances
        mean = (r[:, None] * m).sum(0)
        second = (r[:, None, None] * (torch.diag_embed(p) + m[:, :, None] * m[:, None, :])).sum(0)
        return mean, second - torch.outer(mean, mean)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of the data distribution."""
        w = self.log_w.exp()
        mean = (w[:, None] * self.mu).sum(0)
        second = (w[:, None, None] * (torch.diag_embed(self.var) + self.mu[:, :, None] * self.mu[:, None, :])).sum(0)
        return mean, second - torch.outer(mean, mean)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.mu.shape[1], dtype=torch.float64, generator=generator)
        return self.mu[k] + self.var[k].sqrt() * eps


def make_gmm() -> GaussianMixtureDenoiser:
    """Two anisotropic components: the posterior between them is bimodal (nonlinear case)."""
    return GaussianMixtureDenoiser(
        torch.tensor([0.4, 0.6]),
        torch.tensor([[-1.0, 0.5], [1.0, -0.5]]),
        torch.tensor([[0.30, 0.10], [0.15, 0.35]]),
    ).eval()


def write_tensor_dataset(root: Path, samples: np.ndarray, sigma_min: np.ndarray) -> Path:
    """A ``tensors``-format dataset version (one ``.npy`` part + keys + sidecar)."""
    rows = [
        Sample(index=i, key=f"gmm/{i:06d}", array=row, sigma_min=float(level))
        for i, (row, level) in enumerate(zip(samples, sigma_min, strict=True))
    ]
    return write_dataset(root, "tensors", rows, tensor_container="npy")


def read_tensor_dataset(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``(N, ...)`` and sigma_min ``(N,)`` of a tensors dataset, in key order."""
    dataset = open_dataset(root)
    return dataset.rows(range(len(dataset))), dataset.sigma_min


def _engine(gmm: GaussianMixtureDenoiser, batch: int, **config: object) -> RestorationSampler:
    cfg = SamplerConfig(state_dtype=torch.float64, **config)  # type: ignore[arg-type]
    return RestorationSampler(gmm, (2,), batch, cfg, codec=float_codec(torch.float64))


def test_stochastic_restoration_matches_closed_form_posterior(tmp_path: Path) -> None:
    """M copies of one stored-noisy sample y at sm = 1 (``start_noise="none"``: each chain
    starts exactly at y), each with its own seed, restored to 0 by the stochastic sampler:
    M independent draws from ``p(x0 | x_1 = y)``, whose mean and covariance are known
    (SPEC 7). y sits between the modes: the posterior is bimodal (weights 0.26 / 0.74).

    Tolerance = Monte-Carlo error + discretisation bias. MC: standard errors for M = 8192
    draws are sqrt(Var_i / M) <= 0.010 for the mean and sqrt((Var_i Var_j + Cov_ij^2) / M)
    <= 0.012 for a covariance entry (Gaussian approximation of the fourth moments); we
    allow 4.5 of them (a false alarm about 1 in 10^5 per entry). Bias: the ancestral step
    ignores Var(x0 | x) inside a step, so it is first order: its variance deficit measured
    with M = 16384 at K = 128 and 512 is 4.4 and 5.2 Var/K; we add 6 sqrt(Var_i Var_j)/K
    (0.009 at K = 512, about 0.8 standard errors) to each entry's bound, and the same
    relative allowance to the mean.
    """
    gmm = make_gmm()
    m, k, sm = 8192, 512, 1.0
    y = torch.tensor([0.1, 0.0], dtype=torch.float64)
    src = write_tensor_dataset(tmp_path / "src", np.tile(y.numpy(), (m, 1)), np.full(m, sm))
    restore_dataset(
        gmm,
        src,
        tmp_path / "dst",
        num_steps=k,
        batch_size=m,
        method="sde",
        start_noise="none",
        state_dtype="float64",
        seed=1,
        progress=False,
    )
    rows, new_sigma_min = read_tensor_dataset(tmp_path / "dst")
    assert np.all(new_sigma_min == sm / 8)
    out = torch.from_numpy(rows)
    mean, cov = gmm.posterior(y, sm)
    std = torch.diagonal(cov).sqrt()
    bias = 6.0 / k
    se_mean = std / m**0.5
    se_cov = ((std[:, None] * std[None, :]) ** 2 + cov**2).div(m).sqrt()
    assert torch.all((out.mean(0) - mean).abs() <= 4.5 * se_mean + bias * std), (out.mean(0), mean)
    assert torch.all((torch.cov(out.T) - cov).abs() <= 4.5 * se_cov + bias * std[:, None] * std[None, :]), (
        torch.cov(out.T),
        cov,
    )


def test_deterministic_restoration_transports_noisy_marginal(tmp_path: Path) -> None:
    """Data y ~ GMM at sm = 0.8; Heun restoration of ``y + sm eps`` (fresh noise, the anchor
    default) to 0 transports ``p * N(0, sm^2)`` back to p (SPEC 7): the restored set has the
    mixture's mean and covariance. Heun is second order; at K = 32 its transport error is
    far below the MC error. Tolerance: 4.5 MC standard errors for M = 8192 (mean
    sqrt(Var/M) <= 0.011; covariance entries as in the posterior test)."""
    gmm = make_gmm()
    m, sm = 8192, 0.8
    data = gmm.sample(m, torch.Generator().manual_seed(1))
    src = write_tensor_dataset(tmp_path / "src", data.numpy(), np.full(m, sm))
    restore_dataset(
        gmm,
        src,
        tmp_path / "dst",
        num_steps=32,
        batch_size=2048,
        method="heun",
        state_dtype="float64",
        seed=2,
        progress=False,
    )
    out = torch.from_numpy(read_tensor_dataset(tmp_path / "dst")[0])
    mean, cov = gmm.moments()
    var = torch.diagonal(cov)
    assert torch.all((out.mean(0) - mean).abs() <= 4.5 * (var / m).sqrt())
    se_cov = ((var[:, None] * var[None, :] + cov**2) / m).sqrt()
    assert torch.all((torch.cov(out.T) - cov).abs() <= 4.5 * se_cov)


@pytest.mark.parametrize("method", ["heun", "sde"])
def test_restored_dataset_is_the_engine_output(tmp_path: Path, method: str) -> None:
    """End to end: ``restore_dataset`` on a tensors dataset (clean and corrupt samples, a
    padded last batch) stores exactly the engine's per-sample results (so the closed-form
    checks above hold for restored datasets), keeps clean rows bit for bit, and annotates
    restored samples ``sigma_min / rho_ambient``."""
    gmm = make_gmm()
    n = 45
    data = gmm.sample(n, torch.Generator().manual_seed(4)).numpy()
    sigma_min = np.where(np.arange(n) % 4 == 0, 0.0, np.linspace(0.2, 1.5, n))
    src = write_tensor_dataset(tmp_path / "src", data, sigma_min)
    report = restore_dataset(
        gmm,
        src,
        tmp_path / "dst",
        num_steps=12,
        batch_size=8,
        method=method,
        seed=9,
        rho_ambient=4.0,
        state_dtype="float64",
        backend="torch",
        progress=False,
    )
    assert (report.num_restored, report.num_copied) == ((sigma_min > 0).sum(), (sigma_min == 0).sum())
    out, new_sigma_min = read_tensor_dataset(tmp_path / "dst")
    noisy = np.flatnonzero(sigma_min > 0)
    engine = _engine(gmm, 64, num_steps=12, method=method, backend="torch")
    want = engine.restore(
        torch.from_numpy(data[noisy]), torch.from_numpy(noisy), torch.from_numpy(sigma_min[noisy]), seed=9
    )
    np.testing.assert_array_equal(out[noisy], want.numpy())
    np.testing.assert_array_equal(out[sigma_min == 0], data[sigma_min == 0])
    np.testing.assert_array_equal(new_sigma_min, np.where(sigma_min > 0, sigma_min / 4.0, 0.0))


@pytest.mark.parametrize("method", ["heun", "euler", "sde"])
@pytest.mark.parametrize("sigma_out", [0.0, 0.3])
@pytest.mark.parametrize("start_noise", ["fresh", "training", "none"])
def test_engine_matches_reference_restorer(method: str, sigma_out: float, start_noise: str) -> None:
    """The captured-loop engine computes exactly what the reference batch restorer does
    (float64 state, plain-PyTorch step ops: bit-for-bit up to a few ulps)."""
    gmm = make_gmm()
    n, k, seed = 37, 7, 11
    y = gmm.sample(n, torch.Generator().manual_seed(2))
    ids = torch.arange(100, 100 + n)
    sigma_min = torch.linspace(0.35, 2.0, n, dtype=torch.float64)
    config = SamplerConfig(
        num_steps=k,
        method=method,
        final_to_zero=sigma_out == 0,
        start_noise=start_noise,
        state_dtype=torch.float64,
        backend="torch",
    )
    sampler = RestorationSampler(gmm, (2,), 64, config, codec=float_codec(torch.float64))
    got = sampler.restore(y, ids, sigma_min, sigma_out=sigma_out, seed=seed, training_noise_seed=5)

    start = None
    if start_noise == "training":
        from ambient_fast.core.noise import STREAM_NATURE, sample_normal

        start = sample_normal(derive_seeds(ids, 5), (2,), stream=STREAM_NATURE, dtype=torch.float64)
    elif start_noise == "none":
        start = torch.zeros(n, 2, dtype=torch.float64)
    want = restore(
        gmm,
        y,
        sigma_min,
        sigma_out,
        num_steps=k,
        method=method,
        seeds=derive_seeds(ids, seed),
        start_noise=start,
        state_dtype=torch.float64,
        backend="torch",
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_batch_composition_does_not_change_a_sample() -> None:
    """Per-sample determinism in the engine: the same id gives the same bits whatever its
    batch size, position and neighbours (padding included)."""
    gmm = make_gmm()
    y = gmm.sample(10, torch.Generator().manual_seed(3))
    ids = torch.arange(10)
    sigma_min = torch.linspace(0.5, 1.5, 10, dtype=torch.float64)
    config = SamplerConfig(num_steps=9, method="sde", state_dtype=torch.float32)
    codec = float_codec(torch.float64)
    whole = RestorationSampler(gmm, (2,), 16, config, codec=codec).restore(y, ids, sigma_min, seed=4)
    small = RestorationSampler(gmm, (2,), 3, config, codec=codec)
    order = [7, 2, 9, 0, 5, 1, 8, 3, 6, 4]
    parts = {}
    for start in range(0, 10, 3):
        chosen = order[start : start + 3]
        out = small.restore(y[chosen], ids[chosen], sigma_min[chosen], seed=4)
        parts.update({c: out[j] for j, c in enumerate(chosen)})
    assert torch.equal(torch.stack([parts[i] for i in range(10)]), whole)
