"""What flows between nodes (:class:`FaceEmbeds`), face selection, and :class:`FaceAnalysis`: a model pack's
detector + recognizer, the detection-size retry loop, one face per image."""
from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .detection import Detector, Recognizer
from .errors import FaceAnalysisError, NoFaceError
from .image import alignment_template, image_to_uint8, norm_crop
from .packs import AUXILIARY_FILES, PACK_FILES, find_model_pack, route_model
from .runtime import create_session

log = logging.getLogger("personalize")

DET_SIZE = 640  # FaceAnalysis.prepare(det_size=(640, 640)) in PuLID_ComfyUI and IPAdapter_plus
# The retry loop of PuLID_ComfyUI / IPAdapter_plus: 640 down to 320 in steps of 64 until a face is found.
DET_RETRY_SIZES = tuple(range(640, 319, -64))

SELECTIONS = ("largest", "highest score", "index")


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
    def from_folder(cls, folder: str, provider: str = "CPU", name: str | None = None) -> FaceAnalysis:
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
    def from_pack(cls, name: str, roots: Sequence[str], provider: str = "CPU") -> FaceAnalysis:
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
