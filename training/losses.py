"""Training losses as pure functions of predictions. Each returns a per-sample ``(B,)`` tensor; the trainer weights
and averages them. All predictions are noise predictions (``eps``), whatever the denoiser's parameterization.

- :func:`reconstruction_loss`: the eps-MSE of DDPM / LDM (and DreamBooth's prior preservation on class images).
- :func:`sude_loss`: FaceChain-SuDe (Qiao et al., CVPR 2024), as in the reference code
  (modelscope/facechain ``more_apps/Facechain-SuDe`` ``ldm/models/diffusion/ddpm.py`` ``LatentDiffusion.p_losses``),
  with two deliberate fixes: per-sample reduction (the reference averages over the batch before dividing by the
  per-sample variance) and no term at t = 0 (the reference divides by ``0 + 1e-6`` there).
- :func:`palp_loss`: PALP's prompt-alignment score (Arar et al., arXiv 2401.06105, Eq. 6-7, DDS form): a surrogate
  whose gradient is ``w(t) (G^alpha - G^beta) d x0-hat / d theta``, rescaled by ``sqrt(abar)/sqrt(1 - abar)``.
"""
from __future__ import annotations

import torch

from .schedule import NoiseSchedule

# SuDe: the reference divides the log-probability difference by (2 sigma_t^2 + 1e-6) (`prob_loss_func_class`).
SUDE_VARIANCE_EPS = 1e-6
# SuDe's w_s for DreamBooth: facechain SuDe main.py `--sude_weight` default (paper: 0.4 DreamBooth, 1.5 ViCo,
# 2.0 Custom Diffusion).
SUDE_WEIGHT = 0.4
# PALP guidance scales, paper Appendix C: alpha = 15 for the frozen model on the clean prompt, beta = 7.5 for the
# personalized model (the appendix prints "alpha = 15.0 and alpha = 7.5"; read as alpha=15, beta=7.5, alpha > beta
# being the method's imbalanced guidance).
PALP_ALPHA = 15.0
PALP_BETA = 7.5


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def reconstruction_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """mean((eps_theta(x_t) - eps)^2) per sample (LDM ``p_losses`` with ``l2`` loss, ``parameterization="eps"``)."""
    return _per_sample_mean((eps_pred.float() - eps.float()) ** 2)


# DreamBooth's prior-preservation term is the same quantity on the class images.
prior_preservation_loss = reconstruction_loss


def _sude_scale(t: torch.Tensor, schedule: NoiseSchedule, variance_eps: float) -> torch.Tensor:
    """coef1_t^2 (1/abar_t - 1) / (2 sigma_t^2 + eps), float64 ``(B,)``: turns eps-space squared differences into
    SuDe's posterior-mean ones over the variance. Computed from the float64 schedule: at small t, ``1/abar - 1``
    cancels in float32 (2.5e-5 relative at t = 1); the reference code precomputes its schedule buffers in float64
    (CompVis ``register_schedule``, numpy) too."""
    coef1, sigma2 = schedule.posterior_coefficients(t)
    return coef1 ** 2 * schedule.sqrt_recipm1(t) ** 2 / (2 * sigma2 + variance_eps)


def sude_log_ratio(eps_s: torch.Tensor, eps_c: torch.Tensor, eps_u: torch.Tensor, t: torch.Tensor,
                   schedule: NoiseSchedule, variance_eps: float = SUDE_VARIANCE_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L_ref) of SuDe per sample, as the reference defines them through the posterior means.

    ``mu(eps) = coef1 x0-hat(eps) + coef2 x_t``; the x_t parts cancel in the differences, so
    ``mu_a - mu_b = -coef1 sqrt(1/abar - 1) (eps_a - eps_b)``.
    ``L = (mean((mu_s - mu_c)^2) - mean((mu_s - mu_u)^2)) / (2 sigma_t^2 + eps)`` is -log p(class | x_{t-1} = mu_s)
    of the implicit classifier up to constants; ``L_ref = -mean((mu_c - mu_u)^2) / (2 sigma_t^2 + eps)`` is the same
    for the class branch's own sample (the truncation threshold). Requires t >= 1. The per-t factor is computed in
    float64 and cast once (:func:`_sude_scale`).
    """
    eps_s, eps_c, eps_u = eps_s.float(), eps_c.float(), eps_u.float()
    k = _sude_scale(t, schedule, variance_eps).to(device=eps_s.device, dtype=eps_s.dtype)
    msc, msu, mcu = (_per_sample_mean((a - b) ** 2) for a, b in ((eps_s, eps_c), (eps_s, eps_u), (eps_c, eps_u)))
    return k * (msc - msu), -k * mcu


def sude_loss(eps_s: torch.Tensor, eps_c: torch.Tensor, eps_u: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
              weight: float = SUDE_WEIGHT, variance_eps: float = SUDE_VARIANCE_EPS) -> torch.Tensor:
    """SuDe's subject-derivation term per sample.

    ``eps_s``: the model on the subject prompt ("photo of a sks dog"), with gradient; ``eps_c`` on the class prompt
    ("photo of a dog") and ``eps_u`` on the empty prompt, both from the same (current) model without gradient.
    ``w_s * L * [L > L_ref] / coef1_t`` (reference: ``loss_sude * prob_weight / coef1[t] * sude_weight``); the
    indicator is the truncation: the term switches off once the subject sample is at least as "class-like" as the
    class branch's own. Samples with t = 0 get 0 (deliberate fix: the posterior variance is 0 there, and the
    reference's ``/ (0 + 1e-6)`` gives a ~1e3x spike with probability 1/T).
    """
    if not (eps_s.shape == eps_c.shape == eps_u.shape):
        raise ValueError(f"SuDe needs three predictions of one shape, got {tuple(eps_s.shape)}, {tuple(eps_c.shape)}, "
                         f"{tuple(eps_u.shape)}")
    t = t.reshape(-1).long()
    valid = t >= 1
    t_safe = torch.where(valid, t, torch.ones_like(t))
    loss, ref = sude_log_ratio(eps_s, eps_c.detach(), eps_u.detach(), t_safe, schedule, variance_eps)
    coef1, _ = schedule.posterior_coefficients(t_safe)
    factor = (weight / coef1).to(device=loss.device, dtype=loss.dtype)
    active = (loss.detach() > ref.detach()) & valid.to(loss.device)
    return torch.where(active, loss * factor, torch.zeros_like(loss))


def cfg(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance G^s = (1 - s) G(x, empty) + s G(x, y) (PALP Eq. 5)."""
    return uncond + scale * (cond - uncond)


def palp_residual(frozen_cond: torch.Tensor, frozen_uncond: torch.Tensor, personal_cond: torch.Tensor,
                  personal_uncond: torch.Tensor, alpha: float = PALP_ALPHA, beta: float = PALP_BETA) -> torch.Tensor:
    """G^alpha_theta(x-hat_t, y_c) - G^beta_theta_LoRA(x-hat_t, y_P) (PALP Eq. 6, DDS residual; no gradient)."""
    return (cfg(frozen_uncond, frozen_cond, alpha) - cfg(personal_uncond, personal_cond, beta)).detach().float()


def palp_gradient_scale(t: torch.Tensor, schedule: NoiseSchedule, like: torch.Tensor, rescale: bool = True) -> torch.Tensor:
    """d x0-hat / d eps_theta = -sqrt(1 - abar)/sqrt(abar) (PALP Eq. 7), times the paper's rescale
    sqrt(abar)/sqrt(1 - abar) when ``rescale`` (a uniform gradient magnitude over t): returns the magnitude."""
    if rescale:
        return torch.ones(like.shape[0], *([1] * (like.ndim - 1)), device=like.device)
    a = schedule.abar(t.reshape(-1), like.float())
    return (1 - a).sqrt() / a.sqrt()


def palp_loss(eps_personal: torch.Tensor, residual: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
              rescale: bool = True, time_weight: torch.Tensor | None = None) -> torch.Tensor:
    """PALP's score-distillation surrogate per sample.

    ``eps_personal`` = eps_theta_LoRA(x_t, y_P) with gradient (the reconstruction branch's prediction: same t, same
    noise); ``residual`` = :func:`palp_residual` at x-hat_t, the re-noised x0-hat. The value is
    ``0.5 mean((eps - sg(eps - s r))^2) = 0.5 s^2 mean(r^2)`` and the gradient is
    ``-s w(t) r . d eps_theta / d theta / numel`` = ``w(t) r . d x0-hat / d theta`` (Eq. 6) times the rescale
    (s = 1 with ``rescale``, else sqrt(1 - abar)/sqrt(abar)). No backpropagation through the alignment branch
    (Eq. 7).
    """
    if eps_personal.shape != residual.shape:
        raise ValueError(f"PALP residual {tuple(residual.shape)} and prediction {tuple(eps_personal.shape)} differ")
    s = palp_gradient_scale(t, schedule, eps_personal, rescale)
    if time_weight is not None:
        s = s * time_weight.reshape(s.shape).to(s)
    eps = eps_personal.float()
    target = (eps + s * residual.float()).detach()  # descending moves eps toward eps + s r, i.e. x0-hat along -r
    return 0.5 * _per_sample_mean((eps - target) ** 2)
