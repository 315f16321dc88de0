"""EVA02-CLIP vision towers through timm (``eva02_large_patch14_clip_336``) instead of a vendored EVA-CLIP.

PuLID takes two things from the EVA02-CLIP-L-14-336 visual tower (ToTheBeginning/PuLID ``eva_clip/eva_vit_model.py``
``EVAVisionTransformer.forward_features`` and ``forward(..., return_hidden=True)``): the projected CLS feature
``head(norm(x)[:, 0])`` and the *inputs* of blocks 4, 8, 12, 16 and 20 (``0 < idx <= 20 and idx % 4 == 0``), CLS
token included. The checkpoint is the official full-CLIP file ``EVA02_CLIP_L_336_psz14_s6B.pt`` (``visual.*`` keys,
converted by timm's own ``checkpoint_filter_fn``) or a vision-only file in timm's key layout. The tower's sizes are
read from the keys and shapes; timm is imported when a tower is built, so the pack loads without it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .checkpoints import CheckpointError, check_weights, load_exact

# Blocks whose inputs are PuLID's hidden states (eva_vit_model.py forward_features).
HIDDEN_BLOCKS = (4, 8, 12, 16, 20)
# EVA02-CLIP-L-14-336.json: head_width 64, pt_hw_seq_len 16 (the RoPE reference grid: 224 / 14).
EVA_HEAD_WIDTH = 64
EVA_ROPE_REF_GRID = (16, 16)
# The tower's input normalization (eva_clip/constants.py OPENAI_DATASET_MEAN / STD).
EVA_MEAN = (0.48145466, 0.4578275, 0.40821073)
EVA_STD = (0.26862954, 0.26130258, 0.27577711)
# Keys that training checkpoints nest their weights under (as EVA-CLIP's and timm's loaders unwrap them).
CHECKPOINT_WRAPPERS = ("state_dict", "model", "module")
TIMM_HINT = ("the EVA-CLIP tower runs on timm: install it into ComfyUI's Python (`pip install timm`); nothing is "
             "installed automatically")


def _timm_eva():
    try:
        from timm.models import eva
    except ImportError as e:
        raise ImportError(f"{TIMM_HINT} ({e})") from e
    return eva


def _visual_state(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """The vision keys of a checkpoint, and whether they are in EVA-CLIP's layout (``visual.*``)."""
    if any(k.startswith("visual.") for k in sd):
        return sd, True
    if "pos_embed" in sd and "blocks.0.attn.q_proj.weight" in sd:
        return sd, False
    raise CheckpointError("not an EVA-CLIP vision tower: expected visual.* keys (EVA02_CLIP_L_336_psz14_s6B.pt) or "
                          f"timm Eva keys (pos_embed, blocks.*); found {sorted(sd)[:5]}")


def tower_config(sd: dict[str, torch.Tensor]) -> dict:
    """timm ``Eva`` arguments of a tower, from its keys and shapes (EVA-CLIP or timm layout)."""
    sd, eva_layout = _visual_state(sd)
    p = "visual." if eva_layout else ""
    try:
        pos = sd[p + "pos_embed"]
        patch = sd[p + "patch_embed.proj.weight"]
        head = sd[p + "head.weight"]
        mlp = sd[p + ("blocks.0.mlp.w1.weight" if eva_layout else "blocks.0.mlp.fc1_g.weight")]
    except KeyError as e:
        raise CheckpointError(f"EVA-CLIP tower: key {e.args[0]} is missing; the file is incomplete") from None
    depth = len({k[len(p):].split(".")[1] for k in sd if k.startswith(p + "blocks.")})
    width, grid = int(pos.shape[-1]), math.isqrt(int(pos.shape[1]) - 1)
    if grid * grid != pos.shape[1] - 1 or width % EVA_HEAD_WIDTH:
        raise CheckpointError(f"EVA-CLIP tower: pos_embed {tuple(pos.shape)} is not a square grid + CLS of a width that "
                              f"is a multiple of {EVA_HEAD_WIDTH}")
    if depth <= max(HIDDEN_BLOCKS):
        raise CheckpointError(f"EVA-CLIP tower has {depth} blocks; PuLID reads the inputs of blocks {HIDDEN_BLOCKS}")
    return dict(img_size=grid * int(patch.shape[-1]), patch_size=int(patch.shape[-1]), embed_dim=width, depth=depth,
                num_heads=width // EVA_HEAD_WIDTH, mlp_ratio=int(mlp.shape[0]) / width, qkv_fused=False, swiglu_mlp=True,
                scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=EVA_ROPE_REF_GRID,
                global_pool="token", num_classes=int(head.shape[0]))


class EVAVisionTower(nn.Module):
    """``forward(pixels [N, 3, S, S], normalized with EVA_MEAN / EVA_STD) -> (pooled [N, D], [5 x [N, T, C]])``."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.model = _timm_eva().Eva(**config)

    @property
    def image_size(self) -> int:
        return int(self.config["img_size"])

    @property
    def width(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def output_dim(self) -> int:
        return int(self.config["num_classes"])

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> EVAVisionTower:
        for wrapper in CHECKPOINT_WRAPPERS:  # training checkpoints nest the weights
            if isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
        sd, eva_layout = _visual_state(sd)
        tower = cls(tower_config(sd))
        if eva_layout:  # timm's own conversion of EVA-CLIP checkpoints (q/v bias, SwiGLU and sub-LN names)
            sd = _timm_eva().checkpoint_filter_fn({k: v for k, v in sd.items() if k.startswith("visual.")}, tower.model)
        check_weights(sd)
        load_exact(tower.model, sd, "the EVA-CLIP tower", ignore=lambda k: "rope" in k)  # RoPE tables: recomputed
        return tower.eval().requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        indices = [b - 1 for b in HIDDEN_BLOCKS]  # the input of block b is the output of block b - 1
        x, inter = self.model.forward_intermediates(pixels, indices=indices, return_prefix_tokens=True, norm=False,
                                                    output_fmt="NLC")
        hidden = [torch.cat([prefix, spatial], dim=1) for spatial, prefix in inter]
        return self.model.forward_head(x), hidden
