"""Face analysis on onnxruntime: the insightface model packs (``antelopev2``, ``buffalo_l``) without insightface.

What the IP-Adapter FaceID and PuLID reference code get from ``insightface.app.FaceAnalysis`` (the usage code of the
h94/IP-Adapter-FaceID model card, ``pulid/pipeline.py`` of ToTheBeginning/PuLID):
an SCRFD detection (box, 5 keypoints, score), the ArcFace embedding of the face aligned to the 112-px ArcFace
template (``face_align.norm_crop``), and the same alignment at other sizes for CLIP / EVA-CLIP crops. This package
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

Modules (each imports only modules listed before it):
- ``errors``: :class:`FaceAnalysisError`, :class:`NoFaceError`;
- ``runtime``: onnxruntime, imported only when a model is loaded (never by importing this package), execution
  providers, sessions;
- ``packs``: finding a model pack in folders, routing its models by I/O, the recognizer's mean/std from the first
  ONNX node names;
- ``image``: IMAGE -> uint8, the OpenCV resize / warp, the Umeyama similarity, the ArcFace alignment;
- ``detection``: NMS, the SCRFD :class:`Detector`, the ArcFace :class:`Recognizer`;
- ``analysis``: :class:`FaceEmbeds`, face selection, :class:`FaceAnalysis`.
The names below are re-exported; the submodules are attributes of the package (``face.runtime``...). A test that
patches a name must patch it in the module that looks it up (e.g. ``face.runtime.import_onnxruntime``).
"""
from __future__ import annotations

from .analysis import DET_RETRY_SIZES, DET_SIZE, SELECTIONS, FaceAnalysis, FaceEmbeds, order_left_to_right, select_face
from .detection import DET_INPUT_MEAN, DET_INPUT_STD, DET_THRESH, NMS_THRESH, SCRFD_HEADS, Detector, Recognizer, nms
from .errors import FaceAnalysisError, NoFaceError
from .image import (
    ARCFACE_ALT_SIZE,
    ARCFACE_SIZE,
    ARCFACE_TEMPLATE,
    CROP_SIZES,
    alignment_matrix,
    alignment_template,
    image_to_uint8,
    norm_crop,
    resize_linear,
    umeyama_similarity,
    warp_affine,
)
from .packs import (
    AUXILIARY_FILES,
    MODEL_PACKS,
    MXNET_PROBE_NODES,
    MXNET_REC_INPUT_MEAN,
    MXNET_REC_INPUT_STD,
    PACK_FILES,
    REC_INPUT_MEAN,
    REC_INPUT_STD,
    find_model_pack,
    list_model_packs,
    onnx_node_names,
    recognizer_mean_std,
    route_model,
)
from .runtime import (
    CPU_PROVIDER,
    INSTALL_HINT,
    PROVIDERS,
    OnnxRuntimeMissing,
    create_session,
    import_onnxruntime,
    session_providers,
)

__all__ = [
    "ARCFACE_ALT_SIZE", "ARCFACE_SIZE", "ARCFACE_TEMPLATE", "AUXILIARY_FILES", "CPU_PROVIDER", "CROP_SIZES",
    "DET_INPUT_MEAN", "DET_INPUT_STD", "DET_RETRY_SIZES", "DET_SIZE", "DET_THRESH", "INSTALL_HINT", "MODEL_PACKS",
    "MXNET_PROBE_NODES", "MXNET_REC_INPUT_MEAN", "MXNET_REC_INPUT_STD", "NMS_THRESH", "PACK_FILES", "PROVIDERS",
    "REC_INPUT_MEAN", "REC_INPUT_STD", "SCRFD_HEADS", "SELECTIONS",
    "Detector", "FaceAnalysis", "FaceAnalysisError", "FaceEmbeds", "NoFaceError", "OnnxRuntimeMissing", "Recognizer",
    "alignment_matrix", "alignment_template", "create_session", "find_model_pack", "image_to_uint8",
    "import_onnxruntime", "list_model_packs", "nms", "norm_crop", "onnx_node_names", "order_left_to_right",
    "recognizer_mean_std", "resize_linear", "route_model", "select_face", "session_providers", "umeyama_similarity",
    "warp_affine",
]
