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


# ---------------------------------------------------------------------------------------------------------------
# The down + middle pass (E4T's UNet features) and the stackable model wrapper


def feature_channels(model) -> list[int]:
    """Channels of the outputs of each input block and of the middle block (what :func:`down_mid_features` returns),
    read from the modules: SD1.x gives 4 x 320, 3 x 640, 6 x 1280 (10880 in all)."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as oai

    dm = model.model.diffusion_model
    out, ch = [], None
    for block in list(dm.input_blocks) + [dm.middle_block]:
        for layer in block:
            if isinstance(layer, (oai.ResBlock, oai.Downsample)):
                ch = layer.out_channels
            elif isinstance(layer, torch.nn.Conv2d):
                ch = layer.out_channels
        out.append(ch)
    return out


def down_mid_features(diffusion_model, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the input blocks and of the middle block of a ComfyUI UNet on ``x`` at ``timesteps`` (diffusers'
    ``down_block_res_samples + (mid,)``, in that order), without the output blocks. The first half of
    ``UNetModel._forward`` (comfy/ldm/modules/diffusionmodules/openaimodel.py, ComfyUI 0.3.64) with blank transformer
    options: no attention patches (IP-Adapter, PuLID), no ControlNet residuals, no block patches take part, as in the
    reference, whose feature pass runs a plain UNet."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as oai
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    dm = diffusion_model
    options = {"original_shape": list(x.shape), "transformer_index": 0}
    emb = dm.time_embed(timestep_embedding(timesteps, dm.model_channels, repeat_only=False).to(x.dtype))
    h, out = x, []
    for block_id, block in enumerate(dm.input_blocks):
        options["block"] = ("input", block_id)
        h = oai.forward_timestep_embed(block, h, emb, context, options)
        out.append(h)
    options["block"] = ("middle", 0)
    out.append(oai.forward_timestep_embed(dm.middle_block, h, emb, context, options))
    return out


def add_model_wrapper(model, key: str, wrapper) -> None:
    """A stackable wrapper around the diffusion model's forward (``WrappersMP.DIFFUSION_MODEL`` under ``key``):
    ``wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs)``; other packs' wrappers
    keep running (never the single-slot ``model_function_wrapper``)."""
    import comfy.patcher_extension as pe

    model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, key, wrapper)


def is_sd1_like(model) -> bool:
    """A UNet conditioned by cross-attention only (SD1.x / SD2.x), not SDXL or another extra-conditioned UNet."""
    return is_unet(model) and not getattr(model.model, "adm_channels", 0)
