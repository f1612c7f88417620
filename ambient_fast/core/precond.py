"""Denoiser wrappers into the EDM convention ``D(x, sigma) -> x0 estimate`` (SPEC 1).

- :class:`EDMPrecond`: Karras et al. 2022 preconditioning around a raw network ``F``.
- :class:`VPToEDM`: a VP-trained network (eps or x0 prediction at VP std ``s``) seen as an
  EDM denoiser: ``s = sigma/sqrt(1+sigma^2)``, input scaled by ``sqrt(1-s^2)``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from .schedules import SIGMA_DATA, ve_to_vp_sigma

__all__ = ["EDMPrecond", "VPToEDM", "edm_precond_coefficients"]


def edm_precond_coefficients(
    sigma: torch.Tensor, sigma_data: float = SIGMA_DATA
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out, c_in, c_noise)`` for per-sample ``sigma (B,)`` (SPEC 1)."""
    var = sigma * sigma + sigma_data**2
    c_skip = sigma_data**2 / var
    c_out = sigma * sigma_data / torch.sqrt(var)
    c_in = 1 / torch.sqrt(var)
    c_noise = torch.log(sigma) / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` (EDM eq. 7, Table 1).

    Args:
        net: raw network ``F(x_in, c_noise, labels) -> (B, ...)``; ``c_noise`` is ``(B,)``.
        sigma_data: data std (0.5 for images in [-1, 1]).

    ``forward(x, sigma, labels=None)``: ``x`` ``(B, ...)``, ``sigma`` ``(B,)`` or scalar, > 0.
    The preconditioning runs in float32 (float64 for float64 ``x``); ``F`` runs in its own
    dtype (autocast applies); the output has ``x``'s dtype.
    """

    def __init__(self, net: nn.Module, sigma_data: float = SIGMA_DATA) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: Any = None) -> torch.Tensor:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        sigma = torch.as_tensor(sigma, dtype=dt, device=x.device).reshape(-1)
        if sigma.numel() == 1 and x.shape[0] != 1:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = edm_precond_coefficients(sigma, self.sigma_data)
        view = (-1,) + (1,) * (x.dim() - 1)
        xf = x.to(dt)
        param = next(self.net.parameters(), None)
        net_dtype = param.dtype if param is not None else dt
        f = self.net((c_in.view(view) * xf).to(net_dtype), c_noise.to(net_dtype), labels)
        return (c_skip.view(view) * xf + c_out.view(view) * f.to(dt)).to(x.dtype)


class VPToEDM(nn.Module):
    """Wrap a VP network ``f(x_vp, s, labels)`` into an EDM denoiser ``D(x, sigma)`` (SPEC 1).

    A VE sample ``x = x0 + sigma eps`` corresponds to the VP sample
    ``x_vp = sqrt(1 - s^2) x = x / sqrt(1 + sigma^2)`` at ``s = sigma / sqrt(1 + sigma^2)``.

    Args:
        vp_net: ``f(x_vp, s, labels)`` with ``s`` the VP noise std ``(B,)`` in (0, 1).
        prediction: ``"eps"`` (``D = x - sigma f``), ``"x0"`` (``D = f``) or ``"v"``
            (``v = sqrt(1-s^2) eps - s x0``, so ``x0 = sqrt(1-s^2) x_vp - s v``).
    """

    def __init__(self, vp_net: nn.Module, prediction: Literal["eps", "x0", "v"] = "eps") -> None:
        super().__init__()
        if prediction not in ("eps", "x0", "v"):
            raise ValueError(f"prediction must be 'eps', 'x0' or 'v', got {prediction!r}")
        self.vp_net = vp_net
        self.prediction = prediction

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: Any = None) -> torch.Tensor:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        sigma = torch.as_tensor(sigma, dtype=dt, device=x.device).reshape(-1)
        if sigma.numel() == 1 and x.shape[0] != 1:
            sigma = sigma.expand(x.shape[0])
        view = (-1,) + (1,) * (x.dim() - 1)
        s = ve_to_vp_sigma(sigma)
        alpha = torch.sqrt(1 - s * s).view(view)
        xf = x.to(dt)
        x_vp = alpha * xf
        out = self.vp_net(x_vp.to(x.dtype), s.to(x.dtype), labels).to(dt)
        if self.prediction == "eps":
            d = xf - sigma.view(view) * out
        elif self.prediction == "x0":
            d = out
        else:
            d = alpha * x_vp - s.view(view) * out
        return d.to(x.dtype)
