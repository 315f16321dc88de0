"""Decoupled cross-attention math (IP-Adapter, Ye et al. 2023, Eq. 5), host-free.

Shapes follow ComfyUI's attention patch convention: ``q`` is ``[B, N, heads * dim_head]`` (already projected and
head-merged), image keys/values ``[B, T, heads * dim_head]``. The text branch is computed by the host; these
functions return the image branch, which the host adds to the text branch before ``to_out``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

# ``embeds_scaling`` modes popularised by ComfyUI_IPAdapter_plus (not part of the paper; anchor-packs.md §1.5):
#   "V only"            out_ip * w                      (same as scaling V by w: attention is linear in V)
#   "K+V"               attention(q, w*K, w*V)
#   "K+V w/ C penalty"  w := w * C / 1280 first, C the layer width, then K+V
EMBEDS_SCALING = ("V only", "K+V", "K+V w/ C penalty")
# Width that gets no penalty in "K+V w/ C penalty": the widest SD1.5 / SDXL UNet level (1280 channels).
C_PENALTY_REFERENCE_WIDTH = 1280.0


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention on head-merged tensors: ``[B, N, H*D] -> [B, N, H*D]``."""
    b, n, inner = q.shape
    d = inner // heads
    q_, k_, v_ = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q_, k_, v_)
    return out.transpose(1, 2).reshape(b, n, inner)


def ip_attention(
    q: torch.Tensor,
    k_ip: torch.Tensor,
    v_ip: torch.Tensor,
    heads: int,
    weight: float,
    scaling: str = "V only",
    attn: AttentionFn = attention,
) -> torch.Tensor:
    """The image branch ``weight * softmax(Q K_i^T / sqrt(d)) V_i`` with the chosen ``embeds_scaling``."""
    if scaling == "V only":
        return attn(q, k_ip, v_ip, heads) * weight
    if scaling == "K+V w/ C penalty":
        weight = weight * (q.shape[-1] / C_PENALTY_REFERENCE_WIDTH)
    elif scaling != "K+V":
        raise ValueError(f"unknown embeds_scaling {scaling!r}; expected one of {EMBEDS_SCALING}")
    return attn(q, k_ip * weight, v_ip * weight, heads)
