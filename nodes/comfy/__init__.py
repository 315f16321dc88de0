"""The glue: the only package of the pack that touches ComfyUI internals (``comfy.*``).

One file per host concern:
- ``folders``: the pack's model folders and file resolution (errors name the file, the folders searched, the source);
- ``sites``: one attention-site object per cross-attention layer (the ``.add(callback, **kwargs)`` protocol other
  packs use), sigma windows, and the install step that puts any :class:`~..models.attention.SitePatch` on a model;
- ``unet``: a ComfyUI UNet's cross-attention sites and compute dtype;
- ``flux``: the Flux host: block patches on ComfyUI's ``patches_replace["dit"]`` hooks, chained with other packs';
- ``weights``: adapter weights under model management, LoRA files, trainable weight wrappers;
- ``vision``: CLIP vision features;
- ``text``: ComfyUI text encoding with a trainable token in its slots;
- ``denoiser``: the training denoiser (VAE, SDXL size conditioning, gradient checkpointing).

``models/`` and ``training/`` never import ComfyUI; node modules (``nodes/*.py``) use only ``folder_paths``, ComfyUI's
progress bar and its interrupt check. ``tests/tier1/test_boundary.py`` reads the sources and enforces this.
"""
