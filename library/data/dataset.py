"""All datasets of a run as one torch Dataset whose items are whole batches, in a (seed, epoch)-determined order.

Usage: `group = build_dataset_group(args, seed, prior_loss_weight)`, then per epoch `group.set_epoch(epoch)` before
iterating `group.make_dataloader(...)`. Batches never mix buckets; the order and every random choice (flip,
caption shuffle) depend only on (seed, epoch, sample), so a resumed run sees exactly the same data.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from library.config.dataset_config import DatasetGroupConfig, load_dataset_config
from library.data.image_dataset import ImageDataset, Sample, scan_subset
from library.data.summary import dataset_summary, format_summary
from library.errors import ConfigError

logger = logging.getLogger(__name__)

_SEED_MASK = (1 << 64) - 1  # numpy seed sequences take non-negative integers


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the dataset engine and its data loader (`parser` may also be an argument group)."""
    parser.add_argument("--dataset_config", type=Path, default=None, help="dataset config file (.toml or .json)")
    parser.add_argument(
        "--max_data_loader_n_workers",
        type=int,
        default=8,
        help="most data loader worker processes (fewer if the machine has fewer CPUs; 0 loads in the main process)",
    )
    parser.add_argument(
        "--persistent_data_loader_workers",
        action="store_true",
        help="keep data loader workers alive between epochs (faster epoch starts, more memory)",
    )
    parser.add_argument("--debug_dataset", action="store_true", help="print the dataset summary and exit")


def build_dataset_group(args: argparse.Namespace, seed: int, prior_loss_weight: float) -> DatasetGroup:
    """Validate the dataset config and scan every image folder (headers and captions only; no model needed)."""
    if getattr(args, "dataset_config", None) is None:
        raise ConfigError("No dataset given: pass --dataset_config with a .toml or .json dataset config file.")
    if prior_loss_weight < 0:
        raise ConfigError(f"--prior_loss_weight = {prior_loss_weight} is invalid: expected a number >= 0.")
    config = load_dataset_config(args.dataset_config)
    group = DatasetGroup.from_config(config, seed, prior_loss_weight)
    if getattr(args, "debug_dataset", False):
        print(format_summary(group.summary()))  # --debug_dataset: the summary is the product
    return group


def _take_single(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate for batch_size=1 loaders: each item already is a batch."""
    return items[0]


class DatasetGroup(Dataset):
    """Index i is the i-th batch of the current epoch, over all datasets; see the module docstring."""

    def __init__(self, datasets: list[ImageDataset], seed: int) -> None:
        self.datasets = datasets
        self.seed = seed & _SEED_MASK
        self.num_train_images = sum(d.num_train_samples for d in datasets)  # repeats counted, as ss_num_train_images
        self.num_reg_images = sum(d.num_reg_images for d in datasets)  # distinct reg image files
        self._length = sum(d.batch_count() for d in datasets)
        # The epoch lives in shared memory so that persistent DataLoader workers follow set_epoch().
        self._shared_epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._epoch = -1
        self._batches: list[tuple[int, np.ndarray]] = []
        self.set_epoch(0)

    @classmethod
    def from_config(cls, config: DatasetGroupConfig, seed: int, prior_loss_weight: float) -> DatasetGroup:
        """Scan the folders of every subset and build the group."""
        datasets = []
        for dataset_config in config.datasets:
            images = [scan_subset(subset, config.source) for subset in dataset_config.subsets]
            datasets.append(ImageDataset(dataset_config, images, prior_loss_weight, config.source))
        return cls(datasets, seed)

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Reorder for `epoch`; call before iterating the epoch's data loader."""
        self._shared_epoch[0] = epoch
        self._follow_epoch()

    def _follow_epoch(self) -> None:
        epoch = int(self._shared_epoch[0])
        if epoch != self._epoch:
            self._batches = self._plan_epoch(epoch)
            self._epoch = epoch

    def _plan_epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        rng = np.random.default_rng((self.seed, epoch & _SEED_MASK))
        batches = [
            (dataset_index, sample_ids)
            for dataset_index, dataset in enumerate(self.datasets)
            for sample_ids in dataset.plan_batches(rng)
        ]
        return [batches[i] for i in rng.permutation(len(batches))]

    def batch_plan(self) -> list[tuple[int, list[int]]]:
        """The current epoch's batches as (dataset index, sample ids); for tests and debugging."""
        self._follow_epoch()
        return [(dataset_index, ids.tolist()) for dataset_index, ids in self._batches]

    def __getitem__(self, index: int) -> dict[str, Any]:
        self._follow_epoch()
        dataset_index, sample_ids = self._batches[index]
        dataset = self.datasets[dataset_index]
        samples = [
            dataset.load_sample(int(sample_id), self._sample_rng(dataset_index, int(sample_id)))
            for sample_id in sample_ids
        ]
        return _collate(samples)

    def _sample_rng(self, dataset_index: int, sample_id: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self._epoch & _SEED_MASK, dataset_index, sample_id))

    def make_dataloader(self, num_workers: int, persistent: bool) -> DataLoader:
        """A loader yielding the batches of the current epoch in order (the order itself is already shuffled)."""
        cpus = os.cpu_count() or 1
        workers = min(num_workers, cpus)
        if workers < num_workers:
            logger.info(
                "Using %d data loader workers instead of %d: the machine has %d CPUs.", workers, num_workers, cpus
            )
        return DataLoader(
            self,
            batch_size=1,
            shuffle=False,
            collate_fn=_take_single,
            num_workers=workers,
            persistent_workers=persistent and workers > 0,
        )

    def summary(self) -> dict[str, Any]:
        """A JSON-able description: per dataset its options, buckets, subsets and counts."""
        return {
            "steps_per_epoch": len(self),
            "num_train_images": self.num_train_images,
            "num_reg_images": self.num_reg_images,
            "datasets": [dataset_summary(dataset) for dataset in self.datasets],
        }


def _collate(samples: list[Sample]) -> dict[str, Any]:
    images = torch.from_numpy(np.stack([sample.image for sample in samples]))  # (B, H, W, 3) uint8
    images = images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, H, W) in [-1, 1]
    height, width = samples[0].image.shape[:2]
    return {
        "images": images.contiguous(),
        "captions": [sample.caption for sample in samples],
        "loss_weights": torch.tensor([sample.loss_weight for sample in samples], dtype=torch.float32),
        "image_paths": [sample.path for sample in samples],
        "original_sizes": [sample.original_size for sample in samples],
        "crop_top_lefts": [sample.crop_top_left for sample in samples],
        "target_size": (height, width),
    }
