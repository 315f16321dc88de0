"""The unified loader's presets: which files of the user's folders make up each preset, for SD1.5 and SDXL, host-free.

Preset names and file-name patterns are ComfyUI_IPAdapter_plus' (``utils.py`` ``get_ipadapter_file``,
``get_clipvision_file``, ``get_lora_file``: case-insensitive searches over the folder listing, first match wins, in
the order given), so users' folders that work there work here. File names are only used to *find* candidates: what a
file is, is still read from its keys (``models.ipadapter.detect_family``), and a file whose keys say another family
is refused. The public names are listed in the errors when nothing matches.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_MODEL = r"\.(safetensors|bin)$"
_LORA = r"\.safetensors$"
CLIP_VISION_PATTERNS = {
    "vit-h": (r"(ViT.H.14.*s32B.b79K|ipadapter.*sd15|sd1.?5.*model)\.(bin|safetensors)$",),
    "vit-bigG": (r"(ViT.bigG.14.*39B.b160k|ipadapter.*sdxl|sdxl.*model)\.(bin|safetensors)$",),
}
CLIP_VISION_NAMES = {"vit-h": ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",),
                     "vit-bigG": ("CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",)}


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # the family the file's keys must show (models.ipadapter.FAMILIES)
    patterns: dict[str, tuple[str, ...]]  # layout -> file-name patterns in models/ipadapter, in order of preference
    names: dict[str, tuple[str, ...]]  # layout -> the public file names (for the error)
    clip: dict[str, str] = field(default_factory=dict)  # layout -> CLIP vision kind ("vit-h" / "vit-bigG")
    lora_patterns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # layout -> patterns in models/loras
    lora_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    plus_version: str | None = None  # FaceID Plus: "v1" / "v2" (the files share one layout)
    face_pack: str | None = None  # the insightface pack (FaceID families)


def _p(*stems: str, ext: str = _MODEL) -> tuple[str, ...]:
    return tuple(s + ext for s in stems)


_H = {"sd15": "vit-h", "sdxl": "vit-h"}
PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("light", "base", {"sd15": _p(r"sd15.light.v11", r"sd15.light")}, {"sd15": ("ip-adapter_sd15_light_v11.bin",)},
           {"sd15": "vit-h"}),
    Preset("standard", "base", {"sd15": _p(r"ip.adapter.sd15"), "sdxl": _p(r"ip.adapter.sdxl.vit.h")},
           {"sd15": ("ip-adapter_sd15.safetensors",), "sdxl": ("ip-adapter_sdxl_vit-h.safetensors",)}, _H),
    Preset("vit-G", "base", {"sd15": _p(r"sd15.vit.g"), "sdxl": _p(r"ip.adapter.sdxl")},
           {"sd15": ("ip-adapter_sd15_vit-G.safetensors",), "sdxl": ("ip-adapter_sdxl.safetensors",)},
           {"sd15": "vit-bigG", "sdxl": "vit-bigG"}),
    Preset("plus", "plus", {"sd15": _p(r"ip.adapter.plus.sd15"), "sdxl": _p(r"plus.sdxl.vit.h")},
           {"sd15": ("ip-adapter-plus_sd15.safetensors",), "sdxl": ("ip-adapter-plus_sdxl_vit-h.safetensors",)}, _H),
    Preset("plus face", "plus", {"sd15": _p(r"plus.face.sd15"), "sdxl": _p(r"plus.face.sdxl.vit.h")},
           {"sd15": ("ip-adapter-plus-face_sd15.safetensors",), "sdxl": ("ip-adapter-plus-face_sdxl_vit-h.safetensors",)}, _H),
    Preset("full face", "full-face", {"sd15": _p(r"full.face.sd15")}, {"sd15": ("ip-adapter-full-face_sd15.safetensors",)},
           {"sd15": "vit-h"}),
    Preset("FaceID", "faceid", {"sd15": _p(r"faceid.sd15"), "sdxl": _p(r"faceid.sdxl")},
           {"sd15": ("ip-adapter-faceid_sd15.bin",), "sdxl": ("ip-adapter-faceid_sdxl.bin",)}, {},
           {"sd15": _p(r"faceid.sd15.lora", ext=_LORA), "sdxl": _p(r"faceid.sdxl.lora", ext=_LORA)},
           {"sd15": ("ip-adapter-faceid_sd15_lora.safetensors",), "sdxl": ("ip-adapter-faceid_sdxl_lora.safetensors",)},
           face_pack="buffalo_l"),
    Preset("FaceID Plus", "faceid-plus", {"sd15": _p(r"faceid.plus.sd15")}, {"sd15": ("ip-adapter-faceid-plus_sd15.bin",)},
           {"sd15": "vit-h"}, {"sd15": _p(r"faceid.plus.sd15.lora", ext=_LORA)},
           {"sd15": ("ip-adapter-faceid-plus_sd15_lora.safetensors",)}, plus_version="v1", face_pack="buffalo_l"),
    Preset("FaceID Plus v2", "faceid-plus", {"sd15": _p(r"faceid.plusv2.sd15"), "sdxl": _p(r"faceid.plusv2.sdxl")},
           {"sd15": ("ip-adapter-faceid-plusv2_sd15.bin",), "sdxl": ("ip-adapter-faceid-plusv2_sdxl.bin",)}, _H,
           {"sd15": _p(r"faceid.plusv2.sd15.lora", ext=_LORA), "sdxl": _p(r"faceid.plusv2.sdxl.lora", ext=_LORA)},
           {"sd15": ("ip-adapter-faceid-plusv2_sd15_lora.safetensors",),
            "sdxl": ("ip-adapter-faceid-plusv2_sdxl_lora.safetensors",)}, plus_version="v2", face_pack="buffalo_l"),
    Preset("Portrait", "faceid-portrait", {"sd15": _p(r"portrait.v11.sd15", r"portrait.sd15"), "sdxl": _p(r"portrait.sdxl")},
           {"sd15": ("ip-adapter-faceid-portrait-v11_sd15.bin",), "sdxl": ("ip-adapter-faceid-portrait_sdxl.bin",)},
           face_pack="buffalo_l"),
    Preset("Portrait unnorm", "faceid-portrait-unnorm", {"sdxl": _p(r"portrait.sdxl.unnorm")},
           {"sdxl": ("ip-adapter-faceid-portrait_sdxl_unnorm.bin",)}, face_pack="buffalo_l"),
)}


def find_file(names: list[str], patterns: tuple[str, ...]) -> str | None:
    """The first of ``names`` (a folder listing, relative paths) matching the first pattern that matches any."""
    for pattern in patterns:
        rx = re.compile(pattern, re.IGNORECASE)
        for name in names:
            if rx.search(name):
                return name
    return None
