"""File formats: the LoRA ComfyUI's stock LoraLoader applies exactly, the token embedding ComfyUI prompts use as
``embedding:<name>``, and the resumable training state.

LoRA keys (ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet``, and what ComfyUI's own SaveLoRA writes):
``diffusion_model.<LDM module path>.lora_up.weight``, ``.lora_down.weight``, ``.alpha``; ComfyUI applies
``W + strength * alpha / rank * up @ down``, the delta :class:`~.lora.LoRADelta` trains with.

Token embedding (ComfyUI ``comfy/sd1_clip.py`` ``load_embed``): a safetensors file in ``models/embeddings`` holding
``emb_params`` ``(n_vectors, width)``.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

import torch

from ..models.checkpoints import CheckpointError, atomic_save_safetensors, load_file
from .lora import LoRASet

LORA_PREFIX = "diffusion_model."
EMBEDDING_KEY = "emb_params"
FORMAT_VERSION = "1"


def diffusers_to_ldm_path(name: str, layers_per_block: int = 2) -> str:
    """Module path of a diffusers ``UNet2DConditionModel`` -> the CompVis/LDM path ComfyUI uses, for modules inside the
    transformer blocks (the inner names are the same in both: ``transformer_blocks.0.attn1.to_q``, ``proj_in``).

    down_blocks.i.attentions.j -> input_blocks.(i*(L+1)+j+1).1, mid_block.attentions.0 -> middle_block.1,
    up_blocks.i.attentions.j -> output_blocks.(i*(L+1)+j).1 (L = layers_per_block; ComfyUI ``unet_to_diffusers``).
    """
    m = re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", name)
    if m:
        return f"input_blocks.{int(m[1]) * (layers_per_block + 1) + int(m[2]) + 1}.1.{m[3]}"
    m = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", name)
    if m:
        return f"output_blocks.{int(m[1]) * (layers_per_block + 1) + int(m[2])}.1.{m[3]}"
    m = re.match(r"mid_block\.attentions\.0\.(.+)$", name)
    if m:
        return f"middle_block.1.{m[1]}"
    raise ValueError(f"no LDM path for diffusers module {name!r}: only modules inside attention blocks are exported")


def lora_to_comfy(lora: LoRASet, to_ldm=None) -> dict[str, torch.Tensor]:
    """The LoRA state in ComfyUI's key format; ``to_ldm`` maps host module paths to LDM paths (None: already LDM)."""
    out = {}
    for key, value in lora.lora_state().items():
        name, suffix = _split(key)
        out[LORA_PREFIX + (to_ldm(name) if to_ldm else name) + suffix] = value.float().contiguous()
    return out


def _split(key: str) -> tuple[str, str]:
    for suffix in (".lora_up.weight", ".lora_down.weight", ".alpha"):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    raise ValueError(f"not a LoRA key: {key}")


def save_lora(lora: LoRASet, path: str, to_ldm=None, metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> str:
    meta = {"personalize_format": FORMAT_VERSION, "rank": str(lora.rank), "alpha": str(lora.alpha), **(metadata or {})}
    return atomic_save_safetensors(lora_to_comfy(lora, to_ldm), path, meta, overwrite=overwrite)


def save_embedding(vectors: torch.Tensor, path: str, metadata: Mapping[str, str] | None = None,
                   parts: Sequence[tuple[str, int]] | None = None, overwrite: bool = False) -> str:
    """``(n_vectors, width)`` -> ``{"emb_params": ...}`` (the A1111 / ComfyUI textual-inversion layout, readable by
    ComfyUI as ``embedding:<file name>``). With ``parts`` (``[(key, width), ...]`` for a model with several text
    encoders) the vectors are the encoders' embeddings side by side and are saved one key each, e.g. SDXL's
    ``clip_l`` / ``clip_g`` (the keys ComfyUI's SDXL tokenizers look up)."""
    if vectors.ndim != 2:
        raise ValueError(f"a token embedding is (n_vectors, width), got {tuple(vectors.shape)}")
    vectors = vectors.detach().float()
    if not parts or len(parts) == 1:
        return atomic_save_safetensors({EMBEDDING_KEY: vectors}, path, metadata, overwrite=overwrite)
    if sum(w for _, w in parts) != vectors.shape[1]:
        raise ValueError(f"embedding width {vectors.shape[1]} does not match the parts {list(parts)}")
    tensors, start = {}, 0
    for key, width in parts:
        tensors[key] = vectors[:, start:start + width].contiguous()
        start += width
    return atomic_save_safetensors(tensors, path, metadata, overwrite=overwrite)


def save_state(tensors: Mapping[str, torch.Tensor], info: Mapping, path: str, overwrite: bool = False) -> str:
    """A resumable training state: tensors plus a JSON ``info`` (step, config, optimizer hyper-parameters)."""
    return atomic_save_safetensors(tensors, path, {"personalize_state": FORMAT_VERSION, "info": json.dumps(info)},
                                   overwrite=overwrite)


def load_state(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "info" not in meta:
        raise CheckpointError(f"{path} is not a training state written by this trainer (no 'info' metadata); "
                              "resume from a *.state.safetensors file")
    return tensors, json.loads(meta["info"])
