# SPDX-License-Identifier: GPL-3.0-or-later
"""Tiny E4T folders in mkshing/e4t-diffusion's exact file layout, with random weights (for the tier-2 tests).

A folder holds what mkshing's ``pretrain_e4t.py`` saves (``e4t/utils.py`` ``save_e4t_encoder`` / ``save_e4t_unet``):

* ``config.json``: the pretraining arguments (``args.__dict__``, the reference's argparse keys);
* ``encoder.pt``: the E4TEncoder state dict: the OpenCLIP image tower under ``clip_vision.*`` in open_clip's
  ``VisionTransformer`` keys without ``proj`` (the reference sets ``proj = None``), and the head
  (``unet_feature_embedder``, ``feature_linear``, ``first_linears.0..128``, ``final_linear``);
* ``weight_offsets.pt``: the UNet state-dict entries holding ``wo`` (``...attn1.wo_q.linear1.weight`` ...), nine tensors
  per q / k / v projection of every self- and cross-attention.

``fmt="safetensors"`` writes the same tensors as ``encoder.safetensors`` / ``weight_offsets.safetensors`` (a
conversion). Plain torch: no ComfyUI needed (the tier-1 tests use it too).

The tiny widths follow ``tiny_models``: the CLIP tower is the tiny ``vit-h`` (hidden 40, 3 layers, 4 heads, MLP 160,
224 px, patch 14: 257 tokens, so 129 head inputs as the real model), the word width is the tiny clip_l's (48) and the
offset targets and feature channels are those of the tiny SD1.5 UNet (model_channels 32, channel_mult (1, 2, 4, 4),
context 48): 96 targets, 1088 feature channels.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from tiny_models import TINY_CLIP_VISION, TINY_SD15_UNET, TINY_TEXT_CLIP_L

# SD1.x (diffusers UNet2DConditionModel defaults, runwayml/stable-diffusion-v1-5 unet/config.json): block widths,
# cross-attention width, res blocks per level, levels with attention (CrossAttnDownBlock2D x 3, DownBlock2D).
SD15_BLOCK_OUT_CHANNELS = (320, 640, 1280, 1280)
SD15_CONTEXT_DIM = 768
SD15_LAYERS_PER_BLOCK = 2
SD15_ATTENTION_LEVELS = (0, 1, 2)

# open_clip ViT-H-14 geometry the reference's head is built for (mkshing e4t/encoder.py: 224 px, 129 inputs).
IMAGE_SIZE, PATCH_SIZE = 224, 14
NUM_TOKENS = 1 + (IMAGE_SIZE // PATCH_SIZE) ** 2  # 257
N_HEAD_INPUTS = 1 + len(range(1, NUM_TOKENS - 1, 2))  # the pooled output + every second patch token: 129
MLP_RATIO = 4  # open_clip ViT-H-14 (mlp_ratio 4: 5120 = 4 * 1280); tiny_models' vit-h: 160 = 4 * 40

TINY_VIT_H = TINY_CLIP_VISION["vit-h"]
TINY_WORD_DIM = TINY_TEXT_CLIP_L["hidden_size"]  # 48


def sd15_offset_targets(model_channels: int = 32, channel_mult=(1, 2, 4, 4), context_dim: int = 48,
                        layers_per_block: int = 2, attention_levels=(0, 1, 2)) -> dict[str, tuple[int, int]]:
    """``{diffusers module path: (out_features, in_features)}`` of every q / k / v projection of the self- (attn1) and
    cross-attentions (attn2) of an SD1.x-topology UNet: ``down_blocks.{level}.attentions.{0..layers-1}``,
    ``mid_block.attentions.0``, ``up_blocks.{n-1-level}.attentions.{0..layers}`` (one transformer block each). attn1 q, k,
    v and attn2 q are ``(w, w)``, attn2 k, v ``(w, context_dim)``. The defaults are the tiny SD1.5 of ``tiny_models``;
    ``sd15_offset_targets(320, context_dim=768)`` is SD1.5's 96 targets."""
    widths = [model_channels * m for m in channel_mult]
    levels = sorted(int(level) for level in attention_levels)
    blocks = [(f"down_blocks.{level}.attentions.{j}", widths[level]) for level in levels for j in range(layers_per_block)]
    blocks.append(("mid_block.attentions.0", widths[-1]))
    n = len(widths)
    blocks += [(f"up_blocks.{n - 1 - level}.attentions.{j}", widths[level])
               for level in reversed(levels) for j in range(layers_per_block + 1)]
    targets = {}
    for prefix, w in blocks:
        base = f"{prefix}.transformer_blocks.0"
        for p in "qkv":
            targets[f"{base}.attn1.to_{p}"] = (w, w)
        targets[f"{base}.attn2.to_q"] = (w, w)
        targets[f"{base}.attn2.to_k"] = (w, context_dim)
        targets[f"{base}.attn2.to_v"] = (w, context_dim)
    return targets


def sd15_feature_channels(model_channels: int = 32, channel_mult=(1, 2, 4, 4), layers_per_block: int = 2) -> int:
    """Channel sum of diffusers' ``down_block_res_samples + (mid,)`` (conv_in, every resnet output, every downsampler,
    the mid block): what the E4T head's ``unet_feature_embedder`` takes. SD1.5: 10880; the tiny SD1.5: 1088."""
    widths = [model_channels * m for m in channel_mult]
    total = model_channels  # conv_in
    for level, w in enumerate(widths):
        total += layers_per_block * w + (w if level < len(widths) - 1 else 0)
    return total + widths[-1]


def offset_param_count(targets: Mapping[str, tuple[int, int]]) -> int:
    """Parameters of the weight-offset generators of ``targets`` (per ``(out, in)``: v 1, linear1 2 in, linear2 2 out,
    linear_column in^2 + in, linear_row out^2 + out)."""
    return sum(1 + 3 * i + 3 * o + i * i + o * o for o, i in targets.values())


#: The tiny SD1.5 of ``tiny_models`` (its UNet config): 96 offset targets, 1088 feature channels.
TINY_SD15_OFFSET_TARGETS = sd15_offset_targets(TINY_SD15_UNET["model_channels"], tuple(TINY_SD15_UNET["channel_mult"]),
                                               TINY_SD15_UNET["context_dim"])
TINY_SD15_FEATURE_CHANNELS = sd15_feature_channels(TINY_SD15_UNET["model_channels"], tuple(TINY_SD15_UNET["channel_mult"]))


def reference_config(class_word: str = "face", placeholder: str = "*s", prompt_template: str = "face") -> dict:
    """A pretraining ``config.json`` as mkshing's ``pretrain_e4t.py`` writes it (``args.__dict__``: its argparse
    defaults, with the class word, placeholder and template given; the README's ``--unfreeze_clip_vision``)."""
    return {
        "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5",
        "clip_model_name_or_path": "ViT-H-14::laion2b_s32b_b79k",
        "placeholder_token": placeholder, "domain_class_token": class_word, "domain_embed_scale": 0.1,
        "reg_lambda": 0.01, "prompt_template": prompt_template, "train_image_dataset": "tiny-random",
        "unfreeze_clip_vision": True, "webdataset": False, "iterable_dataset": False, "resolution": 512, "seed": 42,
        "gradient_accumulation_steps": 1, "max_grad_norm": 1.0, "learning_rate": 1.6e-5, "scale_lr": False,
        "train_batch_size": 16, "num_train_epochs": 1, "max_train_steps": 30000, "dataloader_num_workers": 0,
        "checkpointing_steps": 10000, "resume_from_checkpoint": None, "log_steps": 1000,
        "enable_xformers_memory_efficient_attention": False,
        "save_sample_prompt": "a photo of *s,a photo of *s in the style of monet", "n_save_sample": 4,
        "save_guidance_scale": 7.5, "save_inference_steps": 50, "report_to": "wandb", "revision": None,
        "output_dir": "e4t-model", "logging_dir": "logs", "mixed_precision": "no", "use_8bit_adam": False,
        "lr_scheduler": "constant", "lr_warmup_steps": 0, "local_rank": -1,
    }


# ---------------------------------------------------------------------------------------------------------------
# Random tensors (deterministic from the seed, fp16-representable, nothing left at zero)


class _Draw:
    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(int(seed))

    def normal(self, shape, std: float, mean: float = 0.0) -> torch.Tensor:
        t = mean + std * torch.randn(tuple(shape), generator=self.g, dtype=torch.float32)
        return t.half().float()  # representable in fp16: ComfyUI may hold the tower in fp16

    def linear(self, out: int, inp: int, gain: float = 1.0, bias_std: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
        return self.normal((out, inp), gain / inp ** 0.5), self.normal((out,), bias_std)

    def norm(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.normal((width,), 0.1, 1.0), self.normal((width,), 0.05)


def clip_vision_state(hidden: int, layers: int, draw: _Draw) -> dict[str, torch.Tensor]:
    """An open_clip ``VisionTransformer`` state dict (ViT, 224 px, patch 14), without ``proj``."""
    sd = {"class_embedding": draw.normal((hidden,), 0.5),
          "positional_embedding": draw.normal((NUM_TOKENS, hidden), 0.5),
          "conv1.weight": draw.normal((hidden, 3, PATCH_SIZE, PATCH_SIZE), 1 / (3 * PATCH_SIZE * PATCH_SIZE) ** 0.5)}
    sd["ln_pre.weight"], sd["ln_pre.bias"] = draw.norm(hidden)
    mlp = MLP_RATIO * hidden
    for n in range(layers):
        p = f"transformer.resblocks.{n}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = draw.norm(hidden)
        sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = draw.linear(3 * hidden, hidden)
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = draw.linear(hidden, hidden, 0.5)
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = draw.norm(hidden)
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = draw.linear(mlp, hidden)
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = draw.linear(hidden, mlp, 0.5)
    sd["ln_post.weight"], sd["ln_post.bias"] = draw.norm(hidden)
    return sd


def head_state(feature_channels: int, hidden: int, word_dim: int, draw: _Draw, n_inputs: int = N_HEAD_INPUTS):
    """The E4T head's state dict in the reference's names."""
    sd = {}
    sd["unet_feature_embedder.0.weight"], sd["unet_feature_embedder.0.bias"] = draw.linear(hidden, feature_channels)
    sd["unet_feature_embedder.2.weight"], sd["unet_feature_embedder.2.bias"] = draw.linear(hidden, hidden)
    sd["feature_linear.weight"], sd["feature_linear.bias"] = draw.linear(hidden, 2 * hidden)
    for i in range(n_inputs):
        sd[f"first_linears.{i}.weight"], sd[f"first_linears.{i}.bias"] = draw.linear(hidden, hidden)
    sd["final_linear.weight"], sd["final_linear.bias"] = draw.linear(word_dim, hidden)
    return sd


def offsets_state(targets: Mapping[str, tuple[int, int]], draw: _Draw) -> dict[str, torch.Tensor]:
    """``weight_offsets.pt``: nine tensors per target, scaled so that dW is O(0.1)."""
    sd = {}
    for target in sorted(targets):
        out, inp = targets[target]
        prefix, proj = target.rsplit(".to_", 1)
        p = f"{prefix}.wo_{proj}."
        sd[p + "v"] = draw.normal((1,), 0.1, 1.0)
        sd[p + "linear1.weight"], sd[p + "linear1.bias"] = draw.normal((inp, 1), 0.3), draw.normal((inp,), 0.05)
        sd[p + "linear2.weight"], sd[p + "linear2.bias"] = draw.normal((out, 1), 0.3), draw.normal((out,), 0.05)
        sd[p + "linear_column.weight"], sd[p + "linear_column.bias"] = draw.linear(inp, inp, bias_std=0.02)
        sd[p + "linear_row.weight"], sd[p + "linear_row.bias"] = draw.linear(out, out, bias_std=0.02)
    return sd


def _save(obj, path: str, fmt: str) -> str:
    tmp = path + ".part"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in obj.items()}, tmp)
    elif fmt == "pt":
        torch.save(obj, tmp)
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
    os.replace(tmp, path)
    return path


def write_tiny_e4t(folder: str, offset_targets: Mapping[str, tuple[int, int]] | None = None,
                   feature_channels: int = TINY_SD15_FEATURE_CHANNELS, clip_hidden: int = TINY_VIT_H["hidden_size"],
                   clip_layers: int = TINY_VIT_H["num_hidden_layers"], clip_heads: int = TINY_VIT_H["num_attention_heads"],
                   word_dim: int = TINY_WORD_DIM, seed: int = 0, fmt: str = "pt", class_word: str = "face",
                   placeholder: str = "*s", config: Mapping | None = None) -> str:
    """Write a tiny E4T folder (``config.json``, ``encoder.<ext>``, ``weight_offsets.<ext>``; ``fmt`` "pt", as the
    reference saves, or "safetensors"); returns ``folder``. ``offset_targets``: :func:`sd15_offset_targets` (default:
    the tiny SD1.5's); ``config``: entries replacing those of :func:`reference_config`. The defaults fit the tiny SD1.5
    and the tiny vit-h tower of ``tiny_models`` (which ComfyUI loads from ``clip_vision.*`` through
    ``convert_to_transformers`` once ``tiny_models.register_tiny_configs()`` ran)."""
    if fmt not in ("pt", "safetensors"):
        raise ValueError(f"fmt must be 'pt' or 'safetensors', got {fmt!r}")
    if clip_hidden % clip_heads:
        raise ValueError(f"clip_hidden {clip_hidden} is not a multiple of clip_heads {clip_heads}")
    targets = TINY_SD15_OFFSET_TARGETS if offset_targets is None else dict(offset_targets)
    draw = _Draw(seed)
    encoder = {f"clip_vision.{k}": v for k, v in clip_vision_state(clip_hidden, clip_layers, draw).items()}
    encoder.update(head_state(feature_channels, clip_hidden, word_dim, draw))
    offsets = offsets_state(targets, draw)
    cfg = {**reference_config(class_word, placeholder), **dict(config or {})}
    os.makedirs(folder, exist_ok=True)
    _save(encoder, os.path.join(folder, f"encoder.{fmt}"), fmt)
    _save(offsets, os.path.join(folder, f"weight_offsets.{fmt}"), fmt)
    _save(cfg, os.path.join(folder, "config.json"), "json")
    return folder


__all__ = ["N_HEAD_INPUTS", "TINY_SD15_FEATURE_CHANNELS", "TINY_SD15_OFFSET_TARGETS", "offset_param_count",
           "reference_config", "sd15_feature_channels", "sd15_offset_targets", "write_tiny_e4t"]
