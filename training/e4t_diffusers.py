"""E4T on diffusers / transformers (the pretraining CLI's host; plain torch otherwise): weight offsets on a
``UNet2DConditionModel``'s q / k / v projections, the down + mid feature pass, a CLIP text encoder with one
placeholder slot per prompt, the CLIP image tower's head inputs, and the conversion of the tower's keys between
open_clip (the layout of mkshing/e4t-diffusion's ``encoder.pt`` ``clip_vision.*``) and transformers ``CLIPVisionModel``.

diffusers and transformers are used through the caller's objects only (no import at module level)."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models import e4t

# The projections E4T offsets: q, k, v of every self- (attn1) and cross-attention (attn2), not the output projection
# (mkshing e4t/models/cross_attention.py: wo_q / wo_k / wo_v).
OFFSET_TARGET = re.compile(r"\.attn[12]\.to_[qkv]$")
# The template marker the host fills with the placeholder's embedding (mkshing pretrain_e4t.py templates).
PLACEHOLDER = "{placeholder_token}"


# ---------------------------------------------------------------------------------------------------------------
# Weight offsets


def offset_shapes(unet: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module path: (out_features, in_features)}`` of every attn1 / attn2 ``to_q`` / ``to_k`` / ``to_v`` Linear of
    ``unet`` (diffusers paths, the reference's offset names): what :class:`~..models.e4t.OffsetSet` is built from."""
    shapes = {n: (m.out_features, m.in_features) for n, m in unet.named_modules()
              if OFFSET_TARGET.search(n) and isinstance(m, nn.Linear)}
    if not shapes:
        raise ValueError(f"{type(unet).__name__} has no attention projection named '...attn1.to_q' / '...attn2.to_k': "
                         "E4T's weight offsets need a diffusers UNet2DConditionModel (SD1.x)")
    return shapes


def attach_offsets(unet: nn.Module, offsets: e4t.OffsetSet, deltas: Mapping[str, torch.Tensor] | None = None) -> None:
    """Make every projection named in ``offsets.names`` compute ``F.linear(x, W * (1 + dW), b)``.

    ``dW`` is the generator's output, recomputed at every forward (differentiable in the generator, as the
    reference's ``CrossAttention`` calls ``wo_q()`` per forward); with ``deltas`` (``{name: dW}``, e.g.
    ``offsets.deltas()`` computed once) those fixed tensors are used instead. The module's own forward is replaced
    on the instance (as :func:`.lora.attach`; attaching again replaces the offsets, a module with another instance
    forward is refused); :func:`detach_offsets` restores it. Nothing is changed unless every name is a Linear of
    ``unet`` with the generator's shape."""
    modules = dict(unet.named_modules())
    shapes = offsets.shapes()
    for name in offsets.names:
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            found = "no such module" if m is None else f"a {type(m).__name__}"
            raise ValueError(f"weight offset {name!r}: {found} in the UNet, expected a Linear attention projection; "
                             "the offsets were made for another UNet (E4T's need a diffusers SD1.x UNet2DConditionModel)")
        if (m.out_features, m.in_features) != tuple(shapes[name]):
            raise ValueError(f"weight offset {name!r} is {tuple(shapes[name])} (out, in) but the UNet's projection is "
                             f"{(m.out_features, m.in_features)}: the offsets were made for another UNet")
        if "forward" in vars(m) and not getattr(m, "_e4t_offset", False):
            raise ValueError(f"{name!r} already computes with another weight function (a LoRA attached to this UNet); "
                             "attach the weight offsets to a UNet without it")
        if deltas is not None and name not in deltas:
            raise ValueError(f"no precomputed offset for {name!r} in deltas")
    for name in offsets.names:
        m = modules[name]
        m.forward = _offset_forward(m, offsets[name], None if deltas is None else deltas[name])


def detach_offsets(unet: nn.Module, names: Sequence[str] | None = None) -> None:
    """Undo :func:`attach_offsets` (on ``names``, default every module it changed)."""
    for name, m in unet.named_modules():
        if (names is None or name in names) and getattr(m, "_e4t_offset", False):
            del m.forward
            del m._e4t_offset


def _offset_forward(m: nn.Linear, generator: e4t.WeightOffsets, fixed: torch.Tensor | None):
    def forward(x):
        delta = generator() if fixed is None else fixed
        return F.linear(x, e4t.apply_offset(m.weight, delta), m.bias)
    m._e4t_offset = True
    return forward


# ---------------------------------------------------------------------------------------------------------------
# UNet features


def _check_feature_unet(unet) -> None:
    cfg = unet.config
    problems = []
    if getattr(unet, "class_embedding", None) is not None:
        problems.append(f"class embeddings ({cfg.class_embed_type or 'num_class_embeds'})")
    if cfg.get("addition_embed_type") is not None:
        problems.append(f"addition_embed_type {cfg.addition_embed_type!r}")
    if getattr(unet, "encoder_hid_proj", None) is not None:
        problems.append(f"encoder_hid_dim_type {cfg.get('encoder_hid_dim_type')!r}")
    if unet.mid_block is None:
        problems.append("no mid block")
    if problems:
        raise ValueError(f"unet_features takes an SD1.x-type UNet2DConditionModel (time embedding, down blocks, a mid "
                         f"block); this one has {', '.join(problems)}")


def unet_features(unet, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
    """The reference's encoder outputs of a diffusers ``UNet2DConditionModel``: ``conv_in``, then every down block's
    res samples (resnet / attention outputs and the downsampler's, as diffusers' ``down_block_res_samples``), then the
    mid block's output; the up path is not run (mkshing e4t/models/unet_2d_condition.py ``return_encoder_outputs``).
    ``context``: the empty prompt's text states ``(B, tokens, cross_attention_dim)``."""
    _check_feature_unet(unet)
    p = next(unet.parameters())
    sample, context = sample.to(p.dtype), context.to(p.dtype)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    h = unet.conv_in(sample)
    res = [h]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, samples = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
        else:
            h, samples = block(hidden_states=h, temb=emb)
        res.extend(samples)
    if getattr(unet.mid_block, "has_cross_attention", False):
        h = unet.mid_block(h, emb, encoder_hidden_states=context)
    else:
        h = unet.mid_block(h, emb)
    return res + [h]


def feature_channels(unet) -> int:
    """Channel sum of :func:`unet_features` (the head's ``unet_feature_embedder`` input; SD1.x: 10880), from one
    pass on a small latent (2 x 2 at the lowest level, so that no normalization sees a single value)."""
    size = 2 ** len(unet.down_blocks)
    p = next(unet.parameters())
    with torch.no_grad():
        feats = unet_features(unet, torch.zeros(1, unet.config.in_channels, size, size, device=p.device, dtype=p.dtype),
                              torch.zeros(1, dtype=torch.long, device=p.device),
                              torch.zeros(1, 1, unet.config.cross_attention_dim, device=p.device, dtype=p.dtype))
    return sum(f.shape[1] for f in feats)


# ---------------------------------------------------------------------------------------------------------------
# Text


class SlotTextEncoder:
    """``encode(prompts, e) -> (B, tokens, width)``: the last hidden states of a transformers ``CLIPTextModel`` on
    prompts holding one ``{placeholder_token}`` each, with ``e[i]`` as prompt i's input embedding in that slot.

    Each prompt is split at the placeholder; the text on either side is tokenized without special tokens (as the
    reference's tokenizer treats its added placeholder token: the text around an added token is tokenized apart) and
    laid out as ``[bos] + left + [slot] + right + [eos]``, padded to ``model_max_length`` with the tokenizer's pad token
    on its padding side. The text encoder runs its own forward with the token-embedding output replaced by these input
    embeddings (for the call only), so it equals ``text_encoder(inputs_embeds=...)``; the encoder stays frozen and
    the gradient reaches ``e``."""

    def __init__(self, tokenizer, text_encoder, placeholder: str = PLACEHOLDER):
        if not placeholder:
            raise ValueError("the placeholder marker must be a non-empty string such as '{placeholder_token}'")
        self.tokenizer, self.text_encoder, self.placeholder = tokenizer, text_encoder, placeholder
        self.text_encoder.requires_grad_(False)
        length = getattr(tokenizer, "model_max_length", None)
        positions = text_encoder.config.max_position_embeddings
        self.length = positions if not length or length > positions else int(length)
        for what in ("bos_token_id", "eos_token_id"):
            if getattr(tokenizer, what, None) is None:
                raise ValueError(f"the tokenizer has no {what[:3]} token: a CLIP tokenizer is expected")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_left = getattr(tokenizer, "padding_side", "right") == "left"

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids) if text.strip() else []

    def layout(self, prompt: str) -> tuple[list[int], int]:
        """``(input ids, slot index)`` of one prompt; the slot holds the pad id (its embedding is replaced)."""
        parts = prompt.split(self.placeholder)
        if len(parts) != 2:
            raise ValueError(f"prompt {prompt!r} holds {len(parts) - 1} placeholders {self.placeholder}; E4T fills "
                             "exactly one per prompt")
        left, right = self._ids(parts[0]), self._ids(parts[1])
        ids = [self.tokenizer.bos_token_id, *left, self.pad_id, *right, self.tokenizer.eos_token_id]
        if len(ids) > self.length:
            raise ValueError(f"prompt {prompt!r} is {len(ids)} tokens with the start, end and placeholder tokens; the "
                             f"text encoder takes {self.length}: shorten it")
        pad = [self.pad_id] * (self.length - len(ids))
        slot = 1 + len(left)
        return (pad + ids, slot + len(pad)) if self.pad_left else (ids + pad, slot)

    def word_embedding(self, word: str) -> torch.Tensor:
        """The input embedding ``(width,)`` of a one-token word (the class word: mkshing's scripts assert that
        ``domain_class_token`` is one token)."""
        ids = self._ids(word)
        if len(ids) != 1:
            tokens = self.tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(f"the class word {word!r} is {len(ids)} tokens {tokens} for this tokenizer; E4T's class "
                             "word must be one token (e.g. 'face', 'cat'): choose another word")
        return self.text_encoder.get_input_embeddings().weight[ids[0]].detach().float().clone()

    def plain(self, prompts: Sequence[str]) -> torch.Tensor:
        """The text encoder on plain prompts (no slot), padded to the full length: the feature pass's empty prompt."""
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.length, truncation=True,
                             return_tensors="pt")
        return self.text_encoder(tok.input_ids.to(self.device))[0]

    def __call__(self, prompts: Sequence[str], e: torch.Tensor) -> torch.Tensor:
        prompts = list(prompts)
        if e.ndim != 2 or e.shape[0] != len(prompts):
            raise ValueError(f"{len(prompts)} prompts need {len(prompts)} word embeddings (B, width); got "
                             f"{tuple(e.shape)}")
        layouts = [self.layout(p) for p in prompts]
        ids = torch.tensor([ids for ids, _ in layouts], device=self.device)
        layer = self.text_encoder.get_input_embeddings()
        if e.shape[1] != layer.embedding_dim:
            raise ValueError(f"the word embeddings are {e.shape[1]} wide, the text encoder's {layer.embedding_dim}")
        embeds = layer(ids)
        rows = torch.arange(len(prompts), device=self.device)
        slots = torch.tensor([s for _, s in layouts], device=self.device)
        embeds = embeds.index_put((rows, slots), e.to(device=embeds.device, dtype=embeds.dtype))
        handle = layer.register_forward_hook(lambda module, inputs, output: embeds)
        try:
            return self.text_encoder(ids)[0]
        finally:
            handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# CLIP image tower


def clip_vision_inputs(vision_model, pixels: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """The head's CLIP inputs ``(B, 1 + patches / 2, hidden)`` of ``pixels`` ``(B, 3, H, W)`` in [-1, 1] through a
    transformers ``CLIPVisionModel``: its ``pooler_output`` (post_layernorm of the class token, no projection) and its
    raw ``last_hidden_state`` (no post_layernorm), the open_clip < 2.23 outputs the reference's head was trained on;
    preprocessed as the reference (:func:`~..models.e4t.preprocess`, at the tower's image size)."""
    p = next(vision_model.parameters())
    size = int(size or vision_model.config.image_size)
    out = vision_model(pixel_values=e4t.preprocess(pixels.to(p.device), size).to(p.dtype))
    return e4t.clip_inputs(out.last_hidden_state.float(), out.pooler_output.float())


# open_clip VisionTransformer <-> transformers CLIPVisionModel (the same tensors; q, k, v stacked in ``in_proj``).
_OC_TOP = {"conv1.weight": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
           "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
           "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight",
           "ln_post.bias": "post_layernorm.bias"}
_OC_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2"}
_OC_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
HF_PREFIX = "vision_model."  # CLIPModel / transformers < 5 CLIPVisionModel checkpoints; 5.x's CLIPVisionModel has none


def open_clip_to_transformers(sd: Mapping[str, torch.Tensor], prefix: str = HF_PREFIX) -> dict[str, torch.Tensor]:
    """An open_clip ``VisionTransformer`` state dict without ``proj`` (``encoder.pt``'s ``clip_vision.*``, prefix
    stripped) as transformers ``CLIPVisionModel`` keys under ``prefix`` (``"vision_model."``: the layout of
    CLIPModel checkpoints and of transformers < 5; ``""``: transformers 5's ``CLIPVisionModel.state_dict()``)."""
    out = {}
    for key, v in sd.items():
        if key in _OC_TOP:
            out[prefix + _OC_TOP[key]] = v
            continue
        m = _OC_BLOCK.match(key)
        if m is None:
            hint = (" (E4T's tower has no projection: mkshing sets proj = None)" if key == "proj" else "")
            raise ValueError(f"{key!r} is not a key of an open_clip ViT image tower{hint}")
        n, rest = m.groups()
        base = f"{prefix}encoder.layers.{n}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            if v.shape[0] % 3:
                raise ValueError(f"{key} has {v.shape[0]} rows: q, k and v stacked need a multiple of 3")
            for proj, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{base}self_attn.{proj}_proj.{kind}"] = part.clone()
            continue
        mod, _, param = rest.rpartition(".")
        if mod not in _OC_LAYER or param not in ("weight", "bias"):
            raise ValueError(f"{key!r} is not a key of an open_clip ViT residual block")
        out[f"{base}{_OC_LAYER[mod]}.{param}"] = v
    return out


def transformers_to_open_clip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPVisionModel`` state dict (keys with or without ``vision_model.``) as open_clip
    ``VisionTransformer`` keys without ``proj``: what ``encoder.pt`` holds under ``clip_vision.*`` and ComfyUI's
    CLIP-vision loader converts. The ``position_ids`` buffer older checkpoints hold is dropped."""
    top = {v: k for k, v in _OC_TOP.items()}
    layer = {v: k for k, v in _OC_LAYER.items()}
    out, qkv = {}, {}
    for key, v in sd.items():
        k = key[len(HF_PREFIX):] if key.startswith(HF_PREFIX) else key
        if k == "embeddings.position_ids":
            continue
        if k in top:
            out[top[k]] = v
            continue
        m = _HF_LAYER.match(k)
        if m is None:
            raise ValueError(f"{key!r} is not a key of a transformers CLIPVisionModel (no projection)")
        n, rest = m.groups()
        base = f"transformer.resblocks.{n}."
        sm = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if sm is not None:
            qkv.setdefault((n, sm[2]), {})[sm[1]] = v
            continue
        mod, _, param = rest.rpartition(".")
        if mod not in layer or param not in ("weight", "bias"):
            raise ValueError(f"{key!r} is not a key of a transformers CLIP encoder layer")
        out[f"{base}{layer[mod]}.{param}"] = v
    for (n, kind), parts in qkv.items():
        if set(parts) != set("qkv"):
            raise ValueError(f"layer {n}: the q, k and v projection {kind}s must all be there, got {sorted(parts)}")
        out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in "qkv"], dim=0)
    return out


def load_open_clip_tower(vision_model, sd: Mapping[str, torch.Tensor], what: str = "clip_vision") -> None:
    """Load open_clip tower weights into a transformers ``CLIPVisionModel`` (every key, every shape)."""
    own = vision_model.state_dict()
    prefix = HF_PREFIX if any(k.startswith(HF_PREFIX) for k in own) else ""
    conv = open_clip_to_transformers(sd, prefix)
    own = {k: v for k, v in own.items() if not k.endswith("position_ids")}
    missing, unexpected = sorted(set(own) - set(conv)), sorted(set(conv) - set(own))
    wrong = [k for k in own if k in conv and tuple(conv[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"{what} does not fit the CLIP image tower ({vision_model.config.num_hidden_layers} layers, "
                         f"width {vision_model.config.hidden_size}): missing {missing[:4]}, unexpected {unexpected[:4]}, "
                         f"other shapes {wrong[:4]}")
    vision_model.load_state_dict(conv, strict=False)


# open_clip ViT-H-14's heads (model_configs/ViT-H-14.json: width 1280, head_width 80); other widths: open_clip's
# VisionCfg default head_width 64.
OPEN_CLIP_HEAD_WIDTH = {1280: 80}
OPEN_CLIP_DEFAULT_HEAD_WIDTH = 64
OPEN_CLIP_LN_EPS = 1e-5  # torch LayerNorm default, which open_clip's towers use
OPEN_CLIP_ACT = "gelu"  # open_clip ViT-H-14 (not QuickGELU, which the OpenAI towers use)


def vision_config_from_open_clip(sd: Mapping[str, torch.Tensor], heads: int | None = None) -> dict:
    """A transformers ``CLIPVisionConfig`` (as a dict) for open_clip tower weights: sizes from the shapes, heads from
    ``heads`` or open_clip's head width (ViT-H-14: 16)."""
    try:
        width = int(sd["class_embedding"].shape[0])
        patch = int(sd["conv1.weight"].shape[-1])
        positions = int(sd["positional_embedding"].shape[0])
        mlp = int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    except KeyError as err:
        raise ValueError(f"the CLIP tower has no {err.args[0]!r}: not an open_clip ViT image tower") from None
    layers = 1 + max(int(m[1]) for k in sd if (m := _OC_BLOCK.match(k)))
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise ValueError(f"the CLIP tower has {positions} positions: not 1 + a square grid of patches")
    if heads is None:
        head_width = OPEN_CLIP_HEAD_WIDTH.get(width, OPEN_CLIP_DEFAULT_HEAD_WIDTH)
        if width % head_width:
            raise ValueError(f"cannot tell the attention heads of a {width}-wide CLIP tower; give a CLIP vision "
                             "folder (clip_vision) for its configuration")
        heads = width // head_width
    return {"hidden_size": width, "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": heads,
            "image_size": grid * patch, "patch_size": patch, "num_channels": 3, "hidden_act": OPEN_CLIP_ACT,
            "layer_norm_eps": OPEN_CLIP_LN_EPS}


__all__ = ["PLACEHOLDER", "SlotTextEncoder", "attach_offsets", "clip_vision_inputs", "detach_offsets",
           "feature_channels", "load_open_clip_tower", "offset_shapes", "open_clip_to_transformers",
           "transformers_to_open_clip", "unet_features", "vision_config_from_open_clip"]
