"""Make the pack importable as ``comfyui_personalize`` outside ComfyUI (tests, benches, scripts).

The package object is created without executing the pack's ``__init__.py`` (which registers ComfyUI nodes), so
``comfyui_personalize.models`` imports with plain torch. The repo root itself is not put on sys.path.
"""
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "comfyui_personalize"


def register(name: str = PACKAGE) -> types.ModuleType:
    mod = sys.modules.get(name)
    if mod is None:
        mod = types.ModuleType(name)
        mod.__path__ = [ROOT]
        mod.__file__ = os.path.join(ROOT, "__init__.py")
        sys.modules[name] = mod
    return mod
