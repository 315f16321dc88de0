"""Test setup shared by both tiers.

The pack is imported under the package name ``comfyui_personalize`` without running its ``__init__`` (which needs
ComfyUI); its repo root is never put on sys.path, because the pack's ``nodes`` package must not shadow ComfyUI's
``nodes`` module. ``devtools/`` (tiny-model writers, headless ComfyUI host) and ``tests/`` (references shared by
both tiers) are put on sys.path.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "devtools"))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # shared test references (tests/pulid_reference.py)

import pack_alias  # noqa: E402

pack_alias.register()
