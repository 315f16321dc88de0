"""IP-Adapter (Ye et al. 2023, arXiv:2308.06721): image projection models, the family registry, checkpoint family
detection, and the host-free per-layer patch used by every host (ComfyUI glue, diffusers processor).

Official checkpoints (tencent-ailab/IP-Adapter ``ip_adapter/ip_adapter.py`` ``IPAdapter.load_ip_adapter``; the
h94/IP-Adapter and h94/IP-Adapter-FaceID files) hold two parts: ``image_proj`` (one of the projection models below)
and ``ip_adapter`` with ``f"{2k+1}.to_k_ip.weight"`` / ``".to_v_ip.weight"`` of shape ``[layer_width,
cross_attention_dim]`` for the k-th cross-attention site in diffusers order (see models/layers.py). XLabs' Flux adapters
are the exception: K / V per Flux double block (below, :class:`XLabsAdapterModel`). The family is read from keys and
shapes only, never from the file name.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import SiteCall, TokenPatch, attention, ip_attention
from .checkpoints import CheckpointError, check_weights, load_exact, load_file, split_prefixes
from .layers import ALT, LAYOUT_NAMES, LAYOUTS, MAIN, NEGATED, Site, Transformer, check_sites

# Prefixes of the two parts in flat (.safetensors) files; ComfyUI_IPAdapter_plus also accepts "adapter_modules.".
CHECKPOINT_PARTS = {"image_proj": ("image_proj.",), "ip_adapter": ("ip_adapter.", "adapter_modules.")}
# Every public Resampler uses 64-dimensional heads (official Resampler default; diffusers infers heads the same way).
RESAMPLER_DIM_HEAD = 64
# ArcFace embedding width: a projection that takes 512-d input is a FaceID model (insightface buffalo_l/antelopev2).
ARCFACE_DIM = 512
# The insightface pack the FaceID models were trained with (h94/IP-Adapter-FaceID model card:
# FaceAnalysis(name="buffalo_l")).
FACEID_PACK = "buffalo_l"
# FaceID Portrait models are the FaceID MLP with 16 tokens (h94/IP-Adapter-FaceID: portrait-v11_sd15, portrait_sdxl).
PORTRAIT_TOKENS = 16

# What a user should load for a given CLIP feature width (OpenCLIP checkpoints used by the official adapters).
CLIP_VISION_BY_WIDTH = {
    ("image_embeds", 1024): "ViT-H/14 (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)",
    ("image_embeds", 1280): "ViT-bigG/14 (CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors)",
    ("penultimate", 1280): "ViT-H/14 (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)",
    ("penultimate", 1664): "ViT-bigG/14 (CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors)",
    ("image_embeds", 768): "ViT-L/14 (clip_vision_l.safetensors, openai/clip-vit-large-patch14)",
}


# ---------------------------------------------------------------------------------------------------------------
# Projection models. Parameter names follow the official checkpoints so that state dicts load as they are.


class ImageProjModel(nn.Module):
    """Base projection: ``LayerNorm(reshape(Linear(image_embeds), [B, tokens, cross_dim]))``."""

    def __init__(self, clip_dim: int, cross_dim: int, tokens: int):
        super().__init__()
        self.tokens, self.cross_dim = tokens, cross_dim
        self.proj = nn.Linear(clip_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:  # [B, clip_dim] -> [B, tokens, cross_dim]
        return self.norm(self.proj(embeds).reshape(-1, self.tokens, self.cross_dim))


class MLPProjModel(nn.Module):
    """Full-face projection: a per-token MLP ``LN(Linear(GELU(Linear(h))))`` over all CLIP hidden states."""

    def __init__(self, clip_dim: int, cross_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(clip_dim, clip_dim), nn.GELU(), nn.Linear(clip_dim, cross_dim), nn.LayerNorm(cross_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, 257, clip_dim] -> [B, 257, cross_dim]
        return self.proj(hidden)


class PerceiverAttention(nn.Module):
    """Latents attend to ``concat(features, latents)`` (Flamingo-style perceiver block)."""

    def __init__(self, dim: int, heads: int, dim_head: int = RESAMPLER_DIM_HEAD):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=1)).chunk(2, dim=-1)
        return self.to_out(attention(q, k, v, self.heads))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    # indices 0 (LayerNorm), 1 (Linear up), 3 (Linear down) are the checkpoint keys; 2 is the GELU.
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False))


class FacePerceiverResampler(nn.Module):
    """Perceiver blocks that refine given latents over CLIP hidden states (FaceID Plus: the latents are the
    projected face-ID tokens). Keys: ``proj_in``, ``layers.{i}.{0,1}``, ``proj_out``, ``norm_out``."""

    def __init__(self, dim: int, depth: int, heads: int, embedding_dim: int, output_dim: int, ff_mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            [nn.ModuleList([PerceiverAttention(dim, heads), feed_forward(dim, ff_mult)]) for _ in range(depth)]
        )

    def forward(self, latents: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(hidden)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class Resampler(FacePerceiverResampler):
    """Plus projection: learned latent queries refined by ``depth`` perceiver blocks over CLIP hidden states
    (also FaceID Portrait unnorm, over a one-token sequence holding the raw ArcFace embedding)."""

    def __init__(self, dim: int, depth: int, heads: int, num_queries: int, embedding_dim: int, output_dim: int, ff_mult: int = 4):
        super().__init__(dim, depth, heads, embedding_dim, output_dim, ff_mult)
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, seq, embedding_dim] -> [B, queries, output_dim]
        return super().forward(self.latents.expand(hidden.shape[0], -1, -1), hidden)


def _id_mlp(id_dim: int, cross_dim: int, tokens: int, hidden: int) -> nn.Sequential:
    # keys proj.0 / proj.2 (proj.1 is the GELU): Linear(512 -> 1024) -> GELU -> Linear(1024 -> tokens * cross)
    return nn.Sequential(nn.Linear(id_dim, hidden), nn.GELU(), nn.Linear(hidden, tokens * cross_dim))


class FaceIDProjModel(nn.Module):
    """FaceID / FaceID Portrait projection: ``LN(reshape(MLP(arcface), [B, tokens, cross_dim]))``."""

    def __init__(self, id_dim: int, cross_dim: int, tokens: int, hidden: int):
        super().__init__()
        self.tokens, self.cross_dim = tokens, cross_dim
        self.proj = _id_mlp(id_dim, cross_dim, tokens, hidden)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, 512] -> [B, tokens, cross_dim]
        return self.norm(self.proj(ids).reshape(-1, self.tokens, self.cross_dim))


class FaceIDPlusProjModel(FaceIDProjModel):
    """FaceID Plus (v1, v2): ID tokens refined by a perceiver over the CLIP hidden states of the aligned face;
    v2 adds the ID tokens back: ``out = x + shortcut_scale * perceiver(x, clip)``."""

    def __init__(self, id_dim: int, cross_dim: int, tokens: int, hidden: int, depth: int, heads: int, embedding_dim: int, ff_mult: int = 4):
        super().__init__(id_dim, cross_dim, tokens, hidden)
        self.perceiver_resampler = FacePerceiverResampler(cross_dim, depth, heads, embedding_dim, cross_dim, ff_mult)

    def forward(self, ids: torch.Tensor, clip: torch.Tensor, shortcut_scale: float | None = None) -> torch.Tensor:
        x = super().forward(ids)
        out = self.perceiver_resampler(x, clip)
        return out if shortcut_scale is None else x + shortcut_scale * out


# ---------------------------------------------------------------------------------------------------------------
# The family registry: what each adapter family takes and how its projection is called. Detection, the nodes and
# the error messages read these entries; a new family is one entry here plus its key pattern in detect_family.


def _project_clip(proj: nn.Module, features: torch.Tensor, clip, shortcut) -> torch.Tensor:
    return proj(features)  # CLIP image_embeds [N, C] or hidden states [N, 257, C]


def _project_face(proj: nn.Module, ids: torch.Tensor, clip, shortcut) -> torch.Tensor:
    return proj(ids)  # ArcFace [N, 512]


def _project_face_sequence(proj: nn.Module, ids: torch.Tensor, clip, shortcut) -> torch.Tensor:
    return proj(ids[:, None])  # each face is a one-token sequence for the Resampler


def _project_face_and_crop(proj: nn.Module, ids: torch.Tensor, clip: torch.Tensor, shortcut) -> torch.Tensor:
    return proj(ids, clip, shortcut)  # ArcFace + CLIP hidden states of the aligned face crop


@dataclass(frozen=True)
class Family:
    """One IP-Adapter family, declared once."""

    name: str
    description: str
    projection: type[nn.Module]  # built from AdapterSpec.proj_config
    project: Callable[..., torch.Tensor]  # (projection, features, clip, shortcut) -> tokens [N, T, cross_dim]
    clip_feature: str | None  # CLIP vision output it takes: "image_embeds", "penultimate" (hidden states) or None
    face_embedding: str | None = None  # ArcFace embedding it was trained on: "normed", "raw"; None: not a FaceID family
    clip_of_face_crop: bool = False  # the CLIP input is the aligned face crop (FaceID Plus), not the reference image
    shortcut_versions: bool = False  # v1 / v2 files share one layout; v2 adds the ID tokens back (FaceID Plus)
    trained_with_lora: bool = False  # released with a companion LoRA (h94/IP-Adapter-FaceID *_lora.safetensors)
    face_pack: str | None = None  # the insightface pack its ArcFace embeddings came from in training
    # The unconditional reference without a negative image: "zeros" (zero embeddings, the official base adapters),
    # "blank" (the encoding of an all-zero normalized pixel tensor: Plus, Full-face), "black image" (the encoding of
    # a black image, x-flux ``xflux_pipeline.py`` ``neg_image_prompt = np.zeros(...)``).
    negative: str = "zeros"

    @property
    def is_faceid(self) -> bool:
        return self.face_embedding is not None


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("base", "IP-Adapter (base / light / vit-G)", ImageProjModel, _project_clip, "image_embeds"),
    Family("plus", "IP-Adapter Plus (Plus, Plus-face, composition)", Resampler, _project_clip, "penultimate", negative="blank"),
    Family("full-face", "IP-Adapter Full-face", MLPProjModel, _project_clip, "penultimate", negative="blank"),
    # insightface ``normed_embedding`` (h94/IP-Adapter-FaceID model card), trained with a LoRA
    Family("faceid", "IP-Adapter FaceID", FaceIDProjModel, _project_face, None, face_embedding="normed",
           trained_with_lora=True, face_pack=FACEID_PACK),
    # the FaceID MLP with PORTRAIT_TOKENS tokens, no LoRA (ip-adapter-faceid-portrait-v11_sd15, -portrait_sdxl)
    Family("faceid-portrait", "IP-Adapter FaceID Portrait", FaceIDProjModel, _project_face, None,
           face_embedding="normed", face_pack=FACEID_PACK),
    Family("faceid-plus", "IP-Adapter FaceID Plus (v1 / v2)", FaceIDPlusProjModel, _project_face_and_crop,
           "penultimate", face_embedding="normed", clip_of_face_crop=True, shortcut_versions=True,
           trained_with_lora=True, face_pack=FACEID_PACK, negative="blank"),
    # a Resampler over the raw ArcFace ``embedding`` (ComfyUI_IPAdapter_plus feeds it one raw embedding per image)
    Family("faceid-portrait-unnorm", "IP-Adapter FaceID Portrait unnorm", Resampler, _project_face_sequence, None,
           face_embedding="raw", face_pack=FACEID_PACK),
    # XLabs-AI/flux-ip-adapter (v1: 4 tokens) and -v2 (16 tokens): the base projection of CLIP ViT-L/14 image_embeds
    # (x-flux ``ImageProjModel(4096, 768, 4)``), K / V per double block
    Family("xlabs-flux", "IP-Adapter for Flux by XLabs (v1 / v2)", ImageProjModel, _project_clip, "image_embeds",
           negative="black image"),
)}


# ---------------------------------------------------------------------------------------------------------------
# Family detection


@dataclass(frozen=True)
class AdapterSpec:
    """What a checkpoint is, read from its keys and shapes."""

    family: str  # a key of FAMILIES
    layout: str  # "sd15" | "sdxl"
    cross_dim: int  # text/image token width the UNet's to_k/to_v take (768 SD1.5, 2048 SDXL)
    clip_dim: int  # width of the CLIP feature the projection takes (0: none)
    tokens: int  # image tokens per reference image (0: one per CLIP token, full-face)
    widths: tuple[int, ...]  # layer width per adapter index
    proj_config: dict[str, int] = field(default_factory=dict, compare=False)
    id_dim: int = 0  # ArcFace embedding width of FaceID families (512)
    has_lora: bool = False  # the file carries the FaceID LoRA (to_q_lora ...) next to the image layers

    @property
    def info(self) -> Family:
        return FAMILIES[self.family]

    @property
    def feature(self) -> str | None:
        return self.info.clip_feature

    @property
    def is_faceid(self) -> bool:
        return self.info.is_faceid

    @property
    def expected_clip_vision(self) -> str:
        return CLIP_VISION_BY_WIDTH.get((self.feature, self.clip_dim), f"a CLIP vision model whose {self.feature} width is {self.clip_dim}")

    @property
    def name(self) -> str:
        return self.info.description

    def describe(self) -> str:
        inputs = f"CLIP {self.feature} width {self.clip_dim}" if self.feature else ""
        if self.is_faceid:
            inputs = f"ArcFace {self.info.face_embedding} embedding" + (f" + {inputs}" if inputs else "")
        return f"{self.name} for {LAYOUT_NAMES[self.layout]} ({len(self.widths)} layers, cross-attention width {self.cross_dim}, {inputs})"


# What to load instead, per layout, in the pairing errors.
EXAMPLE_FILES = {"sd15": "ip-adapter_sd15.safetensors", "sdxl": "ip-adapter_sdxl_vit-h.safetensors"}


def check_model(spec: AdapterSpec, transformers: list[Transformer], sites: list[Site], context_dim: int) -> None:
    """Raise unless the adapter was made for a UNet with these transformers, sites and context width (what a host
    found in its model), saying what was found and what to load instead."""
    check_sites("IP-Adapter", spec.layout, spec.widths, spec.cross_dim, transformers, sites, context_dim, EXAMPLE_FILES)


def _require(sd: dict[str, torch.Tensor], key: str, what: str, prefix: str = "image_proj.") -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{what}: key {prefix}{key} is missing; the file is incomplete or not an IP-Adapter")
    return sd[key]


# Dimensions of the image_proj tensors whose shapes detection reads (also under "perceiver_resampler."): any other
# layout is a damaged file, refused with its key instead of failing on a shape later.
DETECTION_NDIM = {"proj.weight": 2, "proj.0.weight": 2, "proj.2.weight": 2, "proj.3.weight": 1, "norm.weight": 1,
                  "latents": 3, "proj_in.weight": 2, "proj_out.weight": 2, "layers.0.0.to_q.weight": 2,
                  "layers.0.1.1.weight": 2}


def _check_detection_shapes(image_proj: dict[str, torch.Tensor]) -> None:
    for key, t in image_proj.items():
        expected = DETECTION_NDIM.get(key.removeprefix("perceiver_resampler."))
        if expected is not None and (t.ndim != expected or 0 in t.shape):
            raise CheckpointError(f"image_proj.{key} has shape {tuple(t.shape)}, expected {expected} non-empty "
                                  "dimensions; the file is damaged or not an IP-Adapter")


def _layer_index(key: str) -> int:
    head = key.split(".")[0]
    if not head.isdigit():
        raise CheckpointError(f"ip_adapter key {key!r}: the layers of an IP-Adapter are numbered (1.to_k_ip.weight, ...)")
    return int(head)


def _perceiver_config(sd: dict[str, torch.Tensor], prefix: str, what: str) -> dict[str, int]:
    """dim/depth/heads/embedding_dim/output_dim/ff_mult of a perceiver stack stored under ``prefix``."""
    proj_in = _require(sd, prefix + "proj_in.weight", what)
    dim = int(proj_in.shape[0])
    inner = int(_require(sd, prefix + "layers.0.0.to_q.weight", what).shape[0])
    if inner % RESAMPLER_DIM_HEAD:
        raise CheckpointError(f"{what}: perceiver attention width {inner} is not a multiple of {RESAMPLER_DIM_HEAD}")
    depth = len({k[len(prefix):].split(".")[1] for k in sd if k.startswith(prefix + "layers.")})
    return dict(dim=dim, depth=depth, heads=inner // RESAMPLER_DIM_HEAD, embedding_dim=int(proj_in.shape[1]),
                output_dim=int(_require(sd, prefix + "proj_out.weight", what).shape[0]),
                ff_mult=int(_require(sd, prefix + "layers.0.1.1.weight", what).shape[0]) // dim)


def detect_family(image_proj: dict[str, torch.Tensor], ip_adapter: dict[str, torch.Tensor]) -> AdapterSpec:
    """Read the adapter family and target model from keys and shapes."""
    if not image_proj or not ip_adapter:
        raise CheckpointError(
            "not an IP-Adapter checkpoint: expected the parts image_proj.* and ip_adapter.* "
            f"(found {len(image_proj)} image_proj and {len(ip_adapter)} ip_adapter keys)"
        )
    has_lora = any("_lora." in k for k in ip_adapter)
    _check_detection_shapes(image_proj)

    # Layers: 1.to_k_ip, 3.to_k_ip, ... contiguous.
    idx = sorted(_layer_index(k) for k in ip_adapter if k.endswith(".to_k_ip.weight"))
    if not idx or idx != list(range(1, 2 * len(idx), 2)):
        raise CheckpointError(f"ip_adapter layers are not numbered 1, 3, 5, ...: found {idx[:6]}{'...' if len(idx) > 6 else ''}")
    for i in idx:
        if f"{i}.to_v_ip.weight" not in ip_adapter:
            raise CheckpointError(f"ip_adapter.{i}.to_v_ip.weight is missing")
        for name in ("to_k_ip", "to_v_ip"):
            w = ip_adapter[f"{i}.{name}.weight"]
            if w.ndim != 2 or 0 in w.shape:
                raise CheckpointError(f"ip_adapter.{i}.{name}.weight has shape {tuple(w.shape)}, expected a matrix; the "
                                      "file is damaged or not an IP-Adapter")
    widths = tuple(int(ip_adapter[f"{i}.to_k_ip.weight"].shape[0]) for i in idx)
    cross_dim = int(ip_adapter["1.to_k_ip.weight"].shape[1])
    layout = LAYOUTS.get(len(idx))
    if layout is None:
        raise CheckpointError(f"IP-Adapter with {len(idx)} cross-attention layers: only SD1.5 (16) and SDXL (70) layouts exist")

    id_dim = 0
    if "perceiver_resampler.proj_in.weight" in image_proj:
        id_dim = int(_require(image_proj, "proj.0.weight", "FaceID Plus").shape[1])
        out_dim = int(_require(image_proj, "norm.weight", "FaceID Plus").shape[0])
        per = _perceiver_config(image_proj, "perceiver_resampler.", "FaceID Plus")
        if per["dim"] != out_dim or per["output_dim"] != out_dim:
            raise CheckpointError(f"FaceID Plus perceiver width {per['dim']}/{per['output_dim']} differs from the ID tokens' {out_dim}")
        tokens = int(_require(image_proj, "proj.2.weight", "FaceID Plus").shape[0]) // out_dim
        cfg = dict(id_dim=id_dim, cross_dim=out_dim, tokens=tokens, hidden=int(image_proj["proj.0.weight"].shape[0]),
                   depth=per["depth"], heads=per["heads"], embedding_dim=per["embedding_dim"], ff_mult=per["ff_mult"])
        family, clip_dim = "faceid-plus", per["embedding_dim"]
    elif "latents" in image_proj:
        cfg = _perceiver_config(image_proj, "", "Plus")
        cfg["num_queries"] = tokens = int(image_proj["latents"].shape[1])
        out_dim = cfg["output_dim"]
        if cfg["embedding_dim"] == ARCFACE_DIM:  # a Resampler over the ArcFace embedding: Portrait unnorm
            family, clip_dim, id_dim = "faceid-portrait-unnorm", 0, ARCFACE_DIM
        else:
            family, clip_dim = "plus", cfg["embedding_dim"]
    elif "proj.3.weight" in image_proj:
        clip_dim = int(image_proj["proj.0.weight"].shape[1])
        out_dim = int(_require(image_proj, "proj.2.weight", "Full-face").shape[0])
        family, tokens, cfg = "full-face", 0, dict(clip_dim=clip_dim, cross_dim=out_dim)
    elif "proj.weight" in image_proj:
        proj = image_proj["proj.weight"]
        out_dim = int(_require(image_proj, "norm.weight", "IP-Adapter").shape[0])
        clip_dim = int(proj.shape[1])
        if proj.shape[0] % out_dim:
            raise CheckpointError(f"image_proj.proj.weight {tuple(proj.shape)} is not a multiple of the token width {out_dim}")
        tokens = int(proj.shape[0]) // out_dim
        family, cfg = "base", dict(clip_dim=clip_dim, cross_dim=out_dim, tokens=tokens)
    elif "proj.0.weight" in image_proj and "proj.2.weight" in image_proj:
        id_dim = int(image_proj["proj.0.weight"].shape[1])
        out_dim = int(_require(image_proj, "norm.weight", "FaceID").shape[0])
        tokens = int(image_proj["proj.2.weight"].shape[0]) // out_dim
        family, clip_dim = ("faceid-portrait" if tokens == PORTRAIT_TOKENS else "faceid"), 0
        cfg = dict(id_dim=id_dim, cross_dim=out_dim, tokens=tokens, hidden=int(image_proj["proj.0.weight"].shape[0]))
    else:
        raise CheckpointError("unknown image_proj layout (keys: " + ", ".join(sorted(image_proj)[:8]) + ")")
    if out_dim != cross_dim:
        raise CheckpointError(f"image_proj outputs width {out_dim} but the ip_adapter layers take {cross_dim}")
    return AdapterSpec(family, layout, cross_dim, clip_dim, tokens, widths, cfg, id_dim, has_lora)


# ---------------------------------------------------------------------------------------------------------------
# The adapter module


class IPLayer(nn.Module):
    """The image K/V projections of one cross-attention site (``W'_k``, ``W'_v`` in the paper)."""

    def __init__(self, cross_dim: int, width: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, width, bias=False)
        self.to_v_ip = nn.Linear(cross_dim, width, bias=False)


class IPAdapterModel(nn.Module):
    """Projection model + per-site image K/V weights, built from a spec and loaded from an official state dict."""

    def __init__(self, spec: AdapterSpec):
        super().__init__()
        self.spec = spec
        self.image_proj = spec.info.projection(**spec.proj_config)
        self.ip_layers = nn.ModuleList([IPLayer(spec.cross_dim, w) for w in spec.widths])

    @classmethod
    def from_parts(cls, image_proj: dict[str, torch.Tensor], ip_adapter: dict[str, torch.Tensor]) -> IPAdapterModel:
        spec = detect_family(image_proj, ip_adapter)
        with torch.device("meta"):
            model = cls(spec)
        file_keys = {f"{k}.{name}.weight": f"{2 * k + 1}.{name}.weight"
                     for k in range(len(spec.widths)) for name in ("to_k_ip", "to_v_ip")}
        layers = {own: ip_adapter[key] for own, key in file_keys.items()}
        check_weights(image_proj, "image_proj.")
        check_weights(dict(zip(file_keys.values(), layers.values())), "ip_adapter.")
        load_exact(model.image_proj, image_proj, "image_proj", assign=True)
        load_exact(model.ip_layers, layers, "ip_adapter", file_keys, assign=True)
        return model.float()

    def project(self, features: torch.Tensor, clip: torch.Tensor | None = None, shortcut_scale: float | None = None) -> torch.Tensor:
        """Reference features -> image tokens ``[N, T, cross_dim]``.

        ``features``: CLIP features (``[N, clip_dim]`` or ``[N, 257, clip_dim]``), or for FaceID families ArcFace
        embeddings ``[N, 512]``; ``clip``: FaceID Plus only, the CLIP hidden states of the aligned faces;
        ``shortcut_scale``: FaceID Plus v2's weight of the ID tokens added back (None: v1, no shortcut).
        """
        spec, family = self.spec, self.spec.info
        p = next(self.image_proj.parameters())
        if family.is_faceid:
            if features.ndim != 2 or features.shape[-1] != spec.id_dim:
                raise ValueError(f"{spec.name} takes ArcFace embeddings of width {spec.id_dim}, got shape {tuple(features.shape)}")
            if family.clip_of_face_crop:
                if clip is None or clip.ndim != 3 or clip.shape[-1] != spec.clip_dim or clip.shape[0] != features.shape[0]:
                    raise ValueError(f"{spec.name} needs the CLIP penultimate hidden states (width {spec.clip_dim}) of each "
                                     f"face crop, got {None if clip is None else tuple(clip.shape)}: use {spec.expected_clip_vision}")
                clip = clip.to(p.device, p.dtype)
        else:
            expected_rank = 2 if spec.feature == "image_embeds" else 3
            if features.ndim != expected_rank or features.shape[-1] != spec.clip_dim:
                raise ValueError(
                    f"{spec.describe()} takes CLIP {spec.feature} of width {spec.clip_dim}, got a tensor of "
                    f"shape {tuple(features.shape)}: use {spec.expected_clip_vision}"
                )
        return family.project(self.image_proj, features.to(p.device, p.dtype), clip, shortcut_scale)


# ---------------------------------------------------------------------------------------------------------------
# Reference-image embeddings

COMBINE_METHODS = ("concat", "average", "norm average")


def combine_features(features: torch.Tensor, method: str) -> torch.Tensor:
    """Combine N reference images' CLIP features before projection (``average``, ``norm average``).

    ``norm average`` averages the per-image unit vectors (over the feature axis) and gives the result the mean
    norm of the inputs, so that no image dominates by magnitude while the scale stays in distribution.
    ``concat`` keeps the images apart: it is done on the projected tokens, see :func:`project_images`.
    """
    if method == "concat" or features.shape[0] == 1:
        return features
    if method == "average":
        return features.mean(dim=0, keepdim=True)
    if method == "norm average":
        norms = features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return (features / norms).mean(dim=0, keepdim=True) * norms.mean(dim=0, keepdim=True)
    raise ValueError(f"unknown combine method {method!r}; expected one of {COMBINE_METHODS}")


def project_images(
    adapter: IPAdapterModel,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    method: str,
    clip: tuple[torch.Tensor, torch.Tensor] | None = None,
    shortcut_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project N reference images into one set of tokens ``[1, T', cross_dim]`` for cond and uncond.

    ``concat`` projects each image and concatenates the tokens along the token axis (T' = N*T), explicitly.
    ``uncond`` has 1 or N rows (one negative for all, or one per image). ``clip`` (FaceID Plus) pairs CLIP
    hidden states with the rows of ``cond`` and ``uncond``.
    """
    n = cond.shape[0]
    if n == 0:
        raise ValueError("no reference image: the image batch is empty")
    if uncond.shape[0] not in (1, n):
        raise ValueError(f"{uncond.shape[0]} negative images for {n} reference images: give 1 or {n}")
    clip_c, clip_u = clip if clip is not None else (None, None)
    if method != "concat":
        if clip is not None:
            clip_c, clip_u = combine_features(clip_c, method), combine_features(clip_u, method)
        cond, uncond = combine_features(cond, method), combine_features(uncond, method)
        return adapter.project(cond, clip_c, shortcut_scale), adapter.project(uncond, clip_u, shortcut_scale)
    tok_c = adapter.project(cond, clip_c, shortcut_scale)
    tok_u = adapter.project(uncond, clip_u, shortcut_scale).expand(n, -1, -1)
    return tok_c.reshape(1, -1, tok_c.shape[-1]), tok_u.reshape(1, -1, tok_u.shape[-1])


# The Combine Embeds node's methods, with ComfyUI_IPAdapter_plus' semantics (``IPAdapterCombineEmbeds``: every
# input's rows are stacked, then reduced over the rows): add = sum, subtract = first row - mean of the others,
# average = mean, norm average = mean of the rows divided by their norm over the rows (dim 0, as that node does; not
# the per-image normalisation of the Apply nodes' "norm average"), max / min = element-wise over the rows.
EMBEDS_COMBINE_METHODS = ("concat", "add", "subtract", "average", "norm average", "max", "min")


def combine_rows(rows: torch.Tensor, method: str) -> torch.Tensor:
    """Reduce stacked embeds ``[N, ...]`` to ``[1, ...]`` (``concat``: unchanged) by ``method``."""
    if method == "concat":
        return rows
    if method == "add":
        out = rows.sum(dim=0)
    elif method == "subtract":
        if rows.shape[0] < 2:
            raise ValueError("'subtract' needs at least two embeds rows (the first minus the mean of the others)")
        out = rows[0] - rows[1:].mean(dim=0)
    elif method == "average":
        out = rows.mean(dim=0)
    elif method == "norm average":
        out = torch.nan_to_num(rows / rows.norm(dim=0, keepdim=True)).mean(dim=0)  # zero columns (a zero uncond) stay 0
    elif method == "max":
        out = rows.max(dim=0).values
    elif method == "min":
        out = rows.min(dim=0).values
    else:
        raise ValueError(f"unknown combine method {method!r}; expected one of {EMBEDS_COMBINE_METHODS}")
    return out.unsqueeze(0)


# ---------------------------------------------------------------------------------------------------------------
# One application of an adapter to a model, host-free


class IPAdapterPatch(TokenPatch):
    """Everything one Apply node adds to a model, independent of the host (the :class:`~.attention.SitePatch`
    protocol; the shared token / row / mask handling is :class:`~.attention.TokenPatch`'s).

    ``site_weights`` maps adapter index -> (weight, token set). Sites missing from it (or with weight 0) are skipped.
    The token sets (models/layers.py): ``MAIN`` the reference, ``ALT`` the second image of "style and composition"
    (``alt``), ``NEGATED`` the reference as a negative (zero tokens in the cond rows, the reference in the uncond
    rows: the "precise" weight types). ``unfold``: one token set per reference, reference i for latent i.
    """

    def __init__(
        self,
        adapter: IPAdapterModel,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        site_weights: dict[int, tuple[float, bool | str]],
        scaling: str = "V only",
        alt: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        unfold: bool = False,
    ):
        tokens = {MAIN: (cond, uncond), **({ALT: alt} if alt is not None else {})}
        if any(key == NEGATED for _, key in site_weights.values()):
            tokens[NEGATED] = (torch.zeros_like(cond), cond)
        super().__init__(tokens, mask, unfold)
        self.adapter = adapter
        self.site_weights = {k: v for k, v in site_weights.items() if v[0] != 0.0}
        self.scaling = scaling

    def active(self, index: int) -> bool:
        return index in self.site_weights

    def delta(self, index: int, q: torch.Tensor, out: torch.Tensor | None, call: SiteCall) -> torch.Tensor | None:
        """The image-attention term of one site (``out`` is not used: IP-Adapter adds its branch as it is)."""
        wt = self.site_weights.get(index)
        if wt is None:
            return None
        weight, key = wt
        layer = self.adapter.ip_layers[index]
        tokens = self.stacked_tokens(key, q.device, q.dtype)
        wk, wv = layer.to_k_ip.weight, layer.to_v_ip.weight
        if wk.device != q.device or wk.dtype != q.dtype:  # only when the host did not load the adapter for us
            wk, wv = wk.to(q.device, q.dtype), wv.to(q.device, q.dtype)
        batch = q.shape[0] // len(call.chunks)
        ip_k = self.rows(key, F.linear(tokens, wk), call.chunks, batch, call.frames)  # [2, T, width] -> [B, T, width]
        ip_v = self.rows(key, F.linear(tokens, wv), call.chunks, batch, call.frames)
        return self.masked(ip_attention(q, ip_k, ip_v, call.heads, weight, self.scaling, call.attn), call)


# ---------------------------------------------------------------------------------------------------------------
# XLabs IP-Adapter for Flux (XLabs-AI/flux-ip-adapter ``ip_adapter.safetensors``, -v2 the same layout with 16 tokens):
# ``ip_adapter_proj_model.{proj,norm}.*`` and ``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*``

XLABS_PARTS = {"image_proj": ("ip_adapter_proj_model.",), "blocks": ("double_blocks.",)}
XLABS_LAYER_KEYS = ("ip_adapter_double_stream_k_proj", "ip_adapter_double_stream_v_proj")


def is_xlabs_flux(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(XLABS_PARTS["blocks"]) and ".processor.ip_adapter_double_stream_" in k for k in sd)


def detect_xlabs(image_proj: dict[str, torch.Tensor], blocks: dict[str, torch.Tensor]) -> AdapterSpec:
    """Layout of an XLabs Flux adapter from keys and shapes: tokens = ``proj.weight.shape[0] / norm width`` (x-flux-comfyui
    reads it the same way), one K / V pair per double block."""
    proj = _require(image_proj, "proj.weight", "XLabs IP-Adapter", XLABS_PARTS["image_proj"][0])
    cross_dim = int(_require(image_proj, "norm.weight", "XLabs IP-Adapter", XLABS_PARTS["image_proj"][0]).shape[0])
    if proj.ndim != 2 or proj.shape[0] % cross_dim:
        raise CheckpointError(f"ip_adapter_proj_model.proj.weight {tuple(proj.shape)} is not a multiple of the token width {cross_dim}")
    index = sorted({int(k.split(".")[0]) for k in blocks if k.split(".")[0].isdigit()})
    if not index or index != list(range(len(index))):
        raise CheckpointError(f"XLabs IP-Adapter double blocks are not numbered 0, 1, 2, ...: found {index[:6]}")
    widths = []
    for i in index:
        for name in XLABS_LAYER_KEYS:
            for part, ndim in (("weight", 2), ("bias", 1)):
                t = blocks.get(f"{i}.processor.{name}.{part}")
                if t is None or t.ndim != ndim:
                    raise CheckpointError(f"double_blocks.{i}.processor.{name}.{part} is missing or not a {ndim}-d tensor")
            w = blocks[f"{i}.processor.{name}.weight"]
            if w.shape[1] != cross_dim:
                raise CheckpointError(f"double_blocks.{i}.processor.{name}.weight takes width {w.shape[1]}, the tokens are {cross_dim}")
        widths.append(int(blocks[f"{i}.processor.{XLABS_LAYER_KEYS[0]}.weight"].shape[0]))
    tokens, clip_dim = int(proj.shape[0]) // cross_dim, int(proj.shape[1])
    return AdapterSpec("xlabs-flux", "flux", cross_dim, clip_dim, tokens, tuple(widths),
                       dict(clip_dim=clip_dim, cross_dim=cross_dim, tokens=tokens))


class XLabsLayer(nn.Module):
    """The image K / V projections of one double block (with bias, zero-initialised in training)."""

    def __init__(self, cross_dim: int, width: int):
        super().__init__()
        self.ip_adapter_double_stream_k_proj = nn.Linear(cross_dim, width)
        self.ip_adapter_double_stream_v_proj = nn.Linear(cross_dim, width)


class XLabsAdapterModel(nn.Module):
    """The projection and the per-double-block K / V layers of an XLabs Flux adapter (``project`` as
    :class:`IPAdapterModel`'s, so the combine methods and the embeds work the same)."""

    def __init__(self, spec: AdapterSpec):
        super().__init__()
        self.spec = spec
        self.image_proj = ImageProjModel(**spec.proj_config)
        self.blocks = nn.ModuleList([XLabsLayer(spec.cross_dim, w) for w in spec.widths])

    @classmethod
    def from_parts(cls, image_proj: dict[str, torch.Tensor], blocks: dict[str, torch.Tensor]) -> XLabsAdapterModel:
        spec = detect_xlabs(image_proj, blocks)
        with torch.device("meta"):
            model = cls(spec)
        file_keys = {f"{i}.{name}.{part}": f"{i}.processor.{name}.{part}" for i in range(len(spec.widths))
                     for name in XLABS_LAYER_KEYS for part in ("weight", "bias")}
        check_weights(image_proj, "ip_adapter_proj_model.")
        check_weights(blocks, "double_blocks.")
        load_exact(model.image_proj, image_proj, "ip_adapter_proj_model", assign=True)
        load_exact(model.blocks, {own: blocks[key] for own, key in file_keys.items()}, "double_blocks", file_keys, assign=True)
        return model.float()

    def project(self, features: torch.Tensor, clip=None, shortcut_scale=None) -> torch.Tensor:
        spec = self.spec
        if features.ndim != 2 or features.shape[-1] != spec.clip_dim:
            raise ValueError(f"{spec.describe()} takes CLIP image_embeds of width {spec.clip_dim}, got a tensor of shape "
                             f"{tuple(features.shape)}: use {spec.expected_clip_vision}")
        p = next(self.image_proj.parameters())
        return self.image_proj(features.to(p.device, p.dtype))


def load_adapter(path: str) -> IPAdapterModel | XLabsAdapterModel:
    """An IP-Adapter of any family, told apart by its keys (XLabs Flux files, or the SD1.5 / SDXL families)."""
    sd = load_file(path)
    try:
        if is_xlabs_flux(sd):
            parts = split_prefixes(sd, XLABS_PARTS)
            return XLabsAdapterModel.from_parts(parts["image_proj"], parts["blocks"])
        parts = split_prefixes(sd, CHECKPOINT_PARTS)
        return IPAdapterModel.from_parts(parts["image_proj"], parts["ip_adapter"])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e


class XLabsPatch(TokenPatch):
    """One Apply node's XLabs adapter on a Flux model (the :class:`~.dit.BlockPatch` protocol): after every double
    block, ``img + weight * SDPA(img_q, K_ip, V_ip)`` with the block's own image query of its input (x-flux
    ``IPDoubleStreamBlockProcessor``); the cond rows attend to the reference's tokens, the uncond rows to the
    negative's (not the batch mean x-flux-comfyui takes); limited to ``mask``."""

    uses_query = True

    def __init__(self, adapter: XLabsAdapterModel, cond: torch.Tensor, uncond: torch.Tensor, weight: float,
                 mask: torch.Tensor | None = None):
        super().__init__({False: (cond, uncond)}, mask)
        self.adapter, self.weight = adapter, float(weight)

    def sites(self) -> set[tuple[str, int]]:
        return {("double", i) for i in range(len(self.adapter.blocks))} if self.weight != 0.0 else set()

    def delta(self, call, img: torch.Tensor) -> torch.Tensor | None:
        if call.kind != "double" or not 0 <= call.index < len(self.adapter.blocks) or self.weight == 0.0:
            return None
        layer = self.adapter.blocks[call.index]
        q = call.query
        b, heads, _, d = q.shape
        p = layer.ip_adapter_double_stream_k_proj.weight
        tokens = self.stacked_tokens(False, p.device, p.dtype)  # [2, T, C]
        k = self.batch_rows(layer.ip_adapter_double_stream_k_proj(tokens), call.chunks, b // len(call.chunks))
        v = self.batch_rows(layer.ip_adapter_double_stream_v_proj(tokens), call.chunks, b // len(call.chunks))
        k, v = (t.to(q.dtype).reshape(b, -1, heads, d).transpose(1, 2) for t in (k, v))
        out = self.weight * call.attn(q, k, v)  # [B, L, heads * d]
        if self.mask is not None and call.grid is not None:
            out = out * self.resized_mask(tuple(call.grid), b // len(call.chunks), call.chunks, out.device, out.dtype)
        return out.to(img.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Embeddings passed between nodes and saved to disk

EMBEDS_FORMAT = "personalize.ipadapter.embeds/1"


@dataclass
class IPAEmbeds:
    """CLIP features of the reference images (not yet projected, so any adapter of the same CLIP kind can use
    them): ``cond`` ``[N, ...]``, ``uncond`` ``[1 or N, ...]``, ``feature`` "image_embeds" | "penultimate"."""

    cond: torch.Tensor
    uncond: torch.Tensor
    feature: str

    def __post_init__(self):
        if self.feature not in ("image_embeds", "penultimate"):
            raise ValueError(f"unknown CLIP feature {self.feature!r}")
        rank = 2 if self.feature == "image_embeds" else 3
        for name, t in (("cond", self.cond), ("uncond", self.uncond)):
            if t.ndim != rank:
                raise ValueError(f"the embeds' {name} has shape {tuple(t.shape)}; CLIP {self.feature} are {rank}-D "
                                 f"({'images, width' if rank == 2 else 'images, tokens, width'})")
        if self.cond.shape[0] == 0:
            raise ValueError("the embeds hold no image")
        if self.cond.shape[1:] != self.uncond.shape[1:]:
            raise ValueError(f"cond {tuple(self.cond.shape)} and uncond {tuple(self.uncond.shape)} embeds differ in shape")

    @property
    def width(self) -> int:
        return int(self.cond.shape[-1])

    def check_for(self, spec: AdapterSpec) -> None:
        if self.feature != spec.feature or self.width != spec.clip_dim:
            raise ValueError(
                f"these embeds are CLIP {self.feature} of width {self.width}, but {spec.describe()} needs "
                f"{spec.feature} of width {spec.clip_dim}: encode with {spec.expected_clip_vision}"
            )

    def save(self, path: str) -> str:
        from .checkpoints import atomic_save_safetensors

        return atomic_save_safetensors({"cond": self.cond.float(), "uncond": self.uncond.float()}, path,
                                       {"format": EMBEDS_FORMAT, "feature": self.feature})

    @classmethod
    def load(cls, path: str) -> IPAEmbeds:
        from safetensors import safe_open

        if not path.lower().endswith(".safetensors"):
            raise CheckpointError(f"{path}: embeds are stored as .safetensors")
        data = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != EMBEDS_FORMAT or "cond" not in data or "uncond" not in data:
            raise CheckpointError(f"{path} is not an IP-Adapter embeds file saved by this pack (format {meta.get('format')!r})")
        for key in ("cond", "uncond"):
            if not bool(torch.isfinite(data[key]).all()):
                raise CheckpointError(f"{path}: {key} holds NaN or Inf values; the file is damaged")
        try:
            return cls(data["cond"], data["uncond"], meta.get("feature", ""))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e

