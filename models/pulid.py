"""PuLID (Guo et al. 2024, arXiv:2404.16022) for SDXL: the ID encoders (v1 IDEncoder, v1.1 IDFormer), checkpoint
detection, the ID features of a face, and the ID attention patch, host-free.

Reference: ToTheBeginning/PuLID (``pulid/encoders.py``, ``pulid/encoders_transformer.py``,
``pulid/attention_processor.py`` ``IDAttnProcessor2_0``, ``pulid/pipeline.py`` / ``pipeline_v1_1.py``
``get_id_embedding``). Checkpoints, detected from keys and shapes, never the file name:
- ``pulid_v1.bin`` / ``pulid_v1.1.safetensors``: ``id_adapter.*`` (the encoder) and
  ``id_adapter_attn_layers.{2k+1}.id_to_k.weight`` / ``.id_to_v.weight`` (the k-th cross-attention site in diffusers'
  ``unet.attn_processors`` order, as IP-Adapter numbers them);
- ``ip-adapter_pulid_sdxl_fp16.safetensors`` (the popular ComfyUI port's conversion of v1): ``image_proj.*`` and
  ``ip_adapter.{2k+1}.to_k_ip.weight`` / ``.to_v_ip.weight``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import SiteCall, TokenPatch
from .checkpoints import CheckpointError, atomic_save_safetensors, check_weights, load_exact, load_file, read_metadata, split_prefixes
from .ipadapter import PerceiverAttention, feed_forward
from .layers import LAYOUT_NAMES, LAYOUTS, Site, Transformer, check_sites

CHECKPOINT_PARTS = {"encoder": ("id_adapter.", "image_proj."), "layers": ("id_adapter_attn_layers.", "ip_adapter.")}
# Layer key names: official (id_to_k / id_to_v) and the IP-Adapter-style conversion (to_k_ip / to_v_ip).
LAYER_KEYS = {"id_to_k": ("id_to_k", "to_k_ip"), "id_to_v": ("id_to_v", "to_v_ip")}
# The EVA hidden states both encoders take (one mapping per scale: mapping_0 .. mapping_4).
ID_SCALES = 5
# IDFormer attention heads are 64 wide (encoders_transformer.py IDFormer(dim_head=64)).
IDFORMER_DIM_HEAD = 64
# ortho_v2 sums the attention on the first five ID tokens (attention_processor.py ``attn_mean[:, :, :5]``).
ORTHO_V2_ID_TOKENS = 5
PROJECTIONS = ("ortho_v2", "ortho", "none")
# Modes of the reference apps -> (projection, zero tokens): app.py "fidelity" (NUM_ZERO 8, ORTHO_v2) and
# "extremely style" (16, ORTHO); app_v1_1.py uses ortho v2 with num_zero 20 by default.
METHODS = {"fidelity": "ortho_v2", "style": "ortho", "neutral": "none"}
ZERO_TOKENS = {("fidelity", "v1"): 8, ("fidelity", "v1.1"): 20, ("style", "v1"): 16, ("style", "v1.1"): 16,
               ("neutral", "v1"): 0, ("neutral", "v1.1"): 0}
# The reference apps' id_scale default.
PULID_WEIGHT = 0.8
# The insightface pack PuLID takes its raw ArcFace embedding from (pipeline.py FaceAnalysis(name='antelopev2')).
PULID_FACE_PACK = "antelopev2"
VERSIONS = ("v1", "v1.1")


# ---------------------------------------------------------------------------------------------------------------
# Encoders. Parameter names are the official checkpoints'.


def _mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    # keys .0 / .1 / .3 / .4 / .6: Linear, LayerNorm, LeakyReLU, Linear, LayerNorm, LeakyReLU, Linear
    return nn.Sequential(nn.Linear(cin, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden),
                         nn.LayerNorm(hidden), nn.LeakyReLU(), nn.Linear(hidden, cout))


class IDEncoder(nn.Module):
    """v1: an MLP turns ``id_cond`` into ``num_token`` tokens; each of the five EVA hidden states gives one more token,
    ``mapping_i(cls) + mean(mapping_patch_i(patches))``: ``num_token + 5`` tokens in all."""

    def __init__(self, width: int, context_dim: int, num_token: int, h1: int, h2: int, vit_width: int, vit_hidden: int):
        super().__init__()
        self.num_token, self.context_dim = num_token, context_dim
        self.body = nn.Sequential(nn.Linear(width, h1), nn.LayerNorm(h1), nn.LeakyReLU(), nn.Linear(h1, h2),
                                  nn.LayerNorm(h2), nn.LeakyReLU(), nn.Linear(h2, context_dim * num_token))
        for i in range(ID_SCALES):
            setattr(self, f"mapping_{i}", _mlp(vit_width, vit_hidden, context_dim))
            setattr(self, f"mapping_patch_{i}", _mlp(vit_width, vit_hidden, context_dim))

    def forward(self, x: torch.Tensor, y: Sequence[torch.Tensor]) -> torch.Tensor:  # [N, W], 5 x [N, T, C]
        x = self.body(x).reshape(-1, self.num_token, self.context_dim)
        scales = [getattr(self, f"mapping_{i}")(h[:, :1]) + getattr(self, f"mapping_patch_{i}")(h[:, 1:]).mean(1, keepdim=True)
                  for i, h in enumerate(y)]
        return torch.cat([x, *scales], dim=1)


class IDFormer(nn.Module):
    """v1.1: a perceiver over the ID tokens and the five EVA scales (two layers per scale for depth 10); the first
    ``num_queries`` latents, times ``proj_out``, are the ID tokens. Several images: ``x`` ``[N, n, W]``, the hidden
    states of the n images side by side along the sequence."""

    def __init__(self, dim: int, depth: int, heads: int, num_id_token: int, num_queries: int, output_dim: int,
                 ff_mult: int, width: int, vit_width: int, hidden: int):
        super().__init__()
        self.num_id_token, self.dim, self.num_queries, self.depth = num_id_token, dim, num_queries, depth // ID_SCALES
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.proj_out = nn.Parameter(torch.zeros(dim, output_dim))
        self.layers = nn.ModuleList([nn.ModuleList([PerceiverAttention(dim, heads, IDFORMER_DIM_HEAD),
                                                    feed_forward(dim, ff_mult)]) for _ in range(depth)])
        for i in range(ID_SCALES):
            setattr(self, f"mapping_{i}", _mlp(vit_width, hidden, dim))
        self.id_embedding_mapping = _mlp(width, hidden, dim * num_id_token)

    def forward(self, x: torch.Tensor, y: Sequence[torch.Tensor]) -> torch.Tensor:
        latents = self.latents.repeat(x.shape[0], 1, 1)
        images = x.shape[1] if x.ndim == 3 else 1
        x = self.id_embedding_mapping(x).reshape(-1, self.num_id_token * images, self.dim)
        latents = torch.cat([latents, x], dim=1)
        for i in range(ID_SCALES):
            ctx = torch.cat([x, getattr(self, f"mapping_{i}")(y[i])], dim=1)
            for attn, ff in self.layers[i * self.depth:(i + 1) * self.depth]:
                latents = attn(ctx, latents) + latents
                latents = ff(latents) + latents
        return latents[:, :self.num_queries] @ self.proj_out


# ---------------------------------------------------------------------------------------------------------------
# Detection


@dataclass(frozen=True)
class PuLIDSpec:
    version: str  # "v1" (IDEncoder) | "v1.1" (IDFormer)
    layout: str  # "sdxl" (the public PuLID files)
    cross_dim: int  # ID token width the layers take (2048)
    widths: tuple[int, ...]  # layer width per site (adapter order)
    id_width: int  # id_cond width: ArcFace 512 + EVA projection
    vit_width: int  # EVA hidden-state width
    tokens: int  # ID tokens per reference image (v1: 10; v1.1: 32 in all)
    encoder_config: dict = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        return (f"PuLID {self.version} for {LAYOUT_NAMES[self.layout]} ({len(self.widths)} layers, {self.tokens} ID tokens "
                f"of width {self.cross_dim}; id_cond {self.id_width}, EVA width {self.vit_width})")


def _shape(sd: dict, key: str, ndim: int) -> tuple[int, ...]:
    t = sd.get(key)
    if t is None:
        raise CheckpointError(f"key {key} is missing; the file is incomplete or not a PuLID model")
    if t.ndim != ndim or 0 in t.shape:
        raise CheckpointError(f"{key} has shape {tuple(t.shape)}, expected {ndim} non-empty dimensions; the file is damaged")
    return tuple(t.shape)


def _layers(layers: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """``{site index k: {"id_to_k": W, "id_to_v": W}}`` from either key style."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in layers.items():
        head, _, rest = key.partition(".")
        name = next((ours for ours, names in LAYER_KEYS.items() if rest in (f"{n}.weight" for n in names)), None)
        if name is None:
            continue
        if not head.isdigit() or int(head) % 2 != 1:
            raise CheckpointError(f"layer key {key!r}: PuLID layers are numbered 1, 3, 5, ...")
        out.setdefault((int(head) - 1) // 2, {})[name] = value
    return out


def detect(encoder: dict[str, torch.Tensor], layers: dict[str, torch.Tensor]) -> PuLIDSpec:
    """Read the PuLID version and target model from keys and shapes."""
    per_site = _layers(layers)
    if not encoder or not per_site:
        raise CheckpointError("not a PuLID checkpoint: expected id_adapter.* (or image_proj.*) and the attention layers "
                              f"id_adapter_attn_layers.* (or ip_adapter.*); found {len(encoder)} and {len(layers)} keys")
    n = len(per_site)
    if sorted(per_site) != list(range(n)) or any(set(v) != set(LAYER_KEYS) for v in per_site.values()):
        raise CheckpointError(f"PuLID attention layers are incomplete: {n} sites, each needs id_to_k and id_to_v")
    widths, cross = [], set()
    for k in range(n):
        for name in LAYER_KEYS:
            w = per_site[k][name]
            if w.ndim != 2 or 0 in w.shape:
                raise CheckpointError(f"attention layer {2 * k + 1}.{name} has shape {tuple(w.shape)}, expected a matrix")
            cross.add(int(w.shape[1]))
        widths.append(int(per_site[k]["id_to_k"].shape[0]))
    layout = LAYOUTS.get(n)
    if layout is None or len(cross) != 1:
        raise CheckpointError(f"PuLID with {n} attention layers of input widths {sorted(cross)}: only the SD1.5 (16) and "
                              "SDXL (70) layouts exist")
    cross_dim = cross.pop()
    vit_out, vit_width = _shape(encoder, "mapping_0.6.weight", 2)[0], _shape(encoder, "mapping_0.0.weight", 2)[1]
    hidden = _shape(encoder, "mapping_0.0.weight", 2)[0]
    if "latents" in encoder:  # v1.1 IDFormer
        cfg = _idformer_config(encoder)
        version, tokens, out_dim = "v1.1", cfg["num_queries"], cfg["output_dim"]
    elif "body.0.weight" in encoder:  # v1 IDEncoder
        h1, width = _shape(encoder, "body.0.weight", 2)
        h2 = _shape(encoder, "body.3.weight", 2)[0]
        body_out = _shape(encoder, "body.6.weight", 2)[0]
        if body_out % vit_out:
            raise CheckpointError(f"IDEncoder: body output {body_out} is not a multiple of the token width {vit_out}")
        cfg = dict(width=width, context_dim=vit_out, num_token=body_out // vit_out, h1=h1, h2=h2, vit_width=vit_width,
                   vit_hidden=hidden)
        version, tokens, out_dim = "v1", body_out // vit_out + ID_SCALES, vit_out
    else:
        raise CheckpointError("unknown PuLID encoder (keys: " + ", ".join(sorted(encoder)[:6]) + "): expected an IDEncoder "
                              "(body.*) or an IDFormer (latents, proj_out)")
    if out_dim != cross_dim:
        raise CheckpointError(f"the encoder gives tokens of width {out_dim} but the attention layers take {cross_dim}")
    return PuLIDSpec(version, layout, cross_dim, tuple(widths), cfg["width"], vit_width, tokens, cfg)


class IDLayer(nn.Module):
    def __init__(self, cross_dim: int, width: int):
        super().__init__()
        self.id_to_k = nn.Linear(cross_dim, width, bias=False)
        self.id_to_v = nn.Linear(cross_dim, width, bias=False)


class PuLIDModel(nn.Module):
    """The ID encoder and the per-site ID key / value projections."""

    def __init__(self, spec: PuLIDSpec):
        super().__init__()
        self.spec = spec
        self.encoder = (IDFormer if spec.version == "v1.1" else IDEncoder)(**spec.encoder_config)
        self.id_layers = nn.ModuleList([IDLayer(spec.cross_dim, w) for w in spec.widths])

    @classmethod
    def from_parts(cls, encoder: dict[str, torch.Tensor], layers: dict[str, torch.Tensor]) -> PuLIDModel:
        spec = detect(encoder, layers)
        with torch.device("meta"):
            model = cls(spec)
        per_site = _layers(layers)
        sd = {f"encoder.{k}": v for k, v in encoder.items()}
        sd.update({f"id_layers.{k}.{name}.weight": w for k, site in per_site.items() for name, w in site.items()})
        check_weights(encoder)
        check_weights({f"{2 * k + 1}.{n}.weight": w for k, site in per_site.items() for n, w in site.items()})
        load_exact(model, sd, f"the PuLID {spec.version} model", assign=True)
        return model.float()


def check_model(spec: PuLIDSpec, transformers: list[Transformer], sites: list[Site], context_dim: int) -> None:
    check_sites("PuLID model", spec.layout, spec.widths, spec.cross_dim, transformers, sites, context_dim,
                {"sdxl": "pulid_v1.1.safetensors"})


# ---------------------------------------------------------------------------------------------------------------
# ID features: what the encoders take, per reference image (model-independent, saved and loaded as they are)

EMBEDS_FORMAT = "personalize.pulid.embeds/1"


@dataclass
class PuLIDEmbeds:
    """Per reference image: ``id_cond`` ``[n, 512 + D]`` (the raw ArcFace embedding and the L2-normalized EVA
    feature) and the five EVA hidden states ``[n, T, C]``; ``pack``: the face analysis pack the embedding came from."""

    id_cond: torch.Tensor
    hidden: list[torch.Tensor]
    pack: str = ""

    def __post_init__(self):
        if self.id_cond.ndim != 2 or self.id_cond.shape[0] == 0:
            raise ValueError(f"PuLID embeds: id_cond must be [images, width], got {tuple(self.id_cond.shape)}")
        if len(self.hidden) != ID_SCALES or any(h.ndim != 3 or h.shape[0] != self.id_cond.shape[0] for h in self.hidden):
            raise ValueError(f"PuLID embeds: expected {ID_SCALES} hidden states [images, tokens, width] for "
                             f"{self.id_cond.shape[0]} images, got {[tuple(h.shape) for h in self.hidden]}")

    @property
    def images(self) -> int:
        return int(self.id_cond.shape[0])

    def check_for(self, spec: PuLIDSpec) -> None:
        if self.id_cond.shape[1] != spec.id_width or self.hidden[0].shape[-1] != spec.vit_width:
            raise ValueError(f"these ID embeds have id_cond width {self.id_cond.shape[1]} and EVA width "
                             f"{self.hidden[0].shape[-1]}, but {spec.describe()} takes {spec.id_width} and "
                             f"{spec.vit_width}: encode with the EVA02-CLIP-L-14-336 tower and antelopev2")

    def save(self, path: str) -> str:
        tensors = {"id_cond": self.id_cond.float(), **{f"hidden.{i}": h.float() for i, h in enumerate(self.hidden)}}
        return atomic_save_safetensors(tensors, path, {"format": EMBEDS_FORMAT, "pack": self.pack})

    @classmethod
    def load(cls, path: str) -> PuLIDEmbeds:
        meta = read_metadata(path)
        if meta is None or meta.get("format") != EMBEDS_FORMAT:
            raise CheckpointError(f"{path} is not a PuLID ID embeds file saved by this pack")
        data = load_file(path)
        try:
            for key, t in data.items():
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{key} holds NaN or Inf values")
            return cls(data["id_cond"], [data[f"hidden.{i}"] for i in range(ID_SCALES)], meta.get("pack", ""))
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}; the file is damaged") from e


def id_cond(arcface: torch.Tensor, eva_pooled: torch.Tensor) -> torch.Tensor:
    """``cat(raw ArcFace embedding, eva / ||eva||)`` (pipeline.py: ``id_cond_vit`` divided by its L2 norm)."""
    return torch.cat([arcface.float(), eva_pooled / torch.norm(eva_pooled, 2, 1, True)], dim=-1)


# The face crop goes to EVA resized bicubic without antialiasing: the reference (requirements.txt pins torchvision
# 0.15.2) calls torchvision's tensor ``resize``, which in that version does not antialias by default.
EVA_RESIZE_ANTIALIAS = False


def eva_input(faces: torch.Tensor, size: int) -> torch.Tensor:
    """Face-only crops ``[n, 3, H, W]`` in 0..1 -> the EVA tower's input: resized to ``size`` (bicubic), normalized
    with the CLIP mean / std (pipeline.py ``get_id_embedding``)."""
    from .eva_clip import EVA_MEAN, EVA_STD

    x = F.interpolate(faces, size=(size, size), mode="bicubic", align_corners=False, antialias=EVA_RESIZE_ANTIALIAS)
    mean = torch.tensor(EVA_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(EVA_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def id_features(crops: torch.Tensor, arcface: torch.Tensor, parser: nn.Module, eva: nn.Module,
                pack: str = "") -> tuple[PuLIDEmbeds, torch.Tensor]:
    """``(embeds, face-only images)`` from FFHQ-aligned face crops ``[n, 3, 512, 512]`` in 0..1 and their raw ArcFace
    embeddings ``[n, 512]``: parsing (white background, grey face), EVA, ``id_cond``."""
    from .face.parsing import face_only

    faces = face_only(crops, parser)
    pooled, hidden = eva(eva_input(faces, eva.image_size))
    return PuLIDEmbeds(id_cond(arcface.to(pooled), pooled.float()), [h.float() for h in hidden], pack), faces


def encode_tokens(model: PuLIDModel, embeds: PuLIDEmbeds, id_mix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """ID tokens ``(cond, uncond)``, each ``[1, T, C]``.

    The uncond is the encoder run on zeros for the condition and every hidden state (pipeline.py). Several images:
    v1 encodes each and appends the further images' first ``num_token`` tokens (all of them with ``id_mix``) to the
    first image's, and the uncond likewise (app.py); v1.1 runs one IDFormer call over all images
    (pipeline_v1_1.py)."""
    enc, spec = model.encoder, model.spec
    p = next(model.parameters())
    cond = embeds.id_cond.to(p.device, p.dtype)
    hidden = [h.to(p.device, p.dtype) for h in embeds.hidden]
    uncond = enc(torch.zeros_like(cond[:1]), [torch.zeros_like(h[:1]) for h in hidden])
    if spec.version == "v1.1":
        n = embeds.images
        tokens = enc(cond[None], [h.reshape(1, n * h.shape[1], h.shape[2]) for h in hidden])
        return tokens, uncond
    keep = None if id_mix else enc.num_token
    per_image = [enc(cond[i:i + 1], [h[i:i + 1] for h in hidden]) for i in range(embeds.images)]
    tok_c = torch.cat([per_image[0]] + [t[:, :keep] for t in per_image[1:]], dim=1)
    tok_u = torch.cat([uncond] + [uncond[:, :keep]] * (embeds.images - 1), dim=1)
    return tok_c, tok_u


# ---------------------------------------------------------------------------------------------------------------
# The ID attention patch


def orthogonal_projection(h: torch.Tensor, h_id: torch.Tensor) -> torch.Tensor:
    """``<h, h_id> / <h, h> * h`` with the inner products over the token axis, per batch row and channel
    (attention_processor.py ``projection``)."""
    return (h * h_id).sum(dim=-2, keepdim=True) / (h * h).sum(dim=-2, keepdim=True) * h


def ortho_v2_weight(q: torch.Tensor, k_id: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, 1]``: per query position, the attention (softmax of ``q k^T`` per head, *no* 1/sqrt(d), as the
    reference) on the first five ID tokens, averaged over heads."""
    b, n, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, n, heads, d).transpose(1, 2)
    kh = k_id.reshape(b, k_id.shape[1], heads, d).transpose(1, 2)
    attn = (qh @ kh.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)  # [B, N, T]
    return attn[:, :, :ORTHO_V2_ID_TOKENS].sum(dim=-1, keepdim=True)


class PuLIDPatch(TokenPatch):
    """One Apply node's ID attention on every cross-attention site (the :class:`~.attention.SitePatch` protocol):
    ``num_zero`` zero tokens appended to the ID tokens (zero keys and values), the ID attention ``h_id`` of the query,
    and the projection rule against ``out`` (the attention output so far: the text attention, plus what patches
    before this one on the site added):
    ``none``: ``w h_id``; ``ortho``: ``w (h_id - P)``; ``ortho_v2``: ``w (h_id + (a - 1) P)``, in float32 at least."""

    def __init__(self, model: PuLIDModel, cond: torch.Tensor, uncond: torch.Tensor, weight: float, projection: str,
                 num_zero: int, mask: torch.Tensor | None = None):
        if projection not in PROJECTIONS:
            raise ValueError(f"unknown projection {projection!r}; expected one of {PROJECTIONS}")
        if num_zero < 0:
            raise ValueError(f"num_zero must be >= 0, got {num_zero}")
        super().__init__({False: (cond, uncond)}, mask)
        self.model, self.weight, self.projection, self.num_zero = model, float(weight), projection, int(num_zero)

    def active(self, index: int) -> bool:
        return self.weight != 0.0 and 0 <= index < len(self.model.id_layers)

    def delta(self, index: int, q: torch.Tensor, out: torch.Tensor | None, call: SiteCall) -> torch.Tensor | None:
        if not self.active(index):
            return None
        layer = self.model.id_layers[index]
        wk, wv = layer.id_to_k.weight, layer.id_to_v.weight
        if wk.device != q.device or wk.dtype != q.dtype:  # only when the host did not load the model for us
            wk, wv = wk.to(q.device, q.dtype), wv.to(q.device, q.dtype)
        tokens = self.stacked_tokens(False, q.device, q.dtype)
        k, v = F.linear(tokens, wk), F.linear(tokens, wv)  # [2, T, width]; zero tokens give zero keys and values
        if self.num_zero:
            zeros = k.new_zeros(2, self.num_zero, k.shape[-1])
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        batch = q.shape[0] // len(call.chunks)
        k, v = self.batch_rows(k, call.chunks, batch), self.batch_rows(v, call.chunks, batch)
        h_id = call.attn(q, k, v, call.heads)
        if self.projection == "none":
            d = self.weight * h_id
        else:  # in float32 (or wider) whatever the model's dtype, as the reference
            ct = torch.promote_types(q.dtype, torch.float32)
            h, hid = out.to(ct), h_id.to(ct)
            proj = orthogonal_projection(h, hid)
            if self.projection == "ortho":
                d = self.weight * (hid - proj)
            else:
                d = self.weight * (hid + (ortho_v2_weight(q.to(ct), k.to(ct), call.heads) - 1) * proj)
            d = d.to(q.dtype)
        return self.masked(d, call)


# ---------------------------------------------------------------------------------------------------------------
# PuLID-FLUX (pulid_flux_v0.9.0 / v0.9.1): the v1.1 IDFormer, and cross-attentions from the Flux image tokens to the
# ID tokens after some of the transformer blocks (ToTheBeginning/PuLID ``pulid/pipeline_flux.py``, ``flux/model.py``)

FLUX_CHECKPOINT_PARTS = {"encoder": ("pulid_encoder.",), "ca": ("pulid_ca.",)}
# PerceiverAttentionCA heads are 128 wide (encoders_transformer.py ``PerceiverAttentionCA(dim_head=128, heads=16)``).
PULID_CA_DIM_HEAD = 128
# One cross-attention after every 2nd double block and every 4th single block, from block 0 (pipeline_flux.py
# ``double_interval = 2``, ``single_interval = 4``): 10 + 10 = 20 on Flux.1-dev's 19 / 38 blocks.
PULID_FLUX_INTERVALS = {"double": 2, "single": 4}
# The Flux app's defaults (app_flux.py): id weight 1, ID from step 0 (its docs suggest 4 for photorealism).
PULID_FLUX_WEIGHT = 1.0
PULID_FLUX_START_STEP = 0
# Several reference images. The official Flux app encodes one image; the popular ComfyUI ports average the IDFormer
# outputs of several (balazik/ComfyUI-PuLID-Flux, lldacing/ComfyUI_PuLID_Flux_ll); the IDFormer also takes several
# images in one call, as PuLID v1.1 for SDXL does (pipeline_v1_1.py).
FLUX_IMAGE_MODES = ("first (official)", "mean of ID embeddings (community)", "all in one IDFormer call (v1.1 style)")


class PerceiverAttentionCA(nn.Module):
    """Image tokens (queries) attend to the ID tokens (keys and values); ``norm1`` over the ID tokens, ``norm2`` over
    the image tokens, the softmax in float32 (encoders_transformer.py ``PerceiverAttentionCA``)."""

    def __init__(self, dim: int, kv_dim: int, heads: int):
        super().__init__()
        inner = heads * PULID_CA_DIM_HEAD
        self.heads = heads
        self.norm1 = nn.LayerNorm(kv_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:  # ID [b|1, T, kv_dim], image [B, L, dim]
        b, n, _ = latents.shape
        q = self.to_q(self.norm2(latents)).reshape(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.to_kv(self.norm1(x)).chunk(2, dim=-1)
        k, v = (t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2) for t in (k, v))
        scale = PULID_CA_DIM_HEAD ** -0.25  # on q and k each, as the reference (stabler in fp16)
        weight = ((q * scale) @ (k * scale).transpose(-2, -1)).float().softmax(dim=-1).to(q.dtype)
        return self.to_out((weight @ v).transpose(1, 2).reshape(b, n, -1))


@dataclass(frozen=True)
class PuLIDFluxSpec:
    dim: int  # Flux hidden width the cross-attentions take (3072)
    cross_dim: int  # ID token width (2048)
    heads: int  # cross-attention heads (16)
    modules: int  # cross-attentions (20)
    id_width: int
    vit_width: int
    tokens: int  # ID tokens (32)
    encoder_config: dict = field(default_factory=dict, compare=False)
    version: str = "flux"
    layout: str = "flux"

    def describe(self) -> str:
        return (f"PuLID-FLUX ({self.modules} cross-attentions of width {self.dim}, {self.tokens} ID tokens of width "
                f"{self.cross_dim}; id_cond {self.id_width}, EVA width {self.vit_width})")

    def sites(self, depths: tuple[int, int]) -> dict[tuple[str, int], int]:
        """``{(kind, block): cross-attention index}`` on a Flux with ``depths`` (double, single) blocks."""
        from .dit import interval_sites

        return interval_sites(depths, PULID_FLUX_INTERVALS)


def _idformer_config(encoder: dict[str, torch.Tensor]) -> dict:
    _, queries, dim = _shape(encoder, "latents", 3)
    out_dim = _shape(encoder, "proj_out", 2)[1]
    inner = _shape(encoder, "layers.0.0.to_q.weight", 2)[0]
    depth = len({k.split(".")[1] for k in encoder if k.startswith("layers.")})
    id_out, width = _shape(encoder, "id_embedding_mapping.6.weight", 2)[0], _shape(encoder, "id_embedding_mapping.0.weight", 2)[1]
    vit_out, vit_width = _shape(encoder, "mapping_0.6.weight", 2)[0], _shape(encoder, "mapping_0.0.weight", 2)[1]
    if inner % IDFORMER_DIM_HEAD or depth % ID_SCALES or id_out % dim or vit_out != dim:
        raise CheckpointError(f"IDFormer: attention width {inner}, depth {depth}, ID mapping {id_out} do not fit a "
                              f"perceiver of width {dim} (heads of {IDFORMER_DIM_HEAD}, depth a multiple of {ID_SCALES})")
    return dict(dim=dim, depth=depth, heads=inner // IDFORMER_DIM_HEAD, num_id_token=id_out // dim, num_queries=queries,
                output_dim=out_dim, ff_mult=_shape(encoder, "layers.0.1.1.weight", 2)[0] // dim, width=width,
                vit_width=vit_width, hidden=_shape(encoder, "mapping_0.0.weight", 2)[0])


def detect_flux(encoder: dict[str, torch.Tensor], ca: dict[str, torch.Tensor]) -> PuLIDFluxSpec:
    """Read a PuLID-FLUX checkpoint's layout from its keys and shapes (``pulid_encoder.*``: an IDFormer;
    ``pulid_ca.{k}.*``: the cross-attentions)."""
    if "latents" not in encoder:
        raise CheckpointError("PuLID-FLUX: pulid_encoder.* is not an IDFormer (no latents)")
    cfg = _idformer_config(encoder)
    index = sorted({int(k.split(".")[0]) for k in ca if k.split(".")[0].isdigit()})
    if not index or index != list(range(len(index))):
        raise CheckpointError(f"PuLID-FLUX cross-attentions are not numbered 0, 1, 2, ...: found {index[:6]}")
    names = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "to_q.weight", "to_kv.weight", "to_out.weight")
    for k in index:
        missing = [n for n in names if f"{k}.{n}" not in ca]
        if missing:
            raise CheckpointError(f"PuLID-FLUX cross-attention {k} lacks {', '.join(missing)}; the file is incomplete")
    inner, dim = _shape(ca, "0.to_q.weight", 2)
    kv_dim = _shape(ca, "0.to_kv.weight", 2)[1]
    if inner % PULID_CA_DIM_HEAD:
        raise CheckpointError(f"PuLID-FLUX cross-attention width {inner} is not a multiple of its {PULID_CA_DIM_HEAD}-wide heads")
    if kv_dim != cfg["output_dim"]:
        raise CheckpointError(f"the IDFormer gives tokens of width {cfg['output_dim']} but the cross-attentions take {kv_dim}")
    return PuLIDFluxSpec(dim, kv_dim, inner // PULID_CA_DIM_HEAD, len(index), cfg["width"], cfg["vit_width"],
                         cfg["num_queries"], cfg)


class PuLIDFluxModel(nn.Module):
    """The IDFormer and the cross-attentions, in the official parameter names (``pulid_encoder``, ``pulid_ca``)."""

    def __init__(self, spec: PuLIDFluxSpec):
        super().__init__()
        self.spec = spec
        self.pulid_encoder = IDFormer(**spec.encoder_config)
        self.pulid_ca = nn.ModuleList([PerceiverAttentionCA(spec.dim, spec.cross_dim, spec.heads) for _ in range(spec.modules)])

    @property
    def encoder(self) -> IDFormer:
        return self.pulid_encoder

    @classmethod
    def from_parts(cls, encoder: dict[str, torch.Tensor], ca: dict[str, torch.Tensor]) -> PuLIDFluxModel:
        spec = detect_flux(encoder, ca)
        with torch.device("meta"):
            model = cls(spec)
        check_weights(encoder, "pulid_encoder.")
        check_weights(ca, "pulid_ca.")
        sd = {**{f"pulid_encoder.{k}": v for k, v in encoder.items()}, **{f"pulid_ca.{k}": v for k, v in ca.items()}}
        load_exact(model, sd, "the PuLID-FLUX model", assign=True)
        return model.float()


def load_pulid(path: str) -> PuLIDModel | PuLIDFluxModel:
    """A PuLID model of any kind (SDXL v1 / v1.1, or PuLID-FLUX), told apart by its keys."""
    sd = load_file(path)
    try:
        if any(k.startswith(FLUX_CHECKPOINT_PARTS["ca"]) for k in sd):
            parts = split_prefixes(sd, FLUX_CHECKPOINT_PARTS)
            return PuLIDFluxModel.from_parts(parts["encoder"], parts["ca"])
        parts = split_prefixes(sd, CHECKPOINT_PARTS)
        return PuLIDModel.from_parts(parts["encoder"], parts["layers"])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e


def encode_flux_tokens(model: PuLIDFluxModel, embeds: PuLIDEmbeds, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ID tokens ``(cond, uncond)``, each ``[1, T, C]``: the IDFormer of the reference (``mode`` says which of several
    images, :data:`FLUX_IMAGE_MODES`) and of zeros for the condition and every hidden state (pipeline_flux.py
    ``get_id_embedding(cal_uncond=True)``, the true-CFG path)."""
    enc = model.pulid_encoder
    p = next(model.parameters())
    cond = embeds.id_cond.to(p.device, p.dtype)
    hidden = [h.to(p.device, p.dtype) for h in embeds.hidden]
    uncond = enc(torch.zeros_like(cond[:1]), [torch.zeros_like(h[:1]) for h in hidden])
    if mode == FLUX_IMAGE_MODES[0]:
        tokens = enc(cond[:1], [h[:1] for h in hidden])
    elif mode == FLUX_IMAGE_MODES[1]:
        tokens = enc(cond, hidden).mean(dim=0, keepdim=True)
    elif mode == FLUX_IMAGE_MODES[2]:
        n = embeds.images
        tokens = enc(cond[None], [h.reshape(1, n * h.shape[1], h.shape[2]) for h in hidden])
    else:
        raise ValueError(f"unknown image mode {mode!r}; expected one of {FLUX_IMAGE_MODES}")
    return tokens, uncond


class PuLIDFluxPatch(TokenPatch):
    """One Apply node's PuLID-FLUX on a Flux model (the :class:`~.dit.BlockPatch` protocol): after the blocks of
    ``sites``, ``img + weight * ca_k(id, img)`` on the image tokens (flux/model.py), with the cond ID tokens in the
    cond rows and the IDFormer of zeros in the uncond rows (the official true-CFG path), limited to ``mask``."""

    uses_query = False

    def __init__(self, model: PuLIDFluxModel, cond: torch.Tensor, uncond: torch.Tensor, weight: float,
                 sites: dict[tuple[str, int], int], mask: torch.Tensor | None = None):
        super().__init__({False: (cond, uncond)}, mask)
        self.model, self.weight, self.site_index = model, float(weight), dict(sites)

    def sites(self) -> set[tuple[str, int]]:
        return set(self.site_index) if self.weight != 0.0 else set()

    def delta(self, call, img: torch.Tensor) -> torch.Tensor | None:
        k = self.site_index.get((call.kind, call.index))
        if k is None or self.weight == 0.0:
            return None
        ca = self.model.pulid_ca[k]
        batch = img.shape[0] // len(call.chunks)
        ids = self.batch_rows(self.stacked_tokens(False, img.device, img.dtype), call.chunks, batch)
        if all(c != 1 for c in call.chunks):  # cond only (the official "fake CFG"): one ID row broadcast, as the reference
            ids = ids[:1]
        d = self.weight * ca(ids, img)
        if self.mask is not None and call.grid is not None:
            d = d * self.resized_mask(tuple(call.grid), batch, call.chunks, d.device, d.dtype)
        return d
