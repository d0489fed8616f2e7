"""The JSON-able summary of a dataset (options, buckets, subsets, counts) and its human-readable rendering."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from library.config.dataset_config import SubsetConfig
from library.data.image_dataset import ImageDataset


def dataset_summary(dataset: ImageDataset) -> dict[str, Any]:
    """Options, counts, buckets (`[[width, height], samples per epoch]`) and subsets of one dataset."""
    config = dataset.config
    options = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    del options["subsets"], options["where"]
    options["resolution"] = list(config.resolution)
    samples_per_bucket = np.bincount(dataset.bucket_of_image[dataset.samples], minlength=len(dataset.bucket_sizes))
    buckets = [
        [size.tolist(), int(count)]
        for size, count in zip(dataset.bucket_sizes, samples_per_bucket, strict=True)
        if count
    ]
    return {
        "where": config.where,
        **options,
        "steps_per_epoch": dataset.batch_count(),
        "num_train_images": dataset.num_train_samples,
        "num_reg_images": dataset.num_reg_images,
        "num_reg_samples": dataset.num_reg_samples,
        "buckets": buckets,
        "subsets": [
            _subset_summary(s, count) for s, count in zip(dataset.subsets, dataset.subset_image_counts, strict=True)
        ],
    }


def _subset_summary(subset: SubsetConfig, img_count: int) -> dict[str, Any]:
    values = {field.name: getattr(subset, field.name) for field in dataclasses.fields(subset)}
    values["image_dir"] = None if subset.image_dir is None else str(subset.image_dir)
    return values | {"img_count": img_count}


def format_summary(summary: dict[str, Any]) -> str:
    """A human-readable rendering of `DatasetGroup.summary()`."""
    counts = (
        f"training images x repeats: {summary['num_train_images']}, regularization images: {summary['num_reg_images']}"
    )
    lines = [f"steps per epoch: {summary['steps_per_epoch']}  ({counts})"]
    for dataset in summary["datasets"]:
        lines.extend(_format_dataset(dataset))
    return "\n".join(lines)


def _format_dataset(dataset: dict[str, Any]) -> list[str]:
    width, height = dataset["resolution"]
    if dataset["enable_bucket"]:
        bucketing = (
            f"buckets {dataset['min_bucket_reso']}..{dataset['max_bucket_reso']} step {dataset['bucket_reso_steps']}"
            + (", no upscale" if dataset["bucket_no_upscale"] else "")
        )
    else:
        bucketing = "no bucketing"
    reg = f"regularization images {dataset['num_reg_images']} ({dataset['num_reg_samples']} samples)"
    buckets = ", ".join(f"{w}x{h}: {count}" for (w, h), count in dataset["buckets"])
    lines = [
        f"{dataset['where']}: resolution {width}x{height}, batch_size {dataset['batch_size']}, {bucketing}",
        f"  steps per epoch {dataset['steps_per_epoch']}, training samples {dataset['num_train_images']}, {reg}",
        f"  buckets (width x height: samples): {buckets}",
    ]
    for subset in dataset["subsets"]:
        kind = "regularization" if subset["is_reg"] else "training"
        class_tokens = json.dumps(subset["class_tokens"], ensure_ascii=False)
        lines.append(
            f"  {subset['where']}: {subset['image_dir']}  {subset['img_count']} {kind} images"
            f" x {subset['num_repeats']} repeats, class_tokens {class_tokens}"
        )
    return lines
