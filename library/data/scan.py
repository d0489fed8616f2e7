"""Start-up scan of a subset: which images it has, their sizes, captions, masks and prepared latents.

Only headers and the last bytes of images are read (no decoding), so every problem with files shows up here,
before any model is loaded.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from library.config.dataset_config import SubsetConfig
from library.data.captions import (
    caption_file_name,
    caption_or_class_tokens,
    merge_caption_and_tags,
    read_caption_file,
)
from library.data.images import CorruptImageError, is_image_name, list_folder, probe_image, select_images
from library.data.metadata_cache import MetadataCache
from library.errors import DatasetError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
_IO_THREADS = 8
_CHUNK = 256


@dataclass(frozen=True)
class LatentFiles:
    """Latents written by finetune/prepare_buckets_latents.py for one image."""

    npz: str
    flip_npz: str | None  # "<stem>_flip.npz": latents of the mirrored image, used for half of the samples
    train_resolution: tuple[int, int] | None  # (width, height) the latents were made at; from the metadata


@dataclass
class SubsetImages:
    """What a subset holds. `paths` are image files, or the .npz file for entries that only have latents."""

    paths: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) as displayed
    captions: list[str] = field(default_factory=list)  # stored captions; several lines with enable_wildcard
    mask_paths: list[str | None] = field(default_factory=list)  # conditioning_data_dir mask per image
    latents: list[LatentFiles | None] = field(default_factory=list)
    has_image: list[bool] = field(default_factory=list)

    def add(
        self,
        path: str,
        size: tuple[int, int],
        caption: str,
        mask_path: str | None = None,
        latents: LatentFiles | None = None,
        has_image: bool = True,
    ) -> None:
        """Append one image."""
        self.paths.append(path)
        self.sizes.append(size)
        self.captions.append(caption)
        self.mask_paths.append(mask_path)
        self.latents.append(latents)
        self.has_image.append(has_image)

    def size_array(self) -> np.ndarray:
        """(N, 2) int64 [width, height]."""
        return np.array(self.sizes, dtype=np.int64).reshape(-1, 2)


def scan_subset(subset: SubsetConfig, source: str) -> SubsetImages:
    """Scan a DreamBooth folder or a fine-tuning metadata file."""
    images = _scan_finetune(subset, source) if subset.is_finetune else _scan_dreambooth(subset, source)
    if not images.paths:
        raise DatasetError(
            f"{source}: {subset.where}: every image was left out as unreadable (skip_corrupt_images); "
            "nothing is left to train on."
        )
    return images


def in_threads(function: Callable[[T], R], items: list[T]) -> list[R]:
    """`[function(item) for item in items]`, run by a few threads in chunks: file reads release the GIL, so on a
    cold disk the reads of different files overlap (several times faster start-up), while warm runs pay little."""
    if len(items) <= _CHUNK:
        return [function(item) for item in items]
    chunks = [items[start : start + _CHUNK] for start in range(0, len(items), _CHUNK)]
    with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
        parts = pool.map(lambda chunk: [function(item) for item in chunk], chunks)
        return [result for part in parts for result in part]


# ---------------------------------------------------------------------------------------------------------------
# DreamBooth: a folder of images with caption files


@dataclass
class _FileInfo:
    """One image of a folder while it is scanned: what the cache knew, then what was read."""

    name: str
    caption_name: str | None  # None: no caption file
    size: Any = None  # (width, height), or the error of reading it
    lines: Any = None  # caption lines, or the error of reading them

    def reads(self, folder: str) -> tuple[str | None, str | None]:
        """The image and caption paths still to read (None where known or absent)."""
        image = os.path.join(folder, self.name) if self.size is None else None
        caption = os.path.join(folder, self.caption_name) if self.caption_name and self.lines is None else None
        return image, caption


CAPTION_EXTENSIONS = (".txt", ".caption", ".cap")  # what caption files are commonly named


def _warn_if_captions_use_another_extension(
    subset: SubsetConfig, source: str, image_names: list[str], names: set[str]
) -> None:
    """No image has a caption file of the configured extension, but some have one of another extension: most likely
    a caption_extension that does not match the files (every caption would silently be the class tokens)."""
    if any(caption_file_name(name, subset.caption_extension) in names for name in image_names):
        return
    for extension in CAPTION_EXTENSIONS:
        found = sum(caption_file_name(name, extension) in names for name in image_names)
        if extension != subset.caption_extension and found:
            logger.warning(
                "%s: %s: no image has a '%s' caption file, but %d have '%s' ones, which are not read; set "
                "caption_extension = '%s' to use them", source, subset.where, subset.caption_extension, found,
                extension, extension,
            )  # fmt: skip
            return


def _scan_dreambooth(subset: SubsetConfig, source: str) -> SubsetImages:
    folder = str(subset.image_dir)
    names = list_folder(folder)
    image_names = select_images(names)
    if not image_names:
        raise DatasetError(_no_images_message(subset, folder, source))
    name_set = set(names)
    _warn_if_captions_use_another_extension(subset, source, image_names, name_set)
    cache = MetadataCache(folder, subset.cache_info)
    masks = _mask_names(subset, source)
    infos = []
    for name in image_names:
        caption_name = caption_file_name(name, subset.caption_extension)
        info = _FileInfo(name, caption_name if caption_name in name_set else None, cache.get(name, "size"))
        info.lines = None if info.caption_name is None else cache.get(info.caption_name, "lines")
        infos.append(info)
    # What the cache did not know is read now, in threads: on a cold disk the reads overlap.
    pending = [(info, reads) for info in infos if (reads := info.reads(folder)) != (None, None)]
    for (info, reads), (size, lines) in zip(pending, in_threads(_read_image_and_caption, [r for _, r in pending])):
        if reads[0] is not None and not isinstance(size, DatasetError):
            cache.put(info.name, "size", list(size))
        if reads[1] is not None and not isinstance(lines, DatasetError):
            cache.put(info.caption_name, "lines", lines)
        info.size = size if reads[0] is not None else info.size
        info.lines = lines if reads[1] is not None else info.lines
    images = SubsetImages()
    for info in infos:
        path = os.path.join(folder, info.name)
        size = _size_or_skip(info.size, path, subset, source)
        if size is None:
            continue
        lines = _raise_if_error(info.lines)
        caption = None if lines is None else ("\n".join(lines) if subset.enable_wildcard else lines[0])
        expected = caption_file_name(info.name, subset.caption_extension)
        caption = caption_or_class_tokens(caption, path, expected, subset, source)
        images.add(path, (int(size[0]), int(size[1])), caption, mask_path=_mask_path(info.name, masks, subset, source))
    cache.save()
    return images


def _read_image_and_caption(task: tuple[str | None, str | None]) -> tuple[Any, Any]:
    """Probe an image and read its caption file's lines (each None when not asked); errors are returned."""
    image, caption = task
    return _capture(probe_image, image), _capture(_caption_lines, caption)


def _caption_lines(path: str) -> list[str]:
    return read_caption_file(path, all_lines=True).split("\n")


def _capture(function: Any, argument: str | None) -> Any:
    if argument is None:
        return None
    try:
        return function(argument)
    except DatasetError as err:
        return err


def _raise_if_error(value: Any) -> Any:
    if isinstance(value, Exception):
        raise value
    return value


def _size_or_skip(result: Any, path: str, subset: SubsetConfig, source: str) -> tuple[int, int] | None:
    """The probed size, or None for a corrupt image that skip_corrupt_images leaves out."""
    if isinstance(result, CorruptImageError):
        if not subset.skip_corrupt_images:
            raise DatasetError(f"{source}: {subset.where}: {result}") from None
        logger.warning("%s: %s: leaving out %s: %s", source, subset.where, path, result.detail)
        return None
    return _raise_if_error(result)


def _no_images_message(subset: SubsetConfig, folder: str, source: str) -> str:
    hint = ""
    with os.scandir(folder) as entries:
        entries = list(entries)
    broken = [entry.name for entry in entries if entry.is_symlink() and not os.path.exists(entry.path)]
    if any(is_image_name(name) for name in broken):
        example = next(name for name in broken if is_image_name(name))
        target = os.readlink(os.path.join(folder, example))
        hint = (f" {len(broken)} of its entries are links to missing files (e.g. {example} -> {target}); the linked "
                "images were moved or deleted.")  # fmt: skip
    elif any(entry.is_dir() for entry in entries):
        hint = " Images must be directly inside image_dir; subfolders are not searched."
    extensions = ".png, .jpg, .jpeg, .webp, .bmp"
    return f"{source}: {subset.where}.image_dir {folder} contains no images ({extensions}).{hint}"


def _mask_names(subset: SubsetConfig, source: str) -> dict[str, str] | None:
    """Mask images of conditioning_data_dir by stem (a mask may have another extension than its image)."""
    if subset.conditioning_data_dir is None:
        return None
    names = select_images(list_folder(subset.conditioning_data_dir))
    if not names:
        raise DatasetError(
            f"{source}: {subset.where}.conditioning_data_dir {subset.conditioning_data_dir} contains no images."
        )
    return {os.path.splitext(name)[0]: name for name in names}


def _mask_path(name: str, masks: dict[str, str] | None, subset: SubsetConfig, source: str) -> str | None:
    if masks is None:
        return None
    stem = os.path.splitext(name)[0]
    if stem not in masks:
        raise DatasetError(
            f"{source}: {subset.where}: image {name} has no mask in conditioning_data_dir "
            f"{subset.conditioning_data_dir} (expected an image named {stem}.png or another image extension)."
        )
    return os.path.join(str(subset.conditioning_data_dir), masks[stem])


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning: a metadata file of captions and tags


def read_metadata(path: str, where: str) -> dict[str, Any]:
    """The metadata JSON object: image key -> entry."""
    try:
        with open(path, encoding="utf-8-sig") as file:
            data = json.load(file)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{where}: metadata_file {path} is not valid JSON: {err}.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{where}: cannot read metadata_file {path}: {err}.") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: metadata_file {path} must hold a JSON object of image key -> entry.")
    return data


class _ImageFinder:
    """Finds the image of a metadata key: a path as written (full path), or a name or stem inside image_dir."""

    def __init__(self, image_dir: str | None) -> None:
        self.image_dir = image_dir
        names = select_images(list_folder(image_dir)) if image_dir else []
        self.names = set(names)
        self.by_stem: dict[str, str] = {}
        for name in names:
            self.by_stem.setdefault(os.path.splitext(name)[0], name)

    def image(self, key: str) -> str | None:
        if is_image_name(os.path.basename(key)) and os.path.isfile(key):
            return key
        if self.image_dir is None:
            return None
        if key in self.names:
            return os.path.join(self.image_dir, key)
        if key in self.by_stem:
            return os.path.join(self.image_dir, self.by_stem[key])
        candidate = os.path.join(self.image_dir, key)
        return candidate if is_image_name(os.path.basename(key)) and os.path.isfile(candidate) else None

    def latent_base(self, key: str, image: str | None) -> str | None:
        """Path without extension where `<stem>.npz` would be: next to the image, or where the key points."""
        if image is not None:
            return os.path.splitext(image)[0]
        stem = os.path.splitext(key)[0] if is_image_name(os.path.basename(key)) else key
        if os.path.isabs(key) or os.path.dirname(key) or self.image_dir is None:
            return stem
        return os.path.join(self.image_dir, stem)


def _scan_finetune(subset: SubsetConfig, source: str) -> SubsetImages:
    where = f"{source}: {subset.where}"
    metadata_path = str(subset.metadata_file)
    metadata = read_metadata(metadata_path, where)
    if not metadata:
        raise DatasetError(f"{where}: metadata_file {metadata_path} has no entries.")
    finder = _ImageFinder(None if subset.image_dir is None else str(subset.image_dir))
    entries = []
    for key, entry in metadata.items():
        context = f"{where}: metadata_file {metadata_path}, entry {json.dumps(key, ensure_ascii=False)}"
        if not isinstance(entry, dict):
            raise DatasetError(f"{context}: expected an object with caption and/or tags.")
        caption = _entry_caption(entry, subset, context)
        image = finder.image(key)
        latents = _latent_files(finder.latent_base(key, image), entry, context)
        if image is None and latents is None:
            raise DatasetError(f"{context}: {_not_found_message(key, subset)}")
        if image is None and latents.train_resolution is None:
            raise DatasetError(f"{context}: has latents but no image and no train_resolution [width, height].")
        entries.append((image, caption, latents))
    probed = in_threads(lambda image: _capture(probe_image, image), [image for image, _, _ in entries])
    images = SubsetImages()
    for (image, caption, latents), result in zip(entries, probed, strict=True):
        if image is None:
            images.add(latents.npz, latents.train_resolution, caption, latents=latents, has_image=False)
            continue
        size = _size_or_skip(result, image, subset, source)
        if size is not None:
            images.add(image, size, caption, latents=latents)
    return images


def _not_found_message(key: str, subset: SubsetConfig) -> str:
    if subset.image_dir is None:
        return (
            "no image at this path. Keys that are not full paths need image_dir in the subset (metadata written "
            "without --full_path stores file stems)."
        )
    return f"no image with this path, name or stem in image_dir {subset.image_dir}, and no prepared .npz latents."


def _entry_caption(entry: dict[str, Any], subset: SubsetConfig, context: str) -> str:
    caption, tags = entry.get("caption"), entry.get("tags")
    for name, value in (("caption", caption), ("tags", tags)):
        if value is not None and not isinstance(value, str):
            raise DatasetError(f"{context}: {name} must be a string, got {json.dumps(value, ensure_ascii=False)}.")
    merged = merge_caption_and_tags(caption, tags, subset.caption_separator)
    if merged is None:
        raise DatasetError(
            f"{context}: has neither caption nor tags; add them (finetune/merge_captions_to_metadata.py, "
            "merge_dd_tags_to_metadata.py) or remove the entry."
        )
    return merged


def _latent_files(base: str | None, entry: dict[str, Any], context: str) -> LatentFiles | None:
    if base is None or not os.path.isfile(base + ".npz"):
        return None
    flip = base + "_flip.npz"
    return LatentFiles(base + ".npz", flip if os.path.isfile(flip) else None, _train_resolution(entry, context))


def _train_resolution(entry: dict[str, Any], context: str) -> tuple[int, int] | None:
    value = entry.get("train_resolution")
    if value is None:
        return None
    valid = isinstance(value, list) and len(value) == 2
    valid = valid and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    if not valid:
        raise DatasetError(f"{context}: train_resolution = {json.dumps(value)} is invalid: expected [width, height].")
    return int(value[0]), int(value[1])
