"""Small builders shared by the dataset tests: image folders, caption files, config files, groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from library.config.dataset_config import load_dataset_config
from library.data.dataset import DatasetGroup


def write_images(
    folder: Path,
    sizes: list[tuple[int, int]],
    captions: dict[int, str] | None = None,
    ext: str = ".png",
    names: list[str] | None = None,
) -> Path:
    """Solid images of the given (width, height) sizes, and `.txt` captions for the given indices."""
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"img{index:03d}" for index in range(len(sizes))]
    for index, ((width, height), name) in enumerate(zip(sizes, names, strict=True)):
        Image.new("RGB", (width, height), (index * 30 % 256, 90, 160)).save(folder / f"{name}{ext}")
    for index, caption in (captions or {}).items():
        (folder / f"{names[index]}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def write_config(tmp_path: Path, text: str, name: str = "data.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def one_dataset(tmp_path: Path, dataset: str, *subsets: str) -> Path:
    """A config with one [[datasets]] table of `dataset` lines and one [[datasets.subsets]] per `subsets` entry."""
    text = "[[datasets]]\n" + dataset + "\n" + "".join(f"[[datasets.subsets]]\n{subset}\n" for subset in subsets)
    return write_config(tmp_path, text)


def subset_lines(folder: Path, extra: str = "", class_tokens: str | None = "sks dog") -> str:
    """A subset table body: `folder` with `.txt` captions, class_tokens (unless None) and `extra` lines."""
    tokens = "" if class_tokens is None else f"class_tokens = '{class_tokens}'\n"
    return f"image_dir = '{folder.as_posix()}'\ncaption_extension = '.txt'\n{tokens}{extra}"


def group_of(path: Path, seed: int = 0, prior_loss_weight: float = 1.0, **kwargs) -> DatasetGroup:
    return DatasetGroup.from_config(load_dataset_config(path), seed, prior_loss_weight, **kwargs)


def all_batches(group: DatasetGroup) -> list[dict]:
    return [group[index] for index in range(len(group))]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)
