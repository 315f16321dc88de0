"""Tiny IP-Adapter checkpoints in the official key layout, with random weights.

The layout (``image_proj.*`` + ``ip_adapter.{2k+1}.to_{k,v}_ip.weight``) is written out explicitly here, key by
key, from the public files (h94/IP-Adapter, h94/IP-Adapter-FaceID; tencent-ailab/IP-Adapter ``ip_adapter.py``),
independently of the pack's own modules, so loading these files tests the pack's loader against the public format
(and diffusers' loader reads the very same dicts in the tier-1 tests).
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


ARCFACE_DIM, FACEID_HIDDEN = 512, 1024  # insightface ArcFace width; the FaceID MLP's hidden width (2 x 512)
FACEID_TOKENS = {"faceid": 4, "faceid-portrait": 16, "faceid-plus": 4}
PERCEIVER_DIM_HEAD = 64


def _perceiver(sd: dict, prefix: str, dim: int, inner: int, emb: int, out: int, depth: int, mult: int, g) -> None:
    """``proj_in``, ``layers.{i}.0`` (PerceiverAttention), ``layers.{i}.1`` (FeedForward), ``proj_out``, ``norm_out``."""
    sd[prefix + "proj_in.weight"] = _rand(g, dim, emb)
    sd[prefix + "proj_in.bias"] = 0.1 * torch.randn(dim, generator=g)
    sd[prefix + "proj_out.weight"] = _rand(g, out, dim)
    sd[prefix + "proj_out.bias"] = 0.1 * torch.randn(out, generator=g)
    _layer_norm(sd, prefix + "norm_out", out, g)
    for i in range(depth):
        a, f = f"{prefix}layers.{i}.0", f"{prefix}layers.{i}.1"
        _layer_norm(sd, a + ".norm1", dim, g)
        _layer_norm(sd, a + ".norm2", dim, g)
        sd[a + ".to_q.weight"] = _rand(g, inner, dim)
        sd[a + ".to_kv.weight"] = _rand(g, 2 * inner, dim)
        sd[a + ".to_out.weight"] = _rand(g, dim, inner)
        _layer_norm(sd, f + ".0", dim, g)
        sd[f + ".1.weight"] = _rand(g, dim * mult, dim)
        sd[f + ".3.weight"] = _rand(g, dim, dim * mult)


def _id_mlp(sd: dict, tokens: int, cross_dim: int, g) -> None:
    sd["proj.0.weight"] = _rand(g, FACEID_HIDDEN, ARCFACE_DIM)
    sd["proj.0.bias"] = 0.1 * torch.randn(FACEID_HIDDEN, generator=g)
    sd["proj.2.weight"] = _rand(g, tokens * cross_dim, FACEID_HIDDEN)
    sd["proj.2.bias"] = 0.1 * torch.randn(tokens * cross_dim, generator=g)
    _layer_norm(sd, "norm", cross_dim, g)


def image_proj_state_dict(family: str, cross_dim: int, clip_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Families: base / vit-g, plus, full-face, faceid, faceid-portrait, faceid-plus, faceid-portrait-unnorm.
    ``clip_dim`` is the CLIP width the projection takes (ignored by faceid / faceid-portrait / unnorm)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    depth, q, mult = TINY_PLUS["depth"], TINY_PLUS["queries"], TINY_PLUS["ff_mult"]
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
    elif family in ("plus", "faceid-portrait-unnorm"):
        dim = TINY_PLUS["dim"]
        sd["latents"] = torch.randn(1, q, dim, generator=g) / dim**0.5
        emb = ARCFACE_DIM if family == "faceid-portrait-unnorm" else clip_dim
        _perceiver(sd, "", dim, dim, emb, cross_dim, depth, mult, g)
    elif family in ("faceid", "faceid-portrait"):
        _id_mlp(sd, FACEID_TOKENS[family], cross_dim, g)
    elif family == "faceid-plus":
        # FacePerceiverResampler(dim=cross, heads=cross // 64, dim_head=64) in the public files; tiny widths are
        # below 64, so one 64-wide head (diffusers and the pack read the head count as to_q rows / 64)
        _id_mlp(sd, FACEID_TOKENS[family], cross_dim, g)
        inner = max(PERCEIVER_DIM_HEAD, cross_dim // PERCEIVER_DIM_HEAD * PERCEIVER_DIM_HEAD)
        _perceiver(sd, "perceiver_resampler.", cross_dim, inner, clip_dim, cross_dim, depth, mult, g)
    else:
        raise ValueError(f"unknown family {family!r}")
    return sd


def faceid_lora_state_dict(widths: list[int], cross_dim: int, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """The FaceID LoRA keys official FaceID files keep in ``ip_adapter``: ``{i}.to_{q,k,v,out}_lora.{down,up}``
    for every attention processor i (attn1 at 2k, attn2 at 2k+1)."""
    g = torch.Generator().manual_seed(seed + 2000)
    sd = {}
    for k, w in enumerate(widths):
        for i, ctx in ((2 * k, w), (2 * k + 1, cross_dim)):
            for name, fan_in in (("to_q", w), ("to_k", ctx), ("to_v", ctx), ("to_out", w)):
                sd[f"{i}.{name}_lora.down.weight"] = _rand(g, rank, fan_in)
                sd[f"{i}.{name}_lora.up.weight"] = _rand(g, w, rank)
    return sd


def ip_layers_state_dict(widths: list[int], cross_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1000)
    sd = {}
    for k, w in enumerate(widths):
        sd[f"{2 * k + 1}.to_k_ip.weight"] = _rand(g, w, cross_dim)
        sd[f"{2 * k + 1}.to_v_ip.weight"] = _rand(g, w, cross_dim)
    return sd


def adapter_state_dict(family: str, widths: list[int], cross_dim: int, clip_dim: int, seed: int = 0, lora: bool = False) -> dict:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` as in the official ``.bin`` files (``lora``: with the FaceID
    LoRA keys in ``ip_adapter``, as ip-adapter-faceid*_sd15.bin)."""
    layers = ip_layers_state_dict(widths, cross_dim, seed)
    if lora:
        layers.update(faceid_lora_state_dict(widths, cross_dim, seed=seed))
    return {"image_proj": image_proj_state_dict(family, cross_dim, clip_dim, seed), "ip_adapter": layers}


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
    lora = family in ("faceid", "faceid-plus")  # the public FaceID / FaceID Plus files carry their LoRA
    return save_adapter(adapter_state_dict(family, widths, unet["context_dim"], clip_dim, seed, lora), path)


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
