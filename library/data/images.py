"""Image files: discovery, sizes from headers (no decoding), and loading resized and cropped to a bucket."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from library.data.image_headers import EXIF_ORIENTATION, TRANSPOSING_ORIENTATIONS, header_size
from library.errors import DatasetError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


def list_folder(folder: Path) -> list[str]:
    """Names of the plain files directly inside `folder`, sorted so that every run sees the same order."""
    with os.scandir(folder) as entries:
        return sorted(entry.name for entry in entries if entry.is_file())


def select_images(names: list[str]) -> list[str]:
    """The names with a supported image extension, in any letter case; hidden files (".name") are skipped.

    Skipping hidden files keeps macOS "._name.jpg" resource forks out, as shell globs do.
    """
    return [n for n in names if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]


def read_image_size(path: str) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF orientation; reads the header only."""
    try:
        with open(path, "rb") as file:
            size = header_size(file, os.path.splitext(path)[1].lower())
    except OSError as err:
        raise DatasetError(f"Cannot read image {path}: {err}.") from None
    return size if size is not None else _pil_image_size(path)


def _pil_image_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            width, height = image.size
            # Only consult EXIF when the header already carried it: PNG's getexif() would decode the whole file.
            if "exif" in image.info and image.getexif().get(EXIF_ORIENTATION, 1) in TRANSPOSING_ORIENTATIONS:
                width, height = height, width
    except (OSError, ValueError, SyntaxError) as err:
        raise DatasetError(f"Cannot read image {path}: {err}. Remove it or replace it with a valid image.") from None
    return width, height


def load_image(path: str) -> np.ndarray:
    """Decode an image as RGB uint8 (H, W, 3), upright according to its EXIF orientation."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:
        raise DatasetError(f"Cannot decode image {path}: {err}. Remove it or replace it with a valid image.") from None


def resize_and_crop(image: np.ndarray, target: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Scale `image` (H, W, 3) to cover `target` (width, height), then crop the centre.

    Returns the (height, width, 3) crop and the crop's (top, left) in the scaled image. Downscaling uses area
    averaging (OpenCV INTER_AREA) and upscaling Lanczos (PIL), the defaults the seed guide describes.
    """
    target_width, target_height = target
    height, width = image.shape[:2]
    scale = max(target_width / width, target_height / height)
    scaled_width = max(target_width, round(width * scale))
    scaled_height = max(target_height, round(height * scale))
    if (scaled_width, scaled_height) != (width, height):
        if scale < 1:
            image = cv2.resize(image, (scaled_width, scaled_height), interpolation=cv2.INTER_AREA)
        else:
            resized = Image.fromarray(image).resize((scaled_width, scaled_height), Image.Resampling.LANCZOS)
            image = np.asarray(resized)
    top = (scaled_height - target_height) // 2
    left = (scaled_width - target_width) // 2
    return image[top : top + target_height, left : left + target_width], (top, left)
