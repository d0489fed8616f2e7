"""Latent cache: every training image encoded by the VAE once before training, kept in memory (--cache_latents) or
in a file next to the image (--cache_latents_to_disk), so the VAE leaves the device and steps skip the encoder.

Each image's entry is keyed by its content: the image file's name, size and modification time (and its mask
image's), the alpha-mask setting, its bucket and size (which fix the centre crop), the resize filter, flip_aug,
and the VAE (a fingerprint of its weights). File size + modification time is what `make` and `rsync` trust: it
costs one stat per image instead of reading every image at each start; an edited or replaced image gets a new
time, while a copy that does not keep the times is encoded once more. A changed image, bucket or VAE re-encodes
just the affected images.

Disk format: `<image stem>_latents.safetensors` holds one entry per key in use: `<key>.latents` (C, h, w) raw
(unscaled) float32 latents, `<key>.flipped` for the mirrored image with flip_aug, `<key>.mask` (h, w) loss weights
reduced to the latent size; the metadata maps `<key>` to the sample's original size and crop as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors import SafetensorError

from library.data.cache_files import read_header, read_tensors, tensors_fingerprint, write_cache_file
from library.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

CACHE_SUFFIX = "_latents.safetensors"
CACHE_FORMAT = "1"  # part of every key: a new layout never reads an old entry
# Subset options that change the pixels at every use, which one encoding per image cannot follow (flip_aug can:
# both orientations are cached).
PER_USE_OPTIONS = ("color_aug", "random_crop", "face_crop_aug_range")

LatentEncoder = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, H, W) in [-1, 1] -> raw latents (B, C, h, w)


def add_latent_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """The latent cache's options."""
    parser.add_argument(
        "--cache_latents",
        action="store_true",
        help="encode every image with the VAE once before training and keep the latents in main memory (less VRAM, "
        "faster steps); only flip_aug remains as augmentation",
    )
    parser.add_argument(
        "--cache_latents_to_disk",
        action="store_true",
        help="like --cache_latents, and keep the latents in <image stem>_latents.safetensors next to each image, "
        "reused by later runs while image, bucket and VAE are unchanged",
    )
    parser.add_argument(
        "--vae_batch_size", type=int, default=1, help="images per VAE call while caching latents (default 1)"
    )


@dataclass(frozen=True)
class LatentCacheOptions:
    """Typed latent cache options."""

    enabled: bool = False
    to_disk: bool = False
    vae_batch_size: int = 1

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LatentCacheOptions:
        to_disk = bool(getattr(args, "cache_latents_to_disk", False))
        enabled = bool(getattr(args, "cache_latents", False)) or to_disk
        if to_disk and not getattr(args, "cache_latents", False):
            logger.info("--cache_latents_to_disk: latents are cached (as with --cache_latents) and kept on disk")
        options = cls(enabled, to_disk, getattr(args, "vae_batch_size", 1))
        if options.vae_batch_size < 1:
            raise ConfigError(f"--vae_batch_size must be 1 or more, got {options.vae_batch_size}")
        return options

    @property
    def option(self) -> str:
        return "--cache_latents_to_disk" if self.to_disk else "--cache_latents"

    def check_dataset(self, group) -> None:
        """Raise ConfigError naming the subset when its pixels change between uses (before any model loads)."""
        if not self.enabled:
            return
        for dataset in group.datasets:
            if dataset.uses_latents:  # prepared .npz latents: nothing to cache
                continue
            for subset in dataset.subsets:
                changing = [name for name in PER_USE_OPTIONS if getattr(subset, name)]
                if changing:
                    raise ConfigError(
                        f"{dataset.source}: {subset.where} sets {', '.join(changing)}, which changes the pixels at "
                        f"every use, but {self.option} encodes each image once. Remove {self.option} or those subset "
                        "options (flip_aug works with the cache)."
                    )


@dataclass
class CachedLatents:
    """One image's cache entry: arrays in memory, or the names of its tensors in a cache file."""

    key: str
    original_size: tuple[int, int]  # (height, width) before resizing
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    has_flipped: bool
    has_mask: bool
    arrays: dict[str, np.ndarray] | None = None  # "latents" (C, h, w), "flipped", "mask" (h, w); None: in `file`
    file: str | None = None

    def load(self, flipped: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(latents (C, h, w), mask (h, w) or None) of the image, or of its mirror image with `flipped`."""
        if flipped and not self.has_flipped:
            raise RuntimeError(f"latent cache entry {self.key} has no flipped latents")
        names = ["flipped" if flipped else "latents"] + (["mask"] if self.has_mask else [])
        if self.arrays is not None:
            values = [self.arrays[name] for name in names]
        else:
            values = self._read(names)
        mask = values[1] if self.has_mask else None
        if mask is not None and flipped:
            mask = np.ascontiguousarray(mask[:, ::-1])
        return values[0], mask

    def _read(self, names: list[str]) -> list[np.ndarray]:
        try:
            tensors = read_tensors(self.file, [f"{self.key}.{name}" for name in names])
        except (OSError, SafetensorError) as err:
            raise DatasetError(
                f"latent cache file {self.file} changed or broke during training ({err}); start the run again to "
                "rebuild it"
            ) from err
        return [tensors[f"{self.key}.{name}"].numpy() for name in names]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The entry's tensors under their names in a cache file."""
        return {f"{self.key}.{name}": torch.from_numpy(value) for name, value in self.arrays.items()}

    def description(self) -> str:
        return json.dumps({"original_size": self.original_size, "crop_top_left": self.crop_top_left})


@dataclass
class _Item:
    """One image to cache: where its entry goes, what it needs, and what was encoded so far."""

    dataset: object
    image_index: int
    key: str
    file: str | None
    flip: bool
    mask: bool
    entry: CachedLatents | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # "latents", "flipped", "mask" as encoded
    sizes: tuple[tuple[int, int], tuple[int, int]] | None = None  # (original size, crop top-left)

    @property
    def encoded(self) -> bool:
        return "latents" in self.arrays and (not self.flip or "flipped" in self.arrays)

    def tensor_names(self) -> list[str]:
        names = ["latents"] + (["flipped"] if self.flip else []) + (["mask"] if self.mask else [])
        return [f"{self.key}.{name}" for name in names]


def cache_file_path(image_path: str) -> str:
    """The disk cache file of an image."""
    return os.path.splitext(image_path)[0] + CACHE_SUFFIX


def _file_stamp(path: str | None) -> tuple[str, int, int] | None:
    if path is None:
        return None
    stat = os.stat(path)
    return (os.path.basename(path), stat.st_size, stat.st_mtime_ns)


def entry_key(dataset, image_index: int, vae_id: str) -> str:
    """The content key of one image's entry (see the module docstring)."""
    subset = dataset.subsets[int(dataset.subset_of_image[image_index])]
    bucket = dataset.bucket_sizes[dataset.bucket_of_image[image_index]]
    parts = (
        CACHE_FORMAT,
        vae_id,
        _file_stamp(dataset.image_paths[image_index]),
        _file_stamp(dataset.mask_paths[image_index]) if dataset.has_masks else None,
        bool(subset.alpha_mask and dataset.has_masks),
        tuple(int(value) for value in dataset.image_sizes[image_index]),
        (int(bucket[0]), int(bucket[1])),
        subset.resize_interpolation,
        bool(subset.flip_aug),
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def fill_latent_cache(
    datasets: list, encode: LatentEncoder, vae_id: str, to_disk: bool, batch_size: int = 1, progress: bool = True
) -> tuple[int, int]:
    """Give every dataset without prepared latents its cache entries; returns (images encoded, entries reused).

    With `to_disk`, valid entries are read from the cache files, and each file is rewritten (atomically) as soon
    as all its images are encoded, so an interrupted caching run keeps what it finished.
    """
    items = _items(datasets, vae_id, to_disk)
    reused = _reuse_files(items) if to_disk else 0
    pending = [item for item in items if item.entry is None]
    files_left = Counter(item.file for item in pending)
    items_of_file = defaultdict(list)
    for item in items:
        items_of_file[item.file].append(item)
    for item in _encode(pending, encode, batch_size, progress):
        item.entry = _memory_entry(item)
        if to_disk:
            files_left[item.file] -= 1
            if files_left[item.file] == 0:
                _write_file(item.file, items_of_file[item.file])
    for dataset in datasets:
        if not dataset.uses_latents:
            dataset.latent_cache = [item.entry for item in items if item.dataset is dataset]
    return len(pending), reused


def _items(datasets: list, vae_id: str, to_disk: bool) -> list[_Item]:
    items = []
    for dataset in datasets:
        if dataset.uses_latents:  # prepared .npz latents are served as they are
            continue
        for index, path in enumerate(dataset.image_paths):
            subset = dataset.subsets[int(dataset.subset_of_image[index])]
            file = cache_file_path(path) if to_disk else None
            items.append(
                _Item(dataset, index, entry_key(dataset, index, vae_id), file, subset.flip_aug, dataset.has_masks)
            )
    return items


def _reuse_files(items: list[_Item]) -> int:
    """Point the items whose entry a cache file already holds at that file; returns how many."""
    headers = {file: read_header(file) for file in {item.file for item in items}}
    reused = 0
    for item in items:
        header = headers[item.file]
        if header is None or item.key not in header.metadata or not set(item.tensor_names()) <= header.names:
            continue
        sizes = json.loads(header.metadata[item.key])
        item.entry = CachedLatents(
            item.key, tuple(sizes["original_size"]), tuple(sizes["crop_top_left"]), item.flip, item.mask, file=item.file
        )
        reused += 1
    return reused


def _encode(pending: list[_Item], encode: LatentEncoder, batch_size: int, progress: bool) -> Iterator[_Item]:
    """Encode the pending images (and mirror images) in VAE batches of one bucket; yield each image when done."""
    from tqdm.auto import tqdm

    from library.data.scan import in_threads

    units = [(item, flipped) for item in pending for flipped in ((False, True) if item.flip else (False,))]
    units.sort(key=lambda unit: _bucket_of(unit[0]))  # stable: an image and its mirror stay next to each other
    with tqdm(total=len(units), desc="caching latents", disable=not progress) as bar:
        for start, end in _batch_bounds(units, batch_size):
            chunk = units[start:end]
            unique = list({id(item): item for item, _ in chunk}.values())
            pixels = {id(item): found for item, found in zip(unique, in_threads(_pixels_of, unique), strict=True)}
            crops = [
                pixels[id(item)]["image"][:, ::-1] if flipped else pixels[id(item)]["image"] for item, flipped in chunk
            ]
            for (item, flipped), latents in zip(chunk, _encode_crops(encode, crops, chunk), strict=True):
                item.arrays["flipped" if flipped else "latents"] = latents
                if not flipped:
                    _keep_sizes_and_mask(item, pixels[id(item)], latents.shape[-2:])
            bar.update(len(chunk))
            yield from (item for item in unique if item.encoded)


def _bucket_of(item: _Item) -> tuple[int, int]:
    bucket = item.dataset.bucket_sizes[item.dataset.bucket_of_image[item.image_index]]
    return (int(bucket[0]), int(bucket[1]))


def _batch_bounds(units: list, batch_size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each VAE batch: at most `batch_size` units, all of one bucket."""
    start = 0
    while start < len(units):
        bucket, end = _bucket_of(units[start][0]), start + 1
        while end < len(units) and end - start < batch_size and _bucket_of(units[end][0]) == bucket:
            end += 1
        yield start, end
        start = end


def _pixels_of(item: _Item) -> dict:
    return item.dataset.fixed_pixels(item.image_index)


def _encode_crops(encode: LatentEncoder, crops: list[np.ndarray], chunk: list) -> list[np.ndarray]:
    images = torch.from_numpy(np.stack([np.ascontiguousarray(crop) for crop in crops]))  # (B, H, W, 3) uint8
    images = images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, H, W) in [-1, 1], as batches have
    with torch.no_grad():
        latents = encode(images).float().cpu()  # (B, C, h, w)
    if not torch.isfinite(latents).all():
        paths = ", ".join(item.dataset.image_paths[item.image_index] for item, _ in chunk)
        raise ConfigError(
            f"the VAE gave NaN or infinite latents for {paths}; encode in float32 (--mixed_precision no, or "
            "--no_half_vae where the family has it)"
        )
    return list(latents.numpy())


def _keep_sizes_and_mask(item: _Item, pixels: dict, latent_size: tuple[int, int]) -> None:
    item.sizes = (tuple(pixels["original_size"]), tuple(pixels["crop_top_left"]))
    if item.mask:
        mask = pixels["mask"]
        if mask is None:
            mask = np.ones(pixels["image"].shape[:2], dtype=np.float32)
        item.arrays["mask"] = reduce_mask(mask, latent_size)


def reduce_mask(mask: np.ndarray, latent_size: tuple[int, int]) -> np.ndarray:
    """(H, W) loss weights -> (h, w) by area averaging, as the loss reduces masks itself (library/training/loss.py)."""
    weights = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    reduced = torch.nn.functional.interpolate(weights, size=tuple(latent_size), mode="area")
    return reduced[0, 0].numpy()


def _memory_entry(item: _Item) -> CachedLatents:
    arrays, item.arrays = item.arrays, {}
    return CachedLatents(item.key, *item.sizes, item.flip, item.mask, arrays=arrays)


def _write_file(file: str, items: list[_Item]) -> None:
    """Write every entry of one file's items; entries reused from the old file are read back first."""
    entries: dict[str, dict[str, torch.Tensor]] = {}
    descriptions = {"latent_cache_format": CACHE_FORMAT}
    for item in items:
        entry = item.entry
        if entry.arrays is None:  # still in the file that is about to be replaced
            entries[entry.key] = read_tensors(file, item.tensor_names())
        else:
            entries[entry.key] = entry.tensors()
        descriptions[entry.key] = entry.description()
    write_cache_file(
        file, {name: value for tensors in entries.values() for name, value in tensors.items()}, descriptions
    )
    for item in items:  # read from the file from now on: no copy stays in memory
        entry = item.entry
        item.entry = CachedLatents(entry.key, entry.original_size, entry.crop_top_left, item.flip, item.mask, file=file)


def vae_fingerprint(family_id: str, vae: torch.nn.Module) -> str:
    """What identifies a VAE's encodings: its weights and their dtype, and the family that calls it."""
    dtypes = sorted({str(param.dtype) for param in vae.parameters()})
    return tensors_fingerprint(vae.parameters(), family_id, type(vae).__name__, dtypes)


@contextlib.contextmanager
def _random_state_kept(device: torch.device) -> Iterator[None]:
    """Caching draws from the global generators (VAE sampling); a run reusing the cache must see the same state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def cache_dataset_latents(options: LatentCacheOptions, family, models, dataset, accelerator) -> None:
    """The trainer's hook: fill the cache after the models are placed, then move the VAE off the device."""
    if not options.enabled:
        return
    vae_id = vae_fingerprint(family.id, models.vae)
    first = accelerator.main_process_first() if options.to_disk else contextlib.nullcontext()
    with first, _random_state_kept(accelerator.device):
        encoded, reused = dataset.cache_latents(
            lambda images: family.encode_images(models, images),
            vae_id,
            options.to_disk,
            options.vae_batch_size,
            progress=accelerator.is_local_main_process,
        )
    if options.to_disk:
        logger.info("latent cache: %d images encoded, %d reused from cache files", encoded, reused)
    else:
        logger.info("latent cache: %d images encoded, kept in memory", encoded)
    models.vae.to("cpu")  # training reads latents from the cache only
