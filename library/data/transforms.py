"""Geometry and colour of one sample: resize to cover the bucket, crop (centre, random or around a face), flip, hue.

The crop is planned once per sample and applied alike to the image and its mask, so both stay aligned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

# Filters the seed guide names for resize_interpolation: lanczos and box run in PIL, the others in OpenCV.
_PIL_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}
_CV2_FILTERS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "linear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}
HUE_SHIFT_LIMIT = 8  # OpenCV hue units (half degrees): color_aug shifts the hue by at most 16 degrees


@dataclass(frozen=True)
class CropPlan:
    """Scale the image to `scaled` (width, height), then cut `target` (width, height) at (top, left)."""

    scaled: tuple[int, int]
    target: tuple[int, int]
    top: int
    left: int


@dataclass(frozen=True)
class Face:
    """A face box from the file name, in original-image pixels: centre and size."""

    center_x: int
    center_y: int
    width: int
    height: int


def face_from_name(path: str) -> Face | None:
    """`name_<cx>_<cy>_<w>_<h>.png` carries a face box (the convention of face-cropping tools); else None."""
    parts = os.path.splitext(os.path.basename(path))[0].split("_")
    if len(parts) < 5 or not all(part.isdigit() for part in parts[-4:]):
        return None
    center_x, center_y, width, height = (int(part) for part in parts[-4:])
    return Face(center_x, center_y, width, height) if width > 0 and height > 0 else None


def plan_crop(
    size: tuple[int, int],
    target: tuple[int, int],
    rng: np.random.Generator,
    random_crop: bool = False,
    face: Face | None = None,
    face_range: tuple[float, float] | None = None,
) -> CropPlan:
    """Where to cut `target` from an image of `size` (both (width, height)).

    The image is scaled to just cover the target (aspect ratio kept), then cropped at the centre, or at a random
    place with `random_crop`. With a face box and `face_range` [min, max], the scale is drawn so that the face's
    larger side spans 1/max .. 1/min of the target's shorter side (never below covering the target, never enlarged
    beyond what covering needs), and the crop is centred on the face (with `random_crop`: moved at random while
    the face stays inside where it fits).
    """
    width, height = size
    cover = max(target[0] / width, target[1] / height)
    scale = cover
    if face is not None and face_range is not None:
        scale = _face_scale(cover, face, face_range, min(target), rng)
    scaled = (max(target[0], round(width * scale)), max(target[1], round(height * scale)))
    if face is not None and face_range is not None:
        factor = scaled[0] / width
        left = _face_offset(face.center_x * factor, face.width * factor, scaled[0], target[0], random_crop, rng)
        top = _face_offset(face.center_y * factor, face.height * factor, scaled[1], target[1], random_crop, rng)
    elif random_crop:
        left = int(rng.integers(scaled[0] - target[0] + 1))
        top = int(rng.integers(scaled[1] - target[1] + 1))
    else:
        left, top = (scaled[0] - target[0]) // 2, (scaled[1] - target[1]) // 2
    return CropPlan(scaled=scaled, target=target, top=top, left=left)


def _face_scale(
    cover: float, face: Face, face_range: tuple[float, float], short_side: int, rng: np.random.Generator
) -> float:
    face_size = max(face.width, face.height)
    ceiling = max(cover, 1.0)
    low = min(ceiling, max(cover, short_side / (face_size * face_range[1])))
    high = min(ceiling, max(low, short_side / (face_size * face_range[0])))
    return low if high <= low else float(rng.uniform(low, high))


def _face_offset(
    center: float, extent: float, length: int, target: int, random_crop: bool, rng: np.random.Generator
) -> int:
    """Crop start along one axis: centred on the face, or random among the starts that keep the face inside."""
    last = length - target
    start = round(center - target / 2)
    if random_crop:
        lowest = max(0, round(center + extent / 2 - target))
        highest = min(last, round(center - extent / 2))
        if lowest <= highest:
            start = int(rng.integers(lowest, highest + 1))
    return int(min(max(start, 0), last))


def resize(image: np.ndarray, size: tuple[int, int], interpolation: str | None) -> np.ndarray:
    """Resize (H, W[, C]) uint8 to `size` (width, height).

    Default (interpolation None): area averaging to shrink, Lanczos to enlarge, as the seed guide describes.
    """
    height, width = image.shape[:2]
    if (width, height) == size:
        return image
    if interpolation is None:
        interpolation = "area" if size[0] * size[1] < width * height else "lanczos"
    if interpolation in _PIL_FILTERS:
        return np.asarray(Image.fromarray(image).resize(size, _PIL_FILTERS[interpolation]))
    return cv2.resize(image, size, interpolation=_CV2_FILTERS[interpolation])


def apply_crop(image: np.ndarray, plan: CropPlan, interpolation: str | None) -> np.ndarray:
    """Resize (H, W[, C]) to the plan's scaled size and cut out the target."""
    scaled = resize(image, plan.scaled, interpolation)
    return scaled[plan.top : plan.top + plan.target[1], plan.left : plan.left + plan.target[0]]


def resize_and_crop(
    image: np.ndarray, target: tuple[int, int], interpolation: str | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Scale `image` (H, W, 3) to cover `target` (width, height) and crop the centre; returns crop, (top, left)."""
    plan = plan_crop((image.shape[1], image.shape[0]), target, np.random.default_rng(0))
    return apply_crop(image, plan, interpolation), (plan.top, plan.left)


def shift_hue(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """color_aug: rotate the hue of an RGB uint8 image by a random amount of at most HUE_SHIFT_LIMIT."""
    shift = int(rng.integers(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT + 1))
    if shift == 0:
        return image
    hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)
    hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.int16) + shift) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
