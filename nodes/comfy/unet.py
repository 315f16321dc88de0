"""A ComfyUI UNet as the pack sees it: its cross-attention sites (in execution and adapter order) and its compute
dtype."""
from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management as mm
import torch

from ...models.layers import Site, Transformer, sites_from_transformers

UNET_BLOCKS = ("input_blocks", "middle_block", "output_blocks")  # comfy/ldm/modules/diffusionmodules/openaimodel.py


def is_unet(model) -> bool:
    """Whether a ModelPatcher holds an SD-style UNet (SD1.x / SD2.x / SDXL), not a DiT."""
    dm = model.model.diffusion_model
    return all(hasattr(dm, a) for a in UNET_BLOCKS)


def discover_sites(model) -> tuple[list[Transformer], list[Site], int]:
    """The cross-attention sites of a ComfyUI UNet: (transformers in execution order, sites, context width)."""
    dm = model.model.diffusion_model
    if not is_unet(model):
        raise ValueError(f"{type(dm).__name__} is not a UNet (SD1.x / SD2.x / SDXL); IP-Adapter patches UNet cross-attention")
    transformers, widths, context = [], [], set()
    for block, blocks in (("input", dm.input_blocks), ("middle", [dm.middle_block]), ("output", dm.output_blocks)):
        for block_id, seq in enumerate(blocks):
            for layer in seq:
                tb = getattr(layer, "transformer_blocks", None)
                if tb is None or not isinstance(layer, comfy_attention.SpatialTransformer):
                    continue
                transformers.append(Transformer(block, block_id, len(tb)))
                widths.append(tb[0].attn2.to_k.out_features)
                context.add(tb[0].attn2.to_k.in_features)
    return transformers, sites_from_transformers(transformers, widths), (context.pop() if len(context) == 1 else 0)


def compute_dtype(model) -> torch.dtype:
    """The dtype the UNet computes in (fp8-stored models compute in half precision where the device allows)."""
    dtype = model.model.manual_cast_dtype or model.model.get_dtype()
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.float16 if mm.should_use_fp16(mm.get_torch_device()) else torch.float32
    return dtype
