# SPDX-License-Identifier: GPL-3.0-or-later
"""Run one of the pack's workflows headless in a real ComfyUI and save the image.

    python devtools/run_workflow.py --comfyui PATH --workflow workflows/<name>.json --out out.png
                                    [--models-dir DIR] [--steps N] [--size N] [--tiny] [--cache-dir DIR]

* The workflow may be UI format (saved by the frontend) or API format.
* The pack is loaded through ComfyUI's own custom-node loader (no server).
* Model files: if every model file the workflow names (checkpoint, CLIP
  vision, IP-Adapter, LoRA, VAE) is found in ComfyUI's model folders (plus
  ``--models-dir`` and ``extra_model_paths.yaml``), they are used.  Otherwise
  (or with ``--tiny``) tiny random models of the same topology are generated
  into a cache dir (default ``<repo>/.tiny_models/``) and substituted; every
  substitution is logged.  Tiny models give noise-like images: that run checks
  the graph, not the looks.
* A missing ``LoadImage`` picture is replaced by a generated test picture.
* The first image of the SaveImage (else PreviewImage) outputs is written to
  ``--out``; the path is printed.
"""

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys

log = logging.getLogger("run_workflow")

DEVTOOLS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(DEVTOOLS)
if DEVTOOLS not in sys.path:
    sys.path.insert(0, DEVTOOLS)

import comfy_host  # noqa: E402

#: (class type or "*", input name) -> model folder.  Extend for new loaders.
MODEL_INPUTS = {
    ("*", "ckpt_name"): "checkpoints",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("*", "lora_name"): "loras",
    ("*", "vae_name"): "vae",
    ("*", "ipadapter_file"): "ipadapter",
    ("PersonalizeFaceAnalysisLoader", "model_pack"): "insightface",  # a folder of .onnx files, not a file
    ("*", "pulid_file"): "pulid",
    ("*", "eva_clip_file"): "eva_clip",
    ("*", "parsing_file"): "face_parsing",
    ("PersonalizeE4TLoader", "e4t_name"): "e4t",  # a folder (config.json + weights), not a file
    ("PersonalizeIPAdapterUnifiedLoader", "preset"): "ipadapter_preset",  # the files of a preset, found by name
}
#: Inputs of the tuning nodes shrunk in a tiny run (a CPU smoke run of the graph, not of the training).
_TINY_TUNING = {"PersonalizeE4TTune": {"batch_size": 2}}
#: Node types whose input images must show a face the tiny blob detector finds (see tiny_onnx_faces).
_FACE_NODES = {"PersonalizeFaceEmbed", "PersonalizePuLIDEncode"}
#: The test face for tiny runs: a white square of side 3 * 32 with its corner on the 32-pixel grid of a 640 x 640
#: picture is exactly one face for the stand-in detector (tiny_onnx_faces.blob_detector).
TINY_FACE_PICTURE = (640, 640, [(256, 224, 96, 255)])
#: VAELoader names that are not files (approximate decoders, pixel space).
#: Latent size and steps of a tiny run unless --size / --steps say otherwise.
TINY_DEFAULT_SIZE, TINY_DEFAULT_STEPS = 128, 4
_SPECIAL_VAE_NAMES = {"taesd", "taesdxl", "taesd3", "taef1", "pixel_space"}
_IMAGE_LOADERS = {("LoadImage", "image"), ("LoadImageMask", "image")}


def model_refs(api):
    """[(node_id, input_name, folder, value)] for every model file the prompt names."""
    refs = []
    for node_id, node in api.items():
        for name, value in node.get("inputs", {}).items():
            if not isinstance(value, str):
                continue
            folder = MODEL_INPUTS.get((node["class_type"], name)) or MODEL_INPUTS.get(("*", name))
            if folder is None:
                continue
            if folder == "vae" and value in _SPECIAL_VAE_NAMES:
                continue
            refs.append((node_id, name, folder, value))
    return refs


# ---------------------------------------------------------------------------
# tiny substitutes
# ---------------------------------------------------------------------------

def checkpoint_layout(name):
    """Guess "flux" / "sdxl" / "sd15" from a checkpoint file name."""
    if re.search(r"flux", name, re.I):
        return "flux"
    return "sdxl" if re.search(r"xl", name, re.I) else "sd15"


def clip_vision_kind(name):
    low = name.lower()
    if "vit-l" in low or "clip_vision_l" in low or "vit_l" in low:
        return "vit-l"
    return "vit-bigG" if ("bigg" in low or "vit-g" in low or "vit_g" in low) else "vit-h"


def ipadapter_spec(name):
    """(family, layout, clip_kind) of an IP-Adapter file from its conventional name."""
    low = name.lower()
    layout = "sdxl" if "sdxl" in low else "sd15"
    if "faceid" in low:
        family = ("faceid-portrait-unnorm" if "unnorm" in low else "faceid-portrait" if "portrait" in low
                  else "faceid-plus" if "plus" in low else "faceid")
    elif "full-face" in low or "full_face" in low:
        family = "full-face"
    elif "plus" in low:
        family = "plus"
    elif "vit-g" in low or "vit_g" in low:
        family = "vit-g"
    else:
        family = "base"
    if family == "vit-g" or (layout == "sdxl" and family == "base" and "vit-h" not in low):
        clip_kind = "vit-bigG"
    else:
        clip_kind = "vit-h"
    return family, layout, clip_kind


def _source_stamp():
    """Changes whenever the tiny-model generators change (cache invalidation)."""
    h = hashlib.sha256()
    for fname in ("tiny_models.py", "tiny_adapters.py", "tiny_onnx_faces.py", "tiny_pulid.py", "tiny_flux.py"):
        path = os.path.join(DEVTOOLS, fname)
        if os.path.exists(path):
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


_CACHE_SUBDIRS = ("checkpoints", "clip_vision", "ipadapter", "loras", "vae", "insightface", "pulid", "eva_clip",
                  "face_parsing")


def prepare_cache(cache_dir):
    """Empty the generated sub-folders of ``cache_dir`` if the generators changed."""
    os.makedirs(cache_dir, exist_ok=True)
    stamp_path = os.path.join(cache_dir, "STAMP")
    stamp = _source_stamp()
    old = open(stamp_path).read().strip() if os.path.exists(stamp_path) else None
    if old != stamp:
        for sub in _CACHE_SUBDIRS:
            shutil.rmtree(os.path.join(cache_dir, sub), ignore_errors=True)
        with open(stamp_path, "w") as f:
            f.write(stamp + "\n")


def _ensure(path, writer):
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        writer(path)
    return os.path.basename(path)


def preset_files(preset, cache_dir, seed=0):
    """Write (once) tiny files under the public names of a unified-loader preset, for every layout it has; returns
    ``[(folder, name)]``."""
    import pack_alias
    import tiny_adapters
    import tiny_models

    pack_alias.register()
    from comfyui_personalize.models.presets import CLIP_VISION_NAMES, PRESETS

    p, out = PRESETS[preset], []
    for layout, names in p.names.items():
        family = p.family if p.family != "base" or p.clip.get(layout) != "vit-bigG" else "vit-g"
        kind = p.clip.get(layout, "vit-h")
        name = names[0]
        _ensure(os.path.join(cache_dir, "ipadapter", name),
                lambda path, f=family, lay=layout, k=kind: tiny_adapters.write_tiny_adapter(path, f, lay, k, seed))
        out.append(("ipadapter", name))
        if layout in p.clip:
            cv = CLIP_VISION_NAMES[kind][0]
            _ensure(os.path.join(cache_dir, "clip_vision", cv), lambda path, k=kind: tiny_models.write_tiny_clip_vision(path, k, seed))
            out.append(("clip_vision", cv))
        for lora in p.lora_names.get(layout, ()):
            _ensure(os.path.join(cache_dir, "loras", lora), lambda path, lay=layout: tiny_models.write_tiny_lora(path, lay, seed))
            out.append(("loras", lora))
    return out


def _model_present(folder, value):
    import folder_paths
    if folder == "insightface":  # a model pack is a folder: <root>/models/<name>/*.onnx
        return any(os.path.isdir(os.path.join(root, "models", value)) or os.path.isdir(os.path.join(root, value))
                   for root in folder_paths.get_folder_paths(folder))
    if folder == "e4t":  # a folder holding config.json
        return any(os.path.isfile(os.path.join(root, value, "config.json")) for root in folder_paths.get_folder_paths(folder))
    if folder == "ipadapter_preset":  # some file of the preset in models/ipadapter
        import pack_alias
        pack_alias.register()
        from comfyui_personalize.models.presets import PRESETS, find_file
        return any(find_file(folder_paths.get_filename_list("ipadapter"), pats) for pats in PRESETS[value].patterns.values())
    return folder_paths.get_full_path(folder, value) is not None


def tiny_substitute(folder, value, cache_dir, seed=0):
    """Generate (once) the tiny file standing in for ``value``; return its name inside ``folder``."""
    import tiny_models
    out_dir = os.path.join(cache_dir, folder)
    if folder == "checkpoints":
        layout = checkpoint_layout(value)
        if layout == "flux":
            import pack_alias
            import tiny_flux

            pack_alias.register()
            return _ensure(os.path.join(out_dir, "tiny_flux.safetensors"), lambda p: tiny_flux.write_tiny_flux(p, seed))
        writer = tiny_models.write_tiny_sdxl if layout == "sdxl" else tiny_models.write_tiny_sd15
        return _ensure(os.path.join(out_dir, f"tiny_{layout}.safetensors"), lambda p: writer(p, seed))
    if folder == "clip_vision":
        kind = clip_vision_kind(value)
        return _ensure(os.path.join(out_dir, f"tiny_clip_vision_{kind}.safetensors"),
                       lambda p: tiny_models.write_tiny_clip_vision(p, kind, seed))
    if folder == "vae":
        return _ensure(os.path.join(out_dir, "tiny_taesd_vae.safetensors"),
                       lambda p: tiny_models.write_tiny_vae(p, seed))
    if folder in ("pulid", "eva_clip", "face_parsing"):
        import pack_alias
        import tiny_pulid

        pack_alias.register()
        stem = os.path.splitext(os.path.basename(value))[0]
        if folder == "pulid" and "flux" in value.lower():
            import tiny_flux

            return _ensure(os.path.join(out_dir, f"tiny_{stem}.safetensors"), lambda p: tiny_flux.write_tiny_pulid_flux(p, seed))
        if folder == "pulid":  # the version and the key style from the public names
            version = "v1.1" if "1.1" in value or "v11" in value else "v1"
            style = "converted" if value.startswith("ip-adapter") else "official"
            ext = ".bin" if value.endswith(".bin") else ".safetensors"
            return _ensure(os.path.join(out_dir, f"tiny_{stem}{ext}"),
                           lambda p: tiny_pulid.write_tiny_pulid(p, version, "sdxl", style, seed))
        writer = tiny_pulid.write_tiny_eva_clip if folder == "eva_clip" else tiny_pulid.write_tiny_parsing
        ext = ".pt" if folder == "eva_clip" else ".pth"
        return _ensure(os.path.join(out_dir, f"tiny_{stem}{ext}"), lambda p: writer(p, seed))
    if folder == "loras":
        layout = checkpoint_layout(value)
        return _ensure(os.path.join(out_dir, f"tiny_lora_{layout}.safetensors"),
                       lambda p: tiny_models.write_tiny_lora(p, layout, seed))
    if folder == "ipadapter_preset":
        preset_files(value, cache_dir, seed)
        for sub in ("ipadapter", "clip_vision", "loras"):
            folder_paths_cache_clear(sub)
        return value
    if folder == "e4t":
        import tiny_e4t
        path = os.path.join(out_dir, value)
        if not os.path.isfile(os.path.join(path, "config.json")):
            tiny_e4t.write_tiny_e4t(path, seed=seed)
        return value
    if folder == "insightface":
        import tiny_onnx_faces
        root = os.path.join(cache_dir, "insightface")
        if not os.path.isdir(os.path.join(root, "models", value)):
            tiny_onnx_faces.write_tiny_pack(root, value, seed=seed)
        return value
    if folder == "ipadapter" and "flux" in value.lower():  # XLabs flux-ip-adapter (v1: 4 tokens) / -v2 (16)
        import tiny_flux
        stem = os.path.splitext(os.path.basename(value))[0]
        tokens = 16 if "v2" in value.lower() else 4
        return _ensure(os.path.join(out_dir, f"tiny_{stem}.safetensors"), lambda p: tiny_flux.write_tiny_xlabs(p, tokens, seed))
    if folder == "ipadapter":
        family, layout, clip_kind = ipadapter_spec(value)
        import pack_alias
        import tiny_adapters

        pack_alias.register()
        # named after the original, so that behaviour keyed to the public file names (FaceID Plus v2) is kept
        stem = os.path.splitext(os.path.basename(value))[0]
        path = os.path.join(out_dir, f"tiny_{stem}_{clip_kind}.safetensors")
        return _ensure(path, lambda p: tiny_adapters.write_tiny_adapter(p, family, layout, clip_kind, seed))
    raise SystemExit(f"no tiny substitute for model folder {folder!r} (file {value!r}); add one to run_workflow.py")


def folder_paths_cache_clear(folder):
    import folder_paths
    folder_paths.filename_list_cache.pop(folder, None)


def _sources(api, node_id):
    """Ids of the nodes that feed ``node_id`` directly."""
    return {v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)}


def write_test_image(path, key, face=False):
    """A deterministic 256x256 RGB test picture (gradients + a disc), different per ``key``; with ``face``, the
    picture the tiny face detector sees exactly one face in."""
    import numpy as np
    from PIL import Image
    if face:
        import tiny_onnx_faces
        h, w, squares = TINY_FACE_PICTURE
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(tiny_onnx_faces.squares_image(h, w, squares)).save(path)
        return
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256] / 255.0
    c = rng.uniform(0.2, 0.8, size=3)
    img = np.stack([xx * c[0] + (1 - xx) * (1 - c[0]), yy * c[1], (xx + yy) / 2 * c[2]], axis=-1)
    cy, cx = rng.uniform(80, 176, size=2)
    disc = (yy * 255 - cy) ** 2 + (xx * 255 - cx) ** 2 < 60 ** 2
    img[disc] = rng.uniform(0, 1, size=3)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((img * 255).astype("uint8")).save(path)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"),
                   help="ComfyUI checkout (default: $COMFYUI_PATH)")
    p.add_argument("--workflow", required=True, help="workflow JSON (UI or API format)")
    p.add_argument("--out", required=True, help="where to write the resulting image (.png)")
    p.add_argument("--models-dir", help="extra models dir (ComfyUI layout) searched before ComfyUI's own")
    p.add_argument("--steps", type=int, help="override the 'steps' of every sampler")
    p.add_argument("--size", type=int, help="override width/height of EmptyLatentImage-type nodes")
    p.add_argument("--tiny", action="store_true", help="always use tiny random models")
    p.add_argument("--cache-dir", default=os.path.join(REPO_ROOT, ".tiny_models"),
                   help="where tiny models are generated (default: <repo>/.tiny_models)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny random weights")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    if not args.comfyui:
        raise SystemExit("--comfyui PATH (or $COMFYUI_PATH) is required")

    comfy_host.bootstrap(args.comfyui)
    import folder_paths
    import tiny_models
    import utils.extra_config
    extra = os.path.join(comfy_host.comfyui_path(), "extra_model_paths.yaml")
    if os.path.isfile(extra):
        utils.extra_config.load_extra_path_config(extra)
    if args.models_dir:
        comfy_host.use_models_dir(args.models_dir)
    tiny_models.register_tiny_configs()  # only matters if a tiny file is loaded
    comfy_host.load_pack(REPO_ROOT)

    with open(args.workflow) as f:
        workflow = json.load(f)
    if not comfy_host.is_api_format(workflow):
        comfy_host.check_ui_workflow(workflow)
    api = comfy_host.ui_to_api(workflow)

    refs = model_refs(api)
    missing = [r for r in refs if not _model_present(r[2], r[3])]
    if missing or args.tiny:
        if missing:
            log.info("missing model files: %s", ", ".join(f"{r[2]}/{r[3]}" for r in missing))
        log.info("using tiny random models from %s", args.cache_dir)
        # tiny models give noise-like pictures: a small latent and a few steps check the graph just as well
        if args.size is None:
            args.size = TINY_DEFAULT_SIZE
        if args.steps is None:
            args.steps = TINY_DEFAULT_STEPS
        log.info("tiny run at %d px, %d steps (override with --size / --steps)", args.size, args.steps)
        prepare_cache(args.cache_dir)
        comfy_host.use_models_dir(args.cache_dir, folder_names=("insightface", "pulid", "eva_clip", "face_parsing", "e4t"))
        for node_id, name, folder, value in refs:
            sub = tiny_substitute(folder, value, args.cache_dir, args.seed)
            api[node_id]["inputs"][name] = sub
            log.info("node %s %s: %s -> %s (tiny)", node_id, name, value, sub)
    else:
        log.info("all %d model files found; using them", len(refs))

    for node_id, node in api.items():
        inputs = node["inputs"]
        if (node["class_type"], "image") in _IMAGE_LOADERS and isinstance(inputs.get("image"), str):
            if not folder_paths.exists_annotated_filepath(inputs["image"]):
                stem = os.path.splitext(os.path.basename(inputs["image"].split(" [")[0]))[0]
                name = "personalize_test_{}.png".format(re.sub(r"[^A-Za-z0-9_.-]", "_", stem))
                face = any(api[n]["class_type"] in _FACE_NODES and node_id in _sources(api, n) for n in api)
                write_test_image(os.path.join(folder_paths.get_temp_directory(), name), inputs["image"], face=face)
                log.info("node %s image: %s not found -> generated %s", node_id, inputs["image"], name)
                inputs["image"] = name + " [temp]"
        if args.steps is not None and isinstance(inputs.get("steps"), int):
            inputs["steps"] = args.steps
        if missing or args.tiny:
            inputs.update({k: v for k, v in _TINY_TUNING.get(node["class_type"], {}).items() if k in inputs})
            if node["class_type"] in _TINY_TUNING and args.size is not None and "resolution" in inputs:
                inputs["resolution"] = args.size
        if args.size is not None and re.match(r"Empty\w*Latent", node["class_type"]):  # EmptyLatentImage, EmptySD3LatentImage
            for key in ("width", "height"):
                if isinstance(inputs.get(key), int):
                    inputs[key] = args.size

    result = comfy_host.run_prompt(api)
    images = comfy_host.output_image_paths(result)
    if not images:
        raise SystemExit("the workflow produced no image (no SaveImage/PreviewImage output)")
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if out.lower().endswith(".png"):
        shutil.copyfile(images[0], out)
    else:
        from PIL import Image
        with Image.open(images[0]) as im:
            im.save(out)
    print(out)
    return out


if __name__ == "__main__":
    main()
