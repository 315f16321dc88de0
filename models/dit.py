"""Block patches for DiT models (Flux and the models built like it), host-free: the protocol and the block tables.

Flux (black-forest-labs/flux, ``flux/model.py``) runs ``depth`` double-stream blocks (text and image tokens in two
streams with a joint attention), then ``depth_single_blocks`` single-stream blocks over ``cat(txt, img)``, text first.
A method that conditions Flux on a reference acts *after* a block, on the image tokens of its output:
- PuLID-FLUX (ToTheBeginning/PuLID ``flux/model.py``): ``img += w * ca_k(id, img)`` after some blocks;
- XLabs IP-Adapter (XLabs-AI/x-flux ``IPDoubleStreamBlockProcessor``): ``img += w * SDPA(img_q, K_ip, V_ip)`` after
  every double block, with ``img_q`` the block's own image query of its input (after QK-norm, before RoPE).

The protocol (:class:`BlockPatch`): a host (the ComfyUI glue in ``nodes/comfy/flux.py``, the diffusers parity host in
``models/diffusers_flux.py``) asks each patch put on a model
- ``sites``: the blocks ``(kind, index)`` it acts after, ``kind`` "double" or "single";
- ``uses_query``: whether it needs the block's image query (the host computes it once per block, for all patches);
- ``delta(call, img)``: what it adds to the image tokens ``img`` ``[B, L, C]`` of the block's output (the generated
  image only: no text, no Kontext reference tokens);
- ``drop_caches()``: forget what it cached per device.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Blocks of Flux.1-dev / schnell (black-forest-labs/flux ``flux/util.py`` configs: depth 19, depth_single_blocks 38).
FLUX_DEPTHS = (19, 38)
BLOCK_KINDS = ("double", "single")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention on head-split tensors ``[B, H, L, D]`` -> ``[B, L, H*D]`` (torch's scaled dot-product attention, the
    kernel both reference implementations call)."""
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


@dataclass(frozen=True)
class BlockCall:
    """What the host says about one block call.

    ``chunks``: the batch layout, ComfyUI's ``cond_or_uncond`` (0 = cond, 1 = uncond; ``B / len(chunks)`` rows each).
    ``grid``: rows and columns of the generated image's token grid (None when the host does not know them).
    ``query``: double blocks, for patches with ``uses_query``: the block's image query of its input, ``[B, heads, L,
    head_dim]``, after QK-norm and before RoPE. ``attn``: the host's attention kernel on head-split tensors.
    """

    kind: str
    index: int
    chunks: Sequence[int]
    grid: tuple[int, int] | None = None
    query: torch.Tensor | None = None
    attn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = sdpa


class BlockPatch:
    """What a block host asks of a patch."""

    uses_query = False

    def sites(self) -> set[tuple[str, int]]:
        raise NotImplementedError

    def delta(self, call: BlockCall, img: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def drop_caches(self) -> None:
        """Forget per-device caches (the host moved the model)."""


def interval_sites(depths: tuple[int, int], intervals: dict[str, int]) -> dict[tuple[str, int], int]:
    """``{(kind, block index): k}`` for a module after every ``intervals[kind]``-th block of each kind, starting with
    block 0, numbered double blocks first (PuLID-FLUX's ``ca_idx``)."""
    out: dict[tuple[str, int], int] = {}
    for kind, depth in zip(BLOCK_KINDS, depths):
        step = intervals.get(kind)
        if step:
            for i in range(0, depth, step):
                out[(kind, i)] = len(out)
    return out

