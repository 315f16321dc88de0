"""CLIP vision features of ComfyUI's CLIP_VISION models, as the image-prompt adapters take them."""
from __future__ import annotations

import logging

import comfy.model_management as mm
import torch

# ComfyUI's CLIP-vision loader warns about every key its model has and the file lacks (comfy/clip_vision.py,
# ``load_sd``); an image tower without projection (E4T's) lacks exactly this one, by design.
_NO_PROJECTION_WARNING = "missing clip vision: ['visual_projection.weight']"


def _drop_no_projection_warning(record: logging.LogRecord) -> bool:
    return record.getMessage() != _NO_PROJECTION_WARNING


def clip_vision_width(clip_vision, feature: str) -> int:
    """Width of ``image_embeds`` (the projected embedding) or of the hidden states (``penultimate``)."""
    m = clip_vision.model
    if feature == "image_embeds":
        return m.visual_projection.weight.shape[0]
    return m.vision_model.embeddings.class_embedding.shape[0]


def encode_clip_vision(clip_vision, image: torch.Tensor, feature: str, batch_size: int = 0) -> torch.Tensor:
    """CLIP features of a ComfyUI IMAGE batch ``[N, H, W, C]``: ``image_embeds`` or the penultimate hidden states.
    ``batch_size`` > 0 encodes that many images at a time and parks each result on ComfyUI's intermediate device
    (long animation batches: the encoder's activations for all images at once need not fit)."""
    step = batch_size if batch_size > 0 else image.shape[0]
    parts = []
    for i in range(0, image.shape[0], step):
        out = clip_vision.encode_image(image[i:i + step], crop=True)
        parts.append((out["image_embeds"] if feature == "image_embeds" else out["penultimate_hidden_states"]).float()
                     .to(mm.intermediate_device()))
        del out
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def load_clip_vision(path: str):
    """A CLIP_VISION model from a file, as ComfyUI's CLIPVisionLoader loads it."""
    import comfy.clip_vision

    model = comfy.clip_vision.load(path)
    if model is None:
        raise ValueError(f"{path} is not a CLIP vision model ComfyUI can load")
    return model


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


def load_open_clip_tower(sd: dict, what: str):
    """A ComfyUI CLIP_VISION model from an image tower in open_clip keys (``conv1.weight``, ``transformer.resblocks.*``;
    E4T's ``clip_vision.*``) or transformers keys (``vision_model.*``), through ComfyUI's own conversion and loader."""
    import comfy.clip_vision

    prefixed = {"clip_vision." + k: v for k, v in sd.items()}
    converted = comfy.clip_vision.convert_to_transformers(prefixed, "clip_vision.")
    root = logging.getLogger()
    root.addFilter(_drop_no_projection_warning)
    try:
        model = comfy.clip_vision.load_clipvision_from_sd(converted)
    finally:
        root.removeFilter(_drop_no_projection_warning)
    if model is None:
        raise ValueError(f"{what}: the CLIP image tower ({len(sd)} tensors) is not one ComfyUI's CLIP-vision loader knows "
                         "(E4T's public encoder holds the OpenCLIP ViT-H-14 tower)")
    return model


@torch.no_grad()
def tower_outputs(clip_vision, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(last layer's raw output (B, 1 + patches, hidden), pooled = ln_post(class token))`` for normalized pixels
    ``(B, 3, size, size)``: the tower called directly (``encode_image`` would apply ComfyUI's own preprocessing)."""
    mm.load_model_gpu(clip_vision.patcher)
    vm = clip_vision.model.vision_model
    out = vm(pixels.to(clip_vision.load_device, torch.float32))
    return out[0].float().to(mm.intermediate_device()), out[2].float().to(mm.intermediate_device())
