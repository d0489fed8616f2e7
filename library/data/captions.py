"""Captions: reading `<image stem><caption_extension>` files, and the per-sample caption transforms."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from library.errors import DatasetError


def read_caption_file(path: str) -> str:
    """The first line of a UTF-8 caption file, stripped (a byte-order mark is ignored)."""
    try:
        with open(path, encoding="utf-8-sig") as file:
            caption = file.readline().strip()
    except UnicodeDecodeError:
        raise DatasetError(f"Caption file {path} is not UTF-8 text; save it as UTF-8.") from None
    except OSError as err:
        raise DatasetError(f"Cannot read caption file {path}: {err}.") from None
    if not caption:
        raise DatasetError(
            f"Caption file {path} is empty; write a caption in it, or delete it to use the subset's class_tokens."
        )
    return caption


def read_captions(
    folder: str,
    image_names: list[str],
    folder_names: set[str],
    caption_extension: str,
    class_tokens: str | None,
    where: str,
) -> list[str]:
    """One caption per image: its caption file if present, else `class_tokens`; neither is an error.

    `folder_names` are all file names in `folder` (one listing instead of a lookup per image); `where` names the
    subset in messages.
    """
    captions = []
    for name in image_names:
        caption_name = os.path.splitext(name)[0] + caption_extension
        if caption_name in folder_names:
            captions.append(read_caption_file(os.path.join(folder, caption_name)))
        elif class_tokens is not None:
            captions.append(class_tokens)
        else:
            raise DatasetError(
                f"{where}: image {os.path.join(folder, name)} has no caption: {caption_name} does not exist and "
                "the subset sets no class_tokens. Add the caption file or set class_tokens."
            )
    return captions


@dataclass(frozen=True)
class CaptionOptions:
    """The subset options that change a caption each time it is used."""

    caption_prefix: str | None
    caption_suffix: str | None
    shuffle_caption: bool
    keep_tokens: int


def make_caption(caption: str, options: CaptionOptions, rng: np.random.Generator) -> str:
    """Add prefix and suffix, then (with shuffle_caption) shuffle the comma-separated tags after `keep_tokens`.

    The prefix and suffix take part in the shuffle, so the prefix's tags count towards `keep_tokens`.
    """
    caption = (options.caption_prefix or "") + caption + (options.caption_suffix or "")
    if not options.shuffle_caption:
        return caption
    tags = [tag.strip() for tag in caption.split(",")]
    tags = [tag for tag in tags if tag]
    kept, rest = tags[: options.keep_tokens], tags[options.keep_tokens :]
    order = rng.permutation(len(rest))
    return ", ".join(kept + [rest[i] for i in order])
