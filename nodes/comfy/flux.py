"""The Flux host: block patches (:class:`~...models.dit.BlockPatch`) on ComfyUI's own ``patches_replace["dit"]`` hooks.

ComfyUI's Flux (``comfy/ldm/flux/model.py``; Chroma's ``comfy/ldm/chroma/model.py`` has the same loop) calls a replace
object put at ``("double_block", i)`` / ``("single_block", i)`` as ``replace(args, {"original_block": run})`` with the
block's inputs (``img``, ``txt`` for double blocks, ``vec``, ``pe``, ``attn_mask``, ``transformer_options``) and wants
``{"img", "txt"}`` / ``{"img"}`` back. Nothing of the model is replaced: a :class:`BlockHook` at each key runs the
replace that was there before (another pack's, SkipLayerGuidance's) or the block itself, then adds its patches'
deltas to the image tokens of the block's output.

Per model call, a keyed ``DIFFUSION_MODEL`` wrapper (never the single-slot ``model_function_wrapper``) reads once what
every block needs (:class:`CallState`: the sigma, the image token grid, the batch layout) and puts it in the call's
``transformer_options``; the text length the single blocks need (they carry ``cat(txt, img)`` with no length) is taken
at double block 0, where a hook always sits. A model whose diffusion model never calls the hooks (a replaced
``forward_orig``, a wrapper around another implementation) is refused before sampling, or at its first call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import comfy.ldm.flux.model
import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension as pe
import torch
from comfy.ldm.flux.layers import apply_mod

from ...models.dit import BlockCall, BlockPatch
from .sites import ADDITIONAL_MODELS_KEY, current_sigma

STATE_KEY = "personalize_flux"  # the CallState in a model call's transformer_options
WRAPPER_KEY = "personalize.flux"  # our DIFFUSION_MODEL wrapper
BLOCK_LISTS = {"double": "double_blocks", "single": "single_blocks"}
# Relative tolerance of the start-step gate: a step's sigma equals ``sample_sigmas[step]`` up to float rounding.
STEP_SIGMA_RTOL = 1e-4


def _flux_classes() -> tuple[type, ...]:
    """Flux, and Chroma (same double / single block loop and hooks), where this ComfyUI has it."""
    import importlib

    classes = [comfy.ldm.flux.model.Flux]
    try:
        classes.append(importlib.import_module("comfy.ldm.chroma.model").Chroma)
    except (ImportError, AttributeError):  # an older ComfyUI without Chroma
        pass
    return tuple(classes)


def flux_model(model):
    """The diffusion model of a ComfyUI MODEL, checked to be one whose block hooks run; raises naming what was found."""
    dm = model.get_model_object("diffusion_model")
    if not isinstance(dm, _flux_classes()):
        raise ValueError(f"this model is a {type(dm).__name__}, not Flux (or Chroma): connect a Flux model, or use the "
                         "SD1.5 / SDXL node")
    if "forward_orig" in vars(dm):
        raise ValueError("another node has replaced this Flux model's forward_orig (a monkey patch, e.g. an older "
                         "PuLID-Flux pack): ComfyUI's block hooks would be ignored. Restart ComfyUI without that node, "
                         "or reload the model")
    patched = [k for k in model.object_patches if k.startswith("diffusion_model") and k.endswith("forward_orig")]
    if patched:
        raise ValueError(f"another node replaces this Flux model's forward through an object patch ({patched[0]}): its "
                         "forward would ignore ComfyUI's block hooks. Apply this node on the model before that one's, "
                         "or leave that node out")
    return dm


def depths(dm) -> tuple[int, int]:
    return len(dm.double_blocks), len(dm.single_blocks)


def image_query(block, img: torch.Tensor, vec) -> torch.Tensor:
    """A Flux double block's image query of its input ``img``: modulation, norm, qkv and QK-norm as
    ``DoubleStreamBlock.forward`` does them (comfy/ldm/flux/layers.py), before RoPE: ``[B, heads, L, head_dim]``.
    Through the block's own modules, so LoRA, fp8 or GGUF weights behave as in the block."""
    mod, _ = block.img_mod(vec)
    x = apply_mod(block.img_norm1(img), 1 + mod.scale, mod.shift)
    qkv = block.img_attn.qkv(x)
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    return block.img_attn.norm(q, k, v)[0]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ComfyUI's attention kernel (the one its Flux blocks use: PyTorch, xformers, sage...) on head-split tensors. Without
    the call's ``transformer_options``: an ``optimized_attention_override`` another pack set expects Flux's joint
    attention, not this one."""
    return comfy_attention.optimized_attention(q, k, v, q.shape[1], skip_reshape=True)


# ---------------------------------------------------------------------------------------------------------------
# Gates and per-call state


@dataclass(frozen=True)
class Gate:
    """When an entry acts: inside the sigma window ``[sigma_end, sigma_start]`` and from the sampling step
    ``start_step`` on (PuLID-FLUX's ``i >= start_step``: ``sigma <= sample_sigmas[start_step]``)."""

    sigma_start: float = math.inf
    sigma_end: float = 0.0
    start_step: int = 0

    def open(self, state: CallState) -> bool:
        s = state.sigma
        if not self.sigma_end <= s <= self.sigma_start:
            return False
        if self.start_step <= 0 or state.step_sigmas is None:
            return True
        if self.start_step >= len(state.step_sigmas) - 1:
            return False
        return s <= state.step_sigmas[self.start_step] * (1 + STEP_SIGMA_RTOL)


@dataclass
class CallState:
    sigma: float
    step_sigmas: list[float] | None
    chunks: list[int]
    grid: tuple[int, int]
    image_tokens: int
    model: object
    txt_len: int | None = None
    hooks_run: int = 0
    open: dict = field(default_factory=dict)  # id(entry) -> bool, decided once per call

    def is_open(self, entry) -> bool:
        key = id(entry)
        v = self.open.get(key)
        if v is None:
            v = self.open[key] = entry.gate.open(self)
        return v


_step_slot: list = [None, None]


def _step_sigmas(to: dict) -> list[float] | None:
    """The sampler's schedule as floats, read once per sampling (the same tensor object for all its calls)."""
    s = to.get("sample_sigmas")
    if s is None:
        return None
    if _step_slot[0] is not s:
        _step_slot[0], _step_slot[1] = s, [float(x) for x in s.reshape(-1).tolist()]
    return _step_slot[1]


class FluxCallWrapper:
    """The keyed DIFFUSION_MODEL wrapper: one :class:`CallState` per model call, and the check that the model ran the
    block hooks (once per sampling: caches that skip whole steps later are fine)."""

    def __init__(self):
        self._hooks_seen_for = None

    def __call__(self, executor, *args, **kwargs):
        to = kwargs.get("transformer_options")
        if to is None:
            to = next((a for a in reversed(args) if isinstance(a, dict)), None)
        if to is None:  # nothing to read the call from: stay out of the way
            return executor(*args, **kwargs)
        dm, x = executor.class_obj, args[0]
        p = getattr(dm, "patch_size", 2)
        grid = ((x.shape[-2] + p // 2) // p, (x.shape[-1] + p // 2) // p)
        state = CallState(current_sigma(to), _step_sigmas(to), list(to.get("cond_or_uncond") or [0]), grid,
                          grid[0] * grid[1], dm)
        context = args[2] if len(args) > 2 else kwargs.get("context")
        if isinstance(context, torch.Tensor):  # the text length before post_input patches; double block 0 says it exactly
            state.txt_len = context.shape[1]
        to[STATE_KEY] = state
        try:
            out = executor(*args, **kwargs)
        finally:
            to.pop(STATE_KEY, None)
        schedule = to.get("sample_sigmas")
        if state.hooks_run:
            self._hooks_seen_for = id(schedule)
        elif self._hooks_seen_for != id(schedule):
            raise RuntimeError(f"{type(dm).__name__} ran without calling ComfyUI's block hooks (patches_replace['dit']): "
                               "another node replaces its forward (TeaCache-style or nunchaku models, a monkey patch). "
                               "The identity / image prompt would be silently lost; leave that node out")
        return out

    def __deepcopy__(self, memo):
        return self


# ---------------------------------------------------------------------------------------------------------------
# Block hooks


@dataclass(eq=False)
class Entry:
    """One patch at one block: the patch, its gate, and the ModelPatcher of its weights."""

    patch: BlockPatch
    gate: Gate
    patcher: object = None


class BlockHook:
    """The replace object of one block key. Runs ``prev`` (what was at the key before: another pack's replace) or the
    block, then its entries' deltas in order on the image tokens of the output. ``copy.deepcopy`` (done by
    ``ModelPatcher.clone()``) copies the entry list and ``prev`` but shares the patches, so clones never duplicate
    patch weights and never see each other's later additions."""

    def __init__(self, kind: str, index: int, prev=None):
        self.kind, self.index, self.prev = kind, index, prev
        self.entries: list[Entry] = []

    def __deepcopy__(self, memo):
        import copy

        new = BlockHook(self.kind, self.index, copy.deepcopy(self.prev, memo))
        new.entries = list(self.entries)
        return new

    def __call__(self, args: dict, extra: dict) -> dict:
        to = args.get("transformer_options") or {}
        state: CallState | None = to.get(STATE_KEY)
        if state is None:  # called outside our wrapper (another pack runs the blocks itself): do nothing extra
            return self._run(args, extra)
        state.hooks_run += 1
        if self.kind == "double" and self.index == 0:
            state.txt_len = args["txt"].shape[1]
        active = [e for e in self.entries if state.is_open(e)]
        n = state.image_tokens
        query = None
        if active and self.kind == "double" and any(e.patch.uses_query for e in active):
            block = getattr(state.model, BLOCK_LISTS["double"])[self.index]
            query = image_query(block, args["img"][:, :n], args["vec"])
        out = self._run(args, extra)
        if not active:
            return out
        img = out["img"]
        start = 0
        if self.kind == "single":
            sliced = to.get("img_slice")  # later ComfyUI versions say where the image starts
            start = int(sliced[0]) if sliced else state.txt_len
            if start is None:
                raise RuntimeError("Flux single block hook: the text length is unknown (no context, and double block 0 "
                                   "did not run our hook)")
        tokens = img[:, start:start + n]
        call = BlockCall(self.kind, self.index, state.chunks, state.grid, query, attend)
        for e in active:
            d = e.patch.delta(call, tokens)
            if d is not None:
                tokens = tokens + d.to(tokens.dtype)
        if start or start + n < img.shape[1]:  # text before (single blocks) or Kontext reference tokens after
            tokens = torch.cat([img[:, :start], tokens, img[:, start + n:]], dim=1)
        return {**out, "img": tokens}

    def _run(self, args, extra):
        if self.prev is not None:
            return self.prev(args, extra)
        return extra["original_block"](args)

    def to(self, device_or_dtype):
        """ComfyUI moves patch objects with the model; weights move through model management, so only caches are
        dropped here (ComfyUI also passes the model's dtype, which may be fp8: never cast to it)."""
        for e in self.entries:
            e.patch.drop_caches()
        if self.prev is not None and hasattr(self.prev, "to"):
            self.prev = self.prev.to(device_or_dtype)
        return self

    def models(self) -> list:
        out = []
        for m in [e.patcher for e in self.entries if e.patcher is not None] + list(getattr(self.prev, "models", list)()):
            if all(m is not o for o in out):
                out.append(m)
        return out


def install_block_patch(model, patch: BlockPatch, gate: Gate, patcher=None):
    """A clone of ``model`` with ``patch`` after each of its blocks, inside ``gate``; another pack's replace at a key is
    kept and runs first. ``patcher``: the ModelPatcher of the patch's weights (loaded and offloaded with the model)."""
    dm = flux_model(model)
    double, single = depths(dm)
    sites = patch.sites()
    bad = sorted(s for s in sites if s[0] not in BLOCK_LISTS or not 0 <= s[1] < (double if s[0] == "double" else single))
    if bad:
        raise ValueError(f"the patch acts after blocks {bad[:4]} this Flux model ({double} double, {single} single blocks) "
                         "does not have")
    model = model.clone()
    to = model.model_options.setdefault("transformer_options", {})
    dit = to.setdefault("patches_replace", {}).setdefault("dit", {})
    entry = Entry(patch, gate, patcher)
    for kind, index in sorted(sites | {("double", 0)}):  # double block 0 always: it records the text length
        key = (f"{kind}_block", index)
        hook = dit.get(key)
        if not isinstance(hook, BlockHook):
            hook = dit[key] = BlockHook(kind, index, prev=hook)
        if (kind, index) in sites:
            hook.entries.append(entry)
    if not model.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY):
        model.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, FluxCallWrapper())
    if patcher is not None:
        extra = model.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
        if not any(p.model is patcher.model for p in extra):
            model.set_additional_models(ADDITIONAL_MODELS_KEY, extra + [patcher])
    return model
