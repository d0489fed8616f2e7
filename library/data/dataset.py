"""All datasets of a run as one torch Dataset whose items are whole batches, in a (seed, epoch)-determined order.

Usage: `group = build_dataset_group(DatasetSource.from_args(args), seed, prior_loss_weight)`, then per epoch
`group.set_epoch(epoch)` before iterating `group.make_dataloader(...)`. Batches never mix buckets; the order and
every random choice (flip, crop, caption shuffle and dropout) depend only on (seed, epoch, sample), so a resumed run
sees exactly the same data.
With several training processes, each process's group is told its place (`num_processes`, `process_index`) and
yields only its share of every global batch (see library/data/batching.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from library.config.dataset_cli import DatasetSource, add_dataset_option_arguments, load_group_config
from library.config.dataset_config import DatasetGroupConfig
from library.data.image_dataset import ImageDataset, Sample
from library.data.images import DEFAULT_MAX_PIXELS, set_pixel_limit
from library.data.latent_cache import LatentEncoder, fill_latent_cache
from library.data.scan import scan_subset
from library.data.summary import dataset_summary, format_summary
from library.data.validation_split import split_validation
from library.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

_SEED_MASK = (1 << 64) - 1  # numpy seed sequences take non-negative integers
SAMPLE_CAPTIONS = 3  # processed captions per dataset shown by the summary
DEFAULT_MAX_WORKERS = 8


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the dataset engine and its data loader (`parser` may also be an argument group)."""
    add_dataset_option_arguments(parser)
    parser.add_argument(
        "--max_data_loader_n_workers",
        type=int,
        default=None,
        help="most data loader worker processes (default: min(8, CPU threads - 1); fewer if the machine has fewer "
        "CPUs; 0 loads in the main process)",
    )
    parser.add_argument(
        "--persistent_data_loader_workers",
        action="store_true",
        help="keep data loader workers alive between epochs (faster epoch starts, more memory)",
    )
    parser.add_argument(
        "--debug_dataset",
        action="store_true",
        help="print the dataset summary, write the first batches (images with captions and bucket sizes) into "
        "<output_dir>/debug_dataset/, and exit without loading a model",
    )
    parser.add_argument(
        "--max_image_pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse (or, with skip_corrupt_images, leave out) images larger than this many pixels when the dataset "
        f"is scanned; default {DEFAULT_MAX_PIXELS} (about 13400x13400)",
    )


def build_dataset_group(
    source: DatasetSource, seed: int, prior_loss_weight: float, num_processes: int = 1, process_index: int = 0
) -> DatasetGroup:
    """Validate the dataset options and scan every image folder (headers and captions only; no model needed)."""
    if prior_loss_weight < 0:
        raise ConfigError(f"--prior_loss_weight = {prior_loss_weight} is invalid: expected a number >= 0.")
    if source.max_image_pixels < 1:
        raise ConfigError(f"--max_image_pixels must be 1 or more, got {source.max_image_pixels}")
    set_pixel_limit(source.max_image_pixels)
    config = load_group_config(source)
    group = DatasetGroup.from_config(config, seed, prior_loss_weight, num_processes, process_index)
    if source.debug_dataset:
        print(format_summary(group.summary(sample_captions=True)))  # --debug_dataset: the summary is the product
    return group


def default_loader_workers(cpu_threads: int) -> int:
    """The documented default of --max_data_loader_n_workers: min(8, CPU threads - 1)."""
    return max(0, min(DEFAULT_MAX_WORKERS, cpu_threads - 1))


def _ignore_stop_signals(worker_id: int) -> None:
    """Data-loader workers leave SIGINT / SIGTERM to the trainer: schedulers signal the whole process group, and a
    worker that died of it would take the run down before the trainer could save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _take_single(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate for batch_size=1 loaders: each item already is a batch."""
    return items[0]


class _EpochLoader(DataLoader):
    """A DataLoader whose `set_epoch` reaches the dataset group, like accelerate's prepared loaders."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


class DatasetGroup(Dataset):
    """Index i is this process's share of the i-th batch of the current epoch; see the module docstring."""

    def __init__(self, datasets: list[ImageDataset], seed: int, num_processes: int = 1, process_index: int = 0) -> None:
        self.datasets = datasets
        self.seed = seed & _SEED_MASK
        self.num_train_images = sum(d.num_train_samples for d in datasets)  # repeats counted, as ss_num_train_images
        self.num_reg_images = sum(d.num_reg_images for d in datasets)  # distinct reg image files
        self.has_masks = any(d.has_masks for d in datasets)
        # The epoch lives in shared memory so that persistent DataLoader workers follow set_epoch().
        self._shared_epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._epoch = -1
        self._batches: list[tuple[int, np.ndarray]] = []
        self.validation: DatasetGroup | None = None  # the held-out images, set by from_config
        self.set_processes(num_processes, process_index)

    @classmethod
    def from_config(
        cls,
        config: DatasetGroupConfig,
        seed: int,
        prior_loss_weight: float,
        num_processes: int = 1,
        process_index: int = 0,
    ) -> DatasetGroup:
        """Scan the folders and metadata of every subset and build the group.

        Validation images (`is_val` subsets, `validation_split`) are left out and served by `group.validation`.
        """
        datasets, held_out = [], []
        for dataset_config in config.datasets:
            images = [scan_subset(subset, config.source) for subset in dataset_config.subsets]
            train, validation = split_validation(dataset_config, images, seed, config.source)
            if train is not None:
                datasets.append(ImageDataset(*train, prior_loss_weight, config.source))
            if validation is not None:
                held_out.append(ImageDataset(*validation, prior_loss_weight, config.source))
        if not datasets:
            raise DatasetError(f"{config.source}: every subset is a validation subset (is_val); none is left to train.")
        group = cls(datasets, seed, num_processes, process_index)
        if held_out:
            group.validation = cls(held_out, seed)
            images = sum(len(dataset.samples) for dataset in held_out)
            logger.info("validation: %d images in %d batches, never trained on", images, len(group.validation))
        return group

    def including_validation(self) -> DatasetGroup:
        """This group with the validation datasets added, for work over every image (e.g. text-encoder caches)."""
        if self.validation is None:
            return self
        return DatasetGroup(self.datasets + self.validation.datasets, self.seed)

    def set_processes(self, num_processes: int, process_index: int) -> None:
        """Take this process's share of every batch (`accelerator.num_processes`, `accelerator.process_index`)."""
        if num_processes < 1 or not 0 <= process_index < num_processes:
            raise ValueError(f"process {process_index} of {num_processes} does not exist")
        self.num_processes, self.process_index = num_processes, process_index
        self._length = sum(d.batch_count(num_processes) for d in self.datasets)
        self._epoch = -1
        self._follow_epoch()

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Reorder for `epoch` (0-based); call before iterating the epoch's data loader."""
        self._shared_epoch[0] = epoch
        self._follow_epoch()

    def _follow_epoch(self) -> None:
        epoch = int(self._shared_epoch[0])
        if epoch != self._epoch:
            self._batches = self._plan_epoch(epoch)
            self._epoch = epoch

    def _plan_epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        # Every process draws the same plan from the same seed and keeps its own share of each global batch.
        rng = np.random.default_rng((self.seed, epoch & _SEED_MASK))
        batches = [
            (dataset_index, shares[self.process_index])
            for dataset_index, dataset in enumerate(self.datasets)
            for shares in dataset.plan_batches(rng, self.num_processes)
        ]
        return [batches[i] for i in rng.permutation(len(batches))]

    def batch_plan(self) -> list[tuple[int, list[int]]]:
        """This process's batches of the current epoch as (dataset index, sample ids); for tests and debugging."""
        self._follow_epoch()
        return [(dataset_index, ids.tolist()) for dataset_index, ids in self._batches]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The batch, or `{"failed": message}` when an image cannot be decoded and its subset does not skip corrupt
        images (the trainer saves and stops with the message; an error raised here would reach it as a worker's
        traceback)."""
        self._follow_epoch()
        dataset_index, sample_ids = self._batches[index]
        dataset = self.datasets[dataset_index]
        samples = []
        for sample_id in (int(sample_id) for sample_id in sample_ids):
            sample = self._load_or_skip(dataset, dataset_index, sample_id)
            if isinstance(sample, str):
                return {"failed": sample}
            if sample is not None:
                samples.append(sample)
        for mate in dataset.bucket_mates(int(sample_ids[0])) if not samples else []:
            sample = self._load_or_skip(dataset, dataset_index, mate)  # every image of the batch was left out
            if isinstance(sample, str):
                return {"failed": sample}
            if sample is not None:
                samples.append(sample)
                break
        if not samples:
            return {"failed": f"{dataset.source}: no image of a batch's bucket could be decoded"}
        return _collate(samples, self.has_masks)

    def _load_or_skip(self, dataset: ImageDataset, dataset_index: int, sample_id: int) -> Sample | None | str:
        """The sample; None for an undecodable image that its subset skips (with a warning); else the message."""
        try:
            return dataset.load_sample(sample_id, self._sample_rng(dataset_index, sample_id), self._epoch + 1)
        except DatasetError as err:
            if not dataset.skips_corrupt(sample_id):
                return f"{err} (skip_corrupt_images = true leaves such images out)"
            logger.warning("%s; left out (skip_corrupt_images)", err)
            return None

    def _sample_rng(self, dataset_index: int, sample_id: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self._epoch & _SEED_MASK, dataset_index, sample_id))

    def make_dataloader(self, num_workers: int | None, persistent: bool) -> DataLoader:
        """A loader yielding the batches of the current epoch in order (the order itself is already shuffled).

        `num_workers` None: min(8, CPU threads - 1), leaving one thread to the training process.
        The loader has `set_epoch(epoch)`. With several processes the group already yields only this process's
        share, so the loader must not be sharded again (see docs/dataset_config.md, "Several processes").
        """
        cpus = os.cpu_count() or 1
        if num_workers is None:
            num_workers = default_loader_workers(cpus)
            logger.info("%d data loader workers (min(8, CPU threads - 1); --max_data_loader_n_workers)", num_workers)
        workers = min(num_workers, cpus)
        if workers < num_workers:
            logger.info(
                "Using %d data loader workers instead of %d: the machine has %d CPUs.", workers, num_workers, cpus
            )
        return _EpochLoader(
            self,
            batch_size=1,
            shuffle=False,
            collate_fn=_take_single,
            num_workers=workers,
            persistent_workers=persistent and workers > 0,
            worker_init_fn=_ignore_stop_signals,
        )

    def cache_latents(
        self, encode: LatentEncoder, vae_id: str, to_disk: bool, batch_size: int = 1, progress: bool = True
    ) -> tuple[int, int]:
        """Encode every image once (see library/data/latent_cache.py); returns (images encoded, entries reused)."""
        return fill_latent_cache(self.datasets, encode, vae_id, to_disk, batch_size, progress)

    def summary(self, sample_captions: bool = False) -> dict[str, Any]:
        """A JSON-able description: per dataset its options, buckets, subsets and counts.

        `sample_captions` adds a few processed captions with their image paths per dataset (for people looking at
        the data; kept out by default so that training metadata carries no captions).
        """
        datasets = []
        for index, dataset in enumerate(self.datasets):
            described = dataset_summary(dataset, self.num_processes)
            if sample_captions:
                described["sample_captions"] = self._sample_captions(index, dataset)
            datasets.append(described)
        return {
            "steps_per_epoch": len(self),
            "num_train_images": self.num_train_images,
            "num_reg_images": self.num_reg_images,
            "num_processes": self.num_processes,
            "datasets": datasets,
        }

    def _sample_captions(self, dataset_index: int, dataset: ImageDataset) -> list[dict[str, str]]:
        """Captions of the first few images as the first epoch would process them (no image is decoded)."""
        count = min(SAMPLE_CAPTIONS, len(dataset.samples))
        picks = np.linspace(0, len(dataset.samples) - 1, count).astype(np.int64) if count else []
        result = []
        for sample_id in picks:
            image_index = int(dataset.samples[sample_id])
            rng = np.random.default_rng((self.seed, 0, dataset_index, int(sample_id)))
            caption = dataset.caption_of(image_index, rng, epoch=1)
            result.append({"image": dataset.image_paths[image_index], "caption": caption})
        return result


def _collate(samples: list[Sample], with_masks: bool) -> dict[str, Any]:
    """The batch dict: pixels as `images` (B, 3, H, W) in [-1, 1], or prepared `latents` (B, C, h, w) raw."""
    first = samples[0]
    batch: dict[str, Any] = {
        "images": None,
        "captions": [sample.caption for sample in samples],
        "loss_weights": torch.tensor([sample.loss_weight for sample in samples], dtype=torch.float32),
        "image_paths": [sample.path for sample in samples],
        "original_sizes": [sample.original_size for sample in samples],
        "crop_top_lefts": [sample.crop_top_left for sample in samples],
        "target_size": first.target_size,
    }
    if first.latents is not None:
        shapes = {sample.latents.shape for sample in samples}
        if len(shapes) > 1:
            raise DatasetError(
                f"Prepared latents of one bucket differ in shape {sorted(shapes)}: {', '.join(batch['image_paths'])}. "
                "Prepare them again with the same settings."
            )
        batch["latents"] = torch.from_numpy(np.stack([sample.latents for sample in samples]))  # (B, C, h, w)
        mask_size = first.latents.shape[-2:]  # cached masks are already reduced to the latent size
    else:
        images = torch.from_numpy(np.stack([sample.image for sample in samples]))  # (B, H, W, 3) uint8
        batch["images"] = images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()  # (B, 3, H, W)
        mask_size = first.image.shape[:2]
    if with_masks:
        masks = [sample.mask if sample.mask is not None else np.ones(mask_size, dtype=np.float32) for sample in samples]
        batch["masks"] = torch.from_numpy(np.stack(masks))[:, None]  # (B, 1, H, W) or (B, 1, h, w) in [0, 1]
    return batch
