"""Noise schedule helpers (DDPM discrete time): alphas_cumprod, q_sample, eps <-> x0 <-> v, posterior coefficients.

Conventions: ``t`` is an integer timestep in ``[0, T)``, ``abar_t = alphas_cumprod[t]``, and
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (DDPM, Ho et al. 2020, Eq. 4). A k-diffusion / ComfyUI sigma is
``sigma_t = sqrt((1 - abar_t) / abar_t)`` with ``x_sigma = x_t / sqrt(abar_t)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Stable Diffusion v1/v2 and SDXL training schedule ("scaled_linear", CompVis `linear` with sqrt-linear betas):
# beta from 0.00085 to 0.012 over 1000 steps (CompVis v1-inference.yaml linear_start / linear_end / timesteps).
SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_TIMESTEPS = 1000

PREDICTIONS = ("eps", "x0", "v")


def scaled_linear_alphas_cumprod(beta_start: float = SD_BETA_START, beta_end: float = SD_BETA_END,
                                 timesteps: int = SD_TIMESTEPS) -> torch.Tensor:
    """alphas_cumprod of the SD schedule, float64 (as CompVis ``register_schedule`` computes them)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(device=like.device, dtype=like.dtype)


@dataclass
class NoiseSchedule:
    """A discrete noise schedule and the parameterization of the denoiser that uses it.

    ``alphas_cumprod``: ``(T,)``, decreasing, in ``(0, 1]``; ``prediction``: what the denoiser returns
    (``"eps"`` noise, ``"x0"`` the clean sample, ``"v"`` velocity, Salimans & Ho 2022).
    """

    alphas_cumprod: torch.Tensor
    prediction: str = "eps"

    def __post_init__(self):
        ac = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).detach().cpu().reshape(-1)
        if ac.numel() < 2 or not bool(((ac > 0) & (ac <= 1)).all()) or not bool((ac[1:] <= ac[:-1]).all()):
            raise ValueError(f"alphas_cumprod must be a decreasing sequence in (0, 1] of length >= 2; got {ac.numel()} "
                             f"values from {float(ac.max()):.4g} to {float(ac.min()):.4g}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        self.alphas_cumprod = ac

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor, prediction: str = "x0") -> NoiseSchedule:
        """From k-diffusion sigmas (ComfyUI ``model_sampling.sigmas``): abar = 1 / (1 + sigma^2)."""
        s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
        return cls(1.0 / (1.0 + s * s), prediction)

    @property
    def timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_t broadcast against ``like`` (``(B, 1, 1, ...)``, ``like``'s dtype and device)."""
        return _bcast(self.alphas_cumprod[t.detach().cpu().long()], like)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        ac = self.alphas_cumprod[t.detach().cpu().long()]
        return ((1 - ac) / ac).sqrt()

    def q_sample(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def to_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise prediction implied by the denoiser output ``pred`` at ``(x_t, t)``."""
        if self.prediction == "eps":
            return pred
        a = self.abar(t, x_t)
        if self.prediction == "x0":
            return eps_from_x0(x_t, pred, a)
        return a.sqrt() * pred + (1 - a).sqrt() * x_t  # v: eps = sqrt(abar) v + sqrt(1 - abar) x_t

    def x0_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x0_from_eps(x_t, eps, self.abar(t, x_t))

    def posterior_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coef1_t, sigma2_t), float64 ``(B,)``, of q(x_{t-1} | x_t, x0) = N(coef1 x0 + coef2 x_t, sigma2), for
        t >= 1 (DDPM Eq. 7; CompVis ``register_schedule``: posterior_mean_coef1, posterior_variance)."""
        t = t.detach().cpu().long().reshape(-1)
        if bool((t < 1).any()):
            raise ValueError("the DDPM posterior needs t >= 1 (at t = 0 its variance is 0)")
        ac = self.alphas_cumprod
        a_t, a_prev = ac[t], ac[t - 1]
        beta = 1 - a_t / a_prev
        return beta * a_prev.sqrt() / (1 - a_t), beta * (1 - a_prev) / (1 - a_t)

    def posterior(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`posterior_coefficients` broadcast against ``like`` (its dtype and device)."""
        coef1, sigma2 = self.posterior_coefficients(t)
        return _bcast(coef1, like), _bcast(sigma2, like)

    def sqrt_recipm1(self, t: torch.Tensor) -> torch.Tensor:
        """sqrt(1 / abar_t - 1), float64 ``(B,)`` (|d x0-hat / d eps|; CompVis ``sqrt_recipm1_alphas_cumprod``)."""
        ac = self.alphas_cumprod[t.detach().cpu().long().reshape(-1)]
        return (1 / ac - 1).sqrt()


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x0-hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar) (DDPM; PALP Eq. 2)."""
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
