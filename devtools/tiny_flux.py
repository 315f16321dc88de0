# SPDX-License-Identifier: GPL-3.0-or-later
"""A tiny real-topology Flux for CPU tests, and tiny Flux adapters in their official key layouts.

The model is ComfyUI's own ``Flux`` class (double-stream blocks, then single-stream blocks over ``cat(txt, img)``,
RoPE over (index, row, column), guidance embedding, the real key layout) at small widths. ComfyUI's detection fixes
Flux's widths (hidden 3072, 24 heads, text 4096: ``comfy/model_detection.py``), so ``register_tiny_flux`` adds a
``supported_models`` class that matches the tiny file only (by its pooled-text width, 48 where Flux.1 has 768) and
sets the tiny widths; its text encoders are ComfyUI's CLIP-L and T5-XXL classes with tiny configs, so the whole
checkpoint (``model.diffusion_model.*``, ``text_encoders.{clip_l,t5xxl}.*``, ``vae.*``, the layout of Comfy-Org's
``flux1-dev-fp8.safetensors``) loads with ``CheckpointLoaderSimple``.

=============  =========================================================
tiny Flux      hidden 96, 3 heads of 32 (RoPE axes 4 / 14 / 14), mlp 4x, 3 double + 5 single blocks, text width 44
               (tiny T5: 2 layers, 4 heads of 11), pooled width 48 (the tiny CLIP-L), guidance embedding, 16-channel
               latent (TAESD-type VAE with 16 channels)
PuLID-FLUX     IDFormer as the tiny v1.1 (tokens of width 72), cross-attentions 96 <- 72 with 2 heads of 128,
               one after double blocks 0, 2 and single blocks 0, 4 (4 in all: the official spacing)
XLabs          ImageProjModel 28 (tiny CLIP-L image_embeds) -> 4 (v1) or 16 (v2) tokens of 44; K / V 44 -> 96 per
               double block, with bias
=============  =========================================================
"""
from __future__ import annotations

import functools
import logging

import tiny_models
import torch

log = logging.getLogger("personalize.tiny")

TINY_FLUX = {"in_channels": 16, "out_channels": 16, "vec_in_dim": 48, "context_in_dim": 44, "hidden_size": 96,
             "mlp_ratio": 4.0, "num_heads": 3, "depth": 3, "depth_single_blocks": 5, "axes_dim": [4, 14, 14],
             "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
# Overrides of ComfyUI's t5_config_xxl.json (the tokenizer and vocabulary stay the real ones).
TINY_T5 = {"d_model": 44, "d_ff": 64, "d_kv": 11, "num_heads": 4, "num_layers": 2}
TINY_PULID_FLUX = {"id_tokens_width": 72, "ca_heads": 2}
TINY_XLABS_CLIP = "vit-l"
FILES = {"flux": "checkpoints/tiny_flux.safetensors", "pulid_flux": "pulid/tiny_pulid_flux.safetensors",
         "xlabs_v1": "xlabs/tiny_xlabs_v1.safetensors", "xlabs_v2": "xlabs/tiny_xlabs_v2.safetensors"}

_CLASSES: dict = {}


def _classes():
    if _CLASSES:
        return _CLASSES
    import comfy.supported_models as sm
    import comfy.supported_models_base as smb
    import comfy.text_encoders.flux as flux_te

    class TinyFluxClipModel(flux_te.FluxClipModel):
        """ComfyUI's Flux text encoders (CLIP-L + T5-XXL) with the tiny configs."""

        def __init__(self, dtype_t5=None, device="cpu", dtype=None, model_options=None):
            opts = {**(model_options or {}), "clip_l_model_config": dict(tiny_models.TINY_TEXT_CLIP_L),
                    "t5xxl_model_config": dict(TINY_T5)}
            super().__init__(dtype_t5=dtype_t5, device=device, dtype=dtype, model_options=opts)

    class TinyFlux(sm.Flux):
        """Matches the tiny Flux only (pooled text width 48) and gives it the tiny widths."""

        unet_config = {"image_model": "flux", "guidance_embed": True, "vec_in_dim": TINY_FLUX["vec_in_dim"]}
        unet_extra_config = {k: TINY_FLUX[k] for k in ("context_in_dim", "hidden_size", "mlp_ratio", "num_heads", "axes_dim")}

        def clip_target(self, state_dict=None):
            return smb.ClipTarget(flux_te.FluxTokenizer, TinyFluxClipModel)

    _CLASSES.update(flux=TinyFlux, clip=TinyFluxClipModel)
    return _CLASSES


def register_tiny_flux() -> None:
    """Make ComfyUI's loader recognise the tiny Flux (idempotent; real files load as before)."""
    import comfy.supported_models as sm

    cls = _classes()["flux"]
    if all(getattr(m, "__name__", "") != cls.__name__ for m in sm.models):
        sm.models.insert(0, cls)


def _flux_gain(name: str) -> float:
    # modulation and output layers small, so 8 blocks of random weights keep the activations O(1)
    if any(s in name for s in ("_mod.", "modulation.", "adaLN_modulation", "final_layer.linear")):
        return 0.3
    return 1.0


def flux_state_dict(seed: int = 0) -> dict:
    """The tiny Flux's diffusion model (ComfyUI keys, no prefix)."""
    tiny_models._bootstrapped()
    register_tiny_flux()
    cfg = _classes()["flux"](dict(TINY_FLUX, image_model="flux"))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "model.diffusion_model.", device=torch.device("cpu"))
    tiny_models._init_module(model.diffusion_model, seed + 40, gain_for=_flux_gain)
    return {k: v.detach().clone().contiguous() for k, v in model.diffusion_model.state_dict().items()}


def _vae16_sd(seed: int) -> dict:
    import comfy.taesd.taesd as taesd

    vae = taesd.TAESD(latent_channels=16)
    tiny_models._init_module(vae, seed + 41, gain_for=tiny_models._taesd_gain)
    with torch.no_grad():
        vae.vae_scale.fill_(1.0)
        vae.vae_shift.fill_(0.0)
        vae.taesd_decoder[-1].bias.add_(0.5)
    return {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}


def write_tiny_flux(path: str, seed: int = 0) -> str:
    """An all-in-one tiny Flux checkpoint for ``CheckpointLoaderSimple``."""
    sd = {"model.diffusion_model." + k: v for k, v in flux_state_dict(seed).items()}
    clip = _classes()["clip"](device="cpu", dtype=torch.float32)
    tiny_models._init_module(clip, seed + 42, gain_for=tiny_models._text_gain, embed_std=0.5)
    sd.update({"text_encoders." + k: v.detach().clone().contiguous() for k, v in clip.state_dict().items()})
    sd.update({"vae." + k: v for k, v in _vae16_sd(seed).items()})
    return tiny_models._save(sd, path, tiny_models._meta("flux", seed))


def pulid_flux_state_dict(seed: int = 0) -> dict:
    """A tiny PuLID-FLUX file: ``pulid_encoder.*`` (an IDFormer like the tiny v1.1's) and ``pulid_ca.{k}.*`` for the
    tiny Flux's blocks at the official spacing."""
    import tiny_pulid

    from comfyui_personalize.models import pulid
    from comfyui_personalize.models.dit import interval_sites

    width, vit = tiny_pulid.ARCFACE_DIM + tiny_pulid.TINY_EVA["projection"], tiny_pulid.TINY_EVA["width"]
    kv = TINY_PULID_FLUX["id_tokens_width"]
    encoder = pulid.IDFormer(dim=64, depth=10, heads=1, num_id_token=5, num_queries=32, output_dim=kv, ff_mult=2,
                             width=width, vit_width=vit, hidden=48)
    enc = tiny_pulid._randomize(encoder, seed + 43, std=0.1).state_dict()
    n = len(interval_sites((TINY_FLUX["depth"], TINY_FLUX["depth_single_blocks"]), pulid.PULID_FLUX_INTERVALS))
    cas = torch.nn.ModuleList([pulid.PerceiverAttentionCA(TINY_FLUX["hidden_size"], kv, TINY_PULID_FLUX["ca_heads"])
                               for _ in range(n)])
    ca = tiny_pulid._randomize(cas, seed + 44, std=0.1).state_dict()
    return {**{"pulid_encoder." + k: v for k, v in enc.items()}, **{"pulid_ca." + k: v for k, v in ca.items()}}


def write_tiny_pulid_flux(path: str, seed: int = 0) -> str:
    import tiny_pulid

    return tiny_pulid._save({k: v.to(torch.bfloat16) for k, v in pulid_flux_state_dict(seed).items()}, path)  # official: bf16


def xlabs_state_dict(tokens: int = 4, seed: int = 0) -> dict:
    """A tiny XLabs flux-ip-adapter in the official layout (``ip_adapter_proj_model.*``, ``double_blocks.{i}.processor.
    ip_adapter_double_stream_{k,v}_proj.*``); ``tokens`` 4 (v1) or 16 (v2)."""
    g = torch.Generator().manual_seed(seed + 45)
    clip = tiny_models.TINY_CLIP_VISION[TINY_XLABS_CLIP]["projection_dim"]
    cross, hidden = TINY_FLUX["context_in_dim"], TINY_FLUX["hidden_size"]
    sd = {"ip_adapter_proj_model.proj.weight": torch.randn(tokens * cross, clip, generator=g) / clip ** 0.5,
          "ip_adapter_proj_model.proj.bias": 0.05 * torch.randn(tokens * cross, generator=g),
          "ip_adapter_proj_model.norm.weight": 1 + 0.1 * torch.randn(cross, generator=g),
          "ip_adapter_proj_model.norm.bias": 0.05 * torch.randn(cross, generator=g)}
    for i in range(TINY_FLUX["depth"]):
        for name in ("ip_adapter_double_stream_k_proj", "ip_adapter_double_stream_v_proj"):
            key = f"double_blocks.{i}.processor.{name}"
            sd[f"{key}.weight"] = torch.randn(hidden, cross, generator=g) / cross ** 0.5
            sd[f"{key}.bias"] = 0.05 * torch.randn(hidden, generator=g)
    return sd


def write_tiny_xlabs(path: str, tokens: int = 4, seed: int = 0) -> str:
    return tiny_models._save({k: v.to(torch.bfloat16) for k, v in xlabs_state_dict(tokens, seed).items()}, path,
                             tiny_models._meta(f"xlabs_{tokens}", seed))


@functools.cache
def _diffusers_key_map(depth: int, single: int, hidden: int) -> dict:
    import comfy.utils

    return comfy.utils.flux_to_diffusers({"depth": depth, "depth_single_blocks": single, "hidden_size": hidden})


def to_diffusers_flux(dm):
    """A ``diffusers.FluxTransformer2DModel`` with the weights of a ComfyUI Flux ``dm`` (through ComfyUI's own key
    table, ``comfy.utils.flux_to_diffusers``): the independent host of the parity tests."""
    from diffusers import FluxTransformer2DModel

    p = dm.params
    model = FluxTransformer2DModel(patch_size=1, in_channels=dm.in_channels, num_layers=p.depth,
                                   num_single_layers=p.depth_single_blocks, attention_head_dim=p.hidden_size // p.num_heads,
                                   num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
                                   pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed,
                                   axes_dims_rope=tuple(p.axes_dim))
    src = dm.state_dict()
    out = {}
    for dkey, spec in _diffusers_key_map(p.depth, p.depth_single_blocks, p.hidden_size).items():
        if isinstance(spec, str):
            if spec in src:
                out[dkey] = src[spec]
        elif spec[1] is None:
            if spec[0] in src:
                out[dkey] = spec[2](src[spec[0]])
        elif spec[0] in src:
            dim, start, size = spec[1]
            out[dkey] = src[spec[0]].narrow(dim, start, size)
    missing, unexpected = model.load_state_dict(out, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"to_diffusers_flux: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.float().eval()
