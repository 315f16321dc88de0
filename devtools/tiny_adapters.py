"""Tiny IP-Adapter checkpoints in the official key layout, with random weights.

The layout (``image_proj.*`` + ``ip_adapter.{2k+1}.to_{k,v}_ip.weight``) is written out explicitly here, key by
key, from research/methods.md §1.2, independently of the pack's own modules, so loading these files tests the
pack's loader against the public format (and diffusers' loader reads the very same dicts in the tier-1 tests).
"""
from __future__ import annotations

import torch

# Resampler settings of the tiny Plus files: dim must be a multiple of 64 (diffusers and the pack infer
# heads = dim / 64, as for every public file); depth 4 and 16 queries as in the public Plus models.
TINY_PLUS = {"dim": 128, "depth": 4, "queries": 16, "ff_mult": 4}
BASE_TOKENS = 4  # every public base/light/vit-G/SDXL model has 4 tokens (diffusers hard-codes it too)


def _rand(g: torch.Generator, *shape: int, fan_in: int | None = None) -> torch.Tensor:
    fan_in = fan_in or shape[-1]
    return torch.randn(*shape, generator=g) / fan_in**0.5


def _layer_norm(sd: dict, prefix: str, dim: int, g: torch.Generator) -> None:
    sd[prefix + ".weight"] = 1.0 + 0.1 * torch.randn(dim, generator=g)
    sd[prefix + ".bias"] = 0.1 * torch.randn(dim, generator=g)


def image_proj_state_dict(family: str, cross_dim: int, clip_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    if family in ("base", "vit-g"):
        sd["proj.weight"] = _rand(g, BASE_TOKENS * cross_dim, clip_dim)
        sd["proj.bias"] = 0.1 * torch.randn(BASE_TOKENS * cross_dim, generator=g)
        _layer_norm(sd, "norm", cross_dim, g)
    elif family == "full-face":
        sd["proj.0.weight"] = _rand(g, clip_dim, clip_dim)
        sd["proj.0.bias"] = 0.1 * torch.randn(clip_dim, generator=g)
        sd["proj.2.weight"] = _rand(g, cross_dim, clip_dim)
        sd["proj.2.bias"] = 0.1 * torch.randn(cross_dim, generator=g)
        _layer_norm(sd, "proj.3", cross_dim, g)
    elif family == "plus":
        dim, depth, q, mult = TINY_PLUS["dim"], TINY_PLUS["depth"], TINY_PLUS["queries"], TINY_PLUS["ff_mult"]
        sd["latents"] = torch.randn(1, q, dim, generator=g) / dim**0.5
        sd["proj_in.weight"] = _rand(g, dim, clip_dim)
        sd["proj_in.bias"] = 0.1 * torch.randn(dim, generator=g)
        sd["proj_out.weight"] = _rand(g, cross_dim, dim)
        sd["proj_out.bias"] = 0.1 * torch.randn(cross_dim, generator=g)
        _layer_norm(sd, "norm_out", cross_dim, g)
        for i in range(depth):
            a, f = f"layers.{i}.0", f"layers.{i}.1"
            _layer_norm(sd, a + ".norm1", dim, g)
            _layer_norm(sd, a + ".norm2", dim, g)
            sd[a + ".to_q.weight"] = _rand(g, dim, dim)
            sd[a + ".to_kv.weight"] = _rand(g, 2 * dim, dim)
            sd[a + ".to_out.weight"] = _rand(g, dim, dim)
            _layer_norm(sd, f + ".0", dim, g)
            sd[f + ".1.weight"] = _rand(g, dim * mult, dim)
            sd[f + ".3.weight"] = _rand(g, dim, dim * mult)
    else:
        raise ValueError(f"unknown family {family!r}")
    return sd


def ip_layers_state_dict(widths: list[int], cross_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1000)
    sd = {}
    for k, w in enumerate(widths):
        sd[f"{2 * k + 1}.to_k_ip.weight"] = _rand(g, w, cross_dim)
        sd[f"{2 * k + 1}.to_v_ip.weight"] = _rand(g, w, cross_dim)
    return sd


def adapter_state_dict(family: str, widths: list[int], cross_dim: int, clip_dim: int, seed: int = 0) -> dict:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` as in the official ``.bin`` files."""
    return {"image_proj": image_proj_state_dict(family, cross_dim, clip_dim, seed),
            "ip_adapter": ip_layers_state_dict(widths, cross_dim, seed)}


def save_adapter(sd: dict, path: str) -> str:
    """Write the official ``.safetensors`` (flat ``image_proj.`` / ``ip_adapter.`` keys) or ``.bin`` layout."""
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        flat = {f"{part}.{k}": v.contiguous() for part, d in sd.items() for k, v in d.items()}
        save_file(flat, path)
    else:
        torch.save(sd, path)
    return path


def write_tiny_adapter(path: str, family: str, layout: str, clip_kind: str, seed: int = 0) -> str:
    """A tiny adapter matching the tiny ComfyUI models of ``tiny_models`` (layout "sd15"/"sdxl") and the tiny
    CLIP vision ``clip_kind`` ("vit-h"/"vit-bigG")."""
    import tiny_models

    unet = tiny_models.TINY_UNETS[layout]
    clip = tiny_models.TINY_CLIP_VISION[clip_kind]
    clip_dim = clip["projection_dim"] if family in ("base", "vit-g") else clip["hidden_size"]
    widths = adapter_widths(layout, unet["model_channels"], unet["channel_mult"])
    return save_adapter(adapter_state_dict(family, widths, unet["context_dim"], clip_dim, seed), path)


def adapter_widths(layout: str, model_channels: int, channel_mult) -> list[int]:
    """Layer widths in checkpoint (diffusers) order for an SD1.5- or SDXL-topology UNet (2 res blocks per level:
    input block b sits on level (b - 1) // 3, output block b on level L - 1 - b // 3, the middle on the last)."""
    from comfyui_personalize.models.layers import LAYOUT_TRANSFORMERS, sites_from_transformers

    levels = len(channel_mult)
    transformers = list(LAYOUT_TRANSFORMERS[layout])

    def level(t):
        if t.block == "input":
            return (t.block_id - 1) // 3
        return levels - 1 if t.block == "middle" else levels - 1 - t.block_id // 3

    sites = sites_from_transformers(transformers, [model_channels * channel_mult[level(t)] for t in transformers])
    return [site.width for site in sorted(sites, key=lambda site: site.adapter_index)]
