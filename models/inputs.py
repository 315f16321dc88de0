"""Checks of what flows between nodes: ComfyUI IMAGE and MASK tensors, embeddings and numbers. Host-free: each check
names the input, says what was found and what to do, and runs before any work (a NaN pixel would otherwise give a
black image, a channel-first tensor a crash deep inside ComfyUI).

ComfyUI's conventions (``comfy/model_management``, ``nodes.py`` LoadImage): IMAGE is float ``(batch, height, width,
channels)`` in 0..1 with 3 channels (4 with alpha); MASK is ``(batch, height, width)`` or ``(height, width)``.
"""
from __future__ import annotations

import math

import torch

IMAGE_CHANNELS = (1, 3, 4)
# IMAGE values outside this range are not a 0..1 picture (0..255 values, or a latent wired as an image); slight
# overshoots from resampling nodes stay inside it.
IMAGE_RANGE = (-0.5, 1.5)


def check_number(value, name: str, low: float | None = None, high: float | None = None) -> float:
    """A finite number within [low, high]: ComfyUI's own min/max checks let NaN through (every comparison is false)."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} is {value}: give a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} is {value}; it must be between {low} and {high}")
    return value


def check_finite(t: torch.Tensor, name: str, hint: str = "") -> torch.Tensor:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} holds {bad} NaN or Inf values" + (f": {hint}" if hint else ""))
    return t


def check_image(images, name: str, min_side: int = 1, multiple: int = 1) -> torch.Tensor:
    """A ComfyUI IMAGE batch: ``(B, H, W, C)``, B >= 1, C in 1/3/4, sides >= ``min_side`` and multiples of
    ``multiple``, finite, 0..1."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be an IMAGE tensor, got {type(images).__name__}")
    shape = tuple(images.shape)
    if images.ndim == 3 and shape[-1] in IMAGE_CHANNELS:
        raise ValueError(f"{name} has shape {shape}: an IMAGE is (batch, height, width, channels); this one has no "
                         "batch dimension")
    if images.ndim != 4:
        raise ValueError(f"{name} has shape {shape}: an IMAGE is (batch, height, width, channels)")
    if shape[-1] not in IMAGE_CHANNELS:
        layout = " (this looks channel-first: ComfyUI images are channel-last)" if shape[1] in IMAGE_CHANNELS else ""
        raise ValueError(f"{name} has shape {shape}: the last dimension must be the channels (3, or 4 with "
                         f"alpha){layout}")
    if shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (no image)")
    h, w = shape[1], shape[2]
    if min(h, w) < min_side or h % multiple or w % multiple:
        need = f"at least {min_side} px a side" + (f", sides a multiple of {multiple}" if multiple > 1 else "")
        raise ValueError(f"{name} is {w}x{h} px; it needs {need}: scale or crop it (e.g. 'Upscale Image')")
    check_finite(images, name, "a NaN pixel, e.g. from an fp16 VAE decode; decode in fp32 or fix the source image")
    lo, hi = float(images.min()), float(images.max())
    if lo < IMAGE_RANGE[0] or hi > IMAGE_RANGE[1]:
        raise ValueError(f"{name} has values from {lo:.4g} to {hi:.4g}; IMAGE values are 0..1 (is it 0..255, or a "
                         "latent?)")
    return images


def check_mask(mask, name: str) -> torch.Tensor:
    """A ComfyUI MASK: ``(H, W)`` or ``(B, H, W)``, non-empty, finite; returned as ``(B, H, W)``."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a MASK tensor, got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.shape[0] == 0 or min(mask.shape[-2:]) == 0:
        raise ValueError(f"{name} must be a MASK [frames, height, width], got shape {tuple(mask.shape)}")
    return check_finite(mask, name)
