"""Attention math and the patch protocol every method implements, host-free.

Shapes follow ComfyUI's attention patch convention: ``q`` is ``[B, N, heads * dim_head]`` (already projected and
head-merged), keys/values ``[B, T, heads * dim_head]``. The text branch is computed by the host; a patch returns what
it adds to the attention output before ``to_out`` (IP-Adapter's decoupled image branch, Ye et al. 2023, Eq. 5;
PuLID's ID branch with its orthogonal projection, Guo et al. 2024).

The protocol (:class:`SitePatch`): a host (the ComfyUI glue in ``nodes/comfy/sites.py``, a diffusers attention
processor in ``models/diffusers_host.py``) owns one object per cross-attention site and asks each patch put there
- ``active(index)``: does the patch act at the site with this index (the site's position in diffusers'
  ``unet.attn_processors`` order, which IP-Adapter and PuLID checkpoints number their layers by)?
- ``delta(index, q, out, call)``: what it adds to ``out`` (the attention output so far) for the query ``q``;
- ``drop_caches()``: forget tensors cached per device (the host moved the model).
:class:`TokenPatch` holds what every token-based method shares: the conditional / unconditional tokens cached per
device and dtype, the rows of a batch laid out as ComfyUI's ``cond_or_uncond`` chunks, and a spatial mask resized
once per resolution.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

# ``embeds_scaling`` modes popularised by ComfyUI_IPAdapter_plus (``IPAdapterPlus.py``, ``embeds_scaling``); not part
# of the IP-Adapter paper:
#   "V only"            out_ip * w                      (same as scaling V by w: attention is linear in V)
#   "K+V"               attention(q, w*K, w*V)
#   "K+V w/ C penalty"  w := w * C / 1280 first, C the layer width, then K+V
EMBEDS_SCALING = ("V only", "K+V", "K+V w/ C penalty")
# Width that gets no penalty in "K+V w/ C penalty": the widest SD1.5 / SDXL UNet level (1280 channels).
C_PENALTY_REFERENCE_WIDTH = 1280.0
# Resized masks kept per patch (one per resolution, batch and chunk layout); a sampler uses a handful.
MASK_CACHE_SIZE = 32


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


def token_grid(latent_hw: tuple[int, int], seq_len: int) -> tuple[int, int]:
    """Height and width of the token grid of a UNet level with ``seq_len`` tokens.

    Each UNet downsample is a stride-2 3x3 convolution with padding 1, so sizes go ``h -> ceil(h / 2)``.
    """
    h, w = latent_hw
    while h * w > seq_len:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != seq_len:
        raise ValueError(f"cannot place {seq_len} attention tokens on a latent of {latent_hw[0]}x{latent_hw[1]}")
    return h, w


# ---------------------------------------------------------------------------------------------------------------
# The patch protocol


@dataclass(frozen=True)
class SiteCall:
    """What the host says about one attention call at a site.

    ``chunks``: the batch layout, ComfyUI's ``cond_or_uncond`` (0 = cond, 1 = uncond; one chunk of
    ``B / len(chunks)`` rows each; anything else, e.g. InstructPix2Pix's third chunk, counts as cond).
    ``attn``: the host's attention kernel. ``latent_hw``: the latent's height and width in this model call (needed
    to place a spatial mask on the tokens), None when the host does not know it. ``frames``: with ComfyUI's context
    windows, which latents of the whole batch the rows of each chunk are (``context_window.index_list``).
    """

    heads: int
    chunks: Sequence[int]
    attn: AttentionFn = attention
    latent_hw: tuple[int, int] | None = None
    frames: Sequence[int] | None = None  # latents of the full batch this call's rows are (a context window), else None


class SitePatch:
    """What an attention site asks of a patch; every method's patch implements these three."""

    def active(self, index: int) -> bool:
        raise NotImplementedError

    def delta(self, index: int, q: torch.Tensor, out: torch.Tensor | None, call: SiteCall) -> torch.Tensor | None:
        """What the patch adds to ``out`` (the attention output so far, ``[B, N, C]``) at site ``index``; None when
        it does nothing there."""
        raise NotImplementedError

    def drop_caches(self) -> None:
        """Forget per-device caches (the host moved the model)."""


class TokenPatch(SitePatch):
    """The shared parts of a patch that attends to extra tokens (IP-Adapter image tokens, PuLID ID tokens).

    ``tokens`` maps a name to ``(cond, uncond)`` tokens ``[1, T, C]`` (the unconditional ones are what the method
    was trained with for the negative pass). ``mask`` ``[frames or 1, H, W]`` (any size, stretched to the latent)
    limits the patch to a region. Tokens and resized masks are cached per device, dtype and resolution, so the
    per-layer call does no host sync and no repeated work.

    ``unfold``: the tokens are ``[N, T, C]``, one set per reference, and reference i conditions latent i of the batch
    (latents past the last reference take the last: ComfyUI_IPAdapter_plus' "unfold batch" and its ``tensor_to_size``);
    under a context window the latents are the window's (``SiteCall.frames``).
    """

    def __init__(self, tokens: Mapping[Hashable, tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor | None = None,
                 unfold: bool = False):
        for cond, uncond in tokens.values():
            if cond.shape[1:] != uncond.shape[1:] or (not unfold and cond.shape != uncond.shape):
                raise ValueError(f"cond tokens {tuple(cond.shape)} and uncond tokens {tuple(uncond.shape)} differ")
            if unfold and uncond.shape[0] not in (1, cond.shape[0]):
                raise ValueError(f"{uncond.shape[0]} negative references for {cond.shape[0]} references: give 1 or "
                                 f"{cond.shape[0]}")
        self.unfold = unfold
        self.tokens = dict(tokens)
        self.mask = None if mask is None else (mask if mask.ndim == 3 else mask.reshape(-1, *mask.shape[-2:]))
        self._token_cache: dict = {}
        self._mask_cache: dict = {}

    def stacked_tokens(self, name: Hashable, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``[2, T, C]`` on ``device``: row 0 the cond tokens, row 1 the uncond ones (cached); unfolded:
        ``[N + N_uncond, T, C]``, the references' then the negatives'."""
        key = (name, device, dtype)
        t = self._token_cache.get(key)
        if t is None:
            c, u = self.tokens[name]
            t = torch.cat([c, u]).to(device=device, dtype=dtype)
            self._token_cache[key] = t
        return t

    def rows(self, name: Hashable, stacked: torch.Tensor, chunks: Sequence[int], batch: int,
             frames: Sequence[int] | None = None) -> torch.Tensor:
        """``stacked`` (:meth:`stacked_tokens`, or a per-row function of it such as its keys) laid out as the batch:
        ``[len(chunks) * batch, ...]``; unfolded, latent j's rows take reference ``min(frame_j, N - 1)``."""
        if not self.unfold:
            return self.batch_rows(stacked, chunks, batch)
        n = self.tokens[name][0].shape[0]
        nu = stacked.shape[0] - n
        frame = list(frames) if frames is not None and len(frames) == batch else list(range(batch))
        key = ("rows", tuple(chunks), tuple(frame), n, nu, stacked.device)
        index = self._token_cache.get(key)
        if index is None:
            ref = [min(f, n - 1) for f in frame]
            index = torch.tensor([(n + (min(r, nu - 1)) if c == 1 else r) for c in chunks for r in ref], device=stacked.device)
            self._token_cache[key] = index
        return stacked.index_select(0, index)

    @staticmethod
    def batch_rows(pair: torch.Tensor, chunks: Sequence[int], batch: int) -> torch.Tensor:
        """``pair`` ``[2, ...]`` (row 0 cond, row 1 uncond) laid out as the batch: ``[len(chunks) * batch, ...]``.
        Built from views, with no index tensor, so no host-to-device copy per layer call."""
        rows = [1 if c == 1 else 0 for c in chunks]
        if batch == 1 and rows in ([0], [0, 1]):
            return pair[: len(rows)]
        return torch.cat([pair[r : r + 1].expand(batch, *pair.shape[1:]) for r in rows])

    def drop_caches(self) -> None:
        self._token_cache.clear()
        self._mask_cache.clear()

    def resized_mask(self, grid: tuple[int, int], batch: int, chunks: Sequence[int], device, dtype,
                     frames: Sequence[int] | None = None) -> torch.Tensor:
        """The mask on this level's token grid: ``[len(chunks) * batch, h*w, 1]``, cached per resolution. Under a
        context window (``frames``), a mask per latent of the whole batch gives the window's latents theirs."""
        frames = tuple(frames) if frames is not None and len(frames) == batch else None
        key = (grid, batch, tuple(chunks), device, dtype, frames)
        m = self._mask_cache.get(key)
        if m is None:
            mask = self.mask
            if frames is not None and mask.shape[0] > 1 and mask.shape[0] != batch:
                mask = mask[[min(f, mask.shape[0] - 1) for f in frames]]
            if mask.shape[0] not in (1, batch):
                raise ValueError(f"the attention mask has {mask.shape[0]} frames but the latent batch has {batch}: "
                                 f"give one mask, or one per latent")
            m = F.interpolate(mask[:, None].to(device=device, dtype=torch.float32), size=grid, mode="bilinear", align_corners=False)
            m = m.reshape(m.shape[0], -1, 1).expand(batch, -1, -1).repeat(len(chunks), 1, 1).to(dtype)
            if len(self._mask_cache) > MASK_CACHE_SIZE:
                self._mask_cache.clear()
            self._mask_cache[key] = m
        return m

    def masked(self, delta: torch.Tensor, call: SiteCall) -> torch.Tensor:
        """``delta`` limited to the mask's region (unchanged without a mask or when the host gives no latent size)."""
        if self.mask is None or call.latent_hw is None:
            return delta
        grid = token_grid(tuple(call.latent_hw), delta.shape[1])
        return delta * self.resized_mask(grid, delta.shape[0] // len(call.chunks), call.chunks, delta.device, delta.dtype,
                                         call.frames)
