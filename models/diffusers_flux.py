"""Run our block patches (:class:`~.dit.BlockPatch`) on a diffusers ``FluxTransformer2DModel``: the second Flux host,
next to the ComfyUI glue (``nodes/comfy/flux.py``).

The tier-1 tests use it to compare our patches with diffusers' own XLabs IP-Adapter (``FluxIPAdapterAttnProcessor``)
and with a re-statement of the PuLID-FLUX reference on the same weights. The transformer's block lists are swapped for
wrappers for the duration of a ``with`` block and restored after; diffusers is imported by the caller, not here.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from .dit import BlockCall, BlockPatch


def image_query(block, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """A diffusers Flux double block's image query of its input: ``norm1`` (AdaLN), ``to_q``, ``norm_q``, before RoPE:
    ``[B, heads, L, head_dim]``."""
    norm = block.norm1(hidden_states, emb=temb)[0]
    q = block.attn.to_q(norm).unflatten(-1, (block.attn.heads, -1))
    return block.attn.norm_q(q).transpose(1, 2)


class _Block(nn.Module):
    def __init__(self, block: nn.Module, kind: str, index: int, patches: Sequence[BlockPatch], chunks, grid):
        super().__init__()
        self.block, self.kind, self.index = block, kind, index
        self.patches = [p for p in patches if (kind, index) in p.sites()]
        self.chunks, self.grid = list(chunks), grid

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        query = None
        if self.kind == "double" and any(p.uses_query for p in self.patches):
            query = image_query(self.block, hidden_states, temb)
        txt, img = self.block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                              image_rotary_emb=image_rotary_emb, joint_attention_kwargs=joint_attention_kwargs)
        call = BlockCall(self.kind, self.index, self.chunks, self.grid, query)
        for p in self.patches:
            d = p.delta(call, img)
            if d is not None:
                img = img + d.to(img.dtype)
        return txt, img


@contextmanager
def block_patches(transformer, patches: Sequence[BlockPatch], chunks: Sequence[int] = (0,), grid=None):
    """``transformer`` with ``patches`` after its blocks inside the ``with`` block. ``chunks``: the batch layout
    (ComfyUI's ``cond_or_uncond``); ``grid``: the image token grid (for masks)."""
    lists = {"double": transformer.transformer_blocks, "single": transformer.single_transformer_blocks}
    saved = {k: list(v) for k, v in lists.items()}
    try:
        for kind, blocks in lists.items():
            for i in range(len(blocks)):
                blocks[i] = _Block(saved[kind][i], kind, i, patches, chunks, grid)
        yield transformer
    finally:
        for kind, blocks in lists.items():
            for i, b in enumerate(saved[kind]):
                blocks[i] = b
