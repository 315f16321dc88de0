"""Image operations with OpenCV / scikit-image / insightface semantics, numpy only: IMAGE -> uint8, ``cv2.resize``
INTER_LINEAR, ``cv2.warpAffine`` INTER_LINEAR, the Umeyama similarity of scikit-image's
``SimilarityTransform.estimate``, and insightface's ``face_align.estimate_norm`` / ``face_align.norm_crop``."""
from __future__ import annotations

import numpy as np
import torch

from .errors import FaceAnalysisError

# ArcFace 5-point template in a 112x112 crop (insightface utils/face_align.py arcface_dst): eyes, nose, mouth corners.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32)
ARCFACE_SIZE = 112
ARCFACE_ALT_SIZE = 128  # insightface: sizes divisible by 128 (not 112) use a 128 template with an x shift of 8/128
CROP_SIZES = (112, 224, 256, 336)  # ArcFace / FaceID SD1.5 / FaceID SDXL / Kolors; any size >= 16 is accepted


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


def warp_affine(img: np.ndarray, m: np.ndarray, size: int, border=0) -> np.ndarray:
    """``cv2.warpAffine(img, m, (size, size), borderValue=border)`` (INTER_LINEAR, BORDER_CONSTANT) for uint8
    [H, W, C]; ``border``: a value, or one per channel."""
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

    fill = np.broadcast_to(np.asarray(border, np.float32), (src.shape[-1],))

    def tap(yy, xx):  # constant border
        inside = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w))[..., None]
        return np.where(inside, src[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], fill)

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


# The 5-point FFHQ template of a 512 x 512 face (facexlib utils/face_restoration_helper.py FaceRestoreHelper
# face_template; eyes, nose, mouth corners), the crop PuLID's EVA-CLIP and parsing inputs are aligned to.
FFHQ_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float32)
FFHQ_SIZE = 512
# facexlib's warp border, BGR (135, 133, 132) there: the same grey in RGB.
FFHQ_BORDER_RGB = (132, 133, 135)


def ffhq_crop(img: np.ndarray, kps: np.ndarray, size: int = FFHQ_SIZE) -> np.ndarray:
    """The face aligned to the FFHQ template, uint8 [size, size, 3], grey border (facexlib ``align_warp_face``).

    facexlib fits the transform with ``cv2.estimateAffinePartial2D(..., LMEDS)`` to RetinaFace keypoints of a second
    detection; here the keypoints are the SCRFD ones of the face already chosen for the embedding (a deliberate
    choice: one face, one detection), and the similarity is the least-squares (Umeyama) fit over all five. Where the
    five points agree the two fits coincide (median 3e-5 px over 200 noisy random faces, against OpenCV); where
    LMEDS drops a point as an outlier they differ by a few pixels."""
    kps = np.asarray(kps, dtype=np.float32)
    if kps.shape != (5, 2):
        raise FaceAnalysisError(f"alignment needs 5 keypoints [5, 2], got {kps.shape}")
    template = FFHQ_TEMPLATE_512 * np.float32(size / FFHQ_SIZE)
    return warp_affine(img, umeyama_similarity(kps, template)[0:2, :], size, FFHQ_BORDER_RGB)
