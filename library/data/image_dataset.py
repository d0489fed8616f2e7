"""One [[datasets]] table made concrete: its images, captions, buckets, the samples of an epoch, and sample loading."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from library.config.dataset_config import DatasetConfig
from library.data.batching import count_batches, plan_batches
from library.data.buckets import assign_buckets
from library.data.captions import CaptionOptions, make_caption
from library.data.images import load_image_and_alpha, load_mask
from library.data.latent_cache import CachedLatents
from library.data.latents import load_latents, uses_prepared_latents
from library.data.scan import SubsetImages
from library.data.transforms import CropPlan, apply_crop, face_from_name, plan_crop, shift_hue
from library.errors import DatasetError

logger = logging.getLogger(__name__)

# An epoch's sample plan is kept in memory (8 bytes per sample): a typo like num_repeats = 1000000000 would exhaust
# it before training starts, and no run takes more steps than this anyway.
MAX_EPOCH_SAMPLES = 100_000_000


@dataclass(frozen=True)
class Sample:
    """One sample prepared for a batch: pixels (`image`) or prepared / cached `latents`, never both."""

    image: np.ndarray | None  # (H, W, 3) uint8, H x W = the bucket
    latents: np.ndarray | None  # (C, h, w) float32, raw VAE latents
    mask: np.ndarray | None  # (H, W) float32 loss weights in [0, 1]; (h, w) at latent size with cached latents
    caption: str
    loss_weight: float
    path: str
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    target_size: tuple[int, int]  # (height, width) of the bucket


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
        self.mask_paths = [path for images in subset_images for path in images.mask_paths]
        self.latent_files = [files for images in subset_images for files in images.latents]
        self.image_sizes = np.concatenate([images.size_array() for images in subset_images])  # (N, 2) [w, h]
        self.subset_of_image = np.repeat(np.arange(len(subset_images)), self.subset_image_counts)  # (N,)
        has_image = [present for images in subset_images for present in images.has_image]
        self.uses_latents = uses_prepared_latents(config, self.latent_files, has_image, source)
        self.has_masks = not self.uses_latents and any(
            s.alpha_mask or s.conditioning_data_dir is not None for s in self.subsets
        )
        self.bucket_sizes, self.bucket_of_image = self._buckets()
        self._caption_options = [CaptionOptions.of(s) for s in self.subsets]
        self._loss_weights = [prior_loss_weight if s.is_reg else 1.0 for s in self.subsets]
        self.samples = self._epoch_samples()  # (M,) image index of every sample of an epoch
        self.latent_cache: list[CachedLatents] | None = None  # per image, set by library/data/latent_cache.py

    def _buckets(self) -> tuple[np.ndarray, np.ndarray]:
        config = self.config
        if self.uses_latents:
            # Prepared latents already have their size: each image's bucket is its train_resolution.
            sizes = np.array([files.train_resolution for files in self.latent_files], dtype=np.int64)
            buckets, index = np.unique(sizes, axis=0, return_inverse=True)
            return buckets, index.reshape(-1)
        if config.resolution is None:
            raise DatasetError(
                f"{self.source}: {config.where} has no resolution; set e.g. resolution = 512 "
                "(prepared latents with train_resolution for every image are the only case that needs none)."
            )
        return assign_buckets(
            self.image_sizes,
            config.resolution,
            config.enable_bucket,
            config.bucket_no_upscale,
            config.min_bucket_reso,
            config.max_bucket_reso,
            config.bucket_reso_steps,
        )

    def _epoch_samples(self) -> np.ndarray:
        is_reg = np.array([s.is_reg for s in self.subsets], dtype=bool)[self.subset_of_image]
        repeats = np.array([s.num_repeats for s in self.subsets], dtype=np.int64)[self.subset_of_image]
        counts = np.where(is_reg, 0, repeats)
        self.num_train_samples = int(counts.sum())
        if self.num_train_samples > MAX_EPOCH_SAMPLES:
            largest = max(self.subsets, key=lambda subset: subset.num_repeats)
            raise DatasetError(
                f"{self.source}: {self.config.where}: {self.num_train_samples:,} samples per epoch (images times "
                f"num_repeats) is more than any run can use; {largest.where} has num_repeats = {largest.num_repeats}. "
                "Lower num_repeats and set --max_train_steps or --max_train_epochs for the run's length"
            )
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

    def samples_per_bucket(self) -> np.ndarray:
        """(K,) number of samples of an epoch in each bucket."""
        return np.bincount(self.bucket_of_image[self.samples], minlength=len(self.bucket_sizes))

    def batch_count(self, num_processes: int = 1) -> int:
        """Steps per epoch: each bucket is split into batches on its own."""
        return count_batches(self.samples_per_bucket(), self.config.batch_size, num_processes)

    def plan_batches(self, rng: np.random.Generator, num_processes: int = 1) -> list[list[np.ndarray]]:
        """The epoch's global batches (see library/data/batching.py): per process, sample ids from one bucket."""
        sample_buckets = self.bucket_of_image[self.samples]
        return plan_batches(sample_buckets, len(self.bucket_sizes), self.config.batch_size, num_processes, rng)

    def skips_corrupt(self, sample_id: int) -> bool:
        """Whether the subset of this sample leaves undecodable images out (skip_corrupt_images)."""
        return bool(self.subsets[int(self.subset_of_image[int(self.samples[sample_id])])].skip_corrupt_images)

    def bucket_mates(self, sample_id: int) -> list[int]:
        """The other samples of this sample's bucket, in a fixed order starting after it."""
        buckets = self.bucket_of_image[self.samples]
        mates = np.flatnonzero(buckets == buckets[sample_id])
        start = int(np.searchsorted(mates, sample_id))
        return [int(mate) for mate in np.roll(mates, -start - 1) if mate != sample_id]

    def caption_of(self, image_index: int, rng: np.random.Generator, epoch: int) -> str:
        """One use of an image's caption in (1-based) `epoch`."""
        subset_index = int(self.subset_of_image[image_index])
        return make_caption(self.captions[image_index], self._caption_options[subset_index], rng, epoch)

    def load_sample(self, sample_id: int, rng: np.random.Generator, epoch: int = 1) -> Sample:
        """Load one sample: prepared latents, or the image decoded, cropped to its bucket and augmented."""
        image_index = int(self.samples[sample_id])
        subset_index = int(self.subset_of_image[image_index])
        bucket = self.bucket_sizes[self.bucket_of_image[image_index]]
        target = (int(bucket[0]), int(bucket[1]))
        if self.uses_latents:
            sample = self._load_latents(image_index, target, rng)
        elif self.latent_cache is not None:
            sample = self._load_cached(image_index, subset_index, rng)
        else:
            sample = self._load_pixels(image_index, subset_index, target, rng)
        caption = self.caption_of(image_index, rng, epoch)
        return Sample(
            **sample,
            caption=caption,
            loss_weight=self._loss_weights[subset_index],
            target_size=(target[1], target[0]),
        )

    def _load_latents(self, image_index: int, target: tuple[int, int], rng: np.random.Generator) -> dict:
        files = self.latent_files[image_index]
        flipped = files.flip_npz is not None and rng.random() < 0.5
        prepared = load_latents(files.flip_npz if flipped else files.npz)
        return {
            "image": None,
            "latents": prepared.latents,
            "mask": None,
            "path": self.image_paths[image_index],
            "original_size": prepared.original_size or (target[1], target[0]),
            "crop_top_left": prepared.crop_top_left or (0, 0),
        }

    def _load_cached(self, image_index: int, subset_index: int, rng: np.random.Generator) -> dict:
        """A sample from the latent cache; the flip draw is the one the pixel path makes, so the data match."""
        entry = self.latent_cache[image_index]
        flipped = bool(self.subsets[subset_index].flip_aug and rng.random() < 0.5)
        latents, mask = entry.load(flipped)
        return {
            "image": None,
            "latents": latents,
            "mask": mask,
            "path": self.image_paths[image_index],
            "original_size": entry.original_size,
            "crop_top_left": entry.crop_top_left,
        }

    def _load_pixels(
        self, image_index: int, subset_index: int, target: tuple[int, int], rng: np.random.Generator
    ) -> dict:
        subset = self.subsets[subset_index]
        sample = self._cropped(image_index, subset_index, target, rng)
        crop, mask = sample["image"], sample["mask"]
        if subset.flip_aug and rng.random() < 0.5:
            crop = crop[:, ::-1]
            mask = None if mask is None else mask[:, ::-1]
        if subset.color_aug:
            crop = shift_hue(crop, rng)
        sample["image"] = np.ascontiguousarray(crop)
        sample["mask"] = None if mask is None else np.ascontiguousarray(mask)
        return sample

    def fixed_pixels(self, image_index: int) -> dict:
        """An image cut to its bucket, with its mask, before flip and colour: what a latent cache encodes.

        Only meaningful when the subset has no random crop (the latent cache refuses those subsets).
        """
        bucket = self.bucket_sizes[self.bucket_of_image[image_index]]
        target = (int(bucket[0]), int(bucket[1]))
        return self._cropped(image_index, int(self.subset_of_image[image_index]), target, np.random.default_rng(0))

    def _cropped(
        self, image_index: int, subset_index: int, target: tuple[int, int], rng: np.random.Generator
    ) -> dict:
        subset = self.subsets[subset_index]
        path = self.image_paths[image_index]
        image, alpha = load_image_and_alpha(path, with_alpha=subset.alpha_mask)
        height, width = image.shape[:2]
        face = face_from_name(path) if subset.face_crop_aug_range is not None else None
        plan = plan_crop((width, height), target, rng, subset.random_crop, face, subset.face_crop_aug_range)
        return {
            "image": apply_crop(image, plan, subset.resize_interpolation),
            "latents": None,
            "mask": self._mask(image_index, alpha, (width, height), plan, subset.resize_interpolation),
            "path": path,
            "original_size": (height, width),
            "crop_top_left": (plan.top, plan.left),
        }

    def _mask(
        self,
        image_index: int,
        alpha: np.ndarray | None,
        size: tuple[int, int],
        plan: CropPlan,
        interpolation: str | None,
    ) -> np.ndarray | None:
        """(H, W) float32 weights: alpha and/or the conditioning mask (multiplied when both), else all ones."""
        if not self.has_masks:
            return None
        mask_path = self.mask_paths[image_index]
        weights = None if alpha is None else alpha.astype(np.float32) / 255.0
        if mask_path is not None:
            red = load_mask(mask_path, size).astype(np.float32) / 255.0
            weights = red if weights is None else weights * red
        if weights is None:
            return np.ones((plan.target[1], plan.target[0]), dtype=np.float32)
        scaled = apply_crop(np.round(weights * 255.0).astype(np.uint8), plan, interpolation)
        return scaled.astype(np.float32) / 255.0
