"""IP-Adapter nodes. Thin: the math is in models/ipadapter.py, the ComfyUI plumbing in nodes/comfy/."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import folder_paths
import torch

from ..models.attention import EMBEDS_SCALING
from ..models.inputs import check_finite, check_image, check_number
from ..models.ipadapter import (
    COMBINE_METHODS,
    IPAdapterModel,
    IPAdapterPatch,
    IPAEmbeds,
    XLabsPatch,
    check_model,
    load_adapter,
    project_images,
)
from ..models.layers import LAYER_INDEXING, MAIN, WEIGHT_TYPES, layer_weights, parse_layer_weights
from .comfy import flux, folders, unet, vision, weights
from .common import checked_attn_mask, checked_tokens, embeds_files, flux_gate, fraction_input, patch_model, save_embeds, weight_input

log = logging.getLogger("personalize")

CATEGORY = "personalize/ipadapter"
IPADAPTER = "PERSONALIZE_IPADAPTER"
EMBEDS = "PERSONALIZE_IPA_EMBEDS"
EMBEDS_SUFFIX = ".ipaembeds.safetensors"


@dataclass
class LoadedIPAdapter:
    """What flows on a PERSONALIZE_IPADAPTER socket: the adapter module and its ModelPatcher."""

    name: str
    model: IPAdapterModel
    patcher: object
    plus_version: str | None = None  # FaceID Plus "v1" / "v2" when the unified loader's preset says it

    @property
    def spec(self):
        return self.model.spec


# ---------------------------------------------------------------------------------------------------------------
# Shared input declarations (declared once, used by several nodes)

IN_IPADAPTER = (IPADAPTER, {"tooltip": "An IP-Adapter from 'Load IP-Adapter (Personalize)'."})
IN_CLIP_VISION = ("CLIP_VISION", {"tooltip": "The CLIP vision model the adapter was trained with (ViT-H/14 for most; "
                                              "ViT-bigG/14 for ip-adapter_sdxl and ip-adapter_sd15_vit-G)."})
IN_IMAGE = ("IMAGE", {"tooltip": "Reference image(s). Several images are combined as 'combine_embeds' says."})
IN_NEGATIVE = ("IMAGE", {"tooltip": "Optional negative image(s): their embedding replaces the default unconditional one."})
IN_EMBEDS = (EMBEDS, {"tooltip": "Reference embeddings from 'IP-Adapter Encode' or 'Load IP-Adapter Embeds'."})


# ---------------------------------------------------------------------------------------------------------------


class PersonalizeIPAdapterLoader:
    DESCRIPTION = ("Loads an IP-Adapter from models/ipadapter (.safetensors or .bin). The family (base/light/vit-G, "
                   "Plus/Plus-face/composition, Full-face, FaceID / FaceID Plus / Portrait, XLabs Flux v1 / v2) and the "
                   "target model (SD1.5, SDXL or Flux) are read from the file's keys and shapes, not its name.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (IPADAPTER,)
    RETURN_NAMES = ("ipadapter",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ipadapter_file": (folder_paths.get_filename_list("ipadapter"),
                                                {"tooltip": "File in models/ipadapter, e.g. ip-adapter_sd15.safetensors."})}}

    def load(self, ipadapter_file):
        path = folders.full_path("ipadapter", ipadapter_file, "IP-Adapter")
        model = load_adapter(path).eval().requires_grad_(False)
        log.info("IP-Adapter %s: %s", ipadapter_file, model.spec.describe())
        return (LoadedIPAdapter(ipadapter_file, model, weights.adapter_patcher(model)),)


def _encode(ipadapter: LoadedIPAdapter, clip_vision, image: torch.Tensor, image_negative=None, batch_size: int = 0) -> IPAEmbeds:
    spec = ipadapter.spec
    if image is None:
        raise ValueError("IP-Adapter: no reference image")
    check_image(image, "the reference image")
    width = vision.clip_vision_width(clip_vision, spec.feature)
    if width != spec.clip_dim:
        raise ValueError(f"CLIP vision/adapter mismatch: the CLIP vision model gives {spec.feature} of width {width}, "
                         f"but {spec.describe()} needs width {spec.clip_dim}: load {spec.expected_clip_vision}")
    cond = vision.encode_clip_vision(clip_vision, image, spec.feature, batch_size)
    if image_negative is not None:
        check_image(image_negative, "image_negative")
        uncond = vision.encode_clip_vision(clip_vision, image_negative, spec.feature, batch_size)
    elif spec.info.negative == "zeros":
        uncond = torch.zeros_like(cond[:1])  # official uncond for global-embedding adapters: zero embeddings
    elif spec.info.negative == "black image":
        uncond = vision.encode_clip_vision(clip_vision, torch.zeros_like(image[:1]), spec.feature)
    else:
        uncond = vision.blank_clip_features(clip_vision, spec.feature)
    return IPAEmbeds(cond, uncond, spec.feature)


class PersonalizeIPAdapterEncode:
    DESCRIPTION = ("Encodes reference images with CLIP vision for an IP-Adapter. Without a negative image the "
                   "unconditional embedding is the one the adapter was trained with (zero embedding for base "
                   "models, the encoding of a blank image for Plus / Full-face, of a black image for XLabs Flux).")
    CATEGORY = CATEGORY
    RETURN_TYPES = (EMBEDS,)
    RETURN_NAMES = ("embeds",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ipadapter": IN_IPADAPTER, "clip_vision": IN_CLIP_VISION, "image": IN_IMAGE},
                "optional": {"image_negative": IN_NEGATIVE}}

    def encode(self, ipadapter, clip_vision, image, image_negative=None):
        return (_encode(ipadapter, clip_vision, image, image_negative),)


# Inputs every Apply node shares (declared once).
def _apply_controls() -> dict:
    return {
        "weight": weight_input("Strength of the image prompt; 0 leaves the model untouched."),
        "weight_type": (list(WEIGHT_TYPES), {"default": "linear", "tooltip": "How the weight is spread over the "
                        "layers. 'style transfer' / 'composition' use only the style or layout layers "
                        "(InstantStyle); 'style and composition' takes a second image for layout; the 'precise' types "
                        "also push the reference away from the other layers (its image as the negative there)."}),
        "start_at": fraction_input(0.0, "Fraction of the sampling steps where the image prompt starts."),
        "end_at": fraction_input(1.0, "Fraction of the sampling steps where it stops."),
        "combine_embeds": (list(COMBINE_METHODS), {"default": "concat", "tooltip": "Several reference images: "
                           "'concat' keeps all images' tokens; 'average' / 'norm average' blend them first."}),
        "embeds_scaling": (list(EMBEDS_SCALING), {"default": "V only", "tooltip": "Where the weight is applied: "
                           "to the image attention output (V only), to K and V, or K and V with a penalty "
                           "for narrow layers."}),
    }


IN_MASK = ("MASK", {"tooltip": "Where the image prompt acts (white) and where not (black). Any size: it is "
                               "stretched to the latent. One mask, or one per latent in the batch."})


class _ApplyBase:
    """The part of every Apply node after the references are turned into tokens."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @staticmethod
    def _patch(model, ipadapter, weight, weight_type, start_at, end_at, embeds_scaling, attn_mask, project,
               composition_weight=1.0, project_alt=None, layer_weight_text=None, layer_indexing=LAYER_INDEXING[0],
               unfold=False):
        """Check the pairing, project (``project()`` -> (cond, uncond) tokens) and put the patch on a clone.
        ``layer_weight_text``: explicit weights per cross-attention layer (or per transformer), times ``weight``,
        instead of the weight type's; ``unfold``: one token set per reference (reference i for latent i)."""
        if ipadapter.spec.layout == "flux":
            raise ValueError(f"{ipadapter.name} is an {ipadapter.spec.name}: use 'Apply IP-Adapter Flux (Personalize)' on a Flux model")
        check_number(weight, "weight")
        check_number(composition_weight, "composition_weight")
        mask = checked_attn_mask(attn_mask)

        def build(transformers, model_sites):
            tokens = checked_tokens(project(), f"the image tokens of {ipadapter.name}")
            alt = checked_tokens(project_alt(), f"the image tokens of {ipadapter.name}") if project_alt else None
            if layer_weight_text is not None:
                by_site = layer_indexing == LAYER_INDEXING[0]
                count = len(model_sites) if by_site else len(transformers)
                given = parse_layer_weights(layer_weight_text, count, layer_indexing)
                site_weights = {s.adapter_index: (weight * given[i if by_site else s.transformer_index], MAIN)
                                for i, s in enumerate(model_sites) if (i if by_site else s.transformer_index) in given}
            else:
                per_transformer = layer_weights(weight_type, transformers, ipadapter.spec.layout, weight, composition_weight)
                site_weights = {s.adapter_index: per_transformer[s.transformer_index]
                                for s in model_sites if s.transformer_index in per_transformer}
            return IPAdapterPatch(ipadapter.model, *tokens, site_weights, embeds_scaling, alt=alt, mask=mask, unfold=unfold)

        out, patch, model_sites = patch_model(model, ipadapter.patcher,
                                              lambda t, s, c: check_model(ipadapter.spec, t, s, c), build, start_at, end_at)
        log.info("IP-Adapter %s applied on %d of %d cross-attention layers (%s, weight %.3g%s)", ipadapter.name,
                 len(patch.site_weights), len(model_sites), "layer weights" if layer_weight_text is not None else weight_type,
                 weight, ", unfolded" if unfold else "")
        return out


class PersonalizeIPAdapterApply(_ApplyBase):
    DESCRIPTION = ("Adds the image prompt to every cross-attention layer of an SD1.5 / SDXL model (decoupled "
                   "cross-attention). Give either image + clip_vision or embeds. Coexists with other packs' "
                   "attention patches on the same layers.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"model": ("MODEL", {"tooltip": "SD1.5 or SDXL model."}), "ipadapter": IN_IPADAPTER, **_apply_controls()},
            "optional": {
                "image": IN_IMAGE,
                "clip_vision": IN_CLIP_VISION,
                "embeds": IN_EMBEDS,
                "image_negative": IN_NEGATIVE,
                "attn_mask": IN_MASK,
                "composition_image": ("IMAGE", {"tooltip": "Layout reference for weight type 'style and composition'."}),
                "composition_embeds": (EMBEDS, {"tooltip": "Layout reference embeds for 'style and composition'."}),
                "composition_weight": weight_input("'style and composition': strength of the layout reference; "
                                                   "'style transfer precise' / 'composition precise': the boost of the "
                                                   "layers the reference is pushed away from (the popular pack's "
                                                   "style_boost / composition_boost)."),
            },
        }

    def apply(self, model, ipadapter, weight, weight_type, start_at, end_at, combine_embeds, embeds_scaling,
              image=None, clip_vision=None, embeds=None, image_negative=None, attn_mask=None,
              composition_image=None, composition_embeds=None, composition_weight=1.0):
        with_composition = weight_type == "style and composition"
        if weight == 0 and (not with_composition or composition_weight == 0):
            log.info("IP-Adapter weight is 0: model returned unchanged")
            return (model,)
        if ipadapter.spec.is_faceid:
            raise ValueError(f"{ipadapter.name} is an {ipadapter.spec.name} model: use 'Apply IP-Adapter FaceID (Personalize)'")
        embeds = self._embeds(ipadapter, clip_vision, image, embeds, image_negative, "image / embeds")
        alt = None
        if with_composition:
            alt_embeds = self._embeds(ipadapter, clip_vision, composition_image, composition_embeds, None,
                                      "composition_image / composition_embeds")
            alt = lambda: project_images(ipadapter.model, alt_embeds.cond, alt_embeds.uncond, combine_embeds)  # noqa: E731
        out = self._patch(model, ipadapter, weight, weight_type, start_at, end_at, embeds_scaling, attn_mask,
                          lambda: project_images(ipadapter.model, embeds.cond, embeds.uncond, combine_embeds),
                          composition_weight, alt)
        return (out,)

    @staticmethod
    def _embeds(ipadapter, clip_vision, image, embeds, image_negative, what) -> IPAEmbeds:
        if embeds is not None:
            if image is not None:
                raise ValueError(f"connect either an image or embeds ({what}), not both")
            embeds.check_for(ipadapter.spec)
            check_finite(embeds.cond, what.split(" / ")[-1])
            check_finite(embeds.uncond, what.split(" / ")[-1] + " (negative)")
            return embeds
        if image is None:
            raise ValueError(f"IP-Adapter needs a reference: connect {what}")
        if clip_vision is None:
            raise ValueError("IP-Adapter: an image input needs clip_vision too (or connect embeds instead)")
        return _encode(ipadapter, clip_vision, image, image_negative)


# FaceID Plus v1 and v2 files have identical keys; v2 adds the ID tokens back (shortcut). The public v2 files are
# named ...faceid-plusv2...; the explicit option wins over the name.
PLUS_VERSIONS = ("auto (from file name)", "v1", "v2")
PLUS_V2_NAME_HINT = "plusv2"
FACEID_LORA_NONE = "none"


class PersonalizeIPAdapterFaceIDApply(_ApplyBase):
    DESCRIPTION = ("IP-Adapter FaceID family (FaceID, FaceID Plus v1/v2, Portrait, Portrait unnorm; SD1.5 and SDXL): "
                   "identity from the ArcFace embedding of 'Face Embed (Personalize)', plus the CLIP encoding of the "
                   "aligned face for FaceID Plus. Loads the companion LoRA from models/loras.")
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "info")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "SD1.5 or SDXL model."}),
                "ipadapter": IN_IPADAPTER,
                "face_embeds": ("PERSONALIZE_FACE_EMBEDS", {"tooltip": "Faces from 'Face Embed (Personalize)': one per reference image."}),
                **_apply_controls(),
            },
            "optional": {
                "clip_vision": (IN_CLIP_VISION[0], {"tooltip": "FaceID Plus: the CLIP vision model for the face crops (ViT-H/14)."}),
                "lora_name": ([FACEID_LORA_NONE] + folder_paths.get_filename_list("loras"), {
                    "default": FACEID_LORA_NONE, "tooltip": "The LoRA trained with the adapter, e.g. "
                    "ip-adapter-faceid-plusv2_sd15_lora.safetensors (FaceID and FaceID Plus; Portrait has none)."}),
                "lora_strength": ("FLOAT", {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.05,
                                            "tooltip": "LoRA strength (1.0 = as trained; lower leaves more freedom to the prompt)."}),
                "plus_version": (list(PLUS_VERSIONS), {"default": PLUS_VERSIONS[0], "tooltip": "FaceID Plus v1 and v2 "
                                 "files have identical keys: choose, or let the file name decide ('plusv2' = v2)."}),
                "shortcut_weight": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 5.0, "step": 0.05,
                                              "tooltip": "FaceID Plus v2: weight of the ID tokens added back (official s_scale 1.0)."}),
                "attn_mask": IN_MASK,
            },
        }

    def apply(self, model, ipadapter, face_embeds, weight, weight_type, start_at, end_at, combine_embeds, embeds_scaling,
              clip_vision=None, lora_name=FACEID_LORA_NONE, lora_strength=1.0, plus_version=PLUS_VERSIONS[0],
              shortcut_weight=1.0, attn_mask=None):
        spec = ipadapter.spec
        if not spec.is_faceid:
            raise ValueError(f"{ipadapter.name} is an {spec.name} model, not FaceID: use 'Apply IP-Adapter (Personalize)'")
        if weight == 0:
            log.info("IP-Adapter FaceID weight is 0: model returned unchanged")
            return (model, "weight 0: model unchanged")
        family = spec.info
        ids = (face_embeds.normed if family.face_embedding == "normed" else face_embeds.embedding).float()
        if ids.ndim != 2 or ids.shape[0] == 0:
            raise ValueError("IP-Adapter FaceID: no face embeddings (the face batch is empty)")
        check_finite(ids, "face_embeds")
        check_number(lora_strength, "lora_strength")
        check_number(shortcut_weight, "shortcut_weight")
        info = [spec.describe()]
        clip, shortcut = None, None
        if family.clip_of_face_crop:
            if clip_vision is None:
                raise ValueError(f"{spec.name} needs clip_vision ({spec.expected_clip_vision}) to encode the face crops")
            width = vision.clip_vision_width(clip_vision, "penultimate")
            if width != spec.clip_dim:
                raise ValueError(f"CLIP vision/adapter mismatch: the CLIP vision model gives hidden states of width {width}, "
                                 f"{spec.name} needs {spec.clip_dim}: load {spec.expected_clip_vision}")
            clip = (vision.encode_clip_vision(clip_vision, face_embeds.crops, "penultimate"),
                    vision.blank_clip_features(clip_vision, "penultimate"))
        if family.shortcut_versions:
            version = plus_version if plus_version != PLUS_VERSIONS[0] else (ipadapter.plus_version or (
                "v2" if PLUS_V2_NAME_HINT in ipadapter.name.lower().replace("-", "").replace("_", "") else "v1"))
            shortcut = shortcut_weight if version == "v2" else None
            info.append(f"FaceID Plus {version}" + (f" (shortcut weight {shortcut_weight:g})" if shortcut is not None else "")
                        + ("" if plus_version != PLUS_VERSIONS[0] else " from the preset" if ipadapter.plus_version
                           else " from the file name"))
        uncond = torch.zeros_like(ids[:1])  # official uncond: the projection of a zero embedding
        pack = getattr(face_embeds, "pack", None)
        if family.face_pack and pack and pack != family.face_pack:
            log.warning("%s was trained on %s embeddings; these come from %s", ipadapter.name, family.face_pack, pack)
            info.append(f"warning: the faces come from {pack}, the model was trained on {family.face_pack} embeddings "
                        f"(load {family.face_pack} in 'Load Face Analysis')")
        if lora_name != FACEID_LORA_NONE:
            model, layers = weights.apply_lora(model, lora_name, lora_strength)
            info.append(f"LoRA {lora_name} at {lora_strength:g} ({layers} layers)")
        elif spec.has_lora or family.trained_with_lora:
            log.warning("%s was trained with a LoRA; load its *_lora.safetensors in lora_name for full likeness", ipadapter.name)
            info.append("no LoRA (this model was trained with one)")
        out = self._patch(model, ipadapter, weight, weight_type, start_at, end_at, embeds_scaling, attn_mask,
                          lambda: project_images(ipadapter.model, ids, uncond, combine_embeds, clip, shortcut))
        text = "; ".join(info)
        log.info("IP-Adapter FaceID: %s", text)
        return (out, text)


class PersonalizeIPAdapterFluxApply:
    DESCRIPTION = ("XLabs IP-Adapter (v1 / v2) on a Flux model: after each of the 19 double blocks, the block's own image "
                   "query attends to the reference's image tokens and the result is added to the image tokens "
                   "(img += weight * attention), as the official x-flux code, through ComfyUI's block hooks (nothing of "
                   "the model is replaced). The negative pass (cfg > 1) attends to the negative image's tokens (a black "
                   "image by default), never to the cond pass's. Give image + clip_vision (CLIP ViT-L/14) or embeds.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"model": ("MODEL", {"tooltip": "A Flux model (Flux.1-dev)."}),
                         "ipadapter": (IPADAPTER, {"tooltip": "XLabs flux-ip-adapter(-v2) ip_adapter.safetensors from "
                                                   "'Load IP-Adapter (Personalize)'."}),
                         "weight": weight_input("Strength of the image prompt (x-flux ip_scale; 1 by default, XLabs "
                                                "suggests 0.5-1)."),
                         "start_at": fraction_input(0.0, "Fraction of the sampling schedule where the image prompt starts."),
                         "end_at": fraction_input(1.0, "Fraction of the sampling schedule where it stops."),
                         "combine_embeds": (list(COMBINE_METHODS), {"default": "concat", "tooltip": "Several reference "
                                            "images: 'concat' keeps all images' tokens; 'average' / 'norm average' blend "
                                            "their CLIP embeddings first."})},
            "optional": {"image": IN_IMAGE,
                         "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP ViT-L/14 (clip_vision_l.safetensors), the "
                                         "encoder XLabs trained with."}),
                         "embeds": IN_EMBEDS, "image_negative": IN_NEGATIVE, "attn_mask": IN_MASK},
        }

    def apply(self, model, ipadapter, weight, start_at, end_at, combine_embeds, image=None, clip_vision=None, embeds=None,
              image_negative=None, attn_mask=None):
        spec = ipadapter.spec
        if spec.layout != "flux":
            raise ValueError(f"{ipadapter.name} is an {spec.name} for {spec.layout.upper()}: use 'Apply IP-Adapter "
                             "(Personalize)' on an SD1.5 / SDXL model")
        check_number(weight, "weight")
        gate = flux_gate(model, start_at, end_at)
        if weight == 0:
            log.info("IP-Adapter weight is 0: model returned unchanged")
            return (model,)
        dm = flux.flux_model(model)
        double, _ = flux.depths(dm)
        if double != len(spec.widths) or dm.hidden_size != spec.widths[0] or not hasattr(dm.double_blocks[0], "img_mod"):
            raise ValueError(f"{ipadapter.name} is made for a Flux with {len(spec.widths)} double blocks of width "
                             f"{spec.widths[0]}; this {type(dm).__name__} has {double} of width {dm.hidden_size}"
                             + ("" if hasattr(dm.double_blocks[0], "img_mod") else " and no per-block modulation"))
        if dm.params.context_in_dim != spec.cross_dim:
            log.info("XLabs tokens of width %d on a model whose text width is %d", spec.cross_dim, dm.params.context_in_dim)
        embeds = PersonalizeIPAdapterApply._embeds(ipadapter, clip_vision, image, embeds, image_negative, "image / embeds")
        mask = checked_attn_mask(attn_mask)
        weights.prepare_adapter(ipadapter.patcher, unet.compute_dtype(model))
        with torch.no_grad():
            cond, uncond = checked_tokens(project_images(ipadapter.model, embeds.cond, embeds.uncond, combine_embeds),
                                          f"the image tokens of {ipadapter.name}")
        patch = XLabsPatch(ipadapter.model, cond, uncond, weight, mask)
        out = flux.install_block_patch(model, patch, gate, ipadapter.patcher)
        log.info("IP-Adapter %s (%d tokens per image) on %d double blocks, weight %.3g", ipadapter.name, spec.tokens,
                 double, weight)
        return (out,)


class PersonalizeIPAdapterSaveEmbeds:
    DESCRIPTION = "Saves IP-Adapter embeds to the output folder as safetensors (never a pickle)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"embeds": IN_EMBEDS,
                             "filename_prefix": ("STRING", {"default": "personalize/ipa_embeds",
                                                            "tooltip": "Prefix in the output folder."})}}

    def save(self, embeds, filename_prefix):
        return save_embeds(embeds, filename_prefix, EMBEDS_SUFFIX)


class PersonalizeIPAdapterLoadEmbeds:
    DESCRIPTION = "Loads IP-Adapter embeds saved by 'Save IP-Adapter Embeds' (from the input or output folder)."
    CATEGORY = CATEGORY
    RETURN_TYPES = (EMBEDS,)
    RETURN_NAMES = ("embeds",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"embeds_file": (embeds_files(EMBEDS_SUFFIX), {"tooltip": f"A *{EMBEDS_SUFFIX} file."})}}

    def load(self, embeds_file):
        return (IPAEmbeds.load(folders.annotated_file(embeds_file)),)


NODES = {
    "PersonalizeIPAdapterLoader": ("Load IP-Adapter (Personalize)", PersonalizeIPAdapterLoader),
    "PersonalizeIPAdapterEncode": ("IP-Adapter Encode (Personalize)", PersonalizeIPAdapterEncode),
    "PersonalizeIPAdapterApply": ("Apply IP-Adapter (Personalize)", PersonalizeIPAdapterApply),
    "PersonalizeIPAdapterFaceIDApply": ("Apply IP-Adapter FaceID (Personalize)", PersonalizeIPAdapterFaceIDApply),
    "PersonalizeIPAdapterFluxApply": ("Apply IP-Adapter Flux (Personalize)", PersonalizeIPAdapterFluxApply),
    "PersonalizeIPAdapterSaveEmbeds": ("Save IP-Adapter Embeds (Personalize)", PersonalizeIPAdapterSaveEmbeds),
    "PersonalizeIPAdapterLoadEmbeds": ("Load IP-Adapter Embeds (Personalize)", PersonalizeIPAdapterLoadEmbeds),
}
