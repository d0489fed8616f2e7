"""Text-encoder output cache: every caption of a dataset encoded once before training, kept in memory and
optionally on disk next to its image, keyed by content (the caption and the encoders), so a changed caption or
another model never reuses a stale file.

Caching needs each image to have one fixed caption, so options that change captions at every use are refused.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from library.data.cache_files import (
    read_header,
    read_tensors,
    tensors_fingerprint,  # noqa: F401 (kept importable from here, its first home)
    write_cache_file,
)
from library.data.captions import CaptionOptions, make_caption
from library.errors import ConfigError

logger = logging.getLogger(__name__)

# Subset options that make a caption differ between uses, with the test telling whether a value does so.
VARIABLE_CAPTION_OPTIONS: dict[str, Callable[[object], bool]] = {
    "shuffle_caption": bool,
    "caption_dropout_rate": lambda value: (value or 0) > 0,
    "caption_dropout_every_n_epochs": lambda value: (value or 0) > 0,
    "caption_tag_dropout_rate": lambda value: (value or 0) > 0,
    "enable_wildcard": bool,
}
CACHE_KEY = "text_cache_key"  # safetensors metadata entry holding the content key of a cache file

Encoder = Callable[[list[str]], dict[str, torch.Tensor]]  # captions -> tensors with the batch first


def add_text_cache_arguments(parser: argparse.ArgumentParser, file_suffix: str) -> None:
    """The caching options of a family whose text-encoder outputs can be cached (`file_suffix` names disk files)."""
    parser.add_argument(
        "--cache_text_encoder_outputs",
        action="store_true",
        help="encode every caption once before training and free the text encoders' device memory; the text "
        "encoders cannot train, and captions must not change between uses (no shuffle_caption, caption dropout or "
        "wildcards)",
    )
    parser.add_argument(
        "--cache_text_encoder_outputs_to_disk",
        action="store_true",
        help=f"like --cache_text_encoder_outputs, and keep the outputs next to each image (<image>{file_suffix}), "
        "reused while caption, settings and text encoders stay the same",
    )


@dataclass(frozen=True)
class TextCacheOptions:
    """Typed text-encoder output caching options; `file_suffix` None: the family cannot cache."""

    enabled: bool = False
    to_disk: bool = False
    file_suffix: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, file_suffix: str | None) -> TextCacheOptions:
        if file_suffix is None:
            return cls()
        to_disk = args.cache_text_encoder_outputs_to_disk
        return cls(args.cache_text_encoder_outputs or to_disk, to_disk, file_suffix)

    @property
    def option(self) -> str:
        return "--cache_text_encoder_outputs" + ("_to_disk" if self.to_disk else "")

    def check_run(self, dataset, trains_text_encoder: bool) -> None:
        """Refuse what caching cannot serve: text encoders that train, captions that change between uses."""
        if not self.enabled:
            return
        if trains_text_encoder:
            raise ConfigError(
                f"{self.option} fixes the text encoders' outputs, so the text encoders cannot train: add "
                "--network_train_unet_only (LoRA), or leave out --train_text_encoder (fine-tuning)"
            )
        check_fixed_captions(dataset, self.option)


def check_fixed_captions(group, option: str) -> None:
    """Raise ConfigError naming the subset and option when a subset's captions change between uses."""
    for dataset in group.datasets:
        for subset in dataset.subsets:
            varying = [name for name, test in VARIABLE_CAPTION_OPTIONS.items() if test(getattr(subset, name, None))]
            if varying:
                raise ConfigError(
                    f"{dataset.source}: {subset.where} sets {', '.join(varying)}, which changes the caption at every "
                    f"use, but {option} encodes each caption once. Remove {option} or those subset options."
                )


def fixed_captions(group) -> list[tuple[str, str]]:
    """(image path, caption) of every image of every dataset, captions as the dataset engine makes them."""
    rng = np.random.default_rng(0)  # unused: the captions have no random part (check_fixed_captions)
    items = []
    for dataset in group.datasets:
        options = [CaptionOptions.of(subset) for subset in dataset.subsets]
        for index, (path, stored) in enumerate(zip(dataset.image_paths, dataset.captions, strict=True)):
            items.append((path, make_caption(stored, options[int(dataset.subset_of_image[index])], rng)))
    return items


def content_key(fingerprint: str, caption: str) -> str:
    """The key of one cache entry: the encoders' fingerprint and the caption, hashed."""
    return hashlib.sha256(f"{fingerprint}\0{caption}".encode()).hexdigest()


class TextOutputCache:
    """Encoded captions by caption text (CPU tensors without the batch dimension)."""

    def __init__(self, fingerprint: str, file_suffix: str | None = None) -> None:
        self.fingerprint = fingerprint
        self.file_suffix = file_suffix  # e.g. "_sdxl_te.safetensors"; None keeps the cache in memory only
        self.entries: dict[str, dict[str, torch.Tensor]] = {}

    def cache_path(self, image_path: str) -> str:
        return os.path.splitext(image_path)[0] + self.file_suffix

    def fill(self, items: Iterable[tuple[str, str]], encode: Encoder, batch_size: int = 8) -> tuple[int, int]:
        """Encode the captions not cached yet; returns (captions encoded, files read). Writes missing files."""
        files_read = 0
        pending: dict[str, list[str]] = {}  # caption -> image paths whose cache file must be (re)written
        for path, caption in items:
            if self.file_suffix is None:
                pending.setdefault(caption, [])
            elif self._valid_file(path, caption):
                files_read += caption not in self.entries and self._read(path, caption)
            else:
                pending.setdefault(caption, []).append(path)
        captions = [caption for caption in pending if caption not in self.entries]
        for start in range(0, len(captions), batch_size):
            chunk = captions[start : start + batch_size]
            with torch.no_grad():
                outputs = encode(chunk)
            for row, caption in enumerate(chunk):
                self.entries[caption] = {name: value[row].detach().cpu().clone() for name, value in outputs.items()}
        for caption, paths in pending.items():
            for path in paths:
                self._write(path, caption)
        return len(captions), files_read

    def lookup(self, captions: list[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        """The cached outputs of a batch's captions, stacked on `device`."""
        missing = [caption for caption in captions if caption not in self.entries]
        if missing:
            raise RuntimeError(
                f"text-encoder cache has no entry for caption {missing[0]!r}; it was filled from "
                "other captions than the dataset produces"
            )
        names = self.entries[captions[0]].keys()
        return {name: torch.stack([self.entries[c][name] for c in captions]).to(device) for name in names}

    def _file_key(self, path: str) -> str | None:
        header = read_header(self.cache_path(path))  # a damaged file reads as missing and is rewritten
        return None if header is None else header.metadata.get(CACHE_KEY)

    def _valid_file(self, path: str, caption: str) -> bool:
        return self._file_key(path) == content_key(self.fingerprint, caption)

    def _read(self, path: str, caption: str) -> bool:
        self.entries[caption] = read_tensors(self.cache_path(path))
        return True

    def _write(self, path: str, caption: str) -> None:
        key = content_key(self.fingerprint, caption)
        write_cache_file(self.cache_path(path), self.entries[caption], {CACHE_KEY: key})


def cache_text_outputs(
    options: TextCacheOptions, dataset, text_encoders, fingerprint: str, encode: Encoder
) -> tuple[TextOutputCache, tuple[int, int]]:
    """Encode (or read back) every fixed caption of `dataset` once, then move the text encoders off the device.

    Returns the filled cache and (captions encoded, cache files read).
    """
    from library.training.parallel import main_process_first

    cache = TextOutputCache(fingerprint, options.file_suffix if options.to_disk else None)
    # with several processes the main one writes the cache files and the others then read them
    with main_process_first() if options.to_disk else contextlib.nullcontext():
        encoded, read = cache.fill(fixed_captions(dataset), encode)
    logger.info("text-encoder outputs cached: %d captions encoded, %d read from disk", encoded, read)
    for encoder in text_encoders:  # no longer needed on the device
        encoder.to("cpu")
    return cache, (encoded, read)
