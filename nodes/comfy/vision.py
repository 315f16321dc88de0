"""CLIP vision features of ComfyUI's CLIP_VISION models, as the image-prompt adapters take them."""
from __future__ import annotations

import comfy.model_management as mm
import torch


def clip_vision_width(clip_vision, feature: str) -> int:
    """Width of ``image_embeds`` (the projected embedding) or of the hidden states (``penultimate``)."""
    m = clip_vision.model
    if feature == "image_embeds":
        return m.visual_projection.weight.shape[0]
    return m.vision_model.embeddings.class_embedding.shape[0]


def encode_clip_vision(clip_vision, image: torch.Tensor, feature: str) -> torch.Tensor:
    """CLIP features of a ComfyUI IMAGE batch ``[N, H, W, C]``: ``image_embeds`` or the penultimate hidden states."""
    out = clip_vision.encode_image(image, crop=True)
    return (out["image_embeds"] if feature == "image_embeds" else out["penultimate_hidden_states"]).float()


def blank_clip_features(clip_vision, feature: str) -> torch.Tensor:
    """Unconditional CLIP features as the official IP-Adapter makes them (``ip_adapter.py``
    ``IPAdapterPlus.get_image_embeds``): the encoder applied to an all-zero *normalized* pixel tensor (a mean-colour
    image), for models that take hidden states (Plus, Full-face)."""
    mm.load_model_gpu(clip_vision.patcher)
    size = clip_vision.image_size
    pixels = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    out = clip_vision.model(pixel_values=pixels, intermediate_output=-2)
    feats = out[2] if feature == "image_embeds" else out[1]
    return feats.to(mm.intermediate_device()).float()
