"""Run our attention patches on a diffusers ``UNet2DConditionModel``: the second host, next to the ComfyUI glue.

The tier-1 tests use it to compare our patches with diffusers' own implementations (IP-Adapter:
``UNet2DConditionModel._load_ip_adapter_weights``) on the same weights. Only diffusers' public attention-processor
interface is used; diffusers itself is imported by the caller, not here.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from .attention import SiteCall, SitePatch, attention


class SiteAttnProcessor:
    """A cross-attention processor: text attention as in diffusers' ``AttnProcessor2_0`` plus what a
    :class:`~.attention.SitePatch` adds at this site."""

    def __init__(self, patch: SitePatch, index: int, state: dict):
        self.patch, self.index, self.state = patch, index, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
            raise NotImplementedError("site processor: spatial/group norm and residual attention are not used by SD UNets")
        shape = hidden_states.shape
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if attention_mask is not None:
            raise NotImplementedError("site processor: text attention masks are not supported")
        q = attn.to_q(hidden_states)
        out = attention(q, attn.to_k(context), attn.to_v(context), attn.heads)
        delta = self.patch.delta(self.index, q, out, SiteCall(attn.heads, self.state["chunks"]))
        if delta is not None:
            out = out + delta
        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))
        if len(shape) == 4:
            out = out.transpose(-1, -2).reshape(shape)
        return out / attn.rescale_output_factor


def install_patch(unet, patch: SitePatch, sites: int, chunks: Sequence[int] | None = None) -> Callable[[], None]:
    """Put ``patch`` on every cross-attention layer of a diffusers UNet; returns a function that undoes it.

    Cross-attention layers are numbered in ``unet.attn_processors`` order (down, up, mid), the order adapter
    checkpoints number their layers by; ``sites`` is how many the patch was made for. ``chunks`` gives the batch
    layout (diffusers pipelines put the unconditional half first: ``[1, 0]``); it can be changed later through the
    returned function's ``state`` attribute.
    """
    old = dict(unet.attn_processors)
    cross = [name for name in old if name.endswith("attn2.processor")]
    if len(cross) != sites:
        raise ValueError(f"this UNet has {len(cross)} cross-attention layers, the patch was made for {sites}")
    state = {"chunks": list(chunks or [1, 0])}
    new = dict(old)
    for k, name in enumerate(cross):
        if patch.active(k):
            new[name] = SiteAttnProcessor(patch, k, state)
    unet.set_attn_processor(new)

    def restore() -> None:
        unet.set_attn_processor(old)

    restore.state = state  # type: ignore[attr-defined]
    return restore
