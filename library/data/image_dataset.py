"""One [[datasets]] table made concrete: its images, captions, buckets, the samples of an epoch, and sample loading."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from library.config.dataset_config import DatasetConfig, SubsetConfig
from library.data.buckets import assign_buckets
from library.data.captions import CaptionOptions, make_caption, read_captions
from library.data.images import (
    IMAGE_EXTENSIONS,
    list_folder,
    load_image,
    read_image_size,
    resize_and_crop,
    select_images,
)
from library.errors import DatasetError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubsetImages:
    """What a subset folder holds: image paths, their (width, height) and their raw captions."""

    paths: list[str]
    sizes: np.ndarray  # (N, 2) int64 [width, height]
    captions: list[str]


@dataclass(frozen=True)
class Sample:
    """One image prepared for a batch."""

    image: np.ndarray  # (H, W, 3) uint8, H x W = the bucket
    caption: str
    loss_weight: float
    path: str
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) in the resized image


def scan_subset(subset: SubsetConfig, source: str) -> SubsetImages:
    """List a subset's images, read their sizes from the headers and their captions."""
    folder = str(subset.image_dir)
    names = list_folder(subset.image_dir)
    image_names = select_images(names)
    if not image_names:
        hint = ""
        if any(os.scandir(folder)):
            hint = " Images must be directly inside image_dir; subfolders are not searched."
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DatasetError(f"{source}: {subset.where}.image_dir {folder} contains no images ({extensions}).{hint}")
    captions = read_captions(
        folder, image_names, set(names), subset.caption_extension, subset.class_tokens, f"{source}: {subset.where}"
    )
    paths = [os.path.join(folder, name) for name in image_names]
    sizes = np.array([read_image_size(path) for path in paths], dtype=np.int64).reshape(-1, 2)
    return SubsetImages(paths=paths, sizes=sizes, captions=captions)


def reg_sample_counts(repeats: np.ndarray, target: int) -> np.ndarray:
    """How often each regularization image appears in an epoch so that reg samples equal train samples.

    The seed guide asks for a 1:1 ratio: reg images beyond the number of train samples per epoch are not used
    (they are taken in folder order, each with its num_repeats), and too few are repeated round-robin.
    """
    if len(repeats) == 0 or target == 0:
        return np.zeros(len(repeats), dtype=np.int64)
    before = np.cumsum(repeats) - repeats
    if before[-1] + repeats[-1] >= target:
        return np.clip(target - before, 0, repeats)
    extra_rounds, remainder = divmod(target - int(repeats.sum()), len(repeats))
    return repeats + extra_rounds + (np.arange(len(repeats)) < remainder)


class ImageDataset:
    """The images of one [[datasets]] table, bucketed, with the sample list of an epoch (repeats included)."""

    def __init__(
        self, config: DatasetConfig, subset_images: list[SubsetImages], prior_loss_weight: float, source: str
    ) -> None:
        self.config = config
        self.source = source
        self.subsets = config.subsets
        self.subset_image_counts = [len(images.paths) for images in subset_images]
        self.image_paths = [path for images in subset_images for path in images.paths]
        self.captions = [caption for images in subset_images for caption in images.captions]
        self.image_sizes = np.concatenate([images.sizes for images in subset_images])  # (N, 2) [width, height]
        self.subset_of_image = np.repeat(np.arange(len(subset_images)), self.subset_image_counts)  # (N,)
        self.bucket_sizes, self.bucket_of_image = assign_buckets(
            self.image_sizes,
            config.resolution,
            config.enable_bucket,
            config.bucket_no_upscale,
            config.min_bucket_reso,
            config.max_bucket_reso,
            config.bucket_reso_steps,
        )
        self._caption_options = [
            CaptionOptions(s.caption_prefix, s.caption_suffix, s.shuffle_caption, s.keep_tokens) for s in self.subsets
        ]
        self._loss_weights = [prior_loss_weight if s.is_reg else 1.0 for s in self.subsets]
        self.samples = self._epoch_samples()  # (M,) image index of every sample of an epoch

    def _epoch_samples(self) -> np.ndarray:
        is_reg = np.array([s.is_reg for s in self.subsets], dtype=bool)[self.subset_of_image]
        repeats = np.array([s.num_repeats for s in self.subsets], dtype=np.int64)[self.subset_of_image]
        counts = np.where(is_reg, 0, repeats)
        self.num_train_samples = int(counts.sum())
        self.num_reg_images = int(is_reg.sum())
        if self.num_reg_images:
            counts[is_reg] = reg_sample_counts(repeats[is_reg], self.num_train_samples)
            self._check_reg_use(int(repeats[is_reg].sum()))
        self.num_reg_samples = int(counts[is_reg].sum())
        return np.repeat(np.arange(len(counts)), counts)

    def _check_reg_use(self, reg_with_repeats: int) -> None:
        where, train = f"{self.source}: {self.config.where}", self.num_train_samples
        if train == 0:
            raise DatasetError(
                f"{where} has regularization subsets (is_reg = true) but no training images; reg images are only "
                "used next to training images of the same dataset. Add a subset without is_reg."
            )
        if reg_with_repeats > train:
            logger.warning(
                "%s: %d regularization samples (repeats counted) but %d training samples per epoch; "
                "only the first %d reg samples are used.",
                where,
                reg_with_repeats,
                train,
                train,
            )
        elif reg_with_repeats < train:
            logger.info("%s: regularization images are repeated to match %d training samples per epoch.", where, train)

    def batch_count(self) -> int:
        """Batches per epoch: each bucket is split into batches on its own."""
        per_bucket = np.bincount(self.bucket_of_image[self.samples], minlength=len(self.bucket_sizes))
        return int((-(-per_bucket // self.config.batch_size)).sum())

    def plan_batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Sample ids grouped into batches, each from one bucket; items shuffled within their bucket."""
        sample_buckets = self.bucket_of_image[self.samples]
        shuffled = rng.permutation(len(self.samples))
        by_bucket = shuffled[np.argsort(sample_buckets[shuffled], kind="stable")]
        per_bucket = np.bincount(sample_buckets, minlength=len(self.bucket_sizes))
        batch_size = self.config.batch_size
        batches = []
        start = 0
        for count in per_bucket.tolist():
            for offset in range(start, start + count, batch_size):
                batches.append(by_bucket[offset : min(offset + batch_size, start + count)])
            start += count
        return batches

    def load_sample(self, sample_id: int, rng: np.random.Generator) -> Sample:
        """Decode, resize and crop the image of one sample, apply flip_aug, and build its caption."""
        image_index = int(self.samples[sample_id])
        subset_index = int(self.subset_of_image[image_index])
        path = self.image_paths[image_index]
        image = load_image(path)
        bucket = self.bucket_sizes[self.bucket_of_image[image_index]]
        crop, crop_top_left = resize_and_crop(image, (int(bucket[0]), int(bucket[1])))
        if self.subsets[subset_index].flip_aug and rng.random() < 0.5:
            crop = crop[:, ::-1]
        caption = make_caption(self.captions[image_index], self._caption_options[subset_index], rng)
        return Sample(
            image=crop,
            caption=caption,
            loss_weight=self._loss_weights[subset_index],
            path=path,
            original_size=(image.shape[0], image.shape[1]),
            crop_top_left=crop_top_left,
        )
