"""A toy DreamBooth-style dataset: coloured shapes on plain backgrounds, with captions and a TOML config.

    python -m library.testing.toy_data --out data/toy
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

from library.atomic import atomic_write_text

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SIZES = ((64, 64), (96, 64), (64, 96))


def draw_image(index: int, size: tuple[int, int], rng: np.random.Generator) -> tuple[Image.Image, str]:
    """One image and its caption."""
    shape = SHAPES[index % len(SHAPES)]
    color_name = list(COLORS)[index % len(COLORS)]
    background = tuple(int(v) for v in rng.integers(150, 255, 3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    width, height = size
    box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color_name])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color_name])
    else:
        draw.polygon([(width // 2, height // 4), (width // 4, 3 * height // 4), (3 * width // 4, 3 * height // 4)],
                     fill=COLORS[color_name])
    return image, f"a {color_name} {shape}, toy picture"


def write_images(folder: str, count: int, seed: int = 0, captions: bool = True, offset: int = 0) -> list[str]:
    """Write `count` PNG images (three aspect ratios) and, if asked, `.txt` captions; returns the image paths."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(offset, offset + count):
        image, caption = draw_image(index, SIZES[index % len(SIZES)], rng)
        path = os.path.join(folder, f"img_{index:04d}.png")
        image.save(path)
        if captions:
            atomic_write_text(os.path.join(folder, f"img_{index:04d}.txt"), caption + "\n")
        paths.append(path)
    return paths


def write_toy_dataset(out_dir: str, count: int = 8, reg_count: int = 0, resolution: int = 64,
                      batch_size: int = 2, num_repeats: int = 1, enable_bucket: bool = True) -> str:
    """Images, captions and a dataset TOML in `out_dir`; returns the TOML path."""
    image_dir = os.path.join(out_dir, "images")
    write_images(image_dir, count)
    lines = [
        "[general]",
        "caption_extension = '.txt'",
        "",
        "[[datasets]]",
        f"resolution = {resolution}",
        f"batch_size = {batch_size}",
        f"enable_bucket = {'true' if enable_bucket else 'false'}",
        f"min_bucket_reso = {resolution // 2}",
        f"max_bucket_reso = {resolution * 2}",
        "bucket_reso_steps = 16",
        "",
        "  [[datasets.subsets]]",
        f"  image_dir = '{_toml_path(image_dir)}'",
        "  class_tokens = 'toy picture'",
        f"  num_repeats = {num_repeats}",
    ]
    if reg_count:
        reg_dir = os.path.join(out_dir, "reg")
        write_images(reg_dir, reg_count, seed=1, captions=False, offset=1000)
        lines += ["", "  [[datasets.subsets]]", f"  image_dir = '{_toml_path(reg_dir)}'",
                  "  class_tokens = 'picture'", "  is_reg = true"]
    config_path = os.path.join(out_dir, "dataset.toml")
    atomic_write_text(config_path, "\n".join(lines) + "\n")
    return config_path


def _toml_path(path: str) -> str:
    """A path for a TOML literal string (single quotes keep Windows backslashes as they are)."""
    return os.path.abspath(path)


def main() -> None:
    parser = argparse.ArgumentParser(description="write a toy image dataset with captions and a dataset config")
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--reg_count", type=int, default=0)
    args = parser.parse_args()
    print(write_toy_dataset(args.out, args.count, args.reg_count))


if __name__ == "__main__":
    main()
