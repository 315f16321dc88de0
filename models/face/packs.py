"""Finding an insightface model pack in folders and routing its models (FaceAnalysis + ModelRouter semantics):
folder layout, ONNX routing by inputs/outputs, and the first node names read from the protobuf (ArcFace mean/std).

Sources: insightface python-package ``insightface/app/face_analysis.py`` (FaceAnalysis),
``insightface/model_zoo/model_zoo.py`` (ModelRouter.get_model) and ``insightface/model_zoo/arcface_onnx.py``
(ArcFaceONNX.__init__).
"""
from __future__ import annotations

import glob
import logging
import mmap
import os
from collections.abc import Sequence

from .errors import FaceAnalysisError

log = logging.getLogger("personalize")

# Detector and recognizer file of each public pack (the first of each task in sorted order wins, as in
# FaceAnalysis). Landmark and gender/age models of the packs are not needed by PuLID / FaceID and never loaded.
PACK_FILES = {
    "antelopev2": {"detection": "scrfd_10g_bnkps.onnx", "recognition": "glintr100.onnx"},
    "buffalo_l": {"detection": "det_10g.onnx", "recognition": "w600k_r50.onnx"},
}
MODEL_PACKS = tuple(PACK_FILES)
AUXILIARY_FILES = frozenset({"1k3d68.onnx", "2d106det.onnx", "genderage.onnx"})

REC_INPUT_MEAN, REC_INPUT_STD = 127.5, 127.5  # ArcFaceONNX, torch-exported recognizers (glintr100, w600k_r50)
MXNET_REC_INPUT_MEAN, MXNET_REC_INPUT_STD = 0.0, 1.0  # ArcFaceONNX when the first nodes are Sub/_minus and Mul/_mul
MXNET_PROBE_NODES = 8  # ArcFaceONNX looks at graph.node[:8]


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
