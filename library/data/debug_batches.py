"""--debug_dataset: write the first batches of an epoch as the trainer would get them (images after bucketing,
cropping and augmentation, with their processed captions and bucket sizes) into a folder to look at, since training
machines rarely have a display."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from library.atomic import atomic_path, atomic_write_text

DEBUG_BATCHES = 4  # batches written: enough to see bucketing, crops and caption handling at work


def _save_png(pixels: np.ndarray, path: str) -> None:
    with atomic_path(path) as temp:
        Image.fromarray(pixels).save(temp, format="PNG")


def write_debug_batches(group, folder: str, batches: int = DEBUG_BATCHES) -> str:
    """Write up to `batches` batches of the first epoch into `folder`: `batchNN_M.png` with `batchNN_M.txt` (its
    caption), a `_mask.png` where a mask applies, and `index.txt` (one line per image: file, bucket size, source
    image, caption). Returns the index file's path."""
    os.makedirs(folder, exist_ok=True)
    group.set_epoch(0)
    lines = ["file\tbucket (width x height)\tsource image\tcaption"]
    for batch_index in range(min(batches, len(group))):
        batch = group[batch_index]
        if "failed" in batch:
            lines.append(f"batch{batch_index:02d}\t-\t-\tunreadable: {batch['failed']}")
            continue
        for sample_index, caption in enumerate(batch["captions"]):
            name = f"batch{batch_index:02d}_{sample_index}"
            height, width = batch["target_size"]  # the bucket
            if batch["images"] is not None:  # (B, 3, H, W) in [-1, 1]
                image = batch["images"][sample_index]
                pixels = ((image.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
                _save_png(pixels, os.path.join(folder, name + ".png"))
                if "masks" in batch:
                    mask = (batch["masks"][sample_index, 0].numpy() * 255).round().astype(np.uint8)
                    _save_png(mask, os.path.join(folder, name + "_mask.png"))
            else:
                name += " (prepared latents, no image)"
            atomic_write_text(os.path.join(folder, name.split(" ")[0] + ".txt"), caption + "\n")
            source = batch["image_paths"][sample_index]
            lines.append(f"{name}\t{width}x{height}\t{source}\t{caption}")
    index = os.path.join(folder, "index.txt")
    atomic_write_text(index, "\n".join(lines) + "\n")
    return index
