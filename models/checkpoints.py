"""Safe checkpoint loading and atomic writing.

- safetensors first; pickles (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) only through ``torch.load(weights_only=True)``.
- Every failure raises :class:`CheckpointError` with the path and what to do, never a bare KeyError.
- Outputs are written to a temporary file next to the target and renamed into place.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")


class CheckpointError(ValueError):
    """A model file is missing, unreadable, or not what the node expects."""


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


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None = None) -> str:
    """Write ``tensors`` to ``path`` through a temp file in the same folder and an atomic rename."""
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
