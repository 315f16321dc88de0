"""PuLID nodes (SDXL; v1 IDEncoder and v1.1 IDFormer). Thin: the encoders, the ID features and the attention rule are
in models/pulid.py, the face pipeline in models/face/, the EVA-CLIP tower in models/eva_clip.py."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import folder_paths
import numpy as np
import torch

from ..models import pulid as core
from ..models.checkpoints import load_file
from ..models.eva_clip import EVAVisionTower
from ..models.face import image_to_uint8
from ..models.face.image import ffhq_crop
from ..models.face.parsing import load_parser
from ..models.inputs import check_finite, check_image, check_number
from .comfy import flux, folders, unet, weights
from .common import checked_attn_mask, checked_tokens, embeds_files, flux_gate, fraction_input, patch_model, save_embeds, weight_input
from .face import FACE_ANALYSIS, IN_INDEX, IN_SELECTION

log = logging.getLogger("personalize")

CATEGORY = "personalize/pulid"
PULID = "PERSONALIZE_PULID"
EVA_CLIP = "PERSONALIZE_EVA_CLIP"
FACE_PARSING = "PERSONALIZE_FACE_PARSING"
EMBEDS = "PERSONALIZE_PULID_EMBEDS"
EMBEDS_SUFFIX = ".pulidembeds.safetensors"


@dataclass
class Loaded:
    """What flows on the PuLID / EVA-CLIP / parsing sockets: the module and its ModelPatcher."""

    name: str
    model: torch.nn.Module
    patcher: object


def _file_input(folder: str, example: str):
    return (folder_paths.get_filename_list(folder), {"tooltip": f"File in models/{folder}, e.g. {example}."})


def _load(folder: str, name: str, what: str, build):
    path = folders.full_path(folder, name, what)
    model = build(path)
    return Loaded(name, model, weights.adapter_patcher(model))


class PersonalizePuLIDLoader:
    DESCRIPTION = ("Loads a PuLID model from models/pulid: for SDXL v1 (IDEncoder, 10 ID tokens) or v1.1 (IDFormer, 32 ID "
                   "tokens), the official files or the IP-Adapter-style conversion of v1; or PuLID-FLUX v0.9.0 / v0.9.1 "
                   "(IDFormer + 20 cross-attentions). What the file is, is read from its keys.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (PULID,)
    RETURN_NAMES = ("pulid",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pulid_file": _file_input("pulid", "pulid_v1.1.safetensors")}}

    def load(self, pulid_file):
        loaded = _load("pulid", pulid_file, "PuLID model", lambda p: core.load_pulid(p).eval().requires_grad_(False))
        log.info("PuLID %s: %s", pulid_file, loaded.model.spec.describe())
        return (loaded,)


class PersonalizeEVACLIPLoader:
    DESCRIPTION = ("Loads the EVA02-CLIP-L-14-336 vision tower PuLID encodes faces with, from models/eva_clip (the official "
                   "EVA02_CLIP_L_336_psz14_s6B.pt: its visual.* part is used). Runs on timm (pip install timm).")
    CATEGORY = CATEGORY
    RETURN_TYPES = (EVA_CLIP,)
    RETURN_NAMES = ("eva_clip",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"eva_clip_file": _file_input("eva_clip", "EVA02_CLIP_L_336_psz14_s6B.pt")}}

    def load(self, eva_clip_file):
        return (_load("eva_clip", eva_clip_file, "EVA-CLIP tower", lambda p: EVAVisionTower.from_state_dict(load_file(p))),)


class PersonalizeFaceParsingLoader:
    DESCRIPTION = ("Loads the BiSeNet face parser PuLID uses to keep only the face (facexlib's parsing_bisenet.pth) from "
                   "models/face_parsing. Plain torch: facexlib is not needed.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (FACE_PARSING,)
    RETURN_NAMES = ("face_parsing",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"parsing_file": _file_input("face_parsing", "parsing_bisenet.pth")}}

    def load(self, parsing_file):
        return (_load("face_parsing", parsing_file, "face parsing model", lambda p: load_parser(load_file(p))),)


def _preview(crops: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """IMAGE ``[n, S, 2S, 3]``: each aligned crop beside what EVA sees (the parsed, grey face on white)."""
    return torch.cat([crops, faces], dim=-1).permute(0, 2, 3, 1).float().cpu()


class PersonalizePuLIDEncode:
    DESCRIPTION = ("The ID features of reference faces, as PuLID's reference computes them: one face per image (the "
                   "largest by default) gives the raw ArcFace embedding (antelopev2) and, from the same face's keypoints, "
                   "the FFHQ-aligned 512 px crop; the parser keeps the face (grey on white); EVA02-CLIP encodes it. The "
                   "features feed any PuLID model; the preview shows each crop and what EVA sees.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (EMBEDS, "IMAGE", "STRING")
    RETURN_NAMES = ("embeds", "preview", "info")
    OUTPUT_TOOLTIPS = ("ID features of the reference faces (for 'Apply PuLID').",
                       "Each aligned crop beside the parsed face EVA-CLIP encodes.",
                       "Which faces were used, and warnings.")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "face_analysis": (FACE_ANALYSIS, {"tooltip": "From 'Load Face Analysis (Personalize)': antelopev2 for PuLID."}),
            "eva_clip": (EVA_CLIP, {"tooltip": "From 'Load EVA-CLIP (Personalize)'."}),
            "face_parsing": (FACE_PARSING, {"tooltip": "From 'Load Face Parsing (Personalize)'."}),
            "image": ("IMAGE", {"tooltip": "Reference image(s), one face each; several images are one identity."}),
            "selection": IN_SELECTION,
            "face_index": IN_INDEX,
        }}

    def encode(self, face_analysis, eva_clip, face_parsing, image, selection, face_index):
        check_image(image, "image")
        faces = face_analysis.analyze(image, selection, face_index, 112)  # raises naming the image without a face
        arrays = image_to_uint8(image)
        crops = np.stack([ffhq_crop(arr, faces.kps[i].numpy()) for i, arr in enumerate(arrays)])
        crops = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
        for loaded in (eva_clip, face_parsing):
            weights.prepare_adapter(loaded.patcher, torch.float32)
        device = eva_clip.patcher.load_device
        embeds, face_only = core.id_features(crops.to(device), faces.embedding.to(device), face_parsing.model,
                                              eva_clip.model, faces.pack)
        embeds = core.PuLIDEmbeds(embeds.id_cond.cpu(), [h.cpu() for h in embeds.hidden], embeds.pack)
        info = [f"{embeds.images} reference face(s) ({selection}); boxes {faces.bbox.round().int().tolist()}"]
        if faces.pack and faces.pack != core.PULID_FACE_PACK:
            log.warning("PuLID was trained on %s embeddings; these come from %s", core.PULID_FACE_PACK, faces.pack)
            info.append(f"warning: the faces come from {faces.pack}; PuLID was trained on {core.PULID_FACE_PACK} "
                        "embeddings (load it in 'Load Face Analysis')")
        return (embeds, _preview(crops, face_only.cpu()), "; ".join(info))


class PersonalizePuLIDSaveEmbeds:
    DESCRIPTION = "Saves PuLID ID features to the output folder as safetensors (atomic; the counter advances)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"embeds": (EMBEDS, {"tooltip": "ID features from 'PuLID Encode'."}),
                             "filename_prefix": ("STRING", {"default": "personalize/pulid_embeds",
                                                            "tooltip": "Prefix in the output folder."})}}

    def save(self, embeds, filename_prefix):
        return save_embeds(embeds, filename_prefix, EMBEDS_SUFFIX)


class PersonalizePuLIDLoadEmbeds:
    DESCRIPTION = "Loads PuLID ID features saved by 'Save PuLID Embeds' (from the input or output folder)."
    CATEGORY = CATEGORY
    RETURN_TYPES = (EMBEDS,)
    RETURN_NAMES = ("embeds",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"embeds_file": (embeds_files(EMBEDS_SUFFIX), {"tooltip": f"A *{EMBEDS_SUFFIX} file."})}}

    def load(self, embeds_file):
        return (core.PuLIDEmbeds.load(folders.annotated_file(embeds_file)),)


IN_PULID = (PULID, {"tooltip": "A PuLID model from 'Load PuLID (Personalize)'."})
IN_EMBEDS = (EMBEDS, {"tooltip": "ID features from 'PuLID Encode' or 'Load PuLID Embeds'."})
IN_MASK = ("MASK", {"tooltip": "Where the identity acts (white). Any size: it is stretched to the latent. Two PuLID "
                               "nodes with two masks put two identities in one image."})
IN_ID_MIX = ("BOOLEAN", {"default": False, "tooltip": "v1, several images: keep all 10 tokens of the further images "
                         "(the reference's 'id mix'); off: their first 5, as the reference does by default. v1.1 "
                         "encodes all images in one call either way."})


def _common_inputs() -> dict:
    return {"weight": weight_input("ID strength (id_scale; the reference apps use 0.8).", core.PULID_WEIGHT),
            "start_at": fraction_input(0.0, "Fraction of the sampling steps where the identity starts."),
            "end_at": fraction_input(1.0, "Fraction of the sampling steps where it stops.")}


def _check_embeds(loaded, embeds) -> None:
    embeds.check_for(loaded.model.spec)
    for i, t in enumerate([embeds.id_cond, *embeds.hidden]):
        check_finite(t, "the PuLID embeds" + (f" (hidden state {i - 1})" if i else ""))


def _apply(model, loaded, embeds, weight, projection, num_zero, start_at, end_at, attn_mask, id_mix):
    spec = loaded.model.spec
    if spec.layout == "flux":
        raise ValueError(f"{loaded.name} is a PuLID-FLUX model: use 'Apply PuLID-FLUX (Personalize)' on a Flux model")
    check_number(weight, "weight")
    if weight == 0:
        log.info("PuLID weight is 0: model returned unchanged")
        return model
    _check_embeds(loaded, embeds)
    mask = checked_attn_mask(attn_mask)

    def build(transformers, model_sites):
        cond, uncond = checked_tokens(core.encode_tokens(loaded.model, embeds, id_mix), f"the ID tokens of {loaded.name}")
        return core.PuLIDPatch(loaded.model, cond, uncond, weight, projection, num_zero, mask)

    out, patch, model_sites = patch_model(model, loaded.patcher, lambda t, s, c: core.check_model(spec, t, s, c), build,
                                          start_at, end_at)
    log.info("PuLID %s (%s) on %d cross-attention layers: %s, %d zero tokens, weight %.3g, %d reference image(s)",
             loaded.name, spec.version, len(model_sites), projection, num_zero, weight, embeds.images)
    return out


class PersonalizePuLIDApply:
    DESCRIPTION = ("Puts the identity into every cross-attention layer of an SDXL model with PuLID's ID attention: "
                   "'fidelity' (ortho_v2; 8 zero tokens for v1, 20 for v1.1, as the reference apps), 'style' (ortho, 16), "
                   "'neutral' (plain add). Coexists with IP-Adapter and other packs' patches on the same layers.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "An SDXL model."}), "pulid": IN_PULID, "embeds": IN_EMBEDS,
                             "method": (list(core.METHODS), {"default": "fidelity", "tooltip": "fidelity: most likeness; "
                                        "style: more freedom for the prompt's style; neutral: no projection."}),
                             **_common_inputs()},
                "optional": {"attn_mask": IN_MASK, "id_mix": IN_ID_MIX}}

    def apply(self, model, pulid, embeds, method, weight, start_at, end_at, attn_mask=None, id_mix=False):
        num_zero = core.ZERO_TOKENS.get((method, pulid.model.spec.version), 0)  # PuLID-FLUX: refused in _apply
        return (_apply(model, pulid, embeds, weight, core.METHODS[method], num_zero, start_at, end_at, attn_mask, id_mix),)


class PersonalizePuLIDApplyAdvanced:
    DESCRIPTION = ("Apply PuLID with the projection and the number of zero tokens chosen directly (more zero tokens: "
                   "more editability, less likeness).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "An SDXL model."}), "pulid": IN_PULID, "embeds": IN_EMBEDS,
                             "projection": (list(core.PROJECTIONS), {"default": "ortho_v2", "tooltip": "ortho_v2 "
                                            "(fidelity), ortho (style) or none."}),
                             "num_zero": ("INT", {"default": 8, "min": 0, "max": 80, "tooltip": "Zero tokens appended to "
                                          "the ID tokens (reference: 8 fidelity, 16 style, 20 for v1.1)."}),
                             **_common_inputs()},
                "optional": {"attn_mask": IN_MASK, "id_mix": IN_ID_MIX}}

    def apply(self, model, pulid, embeds, projection, num_zero, weight, start_at, end_at, attn_mask=None, id_mix=False):
        return (_apply(model, pulid, embeds, weight, projection, num_zero, start_at, end_at, attn_mask, id_mix),)


class PersonalizePuLIDFluxApply:
    DESCRIPTION = ("PuLID-FLUX on a Flux model, as the official code: after every 2nd double block and every 4th single "
                   "block, the image tokens attend to the ID tokens (img += weight * ca(id, img)), through ComfyUI's own "
                   "block hooks (nothing of the model is replaced; other packs' block patches keep running). cfg 1 (the "
                   "official default) runs the identity on the cond pass only; with cfg > 1 the negative pass gets the "
                   "ID encoder's output for zeros, as the official true-CFG path. Two nodes with two masks put two "
                   "identities in one image.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "info")
    OUTPUT_TOOLTIPS = ("The Flux model with the identity.", "What was applied.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Flux model (Flux.1-dev; PuLID-FLUX was trained on it)."}),
            "pulid": (PULID, {"tooltip": "pulid_flux_v0.9.1.safetensors (or v0.9.0) from 'Load PuLID (Personalize)'."}),
            "embeds": IN_EMBEDS,
            "weight": weight_input("ID strength (the official id_weight, default 1).", core.PULID_FLUX_WEIGHT),
            "start_step": ("INT", {"default": core.PULID_FLUX_START_STEP, "min": 0, "max": 10000, "tooltip": "Sampling "
                           "step from which the identity acts (the official 'timestep to start inserting ID': 0; its "
                           "docs suggest 4 for photorealism, 0-1 for stylized images)."}),
            "start_at": fraction_input(0.0, "Fraction of the sampling schedule where the identity starts (with start_step: "
                                       "both must have begun)."),
            "end_at": fraction_input(1.0, "Fraction of the sampling schedule where it stops."),
            "images": (list(core.FLUX_IMAGE_MODES), {"default": core.FLUX_IMAGE_MODES[0], "tooltip": "Several reference "
                       "images: the first only (the official Flux app takes one image), the mean of their ID embeddings "
                       "(what the popular ComfyUI ports do; not official), or all of them in one ID encoder call (as "
                       "PuLID v1.1 for SDXL)."}),
        }, "optional": {"attn_mask": IN_MASK}}

    def apply(self, model, pulid, embeds, weight, start_step, start_at, end_at, images, attn_mask=None):
        spec = pulid.model.spec
        if spec.layout != "flux":
            raise ValueError(f"{pulid.name} is a PuLID {spec.version} model for SDXL: use 'Apply PuLID (Personalize)', or "
                             "load pulid_flux_v0.9.1.safetensors here")
        check_number(weight, "weight")
        gate = flux_gate(model, start_at, end_at, start_step)
        if weight == 0:
            return (model, "weight 0: model unchanged")
        _check_embeds(pulid, embeds)
        dm = flux.flux_model(model)
        double, single = flux.depths(dm)
        sites = spec.sites((double, single))
        if len(sites) != spec.modules:
            raise ValueError(f"{pulid.name} has {spec.modules} cross-attentions, made for a Flux with 19 double and 38 "
                             f"single blocks; this model has {double} and {single}, which take {len(sites)}")
        if dm.hidden_size != spec.dim:
            raise ValueError(f"{pulid.name} takes image tokens of width {spec.dim}; this model's are {dm.hidden_size}")
        mask = checked_attn_mask(attn_mask)
        weights.prepare_adapter(pulid.patcher, unet.compute_dtype(model))
        with torch.no_grad():
            cond, uncond = checked_tokens(core.encode_flux_tokens(pulid.model, embeds, images), f"the ID tokens of {pulid.name}")
        patch = core.PuLIDFluxPatch(pulid.model, cond, uncond, weight, sites, mask)
        out = flux.install_block_patch(model, patch, gate, pulid.patcher)
        info = (f"PuLID-FLUX {pulid.name} after {len(sites)} blocks of {type(dm).__name__}, weight {weight:g}, from step "
                f"{start_step}; {embeds.images} image(s): {images}")
        if type(dm).__name__ != "Flux":
            info += f"; note: PuLID-FLUX was trained on Flux.1-dev, not {type(dm).__name__}"
        log.info(info)
        return (out, info)


NODES = {
    "PersonalizePuLIDLoader": ("Load PuLID (Personalize)", PersonalizePuLIDLoader),
    "PersonalizeEVACLIPLoader": ("Load EVA-CLIP (Personalize)", PersonalizeEVACLIPLoader),
    "PersonalizeFaceParsingLoader": ("Load Face Parsing (Personalize)", PersonalizeFaceParsingLoader),
    "PersonalizePuLIDEncode": ("PuLID Encode (Personalize)", PersonalizePuLIDEncode),
    "PersonalizePuLIDSaveEmbeds": ("Save PuLID Embeds (Personalize)", PersonalizePuLIDSaveEmbeds),
    "PersonalizePuLIDLoadEmbeds": ("Load PuLID Embeds (Personalize)", PersonalizePuLIDLoadEmbeds),
    "PersonalizePuLIDApply": ("Apply PuLID (Personalize)", PersonalizePuLIDApply),
    "PersonalizePuLIDApplyAdvanced": ("Apply PuLID Advanced (Personalize)", PersonalizePuLIDApplyAdvanced),
    "PersonalizePuLIDFluxApply": ("Apply PuLID-FLUX (Personalize)", PersonalizePuLIDFluxApply),
}
