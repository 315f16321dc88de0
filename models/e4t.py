"""E4T (Gal et al. 2023, "Encoder-based Domain Tuning for Fast Personalization of Text-to-Image Models") as the only
public weights were trained: mkshing/e4t-diffusion (unofficial; SD1.x; the face model ``e4t-diffusion-ffhq-celebahq-v1``).

The design those weights need, which differs from the paper in places (kept, since the weights were trained so):

- **Encoder inputs.** The OpenCLIP ViT-H-14 image tower without its projection: the pooled output (``ln_post`` of
  the class token) and every second *patch token* of the last layer, without ``ln_post`` (open_clip before v2.23,
  current when the weights were trained), 1 + 256 / 2 = 129 vectors. The paper takes the class token of every
  second *layer*.
- **UNet features.** A separate UNet pass on the same noisy latent and timestep with the empty prompt; the outputs of
  the input blocks and the middle block (diffusers' ``down_block_res_samples + (mid,)``), each averaged over space and
  concatenated (10880 channels for SD1.x).
- **Head** (:class:`E4THead`): ``u = embedder(features)``; for each of the 129 vectors ``h_i``:
  ``first_linears[i](feature_linear([h_i, u]))``; mean over i, LeakyReLU, ``final_linear`` to the word width.
- **Word embedding**: ``e = E(class word) + domain_embed_scale * enc`` in the placeholder's slot of the text
  encoder's input embeddings; recomputed at every denoising step from the current latent.
- **Weight offsets** (:class:`WeightOffsets`): ``W' = W * (1 + dW)`` on q, k, v of every self- and cross-attention
  (not the output projection); dW comes from a small generator per projection, non-zero at initialization.

Plain torch: no ComfyUI import. The ComfyUI side (feature pass, weight patches, text slot, sampler wrapper) is in
``nodes/comfy``; the diffusers side (pretraining) in ``training/e4t_diffusers.py``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import CheckpointError, atomic_save_safetensors, atomic_write_json, check_weights, load_exact, load_file

# OpenAI CLIP normalization, which open_clip's ViT-H-14 (laion2b_s32b_b79k) uses and mkshing's encoder applies
# (open_clip constants OPENAI_DATASET_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_IMAGE_SIZE = 224  # ViT-H-14 input size
# mkshing e4t/encoder.py: the pooled output plus hidden_states[:, 1::2] of the 256 patch tokens.
TOKEN_STEP = 2
# SD1.x: CLIP-L text width and the channel sum of the 12 input-block outputs and the middle block
# (4 * 320 + 3 * 640 + 6 * 1280; mkshing's encoder hard-codes 10880).
SD1_WORD_DIM = 768
SD1_FEATURE_CHANNELS = 10880
LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU default, as the reference head uses

# Defaults of mkshing's scripts (pretrain_e4t.py / tuning_e4t.py argparse defaults).
PLACEHOLDER_TOKEN = "*s"
DOMAIN_EMBED_SCALE = 0.1
LEARNING_RATE = 1.6e-5  # both scripts
BATCH_SIZE = 16  # both scripts (tuning: 16 copies of the one image)
TUNE_STEPS = 15
TUNE_REG_LAMBDA = 1e-4
PRETRAIN_REG_LAMBDA = 0.01
MAX_GRAD_NORM = 1.0  # tuning clips; pretraining does not (commented out in the reference)
PRETRAIN_STEPS = 30000  # the reference's help text for the face domain (cat 60k, art 100k)

# Prompt templates of the reference (pretrain_e4t.py ``templates`` / ``face_templates`` / ``art_templates``):
# prompts drawn per sample during pretraining and tuning; ``{placeholder_token}`` is the subject.
TEMPLATES = (
    "a photo of {placeholder_token}", "the photo of {placeholder_token}", "a photo of a {placeholder_token}",
    "a photo of the {placeholder_token}", "a photo of one {placeholder_token}",
    "a close-up photo of the {placeholder_token}", "a bright photo of the {placeholder_token}",
    "a photo of a nice {placeholder_token}", "a good photo of {placeholder_token}",
    "a photo of a cool {placeholder_token}",
)
FACE_TEMPLATES = TEMPLATES + (
    "a portrait of {placeholder_token}", "the portrait of {placeholder_token}",
    "a portrait photo of {placeholder_token}", "portrait of {placeholder_token}", "portrait of the {placeholder_token}",
    "photo realistic portrait of {placeholder_token}",
)
ART_TEMPLATES = TEMPLATES + ("art of {placeholder_token}", "art by {placeholder_token}")
TEMPLATE_SETS = {"normal": TEMPLATES, "face": FACE_TEMPLATES, "art": ART_TEMPLATES}

# File names in an E4T folder (models/e4t/<name>/): the reference's, and safetensors conversions of them.
CONFIG_FILE = "config.json"
ENCODER_STEMS, OFFSET_STEMS = ("encoder",), ("weight_offsets",)
FILE_EXTENSIONS = (".safetensors", ".pt", ".bin")
CLIP_PREFIX = "clip_vision."
# Our keys in config.json (the reference's keys are kept as they are).
OFFSETS_IN_UNET = "personalize_offsets_in_unet"  # a tuned encoder whose offsets are baked into a tuned UNet (LoRA)
CLIP_FROM = "personalize_clip_vision_from"  # folder whose encoder file holds the CLIP tower (not copied again)
UNET_LORA = "personalize_unet_lora"  # the tuned UNet's file in models/loras


# ---------------------------------------------------------------------------------------------------------------
# Weight offsets


class WeightOffsets(nn.Module):
    """dW for one projection ``Linear(in, out)``: shape ``(out, in)`` like its weight (mkshing e4t/weightoffsets.py).

    ``a = linear1(v)`` (in), ``b = linear2(v)`` (out), ``M = a b^T`` (in, out); ``linear_column`` mixes along ``in``,
    then ``linear_row`` along ``out``; the result is transposed to ``(out, in)``. Parameter names are the reference's
    (they are the checkpoint's keys)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.v = nn.Parameter(torch.ones(1))
        self.linear1 = nn.Linear(1, in_features)
        self.linear2 = nn.Linear(1, out_features)
        self.linear_column = nn.Linear(in_features, in_features)
        self.linear_row = nn.Linear(out_features, out_features)

    def forward(self) -> torch.Tensor:
        a, b = self.linear1(self.v), self.linear2(self.v)
        m = a[:, None] * b[None, :]  # (in, out)
        m = self.linear_column(m.T)  # (out, in): mixes the in axis
        return self.linear_row(m.T).T  # (in, out) mixed along out, returned as (out, in)


def apply_offset(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``W * (1 + dW)`` (mkshing e4t/models/cross_attention.py, q/k/v projections)."""
    return weight * (1 + delta.to(weight))


_OFFSET_KEY = re.compile(r"^(?P<prefix>.+\.attn[12])\.wo_(?P<proj>[qkv])\.(?P<param>v|(?:linear1|linear2|linear_column|"
                         r"linear_row)\.(?:weight|bias))$")
OFFSET_PARAMS = ("v", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias", "linear_column.weight",
                 "linear_column.bias", "linear_row.weight", "linear_row.bias")


def offset_target(key: str) -> tuple[str, str] | None:
    """``(projection module path, parameter)`` of a weight-offset key, in the host's names:
    ``down_blocks.0...attn1.wo_q.linear1.weight`` -> (``down_blocks.0...attn1.to_q``, ``linear1.weight``)."""
    m = _OFFSET_KEY.match(key)
    return None if m is None else (f"{m['prefix']}.to_{m['proj']}", m["param"])


def offset_key(target: str, param: str) -> str:
    """The reference's key of ``param`` of the generator of ``target`` (``...attn1.to_q`` -> ``...attn1.wo_q.<param>``)."""
    prefix, proj = target.rsplit(".to_", 1)
    return f"{prefix}.wo_{proj}.{param}"


class OffsetSet(nn.Module):
    """The weight-offset generators of a UNet, named by the projection they change (diffusers module paths, the
    reference's names: ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``)."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], seed: int | None = None):
        """``shapes``: ``{target: (out_features, in_features)}``; new generators get torch's default Linear init
        (the reference's), drawn from ``seed`` when given."""
        super().__init__()
        if not shapes:
            raise ValueError("no attention projection to put weight offsets on")
        self.names = sorted(shapes)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(int(seed))
            self.generators = nn.ModuleDict({_safe(n): WeightOffsets(shapes[n][1], shapes[n][0]) for n in self.names})

    def __getitem__(self, name: str) -> WeightOffsets:
        return self.generators[_safe(name)]

    def items(self) -> Iterable[tuple[str, WeightOffsets]]:
        return ((n, self.generators[_safe(n)]) for n in self.names)

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (g.linear2.out_features, g.linear1.out_features) for n, g in self.items()}

    def deltas(self) -> dict[str, torch.Tensor]:
        return {n: g() for n, g in self.items()}

    def reference_state(self) -> dict[str, torch.Tensor]:
        """The reference's ``weight_offsets.pt`` layout."""
        return {offset_key(n, p): t.detach() for n, g in self.items() for p, t in g.state_dict().items()}

    @classmethod
    def from_reference(cls, sd: Mapping[str, torch.Tensor], what: str = "weight_offsets") -> OffsetSet:
        """Generators from a ``weight_offsets`` state dict (every key must be an offset key; 9 tensors per target)."""
        params: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in sd.items():
            target = offset_target(key)
            if target is None:
                raise CheckpointError(f"{what}: {key!r} is not a weight-offset key (expected "
                                      "'<...>.attn1.wo_q.linear1.weight' and the like, as mkshing/e4t-diffusion saves)")
            params.setdefault(target[0], {})[target[1]] = value
        if not params:
            raise CheckpointError(f"{what} holds no weight offsets")
        shapes = {}
        for target, p in params.items():
            missing = [k for k in OFFSET_PARAMS if k not in p]
            if missing:
                raise CheckpointError(f"{what}: the offsets of {target} lack {missing}: the file is incomplete")
            shapes[target] = (p["linear2.weight"].shape[0], p["linear1.weight"].shape[0])
        out = cls(shapes)
        for target, g in out.items():
            load_exact(g, params[target], f"{what}.{offset_key(target, '')[:-1]}")
        return out


def _safe(name: str) -> str:
    return name.replace(".", "::")


# ---------------------------------------------------------------------------------------------------------------
# Encoder head


class E4THead(nn.Module):
    """The trained part of the E4T encoder (the CLIP tower aside); parameter names are the reference's
    (``encoder.pt`` without ``clip_vision.*``)."""

    def __init__(self, feature_channels: int, hidden: int, n_inputs: int, word_dim: int):
        super().__init__()
        self.unet_feature_embedder = nn.Sequential(nn.Linear(feature_channels, hidden), nn.LeakyReLU(LEAKY_SLOPE),
                                                   nn.Linear(hidden, hidden))
        self.feature_linear = nn.Linear(2 * hidden, hidden)
        self.first_linears = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_inputs))
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.final_linear = nn.Linear(hidden, word_dim)

    @property
    def feature_channels(self) -> int:
        return self.unet_feature_embedder[0].in_features

    @property
    def hidden(self) -> int:
        return self.feature_linear.out_features

    @property
    def n_inputs(self) -> int:
        return len(self.first_linears)

    @property
    def word_dim(self) -> int:
        return self.final_linear.out_features

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], what: str = "encoder") -> E4THead:
        try:
            feature_channels = sd["unet_feature_embedder.0.weight"].shape[1]
            hidden = sd["feature_linear.weight"].shape[0]
            word_dim = sd["final_linear.weight"].shape[0]
        except KeyError as e:
            raise CheckpointError(f"{what} has no {e.args[0]!r}: not an E4T encoder (mkshing/e4t-diffusion "
                                  "encoder.pt holds unet_feature_embedder, feature_linear, first_linears, final_linear "
                                  "and clip_vision.*)") from None
        n = 0
        while f"first_linears.{n}.weight" in sd:
            n += 1
        if n == 0:
            raise CheckpointError(f"{what} has no first_linears.0: not an E4T encoder head")
        head = cls(feature_channels, hidden, n, word_dim)
        load_exact(head, sd, what)
        return head

    def forward(self, clip_inputs: torch.Tensor, unet_features: torch.Tensor) -> torch.Tensor:
        """``clip_inputs`` ``(B, n_inputs, hidden)`` (:func:`clip_inputs`), ``unet_features`` ``(B, channels)``
        (:func:`pool_features`) -> ``(B, word_dim)``."""
        if clip_inputs.shape[1] != self.n_inputs:
            raise ValueError(f"the E4T head takes {self.n_inputs} CLIP vectors, got {clip_inputs.shape[1]}")
        u = self.unet_feature_embedder(unet_features)
        out = torch.stack([lin(self.feature_linear(torch.cat([clip_inputs[:, i], u], dim=-1)))
                           for i, lin in enumerate(self.first_linears)]).mean(0)
        return self.final_linear(self.act(out))


def n_clip_inputs(patch_tokens: int) -> int:
    """How many CLIP vectors the head takes for a tower with ``patch_tokens`` patch tokens (ViT-H-14 at 224: 256 -> 129)."""
    return 1 + len(range(1, patch_tokens, TOKEN_STEP))


def clip_inputs(last_hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """``(B, 1 + n, hidden)``: the pooled output, then every second patch token of the last layer's raw output
    ``last_hidden`` ``(B, 1 + patches, hidden)`` (class token first, no ``ln_post``): the reference's
    ``cat([pooled, tokens[:, 1::2]])`` with ``tokens = last_hidden[:, 1:]``."""
    return torch.cat([pooled[:, None], last_hidden[:, 1:][:, 1::TOKEN_STEP]], dim=1)


def preprocess(pixels: torch.Tensor, size: int = CLIP_IMAGE_SIZE) -> torch.Tensor:
    """The reference's CLIP preprocessing of ``pixels`` ``(B, 3, H, W)`` in [-1, 1]: bicubic resize to ``size`` with
    ``align_corners=True`` and no antialiasing (``kornia.geometry.resize(..., antialias=False)``, which is
    ``F.interpolate``), to [0, 1], normalized with the CLIP mean and std. A non-square image is centre-cropped to a
    square first (the reference squashes it; the tuning script crops a square)."""
    h, w = pixels.shape[-2:]
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        pixels = pixels[..., top:top + s, left:left + s]
    x = F.interpolate(pixels.float(), size=(size, size), mode="bicubic", align_corners=True)
    x = (x + 1) / 2
    mean = torch.tensor(CLIP_MEAN, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).reshape(1, 3, 1, 1)
    return (x - mean) / std


# mkshing make_transforms: albumentations SmallestMaxSize(interpolation=3), an OpenCV flag: cv2.INTER_AREA (pixel-area
# averaging), not bicubic. PIL's BOX filter is the same average when shrinking (to one grey level for integer factors,
# e.g. FFHQ 1024 -> 512); when enlarging both are close to nearest-neighbour. Then RandomCrop and HorizontalFlip(p=0.5).
RESIZE_FILTER = "BOX"
FLIP_P = 0.5


def reference_crop(image, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """The reference's augmentation of one RGB PIL image: the short side resized to ``resolution`` (pixel-area
    averaging), a random square crop and a horizontal flip with p 0.5 (both drawn from ``generator``), as ``(3, r, r)``
    in [-1, 1]. Pretraining draws it at every step; tuning once."""
    from PIL import Image

    size = int(resolution)
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    if (w, h) != image.size:
        image = image.resize((w, h), getattr(Image, RESIZE_FILTER))
    top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
    image = image.crop((left, top, left + size, top + size))
    if float(torch.rand(1, generator=generator)) < FLIP_P:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1


def pool_features(features: Iterable[torch.Tensor]) -> torch.Tensor:
    """The UNet features as the head takes them: each ``(B, C_i, H_i, W_i)`` averaged over space, concatenated."""
    return torch.cat([f.float().mean(dim=(2, 3)) for f in features], dim=-1)


def domain_embedding(class_embed: torch.Tensor, enc: torch.Tensor, scale: float = DOMAIN_EMBED_SCALE) -> torch.Tensor:
    """``e = E(class word) + scale * enc`` ``(B, word_dim)``."""
    return class_embed.to(enc).reshape(1, -1) + scale * enc


def regularizer(e: torch.Tensor) -> torch.Tensor:
    """The reference's L2 term: the sum of squares of the whole word embedding, over the batch too (its
    ``domain_embed.pow(2).sum()``)."""
    return e.float().pow(2).sum()


# ---------------------------------------------------------------------------------------------------------------
# Config and files


@dataclass
class E4TConfig:
    """What the encoder needs from the reference's ``config.json`` (pretraining args; after tuning, the pretraining
    args sit under ``pretrained_args``). ``raw`` keeps the whole file."""

    placeholder_token: str = PLACEHOLDER_TOKEN
    domain_class_token: str = "face"
    domain_embed_scale: float = DOMAIN_EMBED_SCALE
    prompt_template: str = "face"
    unfreeze_clip_vision: bool = False
    raw: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping, what: str = CONFIG_FILE) -> E4TConfig:
        d = dict(d)
        src = {**dict(d.get("pretrained_args") or {}), **{k: v for k, v in d.items() if v is not None}}
        if not src.get("domain_class_token"):
            raise CheckpointError(f"{what} names no domain_class_token (the class word, e.g. 'face'): not an E4T config")
        scale = src.get("domain_embed_scale", DOMAIN_EMBED_SCALE)
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise CheckpointError(f"{what}: domain_embed_scale is {scale!r}, not a number") from None
        return cls(placeholder_token=str(src.get("placeholder_token") or PLACEHOLDER_TOKEN),
                   domain_class_token=str(src["domain_class_token"]).strip(), domain_embed_scale=scale,
                   prompt_template=str(src.get("prompt_template") or "face"),
                   # trained in pretraining or in tuning (a tuned config's own flag, False by default, says only
                   # whether tuning trained it)
                   unfreeze_clip_vision=any(bool(c.get("unfreeze_clip_vision")) for c in (d, d.get("pretrained_args") or {})),
                   raw=d)

    def templates(self) -> tuple[str, ...]:
        """The prompts of training: a named set (normal, face, art) or one template with ``{placeholder_token}``."""
        t = self.prompt_template
        if t in TEMPLATE_SETS:
            return TEMPLATE_SETS[t]
        if "{placeholder_token}" not in t:
            raise ValueError(f"prompt_template {t!r} has no {{placeholder_token}}; use normal, face, art or a template "
                             "such as 'a photo of {placeholder_token}'")
        return (t,)


@dataclass
class E4TWeights:
    """An E4T folder as loaded: config, head, offset generators (None when they are baked into a tuned UNet) and the
    CLIP tower in open_clip keys (prefix stripped; None when the folder takes it from another one)."""

    config: E4TConfig
    head: E4THead
    offsets: OffsetSet | None
    clip_vision: dict[str, torch.Tensor] | None
    folder: str = ""

    @property
    def offsets_in_unet(self) -> bool:
        return bool(self.config.raw.get(OFFSETS_IN_UNET))


def find_file(folder: str, stems: Iterable[str]) -> str | None:
    for stem in stems:
        for ext in FILE_EXTENSIONS:
            path = os.path.join(folder, stem + ext)
            if os.path.isfile(path):
                return path
    return None


def read_config(folder: str) -> E4TConfig:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found: an E4T folder holds config.json, encoder.pt and weight_offsets.pt "
                              "(mkshing/e4t-diffusion; e.g. mshing/e4t-diffusion-ffhq-celebahq-v1 on Hugging Face)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not read {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not the training arguments")
    return E4TConfig.from_dict(data, path)


def load_e4t(folder: str, clip_folder=None) -> E4TWeights:
    """Load an E4T folder. ``clip_folder(name) -> folder``: resolves :data:`CLIP_FROM` (a tuned encoder saved
    without a second copy of the CLIP tower)."""
    config = read_config(folder)
    enc_path = find_file(folder, ENCODER_STEMS)
    if enc_path is None:
        raise CheckpointError(f"no encoder file in {folder} (encoder.pt or encoder.safetensors)")
    enc = load_file(enc_path)
    clip_sd = {k[len(CLIP_PREFIX):]: v for k, v in enc.items() if k.startswith(CLIP_PREFIX)}
    head_sd = {k: v for k, v in enc.items() if not k.startswith(CLIP_PREFIX)}
    check_weights(head_sd, f"{os.path.basename(enc_path)}: ")
    head = E4THead.from_state_dict(head_sd, os.path.basename(enc_path))
    if not clip_sd:
        source = config.raw.get(CLIP_FROM)
        if not source or clip_folder is None:
            raise CheckpointError(f"{enc_path} holds no CLIP image tower (clip_vision.*) and its config names no "
                                  "folder to take it from")
        clip_sd = {k[len(CLIP_PREFIX):]: v for k, v in load_file(find_file(clip_folder(source), ENCODER_STEMS)
                                                                   or os.path.join(clip_folder(source), "encoder.pt")).items()
                   if k.startswith(CLIP_PREFIX)}
        if not clip_sd:
            raise CheckpointError(f"the E4T folder {source!r} named by {enc_path}'s config holds no CLIP tower either")
    check_weights(clip_sd, f"{os.path.basename(enc_path)}: clip_vision.")
    offsets = None
    if not config.raw.get(OFFSETS_IN_UNET):
        wo_path = find_file(folder, OFFSET_STEMS)
        if wo_path is None:
            tuned = " It holds unet.pt: a folder tuned by the reference's tuning_e4t.py (a whole diffusers UNet), which " \
                    "this loader does not read; tune in ComfyUI with E4T Tune from the pretrained folder instead." \
                if os.path.isfile(os.path.join(folder, "unet.pt")) else ""
            raise CheckpointError(f"no weight offsets in {folder} (weight_offsets.pt or weight_offsets.safetensors).{tuned}")
        wo = load_file(wo_path)
        check_weights(wo, f"{os.path.basename(wo_path)}: ")
        offsets = OffsetSet.from_reference(wo, os.path.basename(wo_path))
    return E4TWeights(config, head, offsets, clip_sd, folder)


def save_e4t(folder: str, config: Mapping, head: E4THead, offsets: OffsetSet | None = None,
             clip_vision: Mapping[str, torch.Tensor] | None = None, overwrite: bool = False) -> str:
    """Write an E4T folder the loader (and, for the tensors, the reference's key names) reads: ``encoder.safetensors``
    (head, and ``clip_vision.*`` when given), ``weight_offsets.safetensors`` (when given), ``config.json`` last (a
    folder without it is not listed as an E4T model)."""
    enc = {k: v.detach().float() for k, v in head.state_dict().items()}
    if clip_vision:
        enc.update({CLIP_PREFIX + k: v for k, v in clip_vision.items()})
    atomic_save_safetensors(enc, os.path.join(folder, "encoder.safetensors"), overwrite=overwrite)
    if offsets is not None:
        atomic_save_safetensors({k: v.float() for k, v in offsets.reference_state().items()},
                                os.path.join(folder, "weight_offsets.safetensors"), overwrite=overwrite)
    return atomic_write_json(config, os.path.join(folder, CONFIG_FILE))
