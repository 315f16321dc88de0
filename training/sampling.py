"""A deterministic DDIM sampler over a denoiser (eta = 0, Song et al. 2021 Eq. 12), with classifier-free guidance.

Used for DreamBooth class images (generated once by the frozen base model, then cached) and validation samples.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import conditioning
from .losses import cfg
from .schedule import NoiseSchedule

# DreamBooth class images in the SuDe reference (facechain SuDe README / DreamBooth-SD): DDIM 50 steps, scale 10.
PRIOR_SAMPLING_STEPS = 50
PRIOR_GUIDANCE = 10.0


@torch.no_grad()
def ddim_sample(denoiser: Callable, schedule: NoiseSchedule, noise: torch.Tensor, cond: conditioning.Conditioning,
                uncond: conditioning.Conditioning, steps: int = PRIOR_SAMPLING_STEPS, guidance: float = PRIOR_GUIDANCE,
                check_stop: Callable[[], None] | None = None,
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """x0 from ``noise`` ``(B, C, H, W)``; ``cond`` / ``uncond`` conditionings of batch B or 1 (a context
    ``(B, L, D)`` or a tuple, :mod:`.conditioning`). One batched forward (uncond + cond) per step; ``check_stop()``
    before each (it raises to stop, e.g. ComfyUI's Cancel), ``progress(done, total)`` after each."""
    T = schedule.timesteps
    ts = torch.linspace(T - 1, 0, max(int(steps), 1)).round().long().unique_consecutive()
    b = noise.shape[0]
    ctx = conditioning.to(conditioning.cat([conditioning.expand(uncond, b), conditioning.expand(cond, b)]), noise)
    x = noise
    for i, t in enumerate(ts):
        if check_stop is not None:
            check_stop()
        tt = t.repeat(b)
        xin = torch.cat([x, x])
        pred = denoiser(xin, torch.cat([tt, tt]), ctx)
        eps_u, eps_c = schedule.to_eps(pred, xin, torch.cat([tt, tt])).float().chunk(2)
        eps = cfg(eps_u, eps_c, guidance)
        a = schedule.abar(tt, x)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if i + 1 < len(ts):
            a_next = schedule.abar(ts[i + 1].repeat(b), x)
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        else:
            x = x0
        if progress is not None:
            progress(i + 1, len(ts))
    return x
