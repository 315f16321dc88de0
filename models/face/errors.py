"""Errors of face analysis shared by the modules of the package (this module imports none of them)."""
from __future__ import annotations

from collections.abc import Sequence


class FaceAnalysisError(ValueError):
    """A model pack is missing or malformed, or an input cannot be analysed. The message says what to do."""


class NoFaceError(FaceAnalysisError):
    def __init__(self, image_index: int, det_sizes: Sequence[int], image_shape: Sequence[int]):
        self.image_index, self.det_sizes = image_index, tuple(det_sizes)
        sizes = ", ".join(str(s) for s in self.det_sizes)
        super().__init__(
            f"no face found in image {image_index} ({image_shape[1]}x{image_shape[0]} px) at detection sizes {sizes}. "
            "Use a picture where the face is clearly visible (frontal, not cut off, at least ~40 px wide).")
