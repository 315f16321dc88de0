"""What a denoiser is conditioned on: one tensor (the cross-attention context of SD1.x / SD2.x, ``(B, L, D)``) or a
tuple of tensors that all start with the batch dimension (SDXL: the context and the pooled-text + size vector
``y``). The training core only batches, repeats and moves conditionings; these helpers do it for both forms."""
from __future__ import annotations

from collections.abc import Sequence

import torch

Conditioning = torch.Tensor | tuple[torch.Tensor, ...]


def cat(items: Sequence[Conditioning]) -> Conditioning:
    """Concatenate along the batch dimension."""
    if isinstance(items[0], torch.Tensor):
        return torch.cat(list(items))
    return tuple(torch.cat(parts) for parts in zip(*items))


def expand(c: Conditioning, batch: int) -> Conditioning:
    """Repeat a batch-1 conditioning ``batch`` times (a view where possible)."""
    if isinstance(c, torch.Tensor):
        return c.expand(batch, *c.shape[1:])
    return tuple(expand(p, batch) for p in c)


def to(c: Conditioning, *args, **kwargs) -> Conditioning:
    """``Tensor.to`` on every part."""
    if isinstance(c, torch.Tensor):
        return c.to(*args, **kwargs)
    return tuple(p.to(*args, **kwargs) for p in c)


def detach(c: Conditioning) -> Conditioning:
    if isinstance(c, torch.Tensor):
        return c.detach()
    return tuple(p.detach() for p in c)
