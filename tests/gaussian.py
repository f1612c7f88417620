"""Closed-form Gaussian and Gaussian-mixture quantities for the tests (SPEC section 7).

Everything here is float64 and written from the formulas, independently of the package.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def random_spd(dim: int, generator: torch.Generator, lo: float = 0.2, hi: float = 1.5) -> torch.Tensor:
    """A random symmetric positive-definite matrix with eigenvalues in [lo, hi]."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=generator))
    eig = lo + (hi - lo) * torch.rand(dim, dtype=torch.float64, generator=generator)
    return q @ torch.diag(eig) @ q.T


@dataclass
class Gaussian:
    """x0 ~ N(mu, cov)."""

    mu: torch.Tensor  # (d,)
    cov: torch.Tensor  # (d, d)

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        chol = torch.linalg.cholesky(self.cov)
        return self.mu + torch.randn(n, self.dim, dtype=torch.float64, generator=generator) @ chol.T

    def denoiser_matrix(self, sigma: float) -> torch.Tensor:
        """A with E[x0 | x0 + sigma eps = x] = mu + A (x - mu)."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        return self.cov @ torch.linalg.inv(self.cov + sigma**2 * eye)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact VE denoiser for a batch x (B, d) at per-sample sigma (B,)."""
        eig, vec = torch.linalg.eigh(self.cov)
        z = (x.to(torch.float64) - self.mu) @ vec
        shrink = eig / (eig + sigma.to(torch.float64).reshape(-1, 1) ** 2)
        return (self.mu + (z * shrink) @ vec.T).to(x.dtype)

    def posterior(self, y: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of x0 | x0 + sigma eps = y."""
        gain = self.denoiser_matrix(sigma)
        return self.mu + gain @ (y - self.mu), self.cov - gain @ self.cov


@dataclass
class GaussianMixture:
    """x0 ~ sum_k w_k N(mu_k, cov_k)."""

    weights: torch.Tensor  # (K,)
    mus: torch.Tensor  # (K, d)
    covs: torch.Tensor  # (K, d, d)

    @property
    def dim(self) -> int:
        return self.mus.shape[1]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)
        eps = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.mus[comp] + torch.einsum("nij,nj->ni", chol[comp], eps)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (self.weights[:, None] * self.mus).sum(0)
        second = (self.weights[:, None, None] * (self.covs + self.mus[:, :, None] * self.mus[:, None, :])).sum(0)
        return mean, second - torch.outer(mean, mean)

    def _responsibilities(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(self.dim, dtype=torch.float64)
        noisy = self.covs[None] + sigma.reshape(-1, 1, 1, 1) ** 2 * eye  # (B, K, d, d)
        diff = x[:, None, :] - self.mus[None]  # (B, K, d)
        dist = torch.distributions.MultivariateNormal(self.mus[None].expand_as(diff), covariance_matrix=noisy)
        logp = dist.log_prob(x[:, None, :].expand_as(diff)) + torch.log(self.weights)[None]
        return torch.softmax(logp, dim=1)

    def _component_posteriors(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eye = torch.eye(self.dim, dtype=torch.float64)
        gain = self.covs[None] @ torch.linalg.inv(self.covs[None] + sigma.reshape(-1, 1, 1, 1) ** 2 * eye)
        means = self.mus[None] + torch.einsum("bkij,bkj->bki", gain, x[:, None, :] - self.mus[None])
        covs = self.covs[None] - gain @ self.covs[None]
        return means, covs

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact VE denoiser E[x0 | x] for x (B, d) at per-sample sigma (B,)."""
        xf, s = x.to(torch.float64), sigma.to(torch.float64)
        resp = self._responsibilities(xf, s)
        means, _ = self._component_posteriors(xf, s)
        return (resp[:, :, None] * means).sum(1).to(x.dtype)

    def posterior_moments(self, y: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of x0 | x0 + sigma eps = y for a single y (d,)."""
        s = torch.tensor([sigma], dtype=torch.float64)
        resp = self._responsibilities(y[None], s)[0]
        means, covs = self._component_posteriors(y[None], s)
        means, covs = means[0], covs[0]
        mean = (resp[:, None] * means).sum(0)
        second = (resp[:, None, None] * (covs + means[:, :, None] * means[:, None, :])).sum(0)
        return mean, second - torch.outer(mean, mean)


def empirical_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(torch.float64)
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)
