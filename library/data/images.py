"""Image files: discovery, start-up checks (size from the header, truncation from the tail), and decoding."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from library.data.image_headers import EXIF_ORIENTATION, TRANSPOSING_ORIENTATIONS, ends_completely, header_size
from library.data.transforms import resize_and_crop  # noqa: F401  (re-exported: finetune/ tools import it here)
from library.errors import DatasetError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


SKIP_HINT = "Replace it, or set skip_corrupt_images = true (--skip_corrupt_images) to leave such images out."
# Images above this many pixels are refused when the dataset is scanned (PIL's own decompression-bomb limit by
# default): one 30000x30000 file would take gigabytes in every loader worker. --max_image_pixels changes it.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
_limits = {"pixels": DEFAULT_MAX_PIXELS}


class CorruptImageError(DatasetError):
    """An image file that cannot be used; `skip_corrupt_images` turns it into a warning.

    `detail` says what is wrong with the file; the message adds what to do about it.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(f"{detail} {SKIP_HINT}")
        self.detail = detail


def set_pixel_limit(pixels: int) -> None:
    """The largest image (in pixels) the scan accepts; PIL decodes up to it without refusing."""
    _limits["pixels"] = pixels
    Image.MAX_IMAGE_PIXELS = max(pixels // 2 + 1, 89_478_485)  # PIL refuses above twice this, warns above it


def list_folder(folder: Path | str) -> list[str]:
    """Names of the plain files directly inside `folder`, sorted so that every run sees the same order."""
    with os.scandir(folder) as entries:
        return sorted(entry.name for entry in entries if entry.is_file())


def is_image_name(name: str) -> bool:
    """A supported image extension, in any letter case; hidden files (".name") are not images.

    Skipping hidden files keeps macOS "._name.jpg" resource forks out, as shell globs do.
    """
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def select_images(names: list[str]) -> list[str]:
    """The image names among `names`, in the same order."""
    return [name for name in names if is_image_name(name)]


_HEAD_BYTES = 65536  # one read covers the headers of nearly all files (JPEG EXIF blocks are at most 64 KiB)


def probe_image(path: str) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), without decoding; raises CorruptImageError.

    Reads the header and the last bytes: a file cut short while copying or downloading is found here, at start-up,
    instead of in the middle of training.
    """
    extension = os.path.splitext(path)[1].lower()
    try:
        size, complete = _read_head_and_tail(path, extension)
    except OSError as err:
        raise CorruptImageError(f"Cannot read image {path}: {err.strerror or err}.") from None
    if size is None:
        size = _pil_image_size(path)
    if size[0] * size[1] > _limits["pixels"]:
        megapixels, limit = size[0] * size[1] / 1e6, _limits["pixels"] / 1e6
        raise CorruptImageError(
            f"Image {path} is {size[0]}x{size[1]} ({megapixels:.0f} megapixels), above the limit of {limit:.0f} "
            "(--max_image_pixels raises it)."
        )
    if not complete:
        _decode_or_fail(path)
    return size


def _read_head_and_tail(path: str, extension: str) -> tuple[tuple[int, int] | None, bool]:
    """Header size and end check from two reads (the start and the end of the file), no buffered file object."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        file_size = os.fstat(descriptor).st_size
        head = os.pread(descriptor, _HEAD_BYTES, 0)
        tail = head if file_size <= len(head) else os.pread(descriptor, 16, file_size - 16)
    finally:
        os.close(descriptor)
    buffer = io.BytesIO(head)
    size = header_size(buffer, extension)
    if len(head) < file_size and buffer.tell() >= len(head):
        with open(path, "rb") as file:  # the header runs past the first read: parse from the file itself
            size = header_size(file, extension)
    return size, ends_completely(head, tail, extension, file_size)


def read_image_size(path: str) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF orientation; reads the header only."""
    return probe_image(path)


def _pil_image_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            width, height = image.size
            # Only consult EXIF when the header already carried it: PNG's getexif() would decode the whole file.
            if "exif" in image.info and image.getexif().get(EXIF_ORIENTATION, 1) in TRANSPOSING_ORIENTATIONS:
                width, height = height, width
    except _DECODE_ERRORS as err:
        raise CorruptImageError(f"Cannot read image {path}: {err}.") from None
    return width, height


def _decode_or_fail(path: str) -> None:
    try:
        with Image.open(path) as image:
            image.load()
    except _DECODE_ERRORS as err:
        raise CorruptImageError(f"Image {path} is truncated or damaged ({err}).") from None


def eight_bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale images (PIL modes I;16*, I) scaled to 8 bits: PIL's own conversion clips them to white."""
    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return image
    values = np.asarray(image, dtype=np.float64)
    peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
    return Image.fromarray(np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8), "L")


def load_image(path: str) -> np.ndarray:
    """Decode an image as RGB uint8 (H, W, 3), upright according to its EXIF orientation."""
    return load_image_and_alpha(path, with_alpha=False)[0]


def load_image_and_alpha(path: str, with_alpha: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode upright (EXIF orientation): RGB uint8 (H, W, 3), and with `with_alpha` the alpha (H, W) uint8.

    The alpha is None for images without transparency (they count as fully opaque).
    """
    try:
        with Image.open(path) as image:
            image = eight_bit(ImageOps.exif_transpose(image))
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            if with_alpha and has_alpha:
                rgba = np.asarray(image.convert("RGBA"))
                return np.ascontiguousarray(rgba[:, :, :3]), np.ascontiguousarray(rgba[:, :, 3])
            return np.asarray(image.convert("RGB")), None
    except _DECODE_ERRORS as err:
        raise DatasetError(f"Cannot decode image {path}: {err}. Remove it or replace it with a valid image.") from None


def load_mask(path: str, size: tuple[int, int]) -> np.ndarray:
    """A mask image's R channel as uint8 (H, W), stretched to `size` (width, height) when it differs."""
    try:
        with Image.open(path) as image:
            red = eight_bit(ImageOps.exif_transpose(image)).convert("RGB").getchannel("R")
            if red.size != size:
                red = red.resize(size, Image.Resampling.BILINEAR)
            return np.asarray(red)
    except _DECODE_ERRORS as err:
        raise DatasetError(f"Cannot decode mask image {path}: {err}.") from None
