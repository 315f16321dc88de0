"""The one glue module: everything that touches ComfyUI internals (``comfy.*``, ``folder_paths``).

- model folders of the pack, registered without clobbering extra_model_paths.yaml entries;
- the attention-site registry: one attn2 replace object per cross-attention site, compatible with the
  ``.add(callback, **kwargs)`` protocol of the popular IP-Adapter / PuLID / InstantID packs, so that their patches
  and ours stack on the same site instead of overwriting each other;
- discovery of a UNet's cross-attention sites, sigma windows, compute dtype;
- CLIP-vision encoding and loading adapter weights with ComfyUI's model management.
"""
from __future__ import annotations

import logging
import math
import os

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management as mm
import comfy.model_patcher
import folder_paths

from ..models.ipadapter import IPAdapterModel, IPAdapterPatch, token_grid
from ..models.layers import LAYOUT_NAMES, LAYOUT_TRANSFORMERS, Site, Transformer, sites_from_transformers

log = logging.getLogger("personalize")

# ---------------------------------------------------------------------------------------------------------------
# Model folders

# name -> where users get the files; ipadapter now, the others for the methods that follow.
MODEL_FOLDERS = {
    "ipadapter": "IP-Adapter weights (h94/IP-Adapter, h94/IP-Adapter-FaceID on Hugging Face)",
    "pulid": "PuLID weights",
    "e4t": "E4T encoders and weight offsets",
    "insightface": "insightface model packs, as models/insightface/models/<name>/*.onnx",
    "eva_clip": "EVA02-CLIP vision towers",
    "face_parsing": "face parsing / alignment models (facexlib)",
}


def register_model_folders() -> None:
    """Add ``<models_dir>/<name>`` for each pack folder, keeping paths that extra_model_paths.yaml already set."""
    for name in MODEL_FOLDERS:
        default = os.path.join(folder_paths.models_dir, name)
        entry = folder_paths.folder_names_and_paths.get(name)
        if entry is None:
            folder_paths.folder_names_and_paths[name] = ([default], set(folder_paths.supported_pt_extensions))
            continue
        paths, exts = entry
        if default not in paths:
            paths.append(default)
        if not exts:
            exts.update(folder_paths.supported_pt_extensions)


def full_path(folder: str, name: str, what: str) -> str:
    """Resolve a model file, or raise an error naming the file, the folders searched and where to get it."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        searched = ", ".join(folder_paths.get_folder_paths(folder)) or "(none registered)"
        raise FileNotFoundError(f"{what} '{name}' not found in the '{folder}' folders: {searched}. "
                                f"Put the file there ({MODEL_FOLDERS.get(folder, 'see the README')}).")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Sigma of the current model call, read once per call (not once per layer)

_sigma_slot: list = [None, 0.0]


def current_sigma(extra_options: dict) -> float:
    """The sigma of the running model call. The device->host read happens once per model call: every site of
    every patch in that call sees the same ``sigmas`` tensor object, which is cached here."""
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


# ---------------------------------------------------------------------------------------------------------------
# Attention sites


def _attend(q, k, v, extra_options):
    return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                                               transformer_options=extra_options)


class AttentionSite:
    """attn2 replace object of one site.

    Calls ``base`` (a replace function that was there before, if any) or the plain text attention, then adds
    ``callback(out, q, k, v, extra_options, **kwargs)`` for each callback whose ``[sigma_end, sigma_start]`` window
    contains the current sigma: the protocol of ``Attn2Replace`` in the popular packs, so they can ``.add`` to
    ours and we to theirs. ``copy.deepcopy`` (done by ``ModelPatcher.clone()``) copies the lists but shares the
    callbacks, so clones never duplicate adapter weights and never see each other's later additions.
    """

    def __init__(self, base=None):
        self.callback: list = []
        self.kwargs: list[dict] = []
        self._base = base

    def add(self, callback, **kwargs) -> None:
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        out = self._base(q, k, v, extra_options) if self._base is not None else _attend(q, k, v, extra_options)
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


def discover_sites(model) -> tuple[list[Transformer], list[Site], int]:
    """The cross-attention sites of a ComfyUI UNet: (transformers in execution order, sites, context width)."""
    dm = model.model.diffusion_model
    if not all(hasattr(dm, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        raise ValueError(f"{type(dm).__name__} is not a UNet (SD1.x / SD2.x / SDXL); IP-Adapter patches UNet cross-attention")
    transformers, widths, context = [], [], set()
    for block, blocks in (("input", dm.input_blocks), ("middle", [dm.middle_block]), ("output", dm.output_blocks)):
        for block_id, seq in enumerate(blocks):
            for layer in seq:
                tb = getattr(layer, "transformer_blocks", None)
                if tb is None or not isinstance(layer, comfy_attention.SpatialTransformer):
                    continue
                transformers.append(Transformer(block, block_id, len(tb)))
                widths.append(tb[0].attn2.to_k.out_features)
                context.add(tb[0].attn2.to_k.in_features)
    return transformers, sites_from_transformers(transformers, widths), (context.pop() if len(context) == 1 else 0)


def check_compatible(adapter: IPAdapterModel, transformers: list[Transformer], sites: list[Site], context_dim: int) -> None:
    """Raise if the adapter was not made for this model, saying what was found and what to use."""
    spec = adapter.spec
    layout = next((name for name, t in LAYOUT_TRANSFORMERS.items() if list(t) == transformers), None)
    model_name = LAYOUT_NAMES.get(layout, f"a UNet with {len(sites)} cross-attention layers")
    if layout != spec.layout or len(sites) != len(spec.widths):
        raise ValueError(f"adapter/model mismatch: the IP-Adapter is for {LAYOUT_NAMES[spec.layout]} ({len(spec.widths)} layers) "
                         f"but the model is {model_name}. Load an {model_name} IP-Adapter "
                         f"(e.g. {'ip-adapter_sd15.safetensors' if layout == 'sd15' else 'ip-adapter_sdxl_vit-h.safetensors'}).")
    widths = [0] * len(sites)
    for s in sites:
        widths[s.adapter_index] = s.width
    if tuple(widths) != spec.widths or context_dim != spec.cross_dim:
        raise ValueError(f"adapter/model mismatch: the IP-Adapter's layers take width {spec.cross_dim} and produce "
                         f"{sorted(set(spec.widths))}, the model's cross-attention takes {context_dim} and has "
                         f"{sorted(set(widths))}: this adapter belongs to another {LAYOUT_NAMES[spec.layout]} model family")


class IPAdapterCallback:
    """The per-site callable given to an attention site: bridges ComfyUI's ``extra_options`` to the host-free
    :meth:`IPAdapterPatch.delta`. Shared, never copied, by clones."""

    def __init__(self, patch: IPAdapterPatch, adapter_index: int):
        self.patch, self.adapter_index = patch, adapter_index

    def __call__(self, out, q, k, v, extra_options, **kwargs):
        grid = None
        if self.patch.mask is not None:
            grid = token_grid(tuple(extra_options["original_shape"][-2:]), q.shape[1])
        delta = self.patch.delta(self.adapter_index, q, extra_options["n_heads"], extra_options["cond_or_uncond"],
                                 attn=lambda q_, k_, v_, h: _attend(q_, k_, v_, extra_options), grid=grid)
        return 0.0 if delta is None else delta

    def drop_caches(self) -> None:
        self.patch.drop_caches()

    def __deepcopy__(self, memo):
        return self


ADDITIONAL_MODELS_KEY = "personalize_adapters"


def apply_patch(model, patch: IPAdapterPatch, adapter_patcher, sites: list[Site], transformers: list[Transformer],
                sigma_start: float, sigma_end: float):
    """Clone ``model`` and put ``patch`` on every active site; the adapter weights load and offload with it."""
    model = model.clone()
    to = model.model_options.setdefault("transformer_options", {})
    attn2 = to.setdefault("patches_replace", {}).setdefault("attn2", {})
    depth = {(t.block, t.block_id): t.depth for t in transformers}
    for site in sites:
        if patch.active(site.adapter_index):
            add_to_site(attn2, site, depth[(site.block, site.block_id)], IPAdapterCallback(patch, site.adapter_index),
                        sigma_start=sigma_start, sigma_end=sigma_end)
    extra = model.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
    if not any(p.model is adapter_patcher.model for p in extra):
        model.set_additional_models(ADDITIONAL_MODELS_KEY, extra + [adapter_patcher])
    return model


# ---------------------------------------------------------------------------------------------------------------
# Model management of adapter weights


def compute_dtype(model) -> torch.dtype:
    dtype = model.model.manual_cast_dtype or model.model.get_dtype()
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):  # fp8 storage: compute in half precision
        dtype = torch.float16 if mm.should_use_fp16(mm.get_torch_device()) else torch.float32
    return dtype


def adapter_patcher(module: torch.nn.Module):
    """A ModelPatcher for adapter weights, so ComfyUI loads them with the UNet and offloads them after."""
    return comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def prepare_adapter(adapter_patcher_, dtype: torch.dtype) -> None:
    """Cast the adapter to the model's compute dtype (once) and load it to the compute device."""
    module = adapter_patcher_.model
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    mm.load_models_gpu([adapter_patcher_])


def apply_lora(model, lora_name: str, strength: float):
    """A LoRA from models/loras on the model (UNet only), as ComfyUI's LoraLoaderModelOnly does."""
    import comfy.utils

    lora = comfy.utils.load_torch_file(full_path("loras", lora_name, "LoRA"), safe_load=True)
    return model_with_lora(model, lora, strength)


# ---------------------------------------------------------------------------------------------------------------
# CLIP vision


def clip_vision_width(clip_vision, feature: str) -> int:
    m = clip_vision.model
    if feature == "image_embeds":
        return m.visual_projection.weight.shape[0]
    return m.vision_model.embeddings.class_embedding.shape[0]


def encode_clip_vision(clip_vision, image: torch.Tensor, feature: str) -> torch.Tensor:
    """CLIP features of a ComfyUI IMAGE batch ``[N, H, W, C]``: ``image_embeds`` or the penultimate hidden states."""
    out = clip_vision.encode_image(image, crop=True)
    return (out["image_embeds"] if feature == "image_embeds" else out["penultimate_hidden_states"]).float()


def blank_clip_features(clip_vision, feature: str) -> torch.Tensor:
    """Unconditional CLIP features as the official IP-Adapter makes them: the encoder applied to an all-zero
    *normalized* pixel tensor (a mean-colour image), for models that take hidden states (Plus, Full-face)."""
    mm.load_model_gpu(clip_vision.patcher)
    size = clip_vision.image_size
    pixels = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    out = clip_vision.model(pixel_values=pixels, intermediate_output=-2)
    feats = out[2] if feature == "image_embeds" else out[1]
    return feats.to(mm.intermediate_device()).float()


# ===============================================================================================================
# Training glue (issue 4): the training core (training/, plain torch) on a ComfyUI ModelPatcher. Everything here
# runs inside ``torch.inference_mode(False)``; tensors ComfyUI made under inference mode are cloned before autograd
# sees them, and the trainable deltas reach the UNet through ``ModelPatcher.add_weight_wrapper``.

import contextlib as _contextlib

from ..training.lora import LoRASet as _LoRASet, select_targets as _select_targets
from ..training.schedule import NoiseSchedule as _NoiseSchedule

TRAIN_FOLDER = "personalize_train"  # resumable states and cached class latents, under ComfyUI's output folder


def check_trainable(model) -> None:
    """Raise unless the model is a UNet conditioned by cross-attention (SD1.x / SD2.x) or by cross-attention plus
    SDXL's pooled-text and size vector."""
    import comfy.model_base

    dm = model.model.diffusion_model
    if not all(hasattr(dm, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        raise ValueError(f"the LoRA trainer needs a UNet model (SD1.x / SD2.x / SDXL); got {type(dm).__name__}")
    if getattr(model.model, "adm_channels", 0) and not isinstance(model.model, comfy.model_base.SDXL):
        raise ValueError(f"the LoRA trainer supports SD1.x / SD2.x / SDXL base models; this one "
                         f"({type(model.model).__name__}) takes another extra conditioning (refiner, unCLIP, ...)")


def training_lora(model, targets, rank: int, alpha, seed: int) -> _LoRASet:
    """A LoRA set on the UNet modules matching ``targets``, named by their LDM paths (``input_blocks.1.1...``)."""
    dm = model.model.diffusion_model
    names = _select_targets([n for n, m in dm.named_modules() if hasattr(m, "weight_function")], targets)
    shapes = {n: tuple(dm.get_submodule(n).weight.shape) for n in names}
    return _LoRASet(shapes, rank=rank, alpha=alpha, seed=seed)


def _fresh_copy(tensor):
    return tensor  # ComfyUI casts a wrapped weight into a new tensor before calling this (cast_to(copy=True))


def attach_training_lora(model, lora: _LoRASet):
    """A clone of ``model`` computing every target weight as ``delta(weight)`` (differentiable, switchable).

    When the UNet's weights were made under inference mode (a checkpoint loaded by a node), autograd may not save
    them for the backward pass; every other weight and bias then gets an identity wrapper too, so that ComfyUI hands
    the layers per-forward copies that are normal tensors (what ComfyUI's own TrainLoraNode does by wrapping all)."""
    patched = model.clone()
    targets = set(lora.names)
    for name, delta in lora.items():
        patched.add_weight_wrapper(f"diffusion_model.{name}.weight", delta)
    dm = model.model.diffusion_model
    if any(p.is_inference() for p in dm.parameters()):
        for name, m in dm.named_modules():
            if not hasattr(m, "weight_function"):
                continue
            if getattr(m, "weight", None) is not None and name not in targets:
                patched.add_weight_wrapper(f"diffusion_model.{name}.weight", _fresh_copy)
            if getattr(m, "bias", None) is not None:
                patched.add_weight_wrapper(f"diffusion_model.{name}.bias", _fresh_copy)
    return patched


class ComfyDenoiser:
    """``denoiser(x_t, t, conditioning)`` over a ComfyUI model: DDPM ``x_t`` at integer ``t`` -> ``apply_model`` at
    ``sigma_t`` on ``x_t / sqrt(abar_t)``; the output is ComfyUI's denoised x0 (whatever the model's own
    parameterization), so the schedule says ``x0``. The schedule is the model's own ``model_sampling.sigmas``.
    The conditioning is the cross-attention context, or ``(context, y)`` for SDXL (see :class:`ComfyTextEncoder`).
    ``companions``: other patchers to keep loaded with the UNet (the text encoder when a token is trained)."""

    def __init__(self, patcher):
        self.patcher = patcher
        ms = patcher.get_model_object("model_sampling")
        sigmas = ms.sigmas.detach().float().cpu().clone()
        self.schedule = _NoiseSchedule.from_sigmas(sigmas, "x0")
        self._sigmas = sigmas
        self.transformer_options = dict(patcher.model_options.get("transformer_options", {}))
        self.companions = []

    def __call__(self, x_t, t, context):
        sigma = self._sigmas[t.detach().cpu().long()].to(x_t.device)
        x = x_t * (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()  # x_sigma = x_t / sqrt(abar)
        extra = {}
        if isinstance(context, tuple):
            context, extra["y"] = context
        return self.patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=self.transformer_options,
                                              **extra)

    def load(self) -> None:
        """Load the model (and install the weight wrappers) and its companions on the compute device, fully, first
        unloading everything else (training needs the memory for activations)."""
        mm.load_models_gpu([self.patcher, *self.companions], memory_required=1e20, force_full_load=True)

    @property
    def device(self):
        return self.patcher.load_device


@_contextlib.contextmanager
def gradient_checkpointing(patcher, enabled: bool = True):
    """Recompute each UNet block in the backward pass (``torch.utils.checkpoint``, non-reentrant)."""
    dm = patcher.model.diffusion_model
    blocks = list(dm.input_blocks) + [dm.middle_block] + list(dm.output_blocks) if enabled else []
    for b in blocks:
        forward = b.forward
        b.forward = (lambda f: lambda *a, **k: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False, **k))(forward)
    try:
        yield
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)


def sdxl_size_conditioning(model, latents: torch.Tensor):
    """``pooled -> y`` for SDXL-type models (original size = target size = the training images' size, no crop, as
    ComfyUI's CLIPTextEncodeSDXL defaults); None for models without such a vector."""
    if not getattr(model.model, "adm_channels", 0):
        return None
    h, w = latents.shape[-2] * 8, latents.shape[-1] * 8  # SD VAEs downsample by 8

    def adm(pooled):
        return model.model.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0, target_width=w,
                                      target_height=h)
    return adm


def _keep_inference_or_clone(t):
    return t if t.is_inference() else t.clone()


def _same(t):
    return t


class ComfyTextEncoder:
    """``encode(prompts, token) -> conditioning`` over a ComfyUI CLIP, as the training core expects.

    Without a token: ComfyUI's own encode under no_grad (the trainer caches it). With one: the prompt names the
    trained embedding as ``embedding:<name>``; the embedding file is written first (:meth:`write_embedding`), so
    ComfyUI's tokenizer puts its vectors exactly where a prompt at inference puts them; those vectors are then
    swapped for rows of the trainable token and the text encoder runs with autograd. ComfyUI's CLIP adds residuals
    in place and its weights are inference tensors, so the activations autograd saves are cloned as they are saved
    (the weights, never modified, are kept as they are).

    The token is ``(n_vectors, sum of widths)``: each text encoder's part side by side (:attr:`parts`; SDXL:
    CLIP-G then CLIP-L in the tokenizer's key order). ``adm``: ``pooled -> y`` for SDXL (the conditioning is then
    ``(context, y)``)."""

    def __init__(self, clip, adm=None):
        self.clip, self.adm = clip, adm
        cs = clip.cond_stage_model
        self.parts = []
        for key in clip.tokenize(""):
            encoder = getattr(cs, f"clip_{key}", None)
            if encoder is None or not hasattr(encoder, "transformer"):
                raise ValueError(f"token training needs CLIP text encoders; {type(cs).__name__} has no 'clip_{key}'")
            self.parts.append((key, encoder.transformer.get_input_embeddings().weight.shape[1]))
        self._written: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, tuple] = {}

    @property
    def file_parts(self) -> list[tuple[str, int]]:
        """The embedding file's keys (``clip_l``, ``clip_g``: the keys ComfyUI's tokenizers look up) and widths."""
        return [(f"clip_{k}", w) for k, w in self.parts]

    def _split(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for key, width in self.parts:
            out[key] = vectors[:, start:start + width]
            start += width
        return out

    def word_embedding(self, word: str) -> torch.Tensor:
        """``(1, width)``: the mean input embedding of ``word``'s tokens, per text encoder (a new token's start)."""
        tokens = self.clip.tokenize(word, return_word_ids=True)
        cs, vecs = self.clip.cond_stage_model, []
        for key, _ in self.parts:
            ids = [int(t) for t, _, wid in tokens[key][0] if wid != 0]
            if not ids:
                raise ValueError(f"the class word {word!r} gives no tokens")
            table = getattr(cs, f"clip_{key}").transformer.get_input_embeddings().weight
            vecs.append(table[ids].detach().float().mean(0).cpu())
        return torch.cat(vecs)[None].clone()

    def write_embedding(self, vectors: torch.Tensor, path: str, metadata=None) -> None:
        """Save ``vectors`` where ComfyUI's tokenizer finds them (``embedding:<file name>``)."""
        from ..training import export

        export.save_embedding(vectors, path, metadata, parts=self.file_parts)
        self._written = {k: v.detach().float().cpu().clone() for k, v in self._split(vectors).items()}

    def _conditioning(self, cond, pooled):
        cond = cond.float()
        return cond if self.adm is None else (cond, self.adm(pooled.float()))

    def _plain(self, prompt: str):
        with torch.no_grad():
            cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True)
            out = self._conditioning(cond, pooled)
        return tuple(c.detach().clone() for c in out) if isinstance(out, tuple) else out.detach().clone()

    def _slots(self, prompt: str):
        """ComfyUI's tokens of ``prompt`` and where the written embedding's vectors are: ``(key, section, index,
        row)``."""
        if prompt not in self._tokens:
            tokens = self.clip.tokenize(prompt)
            slots = []
            for key, _ in self.parts:
                for si, section in enumerate(tokens[key]):
                    for idx, entry in enumerate(section):
                        if not torch.is_tensor(entry[0]) or key not in self._written:
                            continue
                        rows = [r for r, v in enumerate(self._written[key]) if torch.equal(entry[0].float().cpu(), v)]
                        if rows:
                            slots.append((key, si, idx, rows[0]))
            if not slots:
                raise ValueError(f"the prompt {prompt!r} names no trained embedding that ComfyUI's tokenizer found "
                                 f"(embeddings folders: {folder_paths.get_folder_paths('embeddings')}); write it with "
                                 "write_embedding first")
            self._tokens[prompt] = (tokens, slots)
        return self._tokens[prompt]

    def _with_token(self, prompt: str, token: torch.Tensor):
        tokens, slots = self._slots(prompt)
        tokens = {k: [list(section) for section in v] for k, v in tokens.items()}
        parts = self._split(token)
        for key, si, idx, row in slots:
            entry = tokens[key][si][idx]
            tokens[key][si][idx] = (parts[key][row],) + tuple(entry[1:])
        cs = self.clip.cond_stage_model
        cs.reset_clip_options()  # as CLIP.encode_from_tokens, without its load_model (the trainer loaded it)
        if self.clip.layer_idx is not None:
            cs.set_clip_options({"layer": self.clip.layer_idx})
        with torch.autograd.graph.saved_tensors_hooks(_keep_inference_or_clone, _same):
            cond, pooled = cs.encode_token_weights(tokens)[:2]
            return self._conditioning(cond, pooled)

    def __call__(self, prompts, token):
        from ..training import conditioning

        return conditioning.cat([self._plain(p) if token is None else self._with_token(p, token) for p in prompts])


def vae_latents(model, vae, images: torch.Tensor) -> torch.Tensor:
    """IMAGE ``(N, H, W, C)`` -> the model's latent space (``process_latent_in`` of the VAE's latents)."""
    with torch.no_grad():  # one image at a time: ComfyUI sizes VAE batches by free memory, so the batching (and with
        # it the last bits of a convolution's result) could change from run to run; Adam's first steps amplify that
        lat = torch.cat([vae.encode(images[i:i + 1, ..., :3].clone()).float() for i in range(images.shape[0])])
    return model.model.process_latent_in(lat.detach().clone())


def vae_images(model, vae, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(model.model.process_latent_out(latents.detach().float())).float().clone()


def model_with_lora(model, lora_state: dict, strength: float = 1.0):
    """``model`` with a LoRA state dict in ComfyUI's key format applied as the stock LoraLoaderModelOnly does."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, lora_state, strength, 0)[0]


def train_folder() -> str:
    path = os.path.join(folder_paths.get_output_directory(), TRAIN_FOLDER)
    os.makedirs(path, exist_ok=True)
    return path


def first_folder(name: str) -> str:
    """The first registered folder of ``name`` (models/loras, models/embeddings), created if missing."""
    paths = folder_paths.get_folder_paths(name)
    if not paths:
        raise FileNotFoundError(f"ComfyUI has no '{name}' model folder registered; check extra_model_paths.yaml")
    os.makedirs(paths[0], exist_ok=True)
    return paths[0]


def refresh_file_list(name: str) -> None:
    folder_paths.filename_list_cache.pop(name, None)
