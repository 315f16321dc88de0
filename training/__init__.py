"""Host-agnostic training core (LoRA, token, SuDe / PALP losses). Plain torch, no ComfyUI imports.

Filled in by the trainer work; kept as a package so the layout is stable for later methods.
"""
