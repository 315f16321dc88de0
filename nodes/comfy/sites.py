"""Attention sites: one attn2 replace object per cross-attention layer, and the install step for any patch.

A site object follows the ``.add(callback, **kwargs)`` protocol of the popular IP-Adapter / PuLID / InstantID
packs (ComfyUI_IPAdapter_plus ``CrossAttentionPatch``, PuLID_ComfyUI ``Attn2Replace``): it calls the text attention
(or a replace function that was there before), then adds ``callback(out, q, k, v, extra_options, **kwargs)`` for each
callback whose ``[sigma_end, sigma_start]`` window contains the current sigma. Their patches and ours stack on the
same layer instead of replacing each other. The callbacks here bridge ComfyUI's ``extra_options`` to the host-free
:class:`~...models.attention.SitePatch` protocol, so every method (IP-Adapter, PuLID, ...) installs the same way.
"""
from __future__ import annotations

import math

import comfy.ldm.modules.attention as comfy_attention

from ...models.attention import SiteCall, SitePatch
from ...models.layers import Site, Transformer

# ModelPatcher additional-models key under which patch weights are registered (see install_patch).
ADDITIONAL_MODELS_KEY = "personalize_adapters"

# Sigma of the current model call, read once per call (not once per layer): every site of every patch in one model
# call sees the same ``sigmas`` tensor object, whose value is cached here.
_sigma_slot: list = [None, 0.0]


def current_sigma(extra_options: dict) -> float:
    """The sigma of the running model call; the device-to-host read happens once per model call."""
    sigmas = extra_options.get("sigmas")
    if sigmas is None:
        return math.inf
    if _sigma_slot[0] is not sigmas:
        _sigma_slot[0], _sigma_slot[1] = sigmas, float(sigmas.reshape(-1)[0])
    return _sigma_slot[1]


def sigma_window(model, start_at: float, end_at: float) -> tuple[float, float]:
    """Fractions of the sampling schedule -> (sigma_start, sigma_end) for the model's own sampling."""
    ms = model.get_model_object("model_sampling")
    return float(ms.percent_to_sigma(start_at)), float(ms.percent_to_sigma(end_at))


def attend(q, k, v, extra_options):
    """ComfyUI's attention kernel (the one the model itself uses), on head-merged tensors."""
    return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                                               transformer_options=extra_options)


class AttentionSite:
    """attn2 replace object of one site.

    Calls ``base`` (a replace function that was there before, if any) or the plain text attention, then adds the
    callbacks in their sigma windows. ``copy.deepcopy`` (done by ``ModelPatcher.clone()``) copies the lists but
    shares the callbacks, so clones never duplicate patch weights and never see each other's later additions.
    ``models()`` answers ComfyUI's own protocol for patch objects (``ModelPatcher.model_patches_models``): the
    ModelPatchers holding the callbacks' weights, loaded and offloaded with the UNet.
    """

    def __init__(self, base=None):
        self.callback: list = []
        self.kwargs: list[dict] = []
        self._base = base

    def add(self, callback, **kwargs) -> None:
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        out = self._base(q, k, v, extra_options) if self._base is not None else attend(q, k, v, extra_options)
        sigma = current_sigma(extra_options)
        for callback, kwargs in zip(self.callback, self.kwargs):
            if kwargs.get("sigma_end", 0.0) <= sigma <= kwargs.get("sigma_start", math.inf):
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(q.dtype)

    def __deepcopy__(self, memo):
        new = AttentionSite(self._base)
        new.callback = list(self.callback)
        new.kwargs = [dict(kw) for kw in self.kwargs]
        return new

    def to(self, device_or_dtype):
        """ComfyUI moves patch objects with the model; weights move through model management, so only caches
        are dropped here."""
        for callback in self.callback:
            drop = getattr(callback, "drop_caches", None)
            if drop is not None:
                drop()
        return self

    def models(self) -> list:
        out = []
        for callback in self.callback:
            for m in getattr(callback, "models", list)():
                if all(m is not o for o in out):
                    out.append(m)
        return out


def add_to_site(attn2: dict, site: Site, depth: int, callback, **kwargs) -> None:
    """Add ``callback`` at ``site``: to the object already there (ours or another pack's), else to a new one."""
    keys = [site.key, site.key[:2]] if site.block_index == 0 else [site.key]
    existing = next((k for k in keys if k in attn2), None)
    if existing is not None:
        obj = attn2[existing]
        if hasattr(obj, "add") and hasattr(obj, "callback"):
            obj.add(callback, **kwargs)
            return
        new = AttentionSite(base=obj)  # a plain replace function: keep it as the base attention
        key = existing
    else:
        new = AttentionSite()
        key = site.key if depth > 1 else site.key[:2]
    new.add(callback, **kwargs)
    attn2[key] = new


class SiteCallback:
    """The per-site callable given to an attention site: turns ComfyUI's ``extra_options`` into a
    :class:`~...models.attention.SiteCall` and asks the patch for its delta. Shared, never copied, by clones."""

    def __init__(self, patch: SitePatch, index: int, patcher=None):
        self.patch, self.index, self.patcher = patch, index, patcher

    def __call__(self, out, q, k, v, extra_options, **kwargs):
        shape = extra_options.get("original_shape")
        window = extra_options.get("context_window")  # ComfyUI's context windows: the latents this call holds
        frames = window.index_list if window is not None and getattr(window, "dim", 0) == 0 else None
        call = SiteCall(extra_options["n_heads"], extra_options["cond_or_uncond"],
                        attn=lambda q_, k_, v_, heads: attend(q_, k_, v_, extra_options),
                        latent_hw=tuple(shape[-2:]) if shape is not None else None, frames=frames)
        delta = self.patch.delta(self.index, q, out, call)
        return 0.0 if delta is None else delta

    def drop_caches(self) -> None:
        self.patch.drop_caches()

    def models(self) -> list:
        return [] if self.patcher is None else [self.patcher]

    def __deepcopy__(self, memo):
        return self


def install_patch(model, patch: SitePatch, sites: list[Site], transformers: list[Transformer],
                  sigma_start: float, sigma_end: float, patcher=None):
    """A clone of ``model`` with ``patch`` on every site where it is active, inside the sigma window.

    ``patcher``: the ModelPatcher of the patch's weights. The site objects answer ``models()`` with it, and it is
    also registered as an additional model of the clone, because a site object of another pack that hosts our
    callback may not answer ``models()``; ComfyUI loads each model once either way.
    """
    model = model.clone()
    to = model.model_options.setdefault("transformer_options", {})
    attn2 = to.setdefault("patches_replace", {}).setdefault("attn2", {})
    depth = {(t.block, t.block_id): t.depth for t in transformers}
    for site in sites:
        if patch.active(site.adapter_index):
            add_to_site(attn2, site, depth[(site.block, site.block_id)], SiteCallback(patch, site.adapter_index, patcher),
                        sigma_start=sigma_start, sigma_end=sigma_end)
    if patcher is not None:
        extra = model.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
        if not any(p.model is patcher.model for p in extra):
            model.set_additional_models(ADDITIONAL_MODELS_KEY, extra + [patcher])
    return model
