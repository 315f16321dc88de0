"""Safe checkpoint loading, and the one save path for every file the pack writes.

Loading: safetensors first; pickles (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) only through
``torch.load(weights_only=True)``. Every failure raises :class:`CheckpointError` with the path and what to do.

Saving (:func:`atomic_save_safetensors`): nothing non-finite is written (:class:`NonFiniteError`, the file there
stays); a file the pack did not write is not replaced unless asked (:class:`ForeignFileError`); the data goes to a
hidden ``.tmp-*.partial`` file next to the target (an extension no ComfyUI loader lists), which is renamed into place
or removed; the file gets the user's umask (0644 under the usual 022), as ComfyUI's own outputs. Every file carries
``personalize_writer`` in its metadata, which is how the pack recognizes its own files.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

import torch

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
# Metadata key and value that mark a file as written by this pack.
WRITER_KEY, WRITER = "personalize_writer", "ComfyUI-Personalize"
# Metadata of files written by earlier versions of the pack (before WRITER_KEY): LoRA, state, embeds, token.
LEGACY_MARKERS = ("personalize_format", "personalize_state")
TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".partial"
# Longest file stem the pack writes: 255 bytes (the usual file-name limit) minus the longest suffix it appends
# (".state.safetensors") and some room.
MAX_STEM_BYTES = 200


class CheckpointError(ValueError):
    """A model file is missing, unreadable, or not what the node expects."""


class NonFiniteError(ValueError):
    """A tensor to be written holds NaN or Inf: nothing was written."""


class ForeignFileError(FileExistsError):
    """The target exists and was not written by this pack: it was not replaced."""


def load_file(path: str) -> dict[str, Any]:
    """Load a checkpoint as a (possibly nested) dict of tensors, on the CPU.

    Pickled files are loaded with ``weights_only=True``: a file that needs arbitrary code to unpickle is refused.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"model file not found: {path}")
    lower = path.lower()
    try:
        if lower.endswith(SAFETENSORS_EXTENSIONS):
            from safetensors.torch import load_file as _load_st

            data = _load_st(path, device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt file, truncated download, unsafe pickle ...
        raise CheckpointError(
            f"could not read {path}: {type(e).__name__}: {e}. The file may be truncated or corrupt "
            "(download it again), or a pickle that is not a plain state dict (only weights are accepted)."
        ) from e
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a state dict of tensors")
    data = dict(data)
    if not data:
        raise CheckpointError(f"{path} is empty")
    _check_tensors(data, path)
    return data


def _check_tensors(data: Mapping[str, Any], path: str, prefix: str = "") -> None:
    for k, v in data.items():
        if isinstance(v, Mapping):
            _check_tensors(v, path, f"{prefix}{k}.")
        elif not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {prefix}{k!s} is a {type(v).__name__}, not a tensor; not a state dict")


def split_prefixes(data: Mapping[str, Any], prefixes: Mapping[str, tuple[str, ...]]) -> dict[str, dict[str, torch.Tensor]]:
    """Split a checkpoint into named parts.

    ``prefixes`` maps a part name to the prefixes that may carry it, e.g. ``{"ip_adapter": ("ip_adapter.",
    "adapter_modules.")}``. A nested dict stored under the part name (the ``.bin`` layout) is taken as is;
    flat keys (the ``.safetensors`` layout) are stripped of their prefix. Parts not found are empty dicts.
    """
    out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in prefixes}
    for name, pres in prefixes.items():
        nested = data.get(name)
        if isinstance(nested, Mapping):
            out[name].update(nested)
            continue
        for key, value in data.items():
            for pre in pres:
                if isinstance(key, str) and key.startswith(pre) and isinstance(value, torch.Tensor):
                    out[name][key[len(pre):]] = value
                    break
    return out


def file_stem(name: str, what: str = "save name") -> str:
    """``name`` as a file stem: characters other than letters, digits, ``-_.`` become ``_``; refused when empty or
    longer than :data:`MAX_STEM_BYTES` (checked before any work starts, not at the first write)."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip())
    if not out.strip("._"):
        raise ValueError(f"{what} {name!r} is empty after removing characters not allowed in file names")
    if len(out.encode()) > MAX_STEM_BYTES:
        raise ValueError(f"{what} is {len(out.encode())} bytes long; file names allow {MAX_STEM_BYTES}: shorten it")
    return out


def read_metadata(path: str) -> dict[str, str] | None:
    """The metadata of a safetensors file (``{}`` when it has none); None when it is not a readable safetensors
    file."""
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return None


def written_by_pack(path: str) -> bool:
    """Whether ``path`` is a file this pack wrote (its metadata says so)."""
    meta = read_metadata(path)
    if meta is None:
        return False
    if meta.get(WRITER_KEY) == WRITER or any(k in meta for k in LEGACY_MARKERS):
        return True
    # earlier IP-Adapter embeds and token embeddings: the pack's format tag, or the trainer's token metadata
    return str(meta.get("format", "")).startswith("personalize.") or {"token", "class_word", "steps"} <= set(meta)


def check_replaceable(path: str, overwrite: bool = False) -> None:
    """Raise :class:`ForeignFileError` if ``path`` exists, was not written by this pack, and ``overwrite`` is off."""
    if os.path.lexists(path) and not overwrite and not written_by_pack(path):
        raise ForeignFileError(f"{path} exists and was not written by ComfyUI-Personalize: it was left as it is. "
                               "Choose another name, or turn on 'overwrite' to replace it")


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`NonFiniteError` naming the first floating tensor that holds NaN or Inf."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"{what}: {key} holds NaN or Inf values; nothing was written")


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (Linux: read from /proc, elsewhere set and restored under a lock)."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^Umask:\s*([0-7]+)", f.read(), re.M)
        if m:
            return int(m.group(1), 8)
    except OSError:
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic_target(path: str):
    """A hidden temp file beside ``path`` to write; on success it gets the user's umask (mkstemp makes 0600) and is
    renamed over ``path``; on any error it is removed and ``path`` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # after the write: safetensors rewrites the file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None = None,
                            overwrite: bool = False) -> str:
    """Write ``tensors`` to ``path``: finite check, ownership check, hidden temp file, umask, atomic rename (see the
    module docstring). ``overwrite``: replace a file of that name the pack did not write."""
    from safetensors.torch import save_file

    check_finite(tensors, path)
    check_replaceable(path, overwrite)
    with _atomic_target(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={**dict(metadata or {}), WRITER_KEY: WRITER})
    return path


def atomic_write_json(data: Mapping, path: str) -> str:
    """``data`` as JSON at ``path``, written to a temp file and renamed (as the tensor files)."""
    with _atomic_target(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(dict(data), f, indent=2, default=str)
    return path


def check_weights(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Raise :class:`CheckpointError` naming the first floating tensor of a loaded file that holds NaN or Inf."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{prefix}{key} holds NaN or Inf values: the file is damaged (download it again)")


def load_exact(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], part: str,
               file_keys: Mapping[str, str] | None = None, ignore=None, assign: bool = False) -> None:
    """Load ``sd`` into ``module``: every key present with its shape, nothing extra, floats as float32. Errors name the
    file's keys (``file_keys``: module key -> file key); ``ignore(key)``: module keys the file need not hold (buffers
    the module recomputes)."""
    own = module.state_dict()
    name = (file_keys or {}).get
    missing = sorted(k for k in set(own) - set(sd) if not (ignore and ignore(k)))
    unexpected = sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        detail = "; ".join(s for s in (
            f"missing {[name(k, k) for k in missing[:4]]}" if missing else "",
            f"unexpected {unexpected[:4]}" if unexpected else "",
            "shape mismatch " + ", ".join(f"{part}.{name(k, k)} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
                                          for k in bad[:4]) if bad else "",
        ) if s)
        raise CheckpointError(f"{part} does not match the detected layout: {detail}")
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
                           strict=ignore is None, assign=assign)
