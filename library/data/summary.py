"""The JSON-able summary of a dataset (options, buckets, subsets, counts) and its human-readable rendering."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from library.config.dataset_config import SubsetConfig
from library.data.image_dataset import ImageDataset


def dataset_summary(dataset: ImageDataset, num_processes: int = 1) -> dict[str, Any]:
    """Options, counts, buckets (`[[width, height], samples per epoch]`) and subsets of one dataset."""
    config = dataset.config
    options = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    del options["subsets"], options["where"]
    options["resolution"] = None if config.resolution is None else list(config.resolution)
    buckets = [
        [size.tolist(), int(count)]
        for size, count in zip(dataset.bucket_sizes, dataset.samples_per_bucket(), strict=True)
        if count
    ]
    return {
        "where": config.where,
        **options,
        "steps_per_epoch": dataset.batch_count(num_processes),
        "num_train_images": dataset.num_train_samples,
        "num_reg_images": dataset.num_reg_images,
        "num_reg_samples": dataset.num_reg_samples,
        "uses_prepared_latents": dataset.uses_latents,
        "has_masks": dataset.has_masks,
        "buckets": buckets,
        "subsets": [
            _subset_summary(s, count) for s, count in zip(dataset.subsets, dataset.subset_image_counts, strict=True)
        ],
    }


def _subset_summary(subset: SubsetConfig, img_count: int) -> dict[str, Any]:
    values = {field.name: getattr(subset, field.name) for field in dataclasses.fields(subset)}
    for name, value in values.items():
        if isinstance(value, Path):
            values[name] = str(value)
        elif isinstance(value, tuple):
            values[name] = list(value)
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
    if dataset["uses_prepared_latents"]:
        size, bucketing = "from prepared latents", "buckets from train_resolution"
    else:
        size = "x".join(str(side) for side in dataset["resolution"])
        bucketing = _bucketing(dataset)
    reg = f"regularization images {dataset['num_reg_images']} ({dataset['num_reg_samples']} samples)"
    buckets = ", ".join(f"{w}x{h}: {count}" for (w, h), count in dataset["buckets"])
    lines = [
        f"{dataset['where']}: resolution {size}, batch_size {dataset['batch_size']}, {bucketing}",
        f"  steps per epoch {dataset['steps_per_epoch']}, training samples {dataset['num_train_images']}, {reg}",
        f"  buckets (width x height: samples): {buckets}",
    ]
    if dataset["has_masks"]:
        lines.append("  loss masks: yes (alpha_mask / conditioning_data_dir)")
    lines.extend(_format_subset(subset) for subset in dataset["subsets"])
    if "sample_captions" in dataset:
        lines.append("  sample captions (first epoch):")
        lines.extend(
            f"    {Path(sample['image']).name}: {json.dumps(sample['caption'], ensure_ascii=False)}"
            for sample in dataset["sample_captions"]
        )
    return lines


def _bucketing(dataset: dict[str, Any]) -> str:
    if not dataset["enable_bucket"]:
        return "no bucketing"
    return f"buckets {dataset['min_bucket_reso']}..{dataset['max_bucket_reso']} step {dataset['bucket_reso_steps']}" + (
        ", no upscale" if dataset["bucket_no_upscale"] else ""
    )


def _format_subset(subset: dict[str, Any]) -> str:
    repeats = f"x {subset['num_repeats']} repeats"
    if subset["metadata_file"] is not None:
        folder = f", image_dir {subset['image_dir']}" if subset["image_dir"] else ""
        return (
            f"  {subset['where']}: metadata {subset['metadata_file']}{folder}  {subset['img_count']} images {repeats}"
        )
    kind = "regularization" if subset["is_reg"] else "training"
    class_tokens = json.dumps(subset["class_tokens"], ensure_ascii=False)
    return (
        f"  {subset['where']}: {subset['image_dir']}  {subset['img_count']} {kind} images {repeats}, "
        f"class_tokens {class_tokens}"
    )
