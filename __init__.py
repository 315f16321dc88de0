"""ComfyUI-Personalize: subject and identity personalization nodes for ComfyUI (IP-Adapter, PuLID, E4T,
SuDe / PALP LoRA training).

Copyright (C) 2026 the ComfyUI-Personalize authors. GPL-3.0-or-later (see LICENSE).

Optional dependencies (onnxruntime, insightface, timm, ...) are imported by the nodes that need them, when they
run, so the pack always loads; those nodes say what to install.
"""
import importlib.util

if importlib.util.find_spec("folder_paths") is None:  # imported outside ComfyUI (CLI, scripts): no nodes
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
