"""Reading latents prepared by finetune/prepare_buckets_latents.py, and deciding whether a dataset can use them.

File format (`<image stem>.npz`, and `<image stem>_flip.npz` for the mirrored image): `latents` raw (unscaled)
VAE latents (C, h, w) in float32 or float16; optional `original_size` (width, height) of the source image and
`crop_ltrb` (left, top, right, bottom) of the crop in the resized image.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass

import numpy as np

from library.config.dataset_config import DatasetConfig
from library.data.scan import LatentFiles
from library.errors import DatasetError

logger = logging.getLogger(__name__)

# Per-sample changes of the pixels that prepared latents cannot follow.
_BLOCKING_OPTIONS = ("color_aug", "random_crop", "face_crop_aug_range", "alpha_mask")


@dataclass(frozen=True)
class PreparedLatents:
    """One sample's latents and the size conditioning that goes with them."""

    latents: np.ndarray  # (C, h, w) float32
    original_size: tuple[int, int] | None  # (height, width)
    crop_top_left: tuple[int, int] | None  # (top, left)


def load_latents(path: str) -> PreparedLatents:
    """Read one .npz file; errors name the file."""
    try:
        with np.load(path) as data:
            if "latents" not in data:
                raise DatasetError(f"Latent file {path} has no 'latents' array; prepare it again.")
            latents = np.asarray(data["latents"], dtype=np.float32)
            original = data["original_size"].tolist() if "original_size" in data else None
            crop = data["crop_ltrb"].tolist() if "crop_ltrb" in data else None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DatasetError(f"Cannot read latent file {path}: {err}. Prepare it again.") from None
    if latents.ndim != 3:
        raise DatasetError(f"Latent file {path}: latents have shape {latents.shape}, expected (C, h, w).")
    return PreparedLatents(
        latents=latents,
        original_size=None if original is None else (int(original[1]), int(original[0])),
        crop_top_left=None if crop is None else (int(crop[1]), int(crop[0])),
    )


def uses_prepared_latents(
    config: DatasetConfig, latents: list[LatentFiles | None], has_image: list[bool], source: str
) -> bool:
    """Whether a dataset trains from prepared latents: only when every image has them (with its train_resolution)
    and no subset asks for per-sample pixel changes; partial use is explained in a warning."""
    where = f"{source}: {config.where}"
    prepared = sum(files is not None and files.train_resolution is not None for files in latents)
    if prepared == 0:
        return False
    blocking = sorted({name for s in config.subsets for name in _BLOCKING_OPTIONS if getattr(s, name)})
    reason = None
    if blocking:
        reason = f"{', '.join(blocking)} change the pixels of every sample, which prepared latents cannot follow"
    elif prepared < len(latents):
        reason = f"only {prepared} of {len(latents)} images have them (with train_resolution in the metadata)"
    if reason is None:
        _warn_flip_without_files(config, latents, where)
        return True
    if not all(has_image):
        missing = next(f.npz for f, present in zip(latents, has_image, strict=True) if not present)
        raise DatasetError(
            f"{where}: prepared latents cannot be used ({reason}), but some entries have no image to encode "
            f"instead, e.g. {missing}."
        )
    logger.warning("%s: prepared .npz latents are not used: %s; images are encoded during training.", where, reason)
    return False


def _warn_flip_without_files(config: DatasetConfig, latents: list[LatentFiles | None], where: str) -> None:
    if any(s.flip_aug for s in config.subsets) and any(files.flip_npz is None for files in latents):
        logger.warning(
            "%s: flip_aug has no effect on prepared latents without <stem>_flip.npz files "
            "(prepare them with --flip_aug).",
            where,
        )
