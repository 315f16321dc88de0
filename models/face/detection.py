"""SCRFD detection (decoding and NMS of insightface ``model_zoo/scrfd.py``) and ArcFace recognition
(``model_zoo/arcface_onnx.py``) on onnxruntime sessions."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import FaceAnalysisError
from .image import norm_crop, resize_linear
from .packs import REC_INPUT_MEAN, REC_INPUT_STD, _static_hw, recognizer_mean_std

DET_THRESH = 0.5  # FaceAnalysis.prepare default
NMS_THRESH = 0.4  # SCRFD.nms_thresh
DET_INPUT_MEAN, DET_INPUT_STD = 127.5, 128.0  # SCRFD._init_vars

# SCRFD head layout by number of outputs: (strides, anchors per location, has keypoints) (SCRFD._init_vars).
SCRFD_HEADS = {
    6: ((8, 16, 32), 2, False),
    9: ((8, 16, 32), 2, True),
    10: ((8, 16, 32, 64, 128), 1, False),
    15: ((8, 16, 32, 64, 128), 1, True),
}


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
