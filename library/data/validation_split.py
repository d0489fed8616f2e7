"""Hold validation images out of a dataset: whole `is_val` subsets, and a `validation_split` share of the rest.

Validation images never reach a training batch. They are served by their own DatasetGroup, one use per image,
without random augmentation or caption randomness, so every validation pass sees exactly the same batches.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from library.config.dataset_config import DatasetConfig, SubsetConfig
from library.data.scan import SubsetImages
from library.errors import DatasetError

logger = logging.getLogger(__name__)

_SEED_MASK = (1 << 64) - 1
Part = tuple[DatasetConfig, list[SubsetImages]]

# What a validation subset turns off: every random change of the image or caption between uses.
_FIXED_VALIDATION = {
    "num_repeats": 1,
    "shuffle_caption": False,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0,
    "flip_aug": False,
    "color_aug": False,
    "random_crop": False,
    "face_crop_aug_range": None,
}


def split_validation(
    config: DatasetConfig, images: list[SubsetImages], seed: int, source: str
) -> tuple[Part | None, Part | None]:
    """(training part, validation part) of one dataset; a part is None when it has no images.

    `images[i]` are the scanned images of `config.subsets[i]`. The `validation_split` share is drawn from the
    images of the subsets that are neither `is_reg` nor `is_val`, with `validation_seed` (else `seed`).
    """
    held_out = [np.zeros(len(subset_images.paths), dtype=bool) for subset_images in images]
    for index, subset in enumerate(config.subsets):
        if subset.is_val:
            held_out[index][:] = True
    if config.validation_split > 0:
        _draw_split(config, held_out, seed if config.validation_seed is None else config.validation_seed, source)
    train = _part(config, images, [~mask for mask in held_out], validation=False)
    validation = _part(config, images, held_out, validation=True)
    return train, validation


def _draw_split(config: DatasetConfig, held_out: list[np.ndarray], seed: int, source: str) -> None:
    """Mark round(validation_split x candidates) images, at least one, chosen at random from the candidates."""
    candidates = [
        (index, position)
        for index, subset in enumerate(config.subsets)
        if not (subset.is_reg or subset.is_val)
        for position in range(len(held_out[index]))
    ]
    count = max(1, round(config.validation_split * len(candidates)))
    if count >= len(candidates):
        raise DatasetError(
            f"{source}: {config.where}.validation_split = {config.validation_split} would hold out {count} of its "
            f"{len(candidates)} training images, leaving none to train on; lower it or add images."
        )
    rng = np.random.default_rng(seed & _SEED_MASK)
    for choice in rng.choice(len(candidates), size=count, replace=False):
        index, position = candidates[int(choice)]
        held_out[index][position] = True


def _part(config: DatasetConfig, images: list[SubsetImages], keep: list[np.ndarray], validation: bool) -> Part | None:
    subsets: list[SubsetConfig] = []
    kept: list[SubsetImages] = []
    for subset, subset_images, mask in zip(config.subsets, images, keep, strict=True):
        if not mask.any() or (validation and subset.is_reg):
            continue
        subsets.append(dataclasses.replace(subset, **_FIXED_VALIDATION) if validation else subset)
        kept.append(_take(subset_images, mask))
    if not subsets:
        return None
    return dataclasses.replace(config, subsets=tuple(subsets)), kept


def _take(images: SubsetImages, mask: np.ndarray) -> SubsetImages:
    """The images of `images` where `mask` is true, every per-image list kept in step."""
    if mask.all():
        return images
    chosen = np.flatnonzero(mask).tolist()
    fields = {field.name: [getattr(images, field.name)[i] for i in chosen] for field in dataclasses.fields(images)}
    return SubsetImages(**fields)
