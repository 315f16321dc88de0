"""Run our IP-Adapter code on a diffusers ``UNet2DConditionModel`` (the second host, used by the CLI and as the
tier-1 test host next to diffusers' own IP-Adapter implementation).

Only diffusers' public attention-processor interface is used; diffusers is imported by the caller, not here.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .attention import attention
from .ipadapter import IPAdapterPatch


class IPAdapterAttnProcessor:
    """A cross-attention processor: text attention as in diffusers' ``AttnProcessor2_0`` plus our image branch."""

    def __init__(self, patch: IPAdapterPatch, adapter_index: int, state: dict):
        self.patch, self.adapter_index, self.state = patch, adapter_index, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
            raise NotImplementedError("IP-Adapter processor: spatial/group norm and residual attention are not used by SD UNets")
        shape = hidden_states.shape
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if attention_mask is not None:
            raise NotImplementedError("IP-Adapter processor: text attention masks are not supported")
        q = attn.to_q(hidden_states)
        out = attention(q, attn.to_k(context), attn.to_v(context), attn.heads)
        delta = self.patch.delta(self.adapter_index, q, attn.heads, self.state["chunks"])
        if delta is not None:
            out = out + delta
        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))
        if len(shape) == 4:
            out = out.transpose(-1, -2).reshape(shape)
        return out / attn.rescale_output_factor


def apply_ip_adapter(unet, patch: IPAdapterPatch, chunks: list[int] | None = None) -> Callable[[], None]:
    """Install ``patch`` on every cross-attention layer of a diffusers UNet; returns a function that undoes it.

    Cross-attention layers are numbered in ``unet.attn_processors`` order (down, up, mid), which is the order of
    the IP-Adapter checkpoint keys. ``chunks`` gives the batch layout (diffusers pipelines put the unconditional
    half first: ``[1, 0]``); it can be changed later through the returned function's ``state`` attribute.
    """
    old = dict(unet.attn_processors)
    cross = [name for name in old if name.endswith("attn2.processor")]
    if len(cross) != len(patch.adapter.spec.widths):
        raise ValueError(f"this UNet has {len(cross)} cross-attention layers, the adapter {len(patch.adapter.spec.widths)}")
    state = {"chunks": list(chunks or [1, 0])}
    new = dict(old)
    for k, name in enumerate(cross):
        new[name] = IPAdapterAttnProcessor(patch, k, state)
    unet.set_attn_processor(new)

    def restore() -> None:
        unet.set_attn_processor(old)

    restore.state = state  # type: ignore[attr-defined]
    return restore
