"""Face analysis on onnxruntime: the insightface model packs (``antelopev2``, ``buffalo_l``) without insightface.

What the IP-Adapter FaceID and PuLID reference code get from ``insightface.app.FaceAnalysis`` (research/face.md §3-4):
an SCRFD detection (box, 5 keypoints, score), the ArcFace embedding of the face aligned to the 112-px ArcFace
template (``face_align.norm_crop``), and the same alignment at other sizes for CLIP / EVA-CLIP crops. This module
does exactly that with numpy and onnxruntime only: nothing to compile, no opencv, no scikit-image, and the
landmark / gender-age models of the packs are never loaded.

Equality with insightface 2.1 (and 0.7.3 except the order of exactly tied scores) on the same ``.onnx`` files:
- model routing by ONNX inputs/outputs (``ModelRouter.get_model``), detector head layouts (6/9/10/15 outputs,
  2-D or batched 3-D), SCRFD decoding, NMS, score order (stable), ArcFace pre-processing (mean/std, the mxnet
  special case read from the first node names);
- the letterbox resize is OpenCV's ``cv2.resize`` INTER_LINEAR on uint8 (11-bit fixed point), reproduced bit for
  bit; the alignment warp is OpenCV's float ``cv2.warpAffine`` INTER_LINEAR kernel (OpenCV >= 4.11; older OpenCV
  used a fixed-point kernel whose crops differ by one grey level at some pixels); the similarity transform is the
  Umeyama estimate of scikit-image's ``SimilarityTransform.estimate``, with the same float32/float64 steps.
``tests/tier1/test_face.py`` checks this against insightface when it is importable.

Images are RGB uint8 ``[H, W, 3]`` here (insightface takes BGR and swaps inside ``blobFromImage``: same network
input). ComfyUI IMAGE tensors are converted with :func:`image_to_uint8`.
"""
from __future__ import annotations

import glob
import importlib
import importlib.metadata
import logging
import mmap
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

log = logging.getLogger("personalize")

# ---------------------------------------------------------------------------------------------------------------
# Model packs and constants (insightface model_zoo; research/face.md §3, §5)

# Detector and recognizer file of each public pack (the first of each task in sorted order wins, as in
# FaceAnalysis). Landmark and gender/age models of the packs are not needed by PuLID / FaceID and never loaded.
PACK_FILES = {
    "antelopev2": {"detection": "scrfd_10g_bnkps.onnx", "recognition": "glintr100.onnx"},
    "buffalo_l": {"detection": "det_10g.onnx", "recognition": "w600k_r50.onnx"},
}
MODEL_PACKS = tuple(PACK_FILES)
AUXILIARY_FILES = frozenset({"1k3d68.onnx", "2d106det.onnx", "genderage.onnx"})

DET_SIZE = 640  # FaceAnalysis.prepare(det_size=(640, 640)) in PuLID_ComfyUI and IPAdapter_plus
# The retry loop of PuLID_ComfyUI / IPAdapter_plus: 640 down to 320 in steps of 64 until a face is found.
DET_RETRY_SIZES = tuple(range(640, 319, -64))
DET_THRESH = 0.5  # FaceAnalysis.prepare default
NMS_THRESH = 0.4  # SCRFD.nms_thresh
DET_INPUT_MEAN, DET_INPUT_STD = 127.5, 128.0  # SCRFD._init_vars
REC_INPUT_MEAN, REC_INPUT_STD = 127.5, 127.5  # ArcFaceONNX, torch-exported recognizers (glintr100, w600k_r50)
MXNET_REC_INPUT_MEAN, MXNET_REC_INPUT_STD = 0.0, 1.0  # ArcFaceONNX when the first nodes are Sub/_minus and Mul/_mul
MXNET_PROBE_NODES = 8  # ArcFaceONNX looks at graph.node[:8]

# SCRFD head layout by number of outputs: (strides, anchors per location, has keypoints) (SCRFD._init_vars).
SCRFD_HEADS = {
    6: ((8, 16, 32), 2, False),
    9: ((8, 16, 32), 2, True),
    10: ((8, 16, 32, 64, 128), 1, False),
    15: ((8, 16, 32, 64, 128), 1, True),
}

# ArcFace 5-point template in a 112x112 crop (insightface utils/face_align.py arcface_dst): eyes, nose, mouth corners.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32)
ARCFACE_SIZE = 112
ARCFACE_ALT_SIZE = 128  # insightface: sizes divisible by 128 (not 112) use a 128 template with an x shift of 8/128
CROP_SIZES = (112, 224, 256, 336)  # ArcFace / FaceID SD1.5 / FaceID SDXL / Kolors; any size >= 16 is accepted

SELECTIONS = ("largest", "highest score", "index")

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


class FaceAnalysisError(ValueError):
    """A model pack is missing or malformed, or an input cannot be analysed. The message says what to do."""


class NoFaceError(FaceAnalysisError):
    def __init__(self, image_index: int, det_sizes: Sequence[int], image_shape: Sequence[int]):
        self.image_index, self.det_sizes = image_index, tuple(det_sizes)
        sizes = ", ".join(str(s) for s in self.det_sizes)
        super().__init__(
            f"no face found in image {image_index} ({image_shape[1]}x{image_shape[0]} px) at detection sizes {sizes}. "
            "Use a picture where the face is clearly visible (frontal, not cut off, at least ~40 px wide).")


class OnnxRuntimeMissing(ImportError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# onnxruntime: imported only when a model is loaded; execution providers


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


# ---------------------------------------------------------------------------------------------------------------
# Finding a pack and routing its models (FaceAnalysis + ModelRouter semantics)


def find_model_pack(name: str, roots: Sequence[str]) -> str:
    """The folder of pack ``name``: ``<root>/models/<name>`` (insightface layout) or ``<root>/<name>``."""
    searched = []
    for root in roots:
        for folder in (os.path.join(root, "models", name), os.path.join(root, name)):
            searched.append(folder)
            if not os.path.isdir(folder):
                continue
            if glob.glob(os.path.join(folder, "*.onnx")):
                return folder
            nested = sorted(glob.glob(os.path.join(folder, "*", "*.onnx")))
            if nested:
                inner = os.path.dirname(nested[0])
                raise FaceAnalysisError(
                    f"model pack {name!r} is nested one folder too deep: the .onnx files are in {inner}, but they "
                    f"must be directly in {folder}. Move them up one level (a common result of unzipping "
                    f"{name}.zip into a folder of the same name) and remove the empty {os.path.basename(inner)} folder.")
    expected = PACK_FILES.get(name)
    files = (" and ".join(expected.values()) + " (other .onnx files of the pack are optional)") if expected else \
        "an SCRFD detector and an ArcFace recognizer (.onnx)"
    raise FaceAnalysisError(
        f"insightface model pack {name!r} not found. Searched: {', '.join(searched) or '(no insightface folder)'}. "
        f"Expected {files} in <ComfyUI>/models/insightface/models/{name}/. Nothing is downloaded automatically.")


def list_model_packs(roots: Sequence[str]) -> list[str]:
    """Names of the folders under ``<root>/models`` (and ``<root>``) that hold .onnx files or a nested pack."""
    names = set()
    for root in roots:
        for base in (os.path.join(root, "models"), root):
            if not os.path.isdir(base):
                continue
            for entry in os.listdir(base):
                folder = os.path.join(base, entry)
                if base == root and entry == "models":
                    continue
                if os.path.isdir(folder) and (glob.glob(os.path.join(folder, "*.onnx"))
                                              or glob.glob(os.path.join(folder, "*", "*.onnx"))):
                    names.add(entry)
    return sorted(names)


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf, start: int, end: int):
    """(field number, wire type, value or (offset, length)) of a protobuf message in ``buf[start:end]``."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield number, wire, (pos, length)
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def onnx_node_names(path: str, limit: int = MXNET_PROBE_NODES) -> list[str]:
    """Names of the first ``limit`` graph nodes, read from the protobuf without the onnx package (and without
    reading the weights: ModelProto.graph = 7, GraphProto.node = 1, NodeProto.name = 3)."""
    names: list[str] = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for number, wire, value in _proto_fields(buf, 0, len(buf)):
            if number != 7 or wire != 2:
                continue
            g_start, g_len = value
            for n_number, n_wire, n_value in _proto_fields(buf, g_start, g_start + g_len):
                if n_number != 1 or n_wire != 2:
                    continue
                name = ""
                for f_number, f_wire, f_value in _proto_fields(buf, n_value[0], n_value[0] + n_value[1]):
                    if f_number == 3 and f_wire == 2:
                        name = bytes(buf[f_value[0]:f_value[0] + f_value[1]]).decode("utf-8", "replace")
                names.append(name)
                if len(names) >= limit:
                    return names
            return names
    return names


def recognizer_mean_std(path: str) -> tuple[float, float]:
    """ArcFaceONNX's rule: mxnet-converted models (first nodes named Sub/_minus and Mul/_mul) take raw pixels."""
    try:
        names = onnx_node_names(path)
    except (OSError, ValueError, IndexError) as e:
        log.warning("could not read node names of %s (%s); assuming mean/std 127.5", path, e)
        names = []
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    if has_sub and has_mul:
        return MXNET_REC_INPUT_MEAN, MXNET_REC_INPUT_STD
    return REC_INPUT_MEAN, REC_INPUT_STD


def _static_hw(shape) -> tuple[int, int] | None:
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:4]):
        return None
    return shape[2], shape[3]


def route_model(session) -> str | None:
    """Task of a model from its inputs/outputs only (insightface ModelRouter): 'detection', 'recognition',
    'landmark', 'attribute', 'swapper' or None."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(outputs) >= 5:
        return "detection"
    hw = _static_hw(inputs[0].shape)
    if hw is None:
        return None
    h, w = hw
    if h == w == 192:
        return "landmark"
    if h == w == 96:
        return "attribute"
    if len(inputs) == 2 and h == w == 128:
        return "swapper"
    if h == w and h >= 112 and h % 16 == 0:
        return "recognition"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Image operations (OpenCV semantics, numpy only)


def image_to_uint8(images: torch.Tensor) -> np.ndarray:
    """ComfyUI IMAGE [N, H, W, 3] float in [0, 1] -> RGB uint8, rounded (8-bit sources come back unchanged;
    the popular packs truncate, which moves some pixels one level down)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4):
        got = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise FaceAnalysisError(f"expected an IMAGE batch [N, H, W, 3], got {got}")
    x = images[..., :3].detach().float().cpu().clamp(0, 1).mul(255).round()
    return x.to(torch.uint8).numpy()


def _linear_taps(dst: int, src: int, clamp_edges: bool):
    # cv2 resize coefficients: centre-aligned float32 source position, 11-bit fixed-point weights.
    scale = 1.0 / (dst / src)
    pos = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(pos).astype(np.int64)
    frac = (pos - i0.astype(np.float32)).astype(np.float32)
    if clamp_edges:  # horizontal taps are clamped (weight 1 on the edge pixel); vertical taps keep their weights
        low, high = i0 < 0, i0 >= src - 1
        frac[low | high] = 0
        i0[low] = 0
        i0[high] = src - 1
    w0 = np.rint((np.float32(1) - frac) * np.float32(2048)).astype(np.int64)
    w1 = np.rint(frac * np.float32(2048)).astype(np.int64)
    return np.clip(i0, 0, src - 1), np.clip(i0 + 1, 0, src - 1), w0, w1


def resize_linear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(img, (width, height))`` (INTER_LINEAR) for uint8 [H, W, C], bit for bit."""
    src_h, src_w = img.shape[:2]
    if (src_w, src_h) == (width, height):
        return img.copy()
    if src_w == 2 * width and src_h == 2 * height:  # OpenCV switches exact 2x downscales to INTER_AREA
        s = img.astype(np.int32)
        return ((s[0::2, 0::2] + s[0::2, 1::2] + s[1::2, 0::2] + s[1::2, 1::2] + 2) >> 2).astype(np.uint8)
    x0, x1, a0, a1 = _linear_taps(width, src_w, True)
    y0, y1, b0, b1 = _linear_taps(height, src_h, False)
    s = img.astype(np.int64)
    rows = s[:, x0] * a0[None, :, None] + s[:, x1] * a1[None, :, None]  # [src_h, width, C], scale 2^11
    b0, b1 = b0[:, None, None], b1[:, None, None]
    # the vectorised vertical pass of OpenCV: (((r0 >> 4) * b0) >> 16) + (((r1 >> 4) * b1) >> 16), then (v + 2) >> 2
    v = (((rows[y0] >> 4) * b0) >> 16) + (((rows[y1] >> 4) * b1) >> 16)
    return np.clip((v + 2) >> 2, 0, 255).astype(np.uint8)


def _fma32(a, b, c):
    """float32 fused multiply-add (one rounding), through float64."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(np.float32)


def _invert_affine(m: np.ndarray) -> list[float]:
    # OpenCV invertAffineTransform order of operations (double)
    m0, m1, m2, m3, m4, m5 = (float(v) for v in np.asarray(m, np.float64).reshape(6))
    d = m0 * m4 - m1 * m3
    d = 1.0 / d if d != 0 else 0.0
    a11, a22 = m4 * d, m0 * d
    m0, m1, m3, m4 = a11, m1 * -d, m3 * -d, a22
    return [m0, m1, -m0 * m2 - m1 * m5, m3, m4, -m3 * m2 - m4 * m5]


# cv2.warpAffine's float kernel handles 16 output pixels per vector step; the remaining columns of a row go
# through its scalar loop, which rounds the source coordinate differently.
_WARP_VECTOR_STEP = 16


def warp_affine(img: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """``cv2.warpAffine(img, m, (size, size), borderValue=0)`` (INTER_LINEAR) for uint8 [H, W, C]."""
    inv = np.array(_invert_affine(m), np.float64).astype(np.float32)
    xs = np.broadcast_to(np.arange(size, dtype=np.float32)[None, :], (size, size))
    ys = np.broadcast_to(np.arange(size, dtype=np.float32)[:, None], (size, size))
    row_x, row_y = ys * inv[1] + inv[2], ys * inv[4] + inv[5]
    sx, sy = _fma32(xs, inv[0], row_x), _fma32(xs, inv[3], row_y)
    tail = np.arange(size) >= (size // _WARP_VECTOR_STEP) * _WARP_VECTOR_STEP
    if tail.any():
        sx[:, tail] = (_fma32(xs, inv[0], ys * inv[1]) + inv[2])[:, tail]
        sy[:, tail] = (_fma32(xs, inv[3], ys * inv[4]) + inv[5])[:, tail]
    ix, iy = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx = (sx - ix.astype(np.float32))[..., None]
    fy = (sy - iy.astype(np.float32))[..., None]
    h, w = img.shape[:2]
    src = img.astype(np.float32)

    def tap(yy, xx):  # constant border 0
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        return src[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)] * inside[..., None]

    top = _fma32(fx, tap(iy, ix + 1) - tap(iy, ix), tap(iy, ix))
    bottom = _fma32(fx, tap(iy + 1, ix + 1) - tap(iy + 1, ix), tap(iy + 1, ix))
    out = _fma32(fy, bottom - top, top)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform src -> dst (Umeyama 1991, eqs. 38-43), 3x3 homogeneous; the dtype steps
    of scikit-image's SimilarityTransform.estimate (float32 points give float32 intermediate sums)."""
    n, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n  # eq. 38
    signs = np.ones((dim,), dtype=np.float64)
    if np.linalg.det(cov) < 0:  # eq. 39
        signs[dim - 1] = -1
    out = np.eye(dim + 1, dtype=np.float64)
    u, s, vt = np.linalg.svd(cov)
    rank = np.count_nonzero(s > s.max() * max(cov.shape) * np.finfo(float).eps)
    if rank == 0:
        raise FaceAnalysisError("degenerate keypoints: all five landmarks coincide")
    if rank == dim - 1 and np.linalg.det(u) * np.linalg.det(vt) <= 0:
        flipped = signs.copy()
        flipped[dim - 1] = -1
        out[:dim, :dim] = u @ np.diag(flipped) @ vt
    elif rank == dim - 1:
        out[:dim, :dim] = u @ vt
    else:
        out[:dim, :dim] = u @ np.diag(signs) @ vt  # eq. 40
    scale = 1.0 / src_c.var(axis=0).sum() * (s @ signs)  # eq. 42
    out[:dim, dim] = dst_mean - scale * (out[:dim, :dim] @ src_mean.T)
    out[:dim, :dim] *= scale
    return out


def alignment_template(size: int) -> np.ndarray:
    """The 5 ArcFace points in a ``size`` crop (insightface estimate_norm: x/112 scaling, or the 128 template with an
    x shift for sizes divisible by 128 only; other sizes scale the 112 template)."""
    if size < 16:
        raise FaceAnalysisError(f"crop size {size} is too small; use 112, 224, 256, 336 or another size >= 16")
    if size % ARCFACE_SIZE != 0 and size % ARCFACE_ALT_SIZE == 0:
        ratio = float(size) / ARCFACE_ALT_SIZE
        dst = ARCFACE_TEMPLATE * ratio
        dst[:, 0] += 8.0 * ratio
        return dst
    return ARCFACE_TEMPLATE * (float(size) / ARCFACE_SIZE)


def alignment_matrix(kps: np.ndarray, size: int) -> np.ndarray:
    """2x3 similarity matrix taking the 5 keypoints to the ArcFace template (insightface face_align.estimate_norm)."""
    kps = np.asarray(kps, dtype=np.float32)
    if kps.shape != (5, 2):
        raise FaceAnalysisError(f"alignment needs 5 keypoints [5, 2], got {kps.shape}")
    return umeyama_similarity(kps, alignment_template(size))[0:2, :]


def norm_crop(img: np.ndarray, kps: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """Aligned face crop, uint8 [size, size, 3] (insightface face_align.norm_crop)."""
    return warp_affine(img, alignment_matrix(kps, size), size)


# ---------------------------------------------------------------------------------------------------------------
# Detector and recognizer


def nms(dets: np.ndarray, thresh: float = NMS_THRESH) -> list[int]:
    """Greedy NMS in score order with insightface's +1 pixel box convention; ``dets`` [K, 5] (x1, y1, x2, y2, s)."""
    x1, y1, x2, y2, scores = (dets[:, i] for i in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter)
        order = rest[overlap <= thresh]
    return keep


class Detector:
    """SCRFD on an onnxruntime session (any of the 6/9/10/15-output layouts, 2-D or batched outputs)."""

    def __init__(self, session, path: str = ""):
        self.session, self.path = session, path
        inp = session.get_inputs()[0]
        outputs = session.get_outputs()
        if len(outputs) not in SCRFD_HEADS:
            raise FaceAnalysisError(f"{path}: a detector with {len(outputs)} outputs is not an SCRFD model "
                                    f"(expected {sorted(SCRFD_HEADS)} outputs)")
        self.strides, self.anchors, self.has_kps = SCRFD_HEADS[len(outputs)]
        if not self.has_kps:
            raise FaceAnalysisError(f"{path}: this SCRFD detector gives no keypoints, which face alignment needs; "
                                    "use the *_bnkps / det_10g detector of the insightface packs")
        self.input_name = inp.name
        self.output_names = [o.name for o in outputs]
        self.batched = len(outputs[0].shape) == 3
        hw = _static_hw(inp.shape)
        self.static_size = (hw[1], hw[0]) if hw else None  # (width, height)
        self._centers: dict = {}

    def sizes(self, requested: Sequence[int]) -> list[tuple[int, int]]:
        if self.static_size is not None:
            return [self.static_size]
        return [(int(s), int(s)) for s in requested]

    def _anchor_centers(self, height: int, width: int, stride: int) -> np.ndarray:
        key = (height, width, stride)
        if key not in self._centers:
            grid = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32)  # (x, y) per location
            centers = (grid * stride).reshape(-1, 2)
            if self.anchors > 1:
                centers = np.repeat(centers, self.anchors, axis=0)  # location-major, anchor-minor
            self._centers[key] = centers
        return self._centers[key]

    def detect(self, img: np.ndarray, size: tuple[int, int], thresh: float = DET_THRESH):
        """Faces in an RGB uint8 image at one detector input size (width, height): boxes+scores [F, 5] float32 in
        image pixels, keypoints [F, 5, 2], in descending score order."""
        in_w, in_h = size
        im_ratio = float(img.shape[0]) / img.shape[1]
        if im_ratio > float(in_h) / in_w:
            new_h = in_h
            new_w = int(new_h / im_ratio)
        else:
            new_w = in_w
            new_h = int(new_w * im_ratio)
        if new_w < 1 or new_h < 1:
            raise FaceAnalysisError(f"image of {img.shape[1]}x{img.shape[0]} px is too thin to detect faces in")
        det_scale = float(new_h) / img.shape[0]
        canvas = np.zeros((in_h, in_w, 3), dtype=np.uint8)  # letterbox: top-left aligned, black padding
        canvas[:new_h, :new_w] = resize_linear(img, new_w, new_h)
        blob = (canvas.transpose(2, 0, 1)[None].astype(np.float32) - np.float32(DET_INPUT_MEAN)) \
            * np.float32(1.0 / DET_INPUT_STD)
        outs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(blob)})
        levels = len(self.strides)
        scores_l, boxes_l, kps_l = [], [], []
        for i, stride in enumerate(self.strides):
            scores, boxes, kps = outs[i], outs[i + levels], outs[i + 2 * levels]
            if self.batched:
                scores, boxes, kps = scores[0], boxes[0], kps[0]
            centers = self._anchor_centers(in_h // stride, in_w // stride, stride)
            boxes, kps = boxes * stride, kps * stride
            keep = np.where(scores >= thresh)[0]
            c = centers[keep]
            b = boxes[keep]
            scores_l.append(scores[keep])
            boxes_l.append(np.stack([c[:, 0] - b[:, 0], c[:, 1] - b[:, 1], c[:, 0] + b[:, 2], c[:, 1] + b[:, 3]], -1))
            k = kps[keep]
            kps_l.append(np.stack([c[:, j % 2] + k[:, j] for j in range(k.shape[1])], -1).reshape(len(keep), k.shape[1] // 2, 2))
        scores = np.vstack(scores_l).ravel()
        if scores.size == 0:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        order = np.argsort(-scores, kind="stable")
        boxes = np.vstack(boxes_l) / det_scale
        kps = np.vstack(kps_l) / det_scale
        dets = np.hstack((boxes, scores[:, None])).astype(np.float32, copy=False)[order]
        kps = kps[order]
        keep = nms(dets)
        return dets[keep], kps[keep]


class Recognizer:
    """ArcFace on an onnxruntime session: aligned 112-px crop -> raw 512-d embedding."""

    def __init__(self, session, path: str = ""):
        self.session, self.path = session, path
        inp, outputs = session.get_inputs()[0], session.get_outputs()
        if len(outputs) != 1:
            raise FaceAnalysisError(f"{path}: a recognizer must have one output, this one has {len(outputs)}")
        self.input_name, self.output_name = inp.name, outputs[0].name
        self.input_size = _static_hw(inp.shape)[0]
        self.mean, self.std = recognizer_mean_std(path) if path else (REC_INPUT_MEAN, REC_INPUT_STD)

    def embed_crop(self, crop: np.ndarray) -> np.ndarray:
        """One aligned uint8 crop [S, S, 3] (S = input size) -> raw embedding [D] float32."""
        blob = (crop.transpose(2, 0, 1)[None].astype(np.float32) - np.float32(self.mean)) * np.float32(1.0 / self.std)
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(blob)})[0].reshape(-1)

    def embed(self, img: np.ndarray, kps: np.ndarray) -> np.ndarray:
        return self.embed_crop(norm_crop(img, kps, self.input_size))


# ---------------------------------------------------------------------------------------------------------------
# What flows between nodes


@dataclass
class FaceEmbeds:
    """One chosen face per input image (type PERSONALIZE_FACE_EMBEDS).

    embedding [N, 512] float32  raw ArcFace output (PuLID, FaceID Portrait-unnorm)
    normed    [N, 512] float32  L2-normalised embedding (FaceID, FaceID Plus / v2, Portrait)
    kps       [N, 5, 2]         keypoints in image pixels (eyes, nose, mouth corners)
    bbox      [N, 4]            x1, y1, x2, y2 in image pixels
    det_score [N]
    crops     [N, S, S, 3]      aligned crop (ArcFace template at size S), RGB float in [0, 1] (ComfyUI IMAGE)
    crop_size S
    det_size  [N] int64         detector input size at which the face was found
    faces     per image: all detected boxes + scores [F_i, 5], left to right (the order 'index' selection uses)
    face_index [N] int64        position of the chosen face in ``faces``
    pack      name of the model pack (e.g. 'antelopev2'); FaceID models were trained on buffalo_l embeddings
    """

    embedding: torch.Tensor
    normed: torch.Tensor
    kps: torch.Tensor
    bbox: torch.Tensor
    det_score: torch.Tensor
    crops: torch.Tensor
    crop_size: int
    det_size: torch.Tensor = None
    faces: list = field(default_factory=list)
    face_index: torch.Tensor = None
    pack: str = ""

    def __post_init__(self):
        n = self.embedding.shape[0]
        if self.det_size is None:
            self.det_size = torch.full((n,), DET_SIZE, dtype=torch.int64)
        if self.face_index is None:
            self.face_index = torch.zeros((n,), dtype=torch.int64)
        expect = {"embedding": (n, self.embedding.shape[1]), "normed": (n, self.embedding.shape[1]),
                  "kps": (n, 5, 2), "bbox": (n, 4), "det_score": (n,),
                  "crops": (n, self.crop_size, self.crop_size, 3), "det_size": (n,), "face_index": (n,)}
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise FaceAnalysisError(f"FaceEmbeds.{name} has shape {got}, expected {shape}")

    def __len__(self) -> int:
        return self.embedding.shape[0]

    def describe(self) -> str:
        return (f"{len(self)} face(s), {self.embedding.shape[1]}-d embeddings, crops {self.crop_size} px"
                + (f", pack {self.pack}" if self.pack else ""))


@dataclass
class Face:
    bbox: np.ndarray  # [4]
    kps: np.ndarray  # [5, 2]
    det_score: float


def order_left_to_right(dets: np.ndarray) -> np.ndarray:
    """Indices of detections sorted by the left edge of the box (then the top edge)."""
    return np.lexsort((dets[:, 1], dets[:, 0]))


def select_face(dets: np.ndarray, selection: str = "largest", index: int = 0, image_index: int = 0) -> int:
    """Row of ``dets`` (score order) to use: the largest box (ties: higher score), the highest score, or the
    ``index``-th face from left to right."""
    if selection == "largest":
        return int(np.argmax((dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])))
    if selection == "highest score":
        return int(np.argmax(dets[:, 4]))
    if selection == "index":
        order = order_left_to_right(dets)
        if not 0 <= index < len(order):
            raise FaceAnalysisError(f"image {image_index} has {len(order)} face(s) (index 0 to {len(order) - 1}, "
                                    f"from left to right); face index {index} does not exist")
        return int(order[index])
    raise FaceAnalysisError(f"unknown face selection {selection!r}; expected one of {', '.join(SELECTIONS)}")


class FaceAnalysis:
    """An insightface model pack on onnxruntime: detector + recognizer (other models of the pack are skipped)."""

    def __init__(self, detector: Detector, recognizer: Recognizer, name: str = "", provider: str = "CPU"):
        self.detector, self.recognizer, self.name, self.provider = detector, recognizer, name, provider

    @property
    def providers(self) -> list[str]:
        return list(self.detector.session.get_providers())

    @classmethod
    def from_folder(cls, folder: str, provider: str = "CPU", name: str | None = None) -> "FaceAnalysis":
        """Load the first detector and the first recognizer among ``folder/*.onnx`` (sorted), routed by I/O."""
        name = name or os.path.basename(os.path.normpath(folder))
        files = sorted(glob.glob(os.path.join(folder, "*.onnx")))
        found: dict[str, tuple[Any, str]] = {}
        for path in files:
            if os.path.basename(path) in AUXILIARY_FILES:
                log.debug("face analysis: skipping %s (landmark / attribute model, not needed)", path)
                continue
            session = create_session(path, provider)
            task = route_model(session)
            if task in ("detection", "recognition") and task not in found:
                found[task] = (session, path)
            else:
                log.debug("face analysis: %s routed to %s, not used", path, task)
            if len(found) == 2:
                break
        missing = [t for t in ("detection", "recognition") if t not in found]
        if missing:
            names = ", ".join(os.path.basename(f) for f in files) or "none"
            expected = PACK_FILES.get(name, {})
            want = ", ".join(f"{t} ({expected[t]})" if t in expected else t for t in missing)
            raise FaceAnalysisError(
                f"model pack {name!r} in {folder} has no {want} model (.onnx files found: {names}). "
                f"A pack needs an SCRFD detector and an ArcFace recognizer; download the complete pack again.")
        det = Detector(*found["detection"])
        rec = Recognizer(*found["recognition"])
        log.info("face analysis %s: detector %s, recognizer %s (%d px, mean %g, std %g) on %s", name,
                 os.path.basename(det.path), os.path.basename(rec.path), rec.input_size, rec.mean, rec.std,
                 det.session.get_providers()[0])
        return cls(det, rec, name, provider)

    @classmethod
    def from_pack(cls, name: str, roots: Sequence[str], provider: str = "CPU") -> "FaceAnalysis":
        return cls.from_folder(find_model_pack(name, roots), provider, name)

    def detect(self, img: np.ndarray, det_sizes: Sequence[int] = DET_RETRY_SIZES, image_index: int = 0):
        """Detections at the first size (of ``det_sizes``, largest first) that finds a face:
        (dets [F, 5], kps [F, 5, 2], det size). Raises :class:`NoFaceError` when none does."""
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise FaceAnalysisError(f"expected an RGB uint8 image [H, W, 3], got {img.dtype} {img.shape}")
        sizes = self.detector.sizes(det_sizes)
        for size in sizes:
            dets, kps = self.detector.detect(img, size)
            if len(dets):
                if size != sizes[0]:
                    log.info("image %d: face found at detection size %d", image_index, size[0])
                return dets, kps, size[0]
        raise NoFaceError(image_index, [s[0] for s in sizes], img.shape)

    def faces(self, img: np.ndarray, det_sizes: Sequence[int] = DET_RETRY_SIZES) -> list[Face]:
        """All faces of one image, in score order (what ``FaceAnalysis.get`` returns, without embeddings)."""
        dets, kps, _ = self.detect(img, det_sizes)
        return [Face(d[:4], k, float(d[4])) for d, k in zip(dets, kps)]

    def analyze(self, images, selection: str = "largest", index: int = 0, crop_size: int = 224,
                det_sizes: Sequence[int] = DET_RETRY_SIZES) -> FaceEmbeds:
        """One face per image: ComfyUI IMAGE [N, H, W, 3] (or a list of RGB uint8 arrays) -> :class:`FaceEmbeds`."""
        if isinstance(images, torch.Tensor):
            arrays = list(image_to_uint8(images))
        else:
            arrays = [np.asarray(a) for a in images]
        if not arrays:
            raise FaceAnalysisError("the image batch is empty")
        alignment_template(crop_size)  # validates the size before any model runs
        rows: dict[str, list] = {k: [] for k in ("embedding", "kps", "bbox", "det_score", "crops", "det_size",
                                                 "faces", "face_index")}
        for i, img in enumerate(arrays):
            dets, kps, size = self.detect(img, det_sizes, image_index=i)
            pick = select_face(dets, selection, index, image_index=i)
            order = order_left_to_right(dets)
            rows["embedding"].append(self.recognizer.embed(img, kps[pick]))
            rows["kps"].append(kps[pick])
            rows["bbox"].append(dets[pick, :4])
            rows["det_score"].append(dets[pick, 4])
            rows["crops"].append(norm_crop(img, kps[pick], crop_size))
            rows["det_size"].append(size)
            rows["faces"].append(torch.from_numpy(np.ascontiguousarray(dets[order])))
            rows["face_index"].append(int(np.nonzero(order == pick)[0][0]))
        embedding = np.stack(rows["embedding"]).astype(np.float32)
        normed = np.stack([e / np.linalg.norm(e) for e in embedding])  # per face, as Face.normed_embedding
        return FaceEmbeds(
            embedding=torch.from_numpy(embedding),
            normed=torch.from_numpy(normed.astype(np.float32)),
            kps=torch.from_numpy(np.stack(rows["kps"]).astype(np.float32)),
            bbox=torch.from_numpy(np.stack(rows["bbox"]).astype(np.float32)),
            det_score=torch.from_numpy(np.array(rows["det_score"], np.float32)),
            crops=torch.from_numpy(np.stack(rows["crops"])).float().div(255.0),
            crop_size=int(crop_size),
            det_size=torch.tensor(rows["det_size"], dtype=torch.int64),
            faces=rows["faces"],
            face_index=torch.tensor(rows["face_index"], dtype=torch.int64),
            pack=self.name,
        )
