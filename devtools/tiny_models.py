# SPDX-License-Identifier: GPL-3.0-or-later
"""Tiny real-topology Stable Diffusion models for CPU tests.

The models built here have the *topology* of the real ones (same blocks, same
number of cross-attention sites, same key layout in the checkpoint files) but
tiny widths and random weights, so a whole ComfyUI graph runs in well under a
second on a CPU.  Everything is built from ComfyUI's own classes, so ComfyUI
must have been bootstrapped first (see ``comfy_host.bootstrap``).

What is provided:

* ``register_tiny_configs()`` teaches ComfyUI to recognise the tiny files:
  two ``comfy.supported_models`` subclasses (tiny SD1.5, tiny SDXL) with shrunk
  CLIP text encoders, and a wrapper around
  ``comfy.clip_vision.load_clipvision_from_sd`` that gives tiny CLIP-vision
  state dicts a tiny config (real files load exactly as before).
* ``write_tiny_sd15`` / ``write_tiny_sdxl`` write checkpoints that
  ``CheckpointLoaderSimple`` loads (UNet + text encoder(s) + TAESD-type VAE).
* ``write_tiny_clip_vision`` writes a CLIP vision model in the transformers key
  layout (``vision_model.*``, ``visual_projection.weight``).
* ``write_tiny_vae`` writes a stand-alone TAESD-type VAE (for ``VAELoader``).
* ``write_tiny_set`` writes all of the above into a ComfyUI-style models dir.
* ``to_diffusers_unet`` converts a (tiny or real) ComfyUI SD1.5/SDXL UNet into a
  ``diffusers.UNet2DConditionModel`` with identical weights.

Dimensions (module constants, also used to build matching adapters):

=============  =========================================================
tiny SD1.5     model_channels 32, channel_mult (1, 2, 4, 4), 2 res blocks,
               transformer depth 1, conv proj_in/proj_out, 8 heads,
               context_dim 48 (clip_l: hidden 48, 3 layers), 16 attn2 sites
               (widths 32 / 64 / 128; dim_head = width / 8)
tiny SDXL      model_channels 32, channel_mult (1, 2, 4), 2 res blocks,
               transformer depth [0, 2, 10], middle 10, linear proj,
               head dim 16 (4 heads at width 64, 8 at width 128),
               context_dim 120 = clip_l 48 + clip_g 72 (3 layers each: ComfyUI
               asserts |layer_idx| < layers and SDXL uses layer -2),
               pooled dim 72, adm_in_channels 72 + 1536 = 1608,
               70 attn2 sites (widths 64 / 128)
CLIP vision    vit-h:    hidden 40, projection 24, 3 layers, 4 heads
               vit-bigG: hidden 56, projection 36, 4 layers, 4 heads
               both: image 224, patch 14 -> 257 tokens
=============  =========================================================

The widths were picked so that no two *different* quantities an adapter
touches are equal (UNet widths 32/64/128, context 48/120, CLIP-vision hidden
40/56 and projection 24/36): a transposed or mixed-up weight cannot slip
through a shape check by accident.

Random weights are scaled so activations stay O(1) and the decoded images are
not saturated; they are deterministic given ``seed``.
"""

import functools
import json
import logging
import os
import tempfile

import torch

log = logging.getLogger(__name__)

#: Bump when the tiny architecture or the initialisation changes, so caches
#: of generated files (e.g. ``run_workflow.py``'s) are rebuilt.
TINY_MODELS_VERSION = 1

# ---------------------------------------------------------------------------
# Dimensions
# ---------------------------------------------------------------------------

# Overrides of ComfyUI's CLIP text config json (sd1_clip_config.json /
# clip_config_bigg.json); the vocabulary (49408) and the 77 positions stay, so
# the real tokenizer is used unchanged.
TINY_TEXT_CLIP_L = {"hidden_size": 48, "intermediate_size": 192, "num_attention_heads": 4, "num_hidden_layers": 3}
TINY_TEXT_CLIP_G = {"hidden_size": 72, "intermediate_size": 288, "num_attention_heads": 4, "num_hidden_layers": 3}

#: Number of values of the SDXL "size/crop/target" conditioning (6 x 256).
SDXL_TIME_IDS_DIM = 6 * 256


def _unet_config(model_channels, channel_mult, num_res_blocks, transformer_depth, transformer_depth_output,
                 transformer_depth_middle, context_dim, use_linear, adm_in_channels):
    """A UNet config in the form ``comfy.model_detection.detect_unet_config`` returns."""
    cfg = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": 4, "out_channels": 4, "model_channels": model_channels,
        "num_res_blocks": [num_res_blocks] * len(channel_mult), "channel_mult": list(channel_mult),
        "transformer_depth": list(transformer_depth), "transformer_depth_output": list(transformer_depth_output),
        "transformer_depth_middle": transformer_depth_middle, "use_linear_in_transformer": use_linear,
        "context_dim": context_dim, "adm_in_channels": adm_in_channels,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }
    if adm_in_channels is not None:
        cfg["num_classes"] = "sequential"
    return cfg


#: Tiny SD1.5 UNet config (detect_unet_config form, without heads/dtype).
TINY_SD15_UNET = _unet_config(
    model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1, context_dim=TINY_TEXT_CLIP_L["hidden_size"], use_linear=False, adm_in_channels=None)
#: Heads of the tiny SD1.5 (like SD1.5: a fixed number of heads).
TINY_SD15_HEADS = {"num_heads": 8, "num_head_channels": -1}

_SDXL_POOLED_DIM = TINY_TEXT_CLIP_G["hidden_size"]
#: Tiny SDXL UNet config (detect_unet_config form, without heads/dtype).
TINY_SDXL_UNET = _unet_config(
    model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2,
    transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    transformer_depth_middle=10, context_dim=TINY_TEXT_CLIP_L["hidden_size"] + TINY_TEXT_CLIP_G["hidden_size"],
    use_linear=True, adm_in_channels=_SDXL_POOLED_DIM + SDXL_TIME_IDS_DIM)
#: Heads of the tiny SDXL (like SDXL: a fixed head dimension).
TINY_SDXL_HEADS = {"num_heads": -1, "num_head_channels": 16}


def attn_sites(unet_config, heads):
    """List the cross-attention (attn2) sites of a ComfyUI UNet config.

    Returns a list of dicts ``{"block": ("input"|"middle"|"output", id),
    "transformer_index": t, "width": C, "heads": H, "dim_head": D}`` in the
    order ComfyUI runs them (input blocks, middle, output blocks).  ``block``
    and ``transformer_index`` are the keys ComfyUI's
    ``ModelPatcher.set_model_attn2_replace`` uses.
    """
    mc = unet_config["model_channels"]
    mult = unet_config["channel_mult"]
    nrb = unet_config["num_res_blocks"]
    depth_in = list(unet_config["transformer_depth"])
    # UNetModel pops transformer_depth_output from the end: output block 0 is the last entry.
    depth_out = list(reversed(unet_config["transformer_depth_output"]))

    def head_split(width):
        if heads["num_heads"] != -1:
            return heads["num_heads"], width // heads["num_heads"]
        return width // heads["num_head_channels"], heads["num_head_channels"]

    sites = []

    def add(block, width, depth):
        h, d = head_split(width)
        for t in range(depth):
            sites.append({"block": block, "transformer_index": t, "width": width, "heads": h, "dim_head": d})

    block_id = 1
    k = 0
    for level, m in enumerate(mult):
        for _ in range(nrb[level]):
            add(("input", block_id), mc * m, depth_in[k])
            k += 1
            block_id += 1
        if level != len(mult) - 1:
            block_id += 1  # downsample block
    add(("middle", 0), mc * mult[-1], unet_config["transformer_depth_middle"])
    block_id = 0
    for level in reversed(range(len(mult))):
        for _ in range(nrb[level] + 1):
            add(("output", block_id), mc * mult[level], depth_out[block_id])
            block_id += 1
    return sites


#: attn2 sites of the tiny SD1.5 (16 sites, like SD1.5).
TINY_SD15_ATTN_SITES = attn_sites(TINY_SD15_UNET, TINY_SD15_HEADS)
#: attn2 sites of the tiny SDXL (70 sites, like SDXL).
TINY_SDXL_ATTN_SITES = attn_sites(TINY_SDXL_UNET, TINY_SDXL_HEADS)

#: Summary of the tiny UNets for building matching adapters.
TINY_UNETS = {
    "sd15": {
        "model_channels": 32, "channel_mult": (1, 2, 4, 4), "context_dim": TINY_SD15_UNET["context_dim"],
        "num_heads": 8, "num_head_channels": -1, "pooled_dim": None, "adm_in_channels": None,
        "text_encoders": {"clip_l": dict(TINY_TEXT_CLIP_L)},
        "attn2_sites": TINY_SD15_ATTN_SITES,
    },
    "sdxl": {
        "model_channels": 32, "channel_mult": (1, 2, 4), "context_dim": TINY_SDXL_UNET["context_dim"],
        "num_heads": -1, "num_head_channels": 16, "pooled_dim": _SDXL_POOLED_DIM,
        "adm_in_channels": TINY_SDXL_UNET["adm_in_channels"],
        "text_encoders": {"clip_l": dict(TINY_TEXT_CLIP_L), "clip_g": dict(TINY_TEXT_CLIP_G)},
        "attn2_sites": TINY_SDXL_ATTN_SITES,
    },
}

#: Tiny CLIP vision models.  ``hidden_size`` is the width of
#: ``penultimate_hidden_states`` / ``last_hidden_state`` (257 tokens), and
#: ``projection_dim`` the width of ``image_embeds``.
TINY_CLIP_VISION = {
    "vit-h": {"hidden_size": 40, "projection_dim": 24, "num_hidden_layers": 3, "num_attention_heads": 4,
              "intermediate_size": 160, "image_size": 224, "patch_size": 14, "num_tokens": 257},
    "vit-bigG": {"hidden_size": 56, "projection_dim": 36, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "intermediate_size": 224, "image_size": 224, "patch_size": 14, "num_tokens": 257},
    # CLIP ViT-L/14 (XLabs' Flux IP-Adapter encoder)
    "vit-l": {"hidden_size": 32, "projection_dim": 28, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 128, "image_size": 224, "patch_size": 14, "num_tokens": 257},
}

#: File names used by ``write_tiny_set`` (relative to the models dir).
TINY_FILES = {
    "sd15": os.path.join("checkpoints", "tiny_sd15.safetensors"),
    "sdxl": os.path.join("checkpoints", "tiny_sdxl.safetensors"),
    "clip_vision_vit-h": os.path.join("clip_vision", "tiny_clip_vision_vit-h.safetensors"),
    "clip_vision_vit-bigG": os.path.join("clip_vision", "tiny_clip_vision_vit-bigG.safetensors"),
    "clip_vision_vit-l": os.path.join("clip_vision", "tiny_clip_vision_vit-l.safetensors"),
    "vae": os.path.join("vae", "tiny_taesd_vae.safetensors"),
}

# ---------------------------------------------------------------------------
# ComfyUI model configs for the tiny checkpoints
# ---------------------------------------------------------------------------

_TINY_SD15_NAME = "PersonalizeTinySD15"
_TINY_SDXL_NAME = "PersonalizeTinySDXL"
_TINY_CLASSES = {}


def _make_tiny_classes():
    """Create (once) the supported_models / text encoder classes for the tiny models."""
    if _TINY_CLASSES:
        return _TINY_CLASSES
    import comfy.supported_models as sm
    import comfy.supported_models_base as smb
    from comfy import sd1_clip, sdxl_clip

    class TinySD15Tokenizer(sd1_clip.SD1Tokenizer):
        """SD1.5 tokenizer whose textual-inversion embeddings have the tiny width."""

        def __init__(self, embedding_directory=None, tokenizer_data={}):
            tok = functools.partial(sd1_clip.SDTokenizer, embedding_size=TINY_TEXT_CLIP_L["hidden_size"])
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, tokenizer=tok)

    class TinySD15ClipModel(sd1_clip.SD1ClipModel):
        """SD1.5 text encoder (clip_l) with the tiny config."""

        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            opts = {**model_options, "clip_l_model_config": dict(TINY_TEXT_CLIP_L)}
            super().__init__(device=device, dtype=dtype, model_options=opts, **kwargs)

    class TinySDXLTokenizer(sdxl_clip.SDXLTokenizer):
        """SDXL tokenizer (clip_l + clip_g) with tiny embedding widths."""

        def __init__(self, embedding_directory=None, tokenizer_data={}):
            # Not calling super().__init__ on purpose: it would build both
            # tokenizers with the real widths first.
            self.clip_l = sd1_clip.SDTokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                                               embedding_size=TINY_TEXT_CLIP_L["hidden_size"])
            self.clip_g = sd1_clip.SDTokenizer(pad_with_end=False, embedding_directory=embedding_directory,
                                               tokenizer_data=tokenizer_data,
                                               embedding_size=TINY_TEXT_CLIP_G["hidden_size"], embedding_key="clip_g")

    class TinySDXLClipModel(sdxl_clip.SDXLClipModel):
        """SDXL text encoders (clip_l penultimate + clip_g) with tiny configs."""

        def __init__(self, device="cpu", dtype=None, model_options={}):
            opts = {**model_options, "clip_l_model_config": dict(TINY_TEXT_CLIP_L),
                    "clip_g_model_config": dict(TINY_TEXT_CLIP_G)}
            super().__init__(device=device, dtype=dtype, model_options=opts)

    class TinySD15(sm.SD15):
        """Matches the tiny SD1.5 checkpoints only (model_channels 32, context 48)."""
        unet_config = {"context_dim": TINY_SD15_UNET["context_dim"], "model_channels": 32,
                       "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False}
        unet_extra_config = dict(TINY_SD15_HEADS)

        def clip_target(self, state_dict={}):
            return smb.ClipTarget(TinySD15Tokenizer, TinySD15ClipModel)

    class TinySDXL(sm.SDXL):
        """Matches the tiny SDXL checkpoints only (model_channels 32, context 120)."""
        unet_config = {"model_channels": 32, "use_linear_in_transformer": True,
                       "transformer_depth": list(TINY_SDXL_UNET["transformer_depth"]),
                       "context_dim": TINY_SDXL_UNET["context_dim"],
                       "adm_in_channels": TINY_SDXL_UNET["adm_in_channels"], "use_temporal_attention": False}
        unet_extra_config = dict(TINY_SDXL_HEADS)

        def clip_target(self, state_dict={}):
            return smb.ClipTarget(TinySDXLTokenizer, TinySDXLClipModel)

    TinySD15.__name__ = TinySD15.__qualname__ = _TINY_SD15_NAME
    TinySDXL.__name__ = TinySDXL.__qualname__ = _TINY_SDXL_NAME
    _TINY_CLASSES.update({"sd15": TinySD15, "sdxl": TinySDXL,
                          "sd15_clip": TinySD15ClipModel, "sdxl_clip": TinySDXLClipModel})
    return _TINY_CLASSES


_CLIP_VISION_CONFIG_DIR = None


def _clip_vision_json(kind):
    """Path of a ComfyUI clip-vision json config for a tiny kind (written once per process)."""
    global _CLIP_VISION_CONFIG_DIR
    if _CLIP_VISION_CONFIG_DIR is None:
        _CLIP_VISION_CONFIG_DIR = tempfile.mkdtemp(prefix="personalize_tiny_clipvision_")
    path = os.path.join(_CLIP_VISION_CONFIG_DIR, f"{kind}.json")
    if not os.path.exists(path):
        with open(path, "w") as f:
            json.dump(clip_vision_config(kind), f, indent=1)
    return path


def clip_vision_config(kind):
    """The ComfyUI/transformers-style config dict of a tiny CLIP vision model."""
    d = TINY_CLIP_VISION[kind]
    return {
        "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": d["hidden_size"],
        "image_size": d["image_size"], "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": d["intermediate_size"], "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
        "num_attention_heads": d["num_attention_heads"], "num_channels": 3,
        "num_hidden_layers": d["num_hidden_layers"], "patch_size": d["patch_size"],
        "projection_dim": d["projection_dim"], "torch_dtype": "float32",
    }


def tiny_clip_vision_kind(sd):
    """Return the tiny kind ("vit-h"/"vit-bigG") a transformers-layout state dict matches, else None.

    Matched on hidden size and layer count, and on the projection width when the dict has a projection; a tower
    without ``visual_projection.weight`` (E4T's ``clip_vision.*``, saved with ``proj = None``) matches on the first
    two."""
    key = "vision_model.encoder.layers.0.layer_norm1.weight"
    if key not in sd:
        return None
    hidden = sd[key].shape[0]
    proj = sd["visual_projection.weight"].shape[0] if "visual_projection.weight" in sd else None
    layers = 0
    while f"vision_model.encoder.layers.{layers}.layer_norm1.weight" in sd:
        layers += 1
    for kind, d in TINY_CLIP_VISION.items():
        if (d["hidden_size"], d["num_hidden_layers"]) == (hidden, layers) and proj in (None, d["projection_dim"]):
            return kind
    return None


def register_tiny_configs():
    """Make ComfyUI recognise the tiny models (idempotent).

    Inserts the tiny SD1.5/SDXL configs at the front of
    ``comfy.supported_models.models`` and wraps
    ``comfy.clip_vision.load_clipvision_from_sd`` so tiny CLIP-vision state
    dicts get their tiny config; everything else is passed through untouched.
    """
    import comfy.clip_vision
    import comfy.supported_models as sm
    import tiny_flux

    tiny_flux.register_tiny_flux()
    classes = _make_tiny_classes()
    present = {getattr(m, "__name__", "") for m in sm.models}
    for key in ("sdxl", "sd15"):
        if classes[key].__name__ not in present:
            sm.models.insert(0, classes[key])

    current = comfy.clip_vision.load_clipvision_from_sd
    if getattr(current, "_personalize_tiny", False):
        return
    original = current

    @functools.wraps(original)
    def load_clipvision_from_sd(sd, prefix="", convert_keys=False):
        if convert_keys:
            # what the original does first; the converted dict then goes the unconverted way
            sd, prefix, convert_keys = comfy.clip_vision.convert_to_transformers(sd, prefix), "", False
        if prefix == "":
            kind = tiny_clip_vision_kind(sd)
            if kind is not None:
                clip = comfy.clip_vision.ClipVisionModel(_clip_vision_json(kind))
                missing, unexpected = clip.load_sd(sd)
                if missing == ["visual_projection.weight"]:
                    # a tower saved without its projection (E4T's): ComfyUI leaves the Linear uninitialised, as for
                    # a real file; only image_embeds depend on it
                    log.info("tiny clip vision %s: no visual_projection (image_embeds are not meaningful)", kind)
                elif missing:
                    log.warning("tiny clip vision %s: missing keys %s", kind, missing)
                return clip
        return original(sd, prefix, convert_keys)

    load_clipvision_from_sd._personalize_tiny = True
    load_clipvision_from_sd._personalize_original = original
    comfy.clip_vision.load_clipvision_from_sd = load_clipvision_from_sd


# ---------------------------------------------------------------------------
# Deterministic random initialisation
# ---------------------------------------------------------------------------

def _randn(gen, shape, std):
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def _init_module(module, seed, gain_for=None, embed_std=0.5):
    """Fill every parameter of ``module`` with deterministic random values.

    Values are rounded to fp16-representable numbers.  Linear/conv weights get N(0, gain^2 / fan_in) (``gain_for(name)`` picks the
    gain, default 1), norm weights 1 + N(0, 0.1^2), biases N(0, 0.05^2), other
    tensors (embeddings, class embedding) N(0, embed_std^2).  Nothing is left at
    zero so a wrong key mapping cannot hide behind a zero tensor.
    """
    gen = torch.Generator().manual_seed(int(seed))
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if isinstance(mod, norm_types):
                    val = (1.0 + _randn(gen, p.shape, 0.1)) if p_name == "weight" else _randn(gen, p.shape, 0.05)
                elif p_name == "bias":
                    val = _randn(gen, p.shape, 0.05)
                elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and p_name == "weight":
                    fan_in = p[0].numel()
                    gain = gain_for(full) if gain_for is not None else 1.0
                    val = _randn(gen, p.shape, gain / fan_in ** 0.5)
                else:
                    val = _randn(gen, p.shape, embed_std)
                # fp16-representable values: ComfyUI may store weights in fp16 (it does
                # for CLIP vision on CPU) without changing the model.
                p.copy_(val.half().float().to(p.dtype))


def _unet_gain(name):
    """Gains for the UNet: residual-branch outputs are damped to keep the stream O(1)."""
    if name.endswith("out_layers.3.weight"):  # last conv of a ResBlock (zero-init in real training)
        return 0.5
    if name.endswith("proj_out.weight"):  # SpatialTransformer output (zero-init in real training)
        return 0.5
    if ".attn1.to_out.0." in name or ".attn2.to_out.0." in name or name.endswith("ff.net.2.weight"):
        return 0.5
    if name.startswith("out.2."):  # final conv: eps of roughly unit variance
        return 0.7
    return 1.0


def _taesd_gain(name):
    # ReLU convs get He gain; the decoder's output conv is damped so images stay
    # inside (0, 1) and keep varying with the latent instead of saturating.
    if name.startswith("taesd_decoder.19."):
        return 0.1
    if name.startswith("taesd_encoder.14."):
        return 1.0
    if name.endswith("conv.4.weight"):  # last conv of a residual block
        return 0.5
    return 2.0 ** 0.5


def _text_gain(name):
    if name.endswith("out_proj.weight") or name.endswith("fc2.weight"):
        return 0.5
    return 1.0


# ---------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------

def _bootstrapped():
    import sys
    if "comfy.model_management" not in sys.modules:
        raise RuntimeError("ComfyUI is not bootstrapped: call comfy_host.bootstrap(COMFYUI_PATH) first")


def _tiny_vae_sd(seed):
    """State dict of a random TAESD-type VAE (ComfyUI detects it by its 'taesd_decoder.*' keys)."""
    import comfy.taesd.taesd as taesd
    vae = taesd.TAESD(latent_channels=4)
    _init_module(vae, seed, gain_for=_taesd_gain)
    with torch.no_grad():
        vae.vae_scale.fill_(1.0)
        vae.vae_shift.fill_(0.0)
        vae.taesd_decoder[-1].bias.add_(0.5)  # decoded pixels centred on mid-grey
    return {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}


def _build_checkpoint_sd(kind, seed):
    _bootstrapped()
    register_tiny_configs()
    classes = _make_tiny_classes()
    cfg_cls = classes[kind]
    unet_cfg = TINY_SD15_UNET if kind == "sd15" else TINY_SDXL_UNET
    model_config = cfg_cls(unet_cfg)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "model.diffusion_model.", device=torch.device("cpu"))
    _init_module(model.diffusion_model, seed, gain_for=_unet_gain)

    clip_model = classes[f"{kind}_clip"](device="cpu", dtype=torch.float32)
    _init_module(clip_model, seed + 1, gain_for=_text_gain, embed_std=0.5)
    clip_sd = {k: v.detach().clone() for k, v in clip_model.state_dict().items()}

    vae_sd = _tiny_vae_sd(seed + 2)
    sd = model.state_dict_for_saving(clip_sd, vae_sd)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def _save(sd, path, metadata=None):
    import comfy.utils
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".part"
    comfy.utils.save_torch_file(sd, tmp, metadata=metadata)
    os.replace(tmp, path)  # atomic: a half-written file is never picked up
    log.info("wrote %s", path)
    return path


def _meta(kind, seed):
    return {"personalize_tiny": kind, "personalize_tiny_version": str(TINY_MODELS_VERSION), "seed": str(seed)}


def write_tiny_sd15(path, seed=0):
    """Write a tiny SD1.5-topology checkpoint (UNet + clip_l + TAESD VAE) to ``path``."""
    return _save(_build_checkpoint_sd("sd15", seed), path, _meta("sd15", seed))


def write_tiny_sdxl(path, seed=0):
    """Write a tiny SDXL-topology checkpoint (UNet + clip_l + clip_g + TAESD VAE) to ``path``."""
    return _save(_build_checkpoint_sd("sdxl", seed), path, _meta("sdxl", seed))


def write_tiny_vae(path, seed=0):
    """Write a stand-alone random TAESD-type VAE that ``VAELoader`` can load."""
    _bootstrapped()
    return _save(_tiny_vae_sd(seed), path, _meta("vae", seed))


def write_tiny_clip_vision(path, kind="vit-h", seed=0):
    """Write a tiny CLIP vision model (transformers key layout) of ``kind`` "vit-h" or "vit-bigG"."""
    _bootstrapped()
    if kind not in TINY_CLIP_VISION:
        raise ValueError(f"unknown tiny clip vision kind {kind!r}; expected one of {list(TINY_CLIP_VISION)}")
    import comfy.clip_model
    import comfy.ops
    model = comfy.clip_model.CLIPVisionModelProjection(clip_vision_config(kind), torch.float32, "cpu",
                                                        comfy.ops.manual_cast)
    _init_module(model, seed + 3 + list(TINY_CLIP_VISION).index(kind), gain_for=_text_gain, embed_std=0.5)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return _save(sd, path, _meta("clip_vision_" + kind, seed))


def write_tiny_lora(path, layout="sd15", seed=0, rank=4):
    """A tiny LoRA in ComfyUI's key format on the first cross-attention query of the tiny ``layout`` UNet (what
    a companion LoRA stands in for: it loads and changes the model)."""
    site = (TINY_SDXL_ATTN_SITES if layout == "sdxl" else TINY_SD15_ATTN_SITES)[0]
    (block, block_id), width = site["block"], site["width"]
    key = f"diffusion_model.{block}_blocks.{block_id}.1.transformer_blocks.0.attn2.to_q"
    g = torch.Generator().manual_seed(seed + 11)
    sd = {f"{key}.lora_up.weight": torch.randn(width, rank, generator=g) * 0.1,
          f"{key}.lora_down.weight": torch.randn(rank, width, generator=g) * 0.1, f"{key}.alpha": torch.tensor(float(rank))}
    return _save(sd, path, _meta("lora_" + layout, seed))


def write_tiny_set(models_dir, seed=0):
    """Write every tiny model into a ComfyUI-style models dir; returns {key: path} (keys of TINY_FILES)."""
    out = {}
    for key, rel in TINY_FILES.items():
        path = os.path.join(models_dir, rel)
        if key == "sd15":
            write_tiny_sd15(path, seed)
        elif key == "sdxl":
            write_tiny_sdxl(path, seed)
        elif key.startswith("clip_vision_"):
            write_tiny_clip_vision(path, key[len("clip_vision_"):], seed)
        elif key == "vae":
            write_tiny_vae(path, seed)
        out[key] = path
    return out


# ---------------------------------------------------------------------------
# diffusers conversion
# ---------------------------------------------------------------------------

def _comfy_base_model(obj):
    """Accept a ModelPatcher, a comfy BaseModel; return the BaseModel."""
    if hasattr(obj, "model") and hasattr(obj.model, "diffusion_model"):
        return obj.model
    if hasattr(obj, "diffusion_model") and hasattr(obj, "model_config"):
        return obj
    raise TypeError(f"expected a ComfyUI ModelPatcher or BaseModel, got {type(obj)!r}")


def diffusers_unet_config(unet_config):
    """Translate a ComfyUI SD1.x/SD2.x/SDXL UNet config into ``UNet2DConditionModel`` kwargs."""
    mc = unet_config["model_channels"]
    mult = list(unet_config["channel_mult"])
    nrb = list(unet_config["num_res_blocks"])
    if len(set(nrb)) != 1:
        raise NotImplementedError(f"diffusers needs the same number of res blocks per level: {nrb}")
    widths = [mc * m for m in mult]
    depth_in = unet_config["transformer_depth"]
    per_level = [depth_in[i * nrb[0]] for i in range(len(mult))]
    mid = unet_config.get("transformer_depth_middle", 1)
    if per_level[-1] == 0:
        # diffusers takes the middle block depth from the last level's entry
        layers_per_level = [max(d, 1) for d in per_level[:-1]] + [max(mid, 1)]
    elif per_level[-1] == mid:
        layers_per_level = [max(d, 1) for d in per_level]
    else:
        raise NotImplementedError(f"middle transformer depth {mid} != last level depth {per_level[-1]}")

    num_heads = unet_config.get("num_heads", -1)
    head_ch = unet_config.get("num_head_channels", -1)
    if num_heads != -1:
        heads = [num_heads] * len(mult)
    else:
        heads = [w // head_ch for w in widths]

    cfg = dict(
        sample_size=unet_config.get("image_size", 32),
        in_channels=unet_config["in_channels"], out_channels=unet_config["out_channels"],
        down_block_types=tuple("CrossAttnDownBlock2D" if d > 0 else "DownBlock2D" for d in per_level),
        up_block_types=tuple("CrossAttnUpBlock2D" if d > 0 else "UpBlock2D" for d in reversed(per_level)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(widths), layers_per_block=nrb[0],
        transformer_layers_per_block=tuple(layers_per_level),
        cross_attention_dim=unet_config["context_dim"],
        attention_head_dim=tuple(heads) if len(set(heads)) > 1 else heads[0],  # diffusers' legacy name for "heads"
        use_linear_projection=bool(unet_config.get("use_linear_in_transformer", False)),
        flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
        downsample_padding=1, center_input_sample=False, upcast_attention=False,
    )
    if unet_config.get("adm_in_channels") is not None:
        # SDXL-style "text_time" conditioning: pooled text embedding + 6 x 256 size embeddings
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=unet_config["adm_in_channels"])
    return cfg


def to_diffusers_unet(model_patcher_or_comfy_model, dtype=torch.float32):
    """Build a ``diffusers.UNet2DConditionModel`` with the same config and weights.

    Works for ComfyUI SD1.x and SDXL-type UNets (tiny or real).  The current
    weights of the ComfyUI module are copied: patches registered on a
    ModelPatcher (LoRAs …) are not applied unless they have been baked in.
    The diffusers model is ``eval()`` and in ``dtype``.

    For SDXL, ComfyUI's ``y`` is ``cat(pooled, time_ids_embedding)``; call the
    diffusers model with ``added_cond_kwargs={"text_embeds": pooled,
    "time_ids": time_ids}`` where ``time_ids`` are the 6 raw numbers
    (height, width, crop_h, crop_w, target_height, target_width).
    """
    import comfy.utils
    from diffusers import UNet2DConditionModel

    base = _comfy_base_model(model_patcher_or_comfy_model)
    unet_config = base.model_config.unet_config
    key_map = comfy.utils.unet_to_diffusers(unet_config)  # diffusers key -> comfy key
    cfg = diffusers_unet_config(unet_config)
    # Built on the meta device (no random init: that is most of the time for SDXL),
    # then every tensor is assigned from ComfyUI's weights below.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)

    comfy_sd = base.diffusion_model.state_dict()
    target = unet.state_dict()
    new_sd = {}
    missing = []
    for dk, tensor in target.items():
        ck = key_map.get(dk)
        if ck is None or ck not in comfy_sd:
            missing.append(dk)
            continue
        src = comfy_sd[ck]
        if tuple(src.shape) != tuple(tensor.shape):
            raise ValueError(f"shape mismatch for {dk} <- {ck}: {tuple(tensor.shape)} vs {tuple(src.shape)}")
        new_sd[dk] = src.detach().clone().to(torch.float32)
    if missing:
        raise ValueError(f"no ComfyUI weight for diffusers keys: {missing[:20]}")
    unet.load_state_dict(new_sd, strict=True, assign=True)
    leftover = [n for n, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"diffusers tensors without a ComfyUI source: {leftover[:20]}")
    if dtype != torch.float32:
        unet = unet.to(dtype)
    return unet.eval()


def sdxl_time_ids(height, width, crop_h=0, crop_w=0, target_height=None, target_width=None):
    """The 6 SDXL size/crop numbers in ComfyUI's (and diffusers') order."""
    return [height, width, crop_h, crop_w,
            height if target_height is None else target_height, width if target_width is None else target_width]


def comfy_sdxl_y(pooled, time_ids):
    """ComfyUI's SDXL ``y`` vector (what ``model_base.SDXL.encode_adm`` builds) from pooled + time ids."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep
    emb = Timestep(256)
    flat = torch.cat([emb(torch.tensor([float(v)])) for v in time_ids]).flatten().unsqueeze(0)
    return torch.cat([pooled, flat.repeat(pooled.shape[0], 1).to(pooled)], dim=1)
