"""IP-Adapter nodes users of ComfyUI_IPAdapter_plus reach for: the unified loader with presets, batch (unfold) and
per-layer applies, embeds tools (combine, noise negatives), CLIP-vision prep and tiles, regional prompts. Thin: the
tables and the math are in models/ (presets.py, layers.py, ipadapter.py, images.py), the ComfyUI plumbing in
nodes/comfy/."""
from __future__ import annotations

import logging

import folder_paths
import torch

from ..models import images as imgs
from ..models.attention import EMBEDS_SCALING
from ..models.inputs import check_image, check_mask, check_number
from ..models.ipadapter import COMBINE_METHODS, EMBEDS_COMBINE_METHODS, FAMILIES, IPAEmbeds, combine_rows, load_adapter, project_images
from ..models.layers import LAYER_INDEXING, LAYOUT_NAMES, LAYOUTS, WEIGHT_TYPES
from ..models.presets import CLIP_VISION_NAMES, CLIP_VISION_PATTERNS, PRESETS, find_file
from .comfy import folders, text, unet, vision, weights
from .common import fraction_input, weight_input
from .face import FACE_ANALYSIS, load_face_analysis
from .face import PROVIDERS as FACE_PROVIDERS
from .ipadapter import (
    CATEGORY,
    EMBEDS,
    IN_EMBEDS,
    IN_IMAGE,
    IN_IPADAPTER,
    IN_MASK,
    IN_NEGATIVE,
    IPADAPTER,
    LoadedIPAdapter,
    PersonalizeIPAdapterApply,
    _ApplyBase,
    _encode,
)

log = logging.getLogger("personalize")

REGIONS = "PERSONALIZE_IPA_REGIONS"
IN_CLIP_VISION = ("CLIP_VISION", {"tooltip": "The CLIP vision model the adapter was trained with."})
IN_SHARPENING = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05,
                           "tooltip": "Contrast-adaptive sharpening (0: none)."})


def _model_layout(model) -> str:
    _, sites, _ = unet.discover_sites(model)
    layout = LAYOUTS.get(len(sites))
    if layout is None:
        raise ValueError(f"this UNet has {len(sites)} cross-attention layers; the presets are for SD1.5 (16) and SDXL (70)")
    return layout


def _pick(folder: str, patterns: tuple[str, ...], names: tuple[str, ...], what: str) -> str:
    found = find_file(folder_paths.get_filename_list(folder), patterns)
    if found is None:
        raise ValueError(f"{what}: no file in models/{folder} matches; the preset accepts {', '.join(names)} (or a name "
                         f"matching {' / '.join(patterns)}). Folders searched: "
                         f"{', '.join(folder_paths.get_folder_paths(folder))}")
    return found


class PersonalizeIPAdapterUnifiedLoader:
    DESCRIPTION = ("One node instead of three loaders: picks the IP-Adapter, the CLIP vision model and, for FaceID, "
                   "the face analysis and the companion LoRA of a preset (the names of ComfyUI_IPAdapter_plus' unified "
                   "loaders) from your folders, for the model it is given (SD1.5 or SDXL, detected). File names only "
                   "find the candidates; each file's keys are checked to be what the preset says. The info output says "
                   "which files were used; a missing file gets an error listing every name the preset accepts.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", IPADAPTER, "CLIP_VISION", FACE_ANALYSIS, "STRING")
    RETURN_NAMES = ("model", "ipadapter", "clip_vision", "face_analysis", "info")
    OUTPUT_TOOLTIPS = ("The model (with the FaceID LoRA for the FaceID / FaceID Plus presets).", "The adapter.",
                       "The CLIP vision model of the preset (none for FaceID and Portrait).",
                       "FaceID presets: the face analysis (buffalo_l) for 'Face Embed'; none otherwise.",
                       "Which files were chosen.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5 or SDXL model: the preset's files for it are chosen."}),
            "preset": (list(PRESETS), {"default": "standard", "tooltip": "light (SD1.5), standard, vit-G, plus, plus face, "
                       "full face (SD1.5), FaceID, FaceID Plus (SD1.5), FaceID Plus v2, Portrait, Portrait unnorm (SDXL)."}),
            "lora_strength": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 2.0, "step": 0.01, "tooltip": "FaceID / "
                              "FaceID Plus: strength of the companion LoRA (the popular pack's default 0.6)."}),
            "provider": (list(FACE_PROVIDERS), {"default": "CPU", "tooltip": "FaceID presets: where the face analysis runs."}),
        }}

    def load(self, model, preset, lora_strength, provider):
        p = PRESETS[preset]
        layout = _model_layout(model)
        if layout not in p.patterns:
            raise ValueError(f"the {preset!r} preset has no {LAYOUT_NAMES[layout]} model; choose another preset")
        info = [f"preset {preset} for {LAYOUT_NAMES[layout]}"]
        name = _pick("ipadapter", p.patterns[layout], p.names[layout], f"IP-Adapter for the {preset!r} preset")
        adapter = load_adapter(folders.full_path("ipadapter", name, "IP-Adapter")).eval().requires_grad_(False)
        spec = adapter.spec
        if spec.family != p.family or spec.layout != layout:
            raise ValueError(f"{name} matched the {preset!r} preset's file names, but its keys say {spec.describe()}; "
                             f"the preset needs {FAMILIES[p.family].description} for {LAYOUT_NAMES[layout]}: rename the file, "
                             "or choose the preset that fits it")
        loaded = LoadedIPAdapter(name, adapter, weights.adapter_patcher(adapter), plus_version=p.plus_version)
        info.append(f"adapter {name}")
        clip_vision = None
        kind = p.clip.get(layout)
        if kind is not None:
            cv_name = _pick("clip_vision", CLIP_VISION_PATTERNS[kind], CLIP_VISION_NAMES[kind], f"CLIP vision ({kind})")
            clip_vision = vision.load_clip_vision(folders.full_path("clip_vision", cv_name, "CLIP vision model"))
            info.append(f"CLIP vision {cv_name}")
        face = None
        if p.face_pack:
            face = load_face_analysis(p.face_pack, provider)
            info.append(f"face analysis {p.face_pack} ({provider})")
        if layout in p.lora_patterns:
            lora = _pick("loras", p.lora_patterns[layout], p.lora_names[layout], f"the LoRA of the {preset!r} preset")
            if lora_strength:
                model, layers = weights.apply_lora(model, lora, lora_strength)
                info.append(f"LoRA {lora} at {lora_strength:g} ({layers} layers)")
        text_info = "; ".join(info)
        log.info("IP-Adapter unified loader: %s", text_info)
        return (model, loaded, clip_vision, face, text_info)


def _references(ipadapter, clip_vision, image, embeds, image_negative, encode_batch_size=0) -> IPAEmbeds:
    if ipadapter.spec.is_faceid or ipadapter.spec.layout == "flux":
        raise ValueError(f"{ipadapter.name} is an {ipadapter.spec.name}: use 'Apply IP-Adapter "
                         f"{'FaceID' if ipadapter.spec.is_faceid else 'Flux'} (Personalize)'")
    if embeds is not None:
        return PersonalizeIPAdapterApply._embeds(ipadapter, clip_vision, None, embeds, None, "image / embeds")
    if image is None or clip_vision is None:
        raise ValueError("connect image + clip_vision, or embeds")
    return _encode(ipadapter, clip_vision, image, image_negative, encode_batch_size)


def _controls() -> dict:
    return {"weight": weight_input("Strength of the image prompt."),
            "start_at": fraction_input(0.0, "Fraction of the sampling steps where the image prompt starts."),
            "end_at": fraction_input(1.0, "Fraction of the sampling steps where it stops."),
            "embeds_scaling": (list(EMBEDS_SCALING), {"default": "V only", "tooltip": "Where the weight is applied."})}


def _optional_refs() -> dict:
    return {"image": IN_IMAGE, "clip_vision": IN_CLIP_VISION, "embeds": IN_EMBEDS, "image_negative": IN_NEGATIVE,
            "attn_mask": IN_MASK}


class PersonalizeIPAdapterApplyBatch(_ApplyBase):
    DESCRIPTION = ("Apply IP-Adapter with one reference per latent (the popular pack's 'unfold batch'): reference i "
                   "conditions latent i of the batch (AnimateDiff-style frame batches); with fewer references than "
                   "latents the last one repeats. Works under ComfyUI's context windows (each window's latents take "
                   "their own references). encode_batch_size encodes long reference batches in chunks.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "SD1.5 or SDXL model."}), "ipadapter": IN_IPADAPTER,
                             "weight": _controls()["weight"],
                             "weight_type": (list(WEIGHT_TYPES), {"default": "linear", "tooltip": "How the weight is "
                                             "spread over the layers (as in 'Apply IP-Adapter')."}),
                             "start_at": _controls()["start_at"], "end_at": _controls()["end_at"],
                             "embeds_scaling": _controls()["embeds_scaling"],
                             "encode_batch_size": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "References "
                                                   "encoded at a time (0: all at once); lower it if encoding a long "
                                                   "batch runs out of memory."})},
                "optional": _optional_refs()}

    def apply(self, model, ipadapter, weight, weight_type, start_at, end_at, embeds_scaling, encode_batch_size,
              image=None, clip_vision=None, embeds=None, image_negative=None, attn_mask=None):
        if weight == 0:
            return (model,)
        refs = _references(ipadapter, clip_vision, image, embeds, image_negative, encode_batch_size)

        def project():
            step = encode_batch_size if encode_batch_size > 0 else refs.cond.shape[0]
            cond = torch.cat([ipadapter.model.project(refs.cond[i:i + step]).cpu() for i in range(0, refs.cond.shape[0], step)])
            return cond, ipadapter.model.project(refs.uncond).cpu()
        return (self._patch(model, ipadapter, weight, weight_type, start_at, end_at, embeds_scaling, attn_mask, project,
                            unfold=True),)


class PersonalizeIPAdapterApplyLayerWeights(_ApplyBase):
    DESCRIPTION = ("Apply IP-Adapter with one weight per cross-attention layer (16 on SD1.5, 70 on SDXL, in execution "
                   "order: input blocks, middle, output blocks), or per transformer (16 / 11, as ComfyUI_IPAdapter_plus' "
                   "Mad Scientist numbers them), for layer studies. Give a list of weights, or index:weight pairs (the "
                   "layers not named get nothing); each is multiplied by weight.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "SD1.5 or SDXL model."}), "ipadapter": IN_IPADAPTER,
                             "weight": _controls()["weight"],
                             "layer_weights": ("STRING", {"default": "0:1.0", "multiline": True, "tooltip": "e.g. "
                                               "'3:1.0, 6:0.5' or one number per layer, separated by commas."}),
                             "layer_indexing": (list(LAYER_INDEXING), {"default": LAYER_INDEXING[0], "tooltip": "What "
                                                "the indices count: cross-attention layers, or transformers."}),
                             "start_at": _controls()["start_at"], "end_at": _controls()["end_at"],
                             "combine_embeds": (list(COMBINE_METHODS), {"default": "concat", "tooltip": "Several "
                                                "reference images: concat / average / norm average."}),
                             "embeds_scaling": _controls()["embeds_scaling"]},
                "optional": _optional_refs()}

    def apply(self, model, ipadapter, weight, layer_weights, layer_indexing, start_at, end_at, combine_embeds,
              embeds_scaling, image=None, clip_vision=None, embeds=None, image_negative=None, attn_mask=None):
        refs = _references(ipadapter, clip_vision, image, embeds, image_negative)
        return (self._patch(model, ipadapter, weight, "linear", start_at, end_at, embeds_scaling, attn_mask,
                            lambda: project_images(ipadapter.model, refs.cond, refs.uncond, combine_embeds),
                            layer_weight_text=layer_weights, layer_indexing=layer_indexing),)


class PersonalizeIPAdapterCombineEmbeds:
    DESCRIPTION = ("Combines IP-Adapter embeds as ComfyUI_IPAdapter_plus' Combine Embeds does: all rows stacked, then "
                   "concat (kept apart), add (sum), subtract (the first minus the mean of the others), average, norm "
                   "average (divided by the norm over the rows), max, min. The negatives are combined the same way.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (EMBEDS,)
    RETURN_NAMES = ("embeds",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        tip = {"tooltip": "Embeds from 'IP-Adapter Encode' or 'Load IP-Adapter Embeds'."}
        return {"required": {"embed1": (EMBEDS, tip), "method": (list(EMBEDS_COMBINE_METHODS), {"default": "concat",
                             "tooltip": "How the rows are combined."})},
                "optional": {f"embed{i}": (EMBEDS, tip) for i in range(2, 6)}}

    def combine(self, embed1, method, embed2=None, embed3=None, embed4=None, embed5=None):
        given = [e for e in (embed1, embed2, embed3, embed4, embed5) if e is not None]
        for e in given[1:]:
            if e.feature != embed1.feature or e.cond.shape[1:] != embed1.cond.shape[1:]:
                raise ValueError(f"embeds of CLIP {e.feature} {tuple(e.cond.shape[1:])} cannot be combined with "
                                 f"{embed1.feature} {tuple(embed1.cond.shape[1:])}: encode them with the same CLIP vision")
        if method == "concat" and len(given) == 1:
            return (embed1,)
        cond = combine_rows(torch.cat([e.cond for e in given]), method)
        uncond = combine_rows(torch.cat([e.uncond for e in given]), method)
        if method == "concat" and uncond.shape[0] not in (1, cond.shape[0]):
            uncond = torch.cat([e.uncond.expand(e.cond.shape[0], *e.uncond.shape[1:]) for e in given])
        return (IPAEmbeds(cond, uncond, embed1.feature),)


class PersonalizeIPAdapterNoise:
    DESCRIPTION = ("A noise image to use as the negative image of an IP-Adapter (the popular pack's IPAdapter Noise "
                   "types): fade, dissolve, gaussian or shuffle, from a black 224 px square or a given image, seeded.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"type": (list(imgs.NOISE_TYPES), {"default": "fade", "tooltip": "fade: blend with uniform "
                             "noise; dissolve: replace pixels; gaussian: add normal noise; shuffle: warp, flip, add noise."}),
                             "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                                    "tooltip": "How much noise."}),
                             "blur": ("INT", {"default": 0, "min": 0, "max": 32, "tooltip": "Gaussian blur in pixels (odd)."}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "The noise's seed."})},
                "optional": {"image": ("IMAGE", {"tooltip": "Noise on this image (its centre square, 224 px)."})}}

    def make(self, type, strength, blur, seed, image=None):
        if image is not None:
            check_image(image, "image")
        return (imgs.noise_image(type, check_number(strength, "strength", 0.0, 1.0), int(blur), int(seed), image),)


class PersonalizePrepImageForClipVision:
    DESCRIPTION = ("Chooses the square a CLIP vision encoder sees, instead of its centre crop: crop at the top / bottom "
                   "/ left / right / centre, or pad to a square; resized with the chosen filter; optional sharpening "
                   "(as the popular pack's Prep Image For ClipVision).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "prep"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {"tooltip": "Reference image(s)."}),
                             "interpolation": (list(imgs.INTERPOLATIONS), {"default": "LANCZOS", "tooltip": "Resize filter."}),
                             "crop_position": (list(imgs.CROP_POSITIONS), {"default": "center", "tooltip": "Where the "
                                               "square is taken, or 'pad' to keep the whole picture."}),
                             "sharpening": IN_SHARPENING,
                             "size": ("INT", {"default": 224, "min": 64, "max": 1024, "tooltip": "Output side (224 for "
                                      "the ViT-H / bigG encoders, 336 for ViT-L-336)."})}}

    def prep(self, image, interpolation, crop_position, sharpening, size):
        check_image(image, "image")
        return (imgs.prep_for_clip_vision(image, interpolation, crop_position, check_number(sharpening, "sharpening", 0, 1),
                                          int(size)),)


class PersonalizeIPAdapterEncodeTiled:
    DESCRIPTION = ("Encodes a tall or wide reference as tiles, so that its borders are not lost to the CLIP centre "
                   "crop: near-square images are cut 2 x 2, others into up to 4 overlapping tiles along the long side "
                   "(the popular pack's IPAdapter Tiled tiling). The tiles' embeds are concatenated; the tiles and "
                   "their masks (where each tile sits) are returned too.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (EMBEDS, "IMAGE", "MASK")
    RETURN_NAMES = ("embeds", "tiles", "masks")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ipadapter": IN_IPADAPTER, "clip_vision": IN_CLIP_VISION, "image": IN_IMAGE,
                             "sharpening": IN_SHARPENING},
                "optional": {"image_negative": IN_NEGATIVE}}

    def encode(self, ipadapter, clip_vision, image, sharpening, image_negative=None):
        check_image(image, "image")
        tiles, masks = imgs.reference_tiles(image, check_number(sharpening, "sharpening", 0, 1))
        return (_encode(ipadapter, clip_vision, tiles, image_negative), tiles, masks)


class PersonalizeIPAdapterRegion:
    DESCRIPTION = ("One region of a picture: a mask, the image prompt for it and, optionally, its text (positive / "
                   "negative conditioning, confined to the mask here). Combine regions with 'Combine IP-Adapter "
                   "Regions' and apply them with 'Apply IP-Adapter Regions'; combine the texts with the core "
                   "Conditioning (Combine) node, beside a prompt for the whole picture.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (REGIONS, "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("regions", "positive", "negative")
    FUNCTION = "region"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {"tooltip": "The reference for this region."}),
                             "mask": ("MASK", {"tooltip": "The region (white). Any size: stretched to the latent."}),
                             "image_weight": weight_input("Strength of the image prompt in the region."),
                             "prompt_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                                         "tooltip": "Strength of the region's text (the mask strength)."}),
                             "weight_type": (list(WEIGHT_TYPES), {"default": "linear", "tooltip": "As in 'Apply IP-Adapter'."}),
                             "start_at": _controls()["start_at"], "end_at": _controls()["end_at"]},
                "optional": {"positive": ("CONDITIONING", {"tooltip": "The region's prompt."}),
                             "negative": ("CONDITIONING", {"tooltip": "The region's negative prompt."}),
                             "image_negative": IN_NEGATIVE}}

    def region(self, image, mask, image_weight, prompt_weight, weight_type, start_at, end_at, positive=None, negative=None,
               image_negative=None):
        check_image(image, "image")
        mask = check_mask(mask, "mask").float().cpu()
        prompt_weight = check_number(prompt_weight, "prompt_weight", 0.0, 10.0)
        entry = {"image": image, "mask": mask, "weight": check_number(image_weight, "image_weight"), "weight_type": weight_type,
                 "start_at": start_at, "end_at": end_at, "image_negative": image_negative}
        pos = text.masked_conditioning(positive, mask, prompt_weight) if positive is not None else None
        neg = text.masked_conditioning(negative, mask, prompt_weight) if negative is not None else None
        return ([entry], pos, neg)


class PersonalizeIPAdapterCombineRegions:
    DESCRIPTION = "Collects regions from several 'IP-Adapter Region' nodes into one list."
    CATEGORY = CATEGORY
    RETURN_TYPES = (REGIONS,)
    RETURN_NAMES = ("regions",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        tip = {"tooltip": "Regions from 'IP-Adapter Region'."}
        return {"required": {"regions_1": (REGIONS, tip), "regions_2": (REGIONS, tip)},
                "optional": {f"regions_{i}": (REGIONS, tip) for i in range(3, 6)}}

    def combine(self, regions_1, regions_2, regions_3=None, regions_4=None, regions_5=None):
        return ([r for rs in (regions_1, regions_2, regions_3, regions_4, regions_5) if rs for r in rs],)


class PersonalizeIPAdapterApplyRegions(_ApplyBase):
    DESCRIPTION = ("Applies each region's image prompt to its mask (one patch per region, stacked on the same layers): "
                   "several regions each get their own reference.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "SD1.5 or SDXL model."}), "ipadapter": IN_IPADAPTER,
                             "clip_vision": IN_CLIP_VISION,
                             "regions": (REGIONS, {"tooltip": "From 'IP-Adapter Region' / 'Combine IP-Adapter Regions'."}),
                             "combine_embeds": (list(COMBINE_METHODS), {"default": "concat", "tooltip": "A region with "
                                                "several images: how they are combined."}),
                             "embeds_scaling": _controls()["embeds_scaling"]}}

    def apply(self, model, ipadapter, clip_vision, regions, combine_embeds, embeds_scaling):
        if not regions:
            raise ValueError("no regions: connect 'IP-Adapter Region' nodes")
        for r in regions:
            if r["weight"] == 0:
                continue
            refs = _encode(ipadapter, clip_vision, r["image"], r["image_negative"])
            model = self._patch(model, ipadapter, r["weight"], r["weight_type"], r["start_at"], r["end_at"], embeds_scaling,
                                r["mask"], lambda refs=refs: project_images(ipadapter.model, refs.cond, refs.uncond,
                                                                            combine_embeds))
        return (model,)


NODES = {
    "PersonalizeIPAdapterUnifiedLoader": ("IP-Adapter Unified Loader (Personalize)", PersonalizeIPAdapterUnifiedLoader),
    "PersonalizeIPAdapterApplyBatch": ("Apply IP-Adapter Batch (Personalize)", PersonalizeIPAdapterApplyBatch),
    "PersonalizeIPAdapterApplyLayerWeights": ("Apply IP-Adapter Layer Weights (Personalize)", PersonalizeIPAdapterApplyLayerWeights),
    "PersonalizeIPAdapterCombineEmbeds": ("Combine IP-Adapter Embeds (Personalize)", PersonalizeIPAdapterCombineEmbeds),
    "PersonalizeIPAdapterNoise": ("IP-Adapter Noise (Personalize)", PersonalizeIPAdapterNoise),
    "PersonalizePrepImageForClipVision": ("Prep Image For CLIP Vision (Personalize)", PersonalizePrepImageForClipVision),
    "PersonalizeIPAdapterEncodeTiled": ("IP-Adapter Encode Tiled (Personalize)", PersonalizeIPAdapterEncodeTiled),
    "PersonalizeIPAdapterRegion": ("IP-Adapter Region (Personalize)", PersonalizeIPAdapterRegion),
    "PersonalizeIPAdapterCombineRegions": ("Combine IP-Adapter Regions (Personalize)", PersonalizeIPAdapterCombineRegions),
    "PersonalizeIPAdapterApplyRegions": ("Apply IP-Adapter Regions (Personalize)", PersonalizeIPAdapterApplyRegions),
}
