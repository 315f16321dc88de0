"""The pack's model folders and file resolution, through ComfyUI's ``folder_paths``."""
from __future__ import annotations

import os

import folder_paths

# name -> where users get the files; ipadapter now, the others for the methods that follow.
MODEL_FOLDERS = {
    "ipadapter": "IP-Adapter weights (h94/IP-Adapter, h94/IP-Adapter-FaceID on Hugging Face)",
    "pulid": "PuLID weights: guozinan/PuLID on Hugging Face (pulid_v1.1.safetensors, pulid_v1.bin), or "
             "huchenlei/ipadapter_pulid (ip-adapter_pulid_sdxl_fp16.safetensors)",
    "e4t": "E4T models, one folder each (config.json, encoder.pt, weight_offsets.pt): "
           "mshing/e4t-diffusion-ffhq-celebahq-v1 on Hugging Face, or the output of training/e4t_pretrain.py",
    "insightface": "insightface model packs, as models/insightface/models/<name>/*.onnx",
    "eva_clip": "EVA02-CLIP vision towers: QuanSun/EVA-CLIP on Hugging Face (EVA02_CLIP_L_336_psz14_s6B.pt)",
    "face_parsing": "face parsing models: facexlib's GitHub release v0.2.0 (parsing_bisenet.pth)",
}
TRAIN_FOLDER = "personalize_train"  # resumable states and cached class latents, under ComfyUI's output folder


def register_model_folders() -> None:
    """Add ``<models_dir>/<name>`` for each pack folder, keeping paths that extra_model_paths.yaml already set."""
    for name in MODEL_FOLDERS:
        default = os.path.join(folder_paths.models_dir, name)
        entry = folder_paths.folder_names_and_paths.get(name)
        if entry is None:
            folder_paths.folder_names_and_paths[name] = ([default], set(folder_paths.supported_pt_extensions))
            continue
        paths, exts = entry
        if default not in paths:
            paths.append(default)
        if not exts:
            exts.update(folder_paths.supported_pt_extensions)


def full_path(folder: str, name: str, what: str) -> str:
    """Resolve a model file, or raise an error naming the file, the folders searched and where to get it."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        searched = ", ".join(folder_paths.get_folder_paths(folder)) or "(none registered)"
        raise FileNotFoundError(f"{what} '{name}' not found in the '{folder}' folders: {searched}. "
                                f"Put the file there ({MODEL_FOLDERS.get(folder, 'see the README')}).")
    return path


MAX_MODEL_DIR_DEPTH = 3  # how deep a listing looks for model folders (models/e4t/<group>/<name>/config.json)


def list_model_dirs(folder: str, marker: str) -> list[str]:
    """Subfolders of a model folder that hold ``marker`` (a model stored as a folder: E4T's config.json and weights),
    as ``/``-separated names relative to the folder, sorted."""
    out = set()
    for root in folder_paths.get_folder_paths(folder):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            if dirpath.count(os.sep) - root.rstrip(os.sep).count(os.sep) >= MAX_MODEL_DIR_DEPTH:
                dirnames[:] = []
            if marker in filenames and dirpath != root:
                out.add(os.path.relpath(dirpath, root).replace(os.sep, "/"))
                dirnames[:] = []
    return sorted(out)


def model_dir(folder: str, name: str, marker: str, what: str) -> str:
    """The folder ``name`` of a model folder (it must hold ``marker``; never a path outside the model folder), or an
    error naming the folders searched and where to get the model."""
    roots = folder_paths.get_folder_paths(folder)
    for root in roots:
        base = os.path.realpath(root)
        path = os.path.realpath(os.path.join(base, name))
        if os.path.commonpath([base, path]) != base or path == base:
            raise ValueError(f"{what} {name!r} points outside the '{folder}' folder; choose a name from the list")
        if os.path.isfile(os.path.join(path, marker)):
            return path
    raise FileNotFoundError(f"{what} '{name}' not found in the '{folder}' folders: {', '.join(roots) or '(none)'}: a "
                            f"folder there holding {marker} is expected ({MODEL_FOLDERS.get(folder, 'see the README')}).")


def first_folder(name: str) -> str:
    """The first registered folder of ``name`` (models/loras, models/embeddings), created if missing."""
    paths = folder_paths.get_folder_paths(name)
    if not paths:
        raise FileNotFoundError(f"ComfyUI has no '{name}' model folder registered; check extra_model_paths.yaml")
    os.makedirs(paths[0], exist_ok=True)
    return paths[0]


def train_folder() -> str:
    """``output/personalize_train``: resumable training states and cached class latents."""
    path = os.path.join(folder_paths.get_output_directory(), TRAIN_FOLDER)
    os.makedirs(path, exist_ok=True)
    return path


def refresh_file_list(name: str) -> None:
    """Forget ComfyUI's cached file list of a model folder (a file was just written there)."""
    folder_paths.filename_list_cache.pop(name, None)


# Listings of the input / output folders, cached while no folder in them changed: {(root, suffix): (mtimes, files)}.
_listings: dict[tuple[str, str], tuple[dict[str, float], list[str]]] = {}
# Folders a listing looks into at most (a huge output folder must not stall the node list).
MAX_LISTED_FOLDERS = 5000


def list_files(root: str, suffix: str) -> list[str]:
    """Files under ``root`` whose names end with ``suffix``, as ``/``-separated paths relative to ``root``, sorted.

    Symlinked folders are not entered (a link loop or a link out of ``root`` cannot hang or widen the listing);
    symlinked files are listed only when they point inside ``root``. The result is cached and reused while the
    modification time of every folder it looked into is unchanged."""
    root = os.path.realpath(root)
    key = (root, suffix)
    cached = _listings.get(key)
    if cached is not None:
        mtimes, files = cached
        try:
            if all(os.stat(d).st_mtime == t for d, t in mtimes.items()):
                return list(files)
        except OSError:
            pass
    mtimes, files = {}, []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        try:
            mtimes[dirpath] = os.stat(dirpath).st_mtime
        except OSError:
            continue
        if len(mtimes) >= MAX_LISTED_FOLDERS:
            dirnames[:] = []
        for f in filenames:
            if not f.endswith(suffix):
                continue
            path = os.path.join(dirpath, f)
            if os.path.islink(path) and os.path.commonpath([root, os.path.realpath(path)]) != root:
                continue
            files.append(os.path.relpath(path, root).replace(os.sep, "/"))
    files.sort()
    _listings[key] = (mtimes, files)
    return list(files)


def annotated_file(name: str) -> str:
    """The path of an input-folder file name as ComfyUI annotates them (``x [output]``, ``x [input]``, ``x [temp]``),
    refused when it leads out of that folder."""
    rel, base = folder_paths.annotated_filepath(name)
    base = os.path.realpath(base or folder_paths.get_input_directory())
    path = os.path.realpath(os.path.join(base, rel))
    if os.path.commonpath([base, path]) != base:
        raise ValueError(f"{name!r} points outside its folder; choose a file from the list")
    return path
