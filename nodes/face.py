"""Face analysis nodes. Thin: detection, alignment and embeddings are in models/face/ (onnxruntime, no insightface,
no opencv). onnxruntime is imported when a model pack is loaded, so the pack loads without it."""
from __future__ import annotations

import logging
import os

import folder_paths
import numpy as np
import torch

from ..models.face import (
    CROP_SIZES,
    MODEL_PACKS,
    PROVIDERS,
    SELECTIONS,
    FaceAnalysis,
    FaceEmbeds,
    find_model_pack,
    image_to_uint8,
    list_model_packs,
)
from ..models.inputs import check_image

log = logging.getLogger("personalize")

CATEGORY = "personalize/face"
FACE_ANALYSIS = "PERSONALIZE_FACE_ANALYSIS"
FACE_EMBEDS = "PERSONALIZE_FACE_EMBEDS"
INSIGHTFACE_FOLDER = "insightface"  # registered by nodes/patching.register_model_folders
MAX_FACE_INDEX = 63
_CACHE_SIZE = 4  # loaded packs kept (per folder, provider and file times): a re-run or a second loader reuses them

# preview colours (RGB)
CHOSEN_COLOR, OTHER_COLOR, KPS_COLOR = (0, 220, 0), (255, 200, 0), (255, 0, 0)


def _roots() -> list[str]:
    try:
        return list(folder_paths.get_folder_paths(INSIGHTFACE_FOLDER))
    except Exception:  # folder not registered (should not happen once the pack is loaded)
        return [os.path.join(folder_paths.models_dir, INSIGHTFACE_FOLDER)]


def _pack_choices() -> list[str]:
    found = list_model_packs(_roots())
    return found + [name for name in MODEL_PACKS if name not in found]


_loaded: dict[tuple, FaceAnalysis] = {}


def load_face_analysis(model_pack: str, provider: str) -> FaceAnalysis:
    folder = find_model_pack(model_pack, _roots())
    stamp = tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in os.scandir(folder) if e.name.endswith(".onnx")))
    key = (os.path.realpath(folder), provider, stamp)
    if key not in _loaded:
        while len(_loaded) >= _CACHE_SIZE:
            _loaded.pop(next(iter(_loaded)))
        _loaded[key] = FaceAnalysis.from_folder(folder, provider, model_pack)
    return _loaded[key]


# ---------------------------------------------------------------------------------------------------------------
# Shared input declarations

IN_FACE_ANALYSIS = (FACE_ANALYSIS, {"tooltip": "Face detector + recognizer from 'Load Face Analysis (Personalize)'."})
IN_IMAGE = ("IMAGE", {"tooltip": "Image(s) with a face; one face is chosen per image."})
IN_SELECTION = (list(SELECTIONS), {"default": "largest", "tooltip": "Which face when an image has several: the "
                "largest box (PuLID), the highest detection score (IP-Adapter FaceID), or 'index' (see face_index)."})
IN_INDEX = ("INT", {"default": 0, "min": 0, "max": MAX_FACE_INDEX, "tooltip": "With selection 'index': the face to "
            "use, counted from the left starting at 0 (the preview output numbers the faces)."})
IN_CROP_SIZE = ("INT", {"default": 224, "min": 16, "max": 1024, "step": 1, "tooltip": "Size of the aligned face crop "
                f"({', '.join(map(str, CROP_SIZES))}: ArcFace / FaceID SD1.5 / FaceID SDXL / Kolors)."})


class PersonalizeFaceAnalysisLoader:
    DESCRIPTION = ("Loads an insightface model pack (antelopev2, buffalo_l) from models/insightface/models/{name}/ "
                   "and runs it on onnxruntime: SCRFD detector and ArcFace recognizer only (no insightface, opencv "
                   "or compiler needed; the landmark / gender-age models are not loaded). Needs onnxruntime "
                   "(or onnxruntime-gpu); nothing is downloaded.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (FACE_ANALYSIS,)
    RETURN_NAMES = ("face_analysis",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_pack": (_pack_choices(), {"tooltip": "A folder in models/insightface/models/. antelopev2 for PuLID; "
                           "buffalo_l for IP-Adapter FaceID (the embeddings it was trained on)."}),
            "provider": (list(PROVIDERS), {"default": "CPU", "tooltip": "Where onnxruntime runs the models. CPU is fast "
                         "enough for a few images; a GPU provider needs the matching onnxruntime build and falls "
                         "back to CPU with a warning when it is not available."}),
        }}

    def load(self, model_pack, provider):
        return (load_face_analysis(model_pack, provider),)


def draw_detections(image: np.ndarray, faces: torch.Tensor, chosen: int, kps: np.ndarray) -> np.ndarray:
    """RGB uint8 image with every detected box (numbered left to right), the chosen one in green, its keypoints."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    width = max(2, round(min(image.shape[:2]) / 200))
    for i, row in enumerate(faces.tolist()):
        x1, y1, x2, y2, score = row
        color = CHOSEN_COLOR if i == chosen else OTHER_COLOR
        draw.rectangle([x1, y1, x2, y2], outline=color, width=width * (2 if i == chosen else 1))
        draw.text((x1 + width * 2, y1 + width * 2), f"{i}: {score:.2f}", fill=color)
    r = width * 1.5
    for x, y in kps.tolist():
        draw.ellipse([x - r, y - r, x + r, y + r], fill=KPS_COLOR)
    return np.asarray(pil)


class PersonalizeFaceEmbed:
    DESCRIPTION = ("Finds one face per image (detection at 640 px, retried at 576 ... 320 when none is found), "
                   "and gives its ArcFace embedding (raw and normalised), the aligned face crop, and a preview of "
                   "the detections. The embeds feed IP-Adapter FaceID and PuLID.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (FACE_EMBEDS, "IMAGE", "IMAGE")
    RETURN_NAMES = ("face_embeds", "face_crop", "preview")
    OUTPUT_TOOLTIPS = ("Embeddings, keypoints, boxes and crops of the chosen faces.",
                       "The aligned face crops (crop_size x crop_size).",
                       "The input with all detected faces numbered (the chosen one in green).")
    FUNCTION = "embed"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"face_analysis": IN_FACE_ANALYSIS, "image": IN_IMAGE, "selection": IN_SELECTION,
                             "face_index": IN_INDEX, "crop_size": IN_CROP_SIZE}}

    def embed(self, face_analysis, image, selection, face_index, crop_size):
        check_image(image, "image")
        embeds: FaceEmbeds = face_analysis.analyze(image, selection, face_index, crop_size)
        images = image_to_uint8(image)
        preview = np.stack([draw_detections(img, embeds.faces[i], int(embeds.face_index[i]), embeds.kps[i].numpy())
                            for i, img in enumerate(images)])
        log.info("face embed: %s", embeds.describe())
        return (embeds, embeds.crops, torch.from_numpy(preview).float().div(255.0))


NODES = {
    "PersonalizeFaceAnalysisLoader": ("Load Face Analysis (Personalize)", PersonalizeFaceAnalysisLoader),
    "PersonalizeFaceEmbed": ("Face Embed (Personalize)", PersonalizeFaceEmbed),
}
