"""What the nodes of every attention method share: input declarations and the apply step (numbers checked when the
node runs, the adapter-model pairing, weights under model management, the install on a clone)."""
from __future__ import annotations

import os
from collections.abc import Callable

import folder_paths
import torch

from ..models.inputs import check_finite, check_mask, check_number
from .comfy import flux, folders, sites, unet, weights


def fraction_input(default: float, tip: str):
    return ("FLOAT", {"default": default, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": tip})


def weight_input(tip: str, default: float = 1.0):
    return ("FLOAT", {"default": default, "min": -1.0, "max": 5.0, "step": 0.05, "tooltip": tip})


def stored(tokens):
    """Tokens are kept on the CPU in fp32; a patch caches a copy per compute device and dtype."""
    return tuple(t.detach().to("cpu", torch.float32) for t in tokens)


def checked_attn_mask(mask):
    """An optional attn_mask input, checked and kept on the CPU in fp32 (None when not connected)."""
    return None if mask is None else check_mask(mask, "attn_mask").float().cpu()


def checked_tokens(tokens, what: str):
    for t in tokens:
        check_finite(t, what, "the reference embeds hold NaN or Inf")
    return stored(tokens)


def checked_window(start_at: float, end_at: float) -> tuple[float, float]:
    """``start_at`` / ``end_at`` checked (numbers in 0..1, in order) when the node runs."""
    start_at, end_at = check_number(start_at, "start_at", 0.0, 1.0), check_number(end_at, "end_at", 0.0, 1.0)
    if start_at > end_at:
        raise ValueError(f"start_at ({start_at}) is after end_at ({end_at})")
    return start_at, end_at


def flux_gate(model, start_at: float, end_at: float, start_step: int = 0):
    """When a Flux block patch acts: the sigma window of ``start_at`` / ``end_at`` in the model's own sampling, and the
    sampling step it starts at."""
    sigma_start, sigma_end = sites.sigma_window(model, *checked_window(start_at, end_at))
    return flux.Gate(sigma_start, sigma_end, int(start_step))


def patch_model(model, patcher, check: Callable, build: Callable, start_at: float, end_at: float):
    """``(patched clone, patch, sites)``: ``check(transformers, sites, context_dim)`` raises when the adapter does not
    fit the model; ``build(transformers, sites)`` makes the :class:`~..models.attention.SitePatch` once the adapter
    weights are on the compute device (``patcher``).

    The numbers are checked here, when the node runs, not in ``VALIDATE_INPUTS``: ComfyUI passes no value for a
    linked input there, and naming an input in ``VALIDATE_INPUTS`` turns off its own min/max check."""
    start_at, end_at = checked_window(start_at, end_at)
    transformers, model_sites, context_dim = unet.discover_sites(model)
    check(transformers, model_sites, context_dim)
    weights.prepare_adapter(patcher, unet.compute_dtype(model))
    with torch.no_grad():
        patch = build(transformers, model_sites)
    sigma_start, sigma_end = sites.sigma_window(model, start_at, end_at)
    return sites.install_patch(model, patch, model_sites, transformers, sigma_start, sigma_end, patcher), patch, model_sites


def save_embeds(embeds, filename_prefix: str, suffix: str) -> dict:
    """Save ``embeds`` (anything with ``.save(path)``) as ``<prefix>_<counter>_<suffix>`` in the output folder, the
    pattern ComfyUI's save-path helper reads existing counters from; the UI entry of the saved file."""
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, folder_paths.get_output_directory())
    file = f"{name}_{counter:05}_{suffix}"
    embeds.save(os.path.join(folder, file))
    return {"ui": {"embeds": [{"filename": file, "subfolder": subfolder, "type": "output"}]}}


def embeds_files(suffix: str) -> list[str]:
    """Saved embeds in the input folder, and in the output folder (tagged " [output]", as ComfyUI annotates)."""
    return (folders.list_files(folder_paths.get_input_directory(), suffix)
            + [f + " [output]" for f in folders.list_files(folder_paths.get_output_directory(), suffix)])
