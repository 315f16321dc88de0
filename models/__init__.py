"""Plain-torch building blocks of ComfyUI-Personalize.

Nothing in this package imports ComfyUI: the same code runs inside a ComfyUI graph (through the glue in
``nodes/comfy/``) and on a diffusers UNet (``models/diffusers_host.py``), which is how the tests check it against
independent reference implementations. ``tests/tier1/test_boundary.py`` enforces the rule.
"""
