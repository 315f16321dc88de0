"""onnxruntime, imported only when a model is loaded (never at import time of the package); execution providers
and sessions."""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from collections.abc import Sequence

from .errors import FaceAnalysisError

log = logging.getLogger("personalize")

# User-facing provider names -> onnxruntime execution providers.
PROVIDERS = {
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCm": "ROCMExecutionProvider",
    "DirectML": "DmlExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
}
CPU_PROVIDER = PROVIDERS["CPU"]

INSTALL_HINT = ("install onnxruntime into ComfyUI's Python: `pip install onnxruntime` (CPU), or `pip install "
                "onnxruntime-gpu` for CUDA (never both: they share one package folder). Nothing is installed "
                "automatically.")


class OnnxRuntimeMissing(ImportError):
    pass


_dual_install_checked = False


def import_onnxruntime():
    """``import onnxruntime``, or an error that says what to install. Never installs anything."""
    global _dual_install_checked
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError as e:
        raise OnnxRuntimeMissing(f"face analysis needs onnxruntime, which cannot be imported ({e}): {INSTALL_HINT}") from e
    if not hasattr(ort, "InferenceSession"):  # the husk left by uninstalling one of two installed runtimes
        raise OnnxRuntimeMissing(
            "onnxruntime is broken (the package has no InferenceSession; this happens when onnxruntime and "
            "onnxruntime-gpu were both installed and one was uninstalled): reinstall the one you want with "
            "`pip install --force-reinstall --no-deps onnxruntime-gpu` (or onnxruntime).")
    if not _dual_install_checked:
        _dual_install_checked = True
        found = []
        for dist in ("onnxruntime", "onnxruntime-gpu"):
            try:
                importlib.metadata.distribution(dist)
                found.append(dist)
            except importlib.metadata.PackageNotFoundError:
                pass
        if len(found) == 2:
            log.warning("both onnxruntime and onnxruntime-gpu are installed; they overwrite each other's files, "
                        "so which one runs depends on the install order. Keep one: `pip uninstall onnxruntime "
                        "onnxruntime-gpu` then `pip install onnxruntime-gpu` (or onnxruntime).")
    return ort


def session_providers(provider: str, available: Sequence[str]) -> list[str]:
    """onnxruntime providers for a user choice; a GPU provider this onnxruntime does not offer falls back to CPU."""
    if provider not in PROVIDERS:
        raise FaceAnalysisError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    if wanted == CPU_PROVIDER:
        return [CPU_PROVIDER]
    if wanted not in available:
        hint = {"CUDA": "install onnxruntime-gpu instead of onnxruntime", "DirectML": "install onnxruntime-directml",
                "ROCm": "install the ROCm build of onnxruntime", "CoreML": "use the macOS build of onnxruntime"}[provider]
        log.warning("face analysis: %s requested, but this onnxruntime offers only %s; running on CPU (%s)",
                    wanted, ", ".join(available), hint)
        return [CPU_PROVIDER]
    return [wanted, CPU_PROVIDER]


def create_session(path: str, provider: str = "CPU"):
    """An onnxruntime session for one model file; logs the provider actually used (``session.get_providers()``)."""
    ort = import_onnxruntime()
    providers = session_providers(provider, ort.get_available_providers())
    options = ort.SessionOptions()
    if providers[0] == PROVIDERS["DirectML"]:  # DirectML supports neither memory patterns nor parallel execution
        options.enable_mem_pattern = False
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        session = ort.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as e:
        raise FaceAnalysisError(f"onnxruntime could not load {path}: {type(e).__name__}: {e}. The file may be "
                                "truncated or corrupt: download it again.") from e
    used = session.get_providers()
    if providers[0] != CPU_PROVIDER and providers[0] not in used:
        log.warning("face analysis: %s could not be initialised for %s (missing CUDA/cuDNN libraries?); "
                    "onnxruntime fell back to %s", providers[0], os.path.basename(path), used[0])
    log.info("face model %s runs on %s", os.path.basename(path), used[0])
    return session
