"""Tiny PuLID files in the official key layouts, with random weights: the PuLID model (v1 IDEncoder / v1.1 IDFormer,
as ``pulid_v1.bin`` / ``pulid_v1.1.safetensors`` or as the ComfyUI port's ``image_proj`` / ``ip_adapter`` conversion),
an EVA02-CLIP vision tower in EVA-CLIP's own key layout (``visual.*``, as in ``EVA02_CLIP_L_336_psz14_s6B.pt``), and a
BiSeNet face parser in facexlib's layout (``parsing_bisenet.pth``).

The sizes are small but the architectures are the real ones: the EVA tower has 24 blocks (PuLID reads the inputs of
blocks 4..20) at 336 px, the encoders take ``512 + EVA projection`` wide conditions and the tiny EVA's hidden states,
and the attention layers fit the tiny SDXL UNet of ``tiny_models``.
"""
from __future__ import annotations

import os

import torch

# The tiny EVA02-CLIP tower: real depth, patch and image size; narrow (one 64-wide head).
TINY_EVA = {"width": 64, "depth": 24, "projection": 16, "img_size": 336, "patch_size": 14}
ARCFACE_DIM = 512
# timm Eva key -> EVA-CLIP visual key (the inverse of timm's checkpoint_filter_fn renames)
_EVA_RENAMES = (("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"),
                ("attn.norm.", "attn.inner_attn_ln."), ("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."),
                ("mlp.norm.", "mlp.ffn_ln."), ("mlp.fc2.", "mlp.w3."))


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln" in name or name.endswith("bn.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return module


def _save(tensors: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".part"
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(tensors, tmp)
    else:
        torch.save(tensors, tmp)
    os.replace(tmp, path)
    return path


def eva_config() -> dict:
    from comfyui_personalize.models.eva_clip import EVA_HEAD_WIDTH, EVA_ROPE_REF_GRID

    w = TINY_EVA["width"]
    return dict(img_size=TINY_EVA["img_size"], patch_size=TINY_EVA["patch_size"], embed_dim=w, depth=TINY_EVA["depth"],
                num_heads=w // EVA_HEAD_WIDTH, mlp_ratio=4 * 2 / 3, qkv_fused=False, swiglu_mlp=True, scale_mlp=True,
                scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=EVA_ROPE_REF_GRID, global_pool="token",
                num_classes=TINY_EVA["projection"])


def eva_clip_state_dict(seed: int = 0) -> dict:
    """A tiny EVA02-CLIP checkpoint in EVA-CLIP's layout: ``visual.*`` (with its RoPE buffers) and a text tower key."""
    from comfyui_personalize.models.eva_clip import EVAVisionTower

    model = _randomize(EVAVisionTower(eva_config()).model, seed, std=0.02)
    out = {}
    for k, v in model.state_dict().items():
        for timm_name, eva_name in _EVA_RENAMES:
            k = k.replace(timm_name, eva_name)
        out["visual." + k] = v
    grid, dim = TINY_EVA["img_size"] // TINY_EVA["patch_size"], TINY_EVA["width"]  # head dim (one head)
    out["visual.rope.freqs_cos"] = out["visual.rope.freqs_sin"] = torch.zeros(grid * grid, dim)  # recomputed on load
    out["text.token_embedding.weight"] = torch.zeros(8, 4)  # the official file is the whole CLIP
    out["logit_scale"] = torch.tensor(4.6)
    return out


def write_tiny_eva_clip(path: str, seed: int = 0) -> str:
    return _save(eva_clip_state_dict(seed), path)


def write_tiny_parsing(path: str, seed: int = 0) -> str:
    from comfyui_personalize.models.face.parsing import BiSeNet

    return _save(_randomize(BiSeNet(), seed + 1, std=0.1).state_dict(), path)


def pulid_state_dict(version: str = "v1.1", layout: str = "sdxl", style: str = "official", seed: int = 0) -> dict:
    """A tiny PuLID model for the tiny UNet of ``layout``: ``style`` "official" (id_adapter.* /
    id_adapter_attn_layers.*) or "converted" (image_proj.* / ip_adapter.*, the ComfyUI port's v1 file)."""
    import tiny_adapters
    import tiny_models

    from comfyui_personalize.models import pulid

    unet = tiny_models.TINY_UNETS[layout]
    widths = tiny_adapters.adapter_widths(layout, unet["model_channels"], unet["channel_mult"])
    cross = unet["context_dim"]
    width, vit = ARCFACE_DIM + TINY_EVA["projection"], TINY_EVA["width"]
    if version == "v1.1":
        cfg = dict(dim=64, depth=10, heads=1, num_id_token=5, num_queries=32, output_dim=cross, ff_mult=2, width=width,
                   vit_width=vit, hidden=48)
        encoder = pulid.IDFormer(**cfg)
    else:
        encoder = pulid.IDEncoder(width=width, context_dim=cross, num_token=5, h1=64, h2=64, vit_width=vit, vit_hidden=48)
    enc = _randomize(encoder, seed + 2, std=0.1).state_dict()
    g = torch.Generator().manual_seed(seed + 3)
    layers = {}
    for k, w in enumerate(widths):
        for name in ("id_to_k", "id_to_v"):
            key = name if style == "official" else {"id_to_k": "to_k_ip", "id_to_v": "to_v_ip"}[name]
            layers[f"{2 * k + 1}.{key}.weight"] = 0.2 * torch.randn(w, cross, generator=g)
    prefix_e, prefix_l = ("id_adapter.", "id_adapter_attn_layers.") if style == "official" else ("image_proj.", "ip_adapter.")
    return {**{prefix_e + k: v for k, v in enc.items()}, **{prefix_l + k: v for k, v in layers.items()}}


def write_tiny_pulid(path: str, version: str = "v1.1", layout: str = "sdxl", style: str = "official", seed: int = 0) -> str:
    sd = pulid_state_dict(version, layout, style, seed)
    if style == "converted":
        sd = {k: v.half() for k, v in sd.items()}  # the port's file is fp16
    return _save(sd, path)
