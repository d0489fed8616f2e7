"""Captions: reading caption files, merging metadata captions and tags, and the per-use caption transforms.

A stored caption may hold several lines (multi-line caption files and metadata captions with `enable_wildcard`);
`make_caption` picks one line per use, then applies prefix/suffix, dropout, wildcards, fixed parts, shuffling,
tag dropout and the secondary separator, in that order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from library.config.dataset_config import SubsetConfig
from library.errors import DatasetError

_WILDCARD = re.compile(r"\{([^{}]*)\}")
# Stand-ins for escaped braces ("{{" and "}}") while wildcards are resolved; private-use code points never occur
# in real captions.
_OPEN_ESCAPE, _CLOSE_ESCAPE = "\ue000", "\ue001"


def read_caption_file(path: str, all_lines: bool) -> str:
    """A UTF-8 caption file: its first non-empty line, or (`all_lines`) every non-empty line joined by newlines."""
    try:
        with open(path, "rb") as file:  # bytes, then decode: several times faster than text-mode line iteration
            text = file.read().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"Caption file {path} is not UTF-8 text; save it as UTF-8.") from None
    except OSError as err:
        raise DatasetError(f"Cannot read caption file {path}: {err}.") from None
    if "\x00" in text:  # UTF-16 without a byte-order mark decodes as UTF-8 with a NUL after every letter
        raise DatasetError(f"Caption file {path} holds NUL characters (saved as UTF-16?); save it as UTF-8.")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DatasetError(
            f"Caption file {path} is empty; write a caption in it, or delete it to use the subset's class_tokens."
        )
    return "\n".join(lines) if all_lines else lines[0]


def caption_file_name(image_name: str, caption_extension: str) -> str:
    """`img001.png` with `.txt` -> `img001.txt`."""
    return os.path.splitext(image_name)[0] + caption_extension


def caption_or_class_tokens(
    caption: str | None, image_path: str, caption_name: str, subset: SubsetConfig, source: str
) -> str:
    """The image's caption file text, else the subset's class_tokens; neither is an error naming the image."""
    if caption is not None:
        return caption
    if subset.class_tokens is not None:
        return subset.class_tokens
    raise DatasetError(
        f"{source}: {subset.where}: image {image_path} has no caption: {caption_name} does not exist and the "
        "subset sets no class_tokens. Add the caption file or set class_tokens."
    )


def join_string(separator: str) -> str:
    """What goes between tags when a caption is put back together: ", " for ","."""
    return separator if separator[-1:].isspace() else separator + " "


def merge_caption_and_tags(caption: str | None, tags: str | None, separator: str) -> str | None:
    """A metadata entry's caption with its tags appended to every line; tags alone when there is no caption."""
    joiner = join_string(separator)
    tags = joiner.join(line.strip() for line in tags.splitlines() if line.strip()) if tags else ""
    lines = [line.strip() for line in (caption or "").splitlines() if line.strip()]
    if not lines:
        return tags or None
    return "\n".join(f"{line}{joiner}{tags}" if tags else line for line in lines)


@dataclass(frozen=True)
class CaptionOptions:
    """The subset options that change a caption each time it is used."""

    caption_prefix: str | None = None
    caption_suffix: str | None = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str = ""
    caption_separator: str = ","
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0

    @classmethod
    def of(cls, subset: SubsetConfig) -> CaptionOptions:
        """The caption options of a subset."""
        return cls(**{name: getattr(subset, name) for name in cls.__dataclass_fields__})


def make_caption(stored: str, options: CaptionOptions, rng: np.random.Generator, epoch: int = 1) -> str:
    """The caption of one use of a sample in (1-based) `epoch`.

    1. one line of a multi-line caption (a random one with enable_wildcard, else the first);
    2. caption_prefix + line + caption_suffix, joined as written;
    3. caption dropout: every caption_dropout_every_n_epochs-th epoch, or with caption_dropout_rate, gives "";
    4. `{a|b}` wildcards resolved (with enable_wildcard; `{{` and `}}` stand for literal braces);
    5. split into a fixed head, the tags in between and a fixed tail at keep_tokens_separator, or else the first
       keep_tokens tags are the fixed head; the tags in between are shuffled (shuffle_caption) and each dropped
       with caption_tag_dropout_rate;
    6. secondary_separator replaced by caption_separator, so a group of words moves and drops as one tag.
    """
    lines = stored.split("\n")
    line = lines[int(rng.integers(len(lines)))] if options.enable_wildcard and len(lines) > 1 else lines[0]
    caption = (options.caption_prefix or "") + line + (options.caption_suffix or "")
    if _dropped(options, rng, epoch):
        return ""
    if options.enable_wildcard:
        caption = resolve_wildcards(caption, rng)
    caption = _arrange_tags(caption, options, rng)
    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.caption_separator)
    return caption


def _dropped(options: CaptionOptions, rng: np.random.Generator, epoch: int) -> bool:
    every = options.caption_dropout_every_n_epochs
    if every > 0 and epoch % every == 0:
        return True
    return options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate


def resolve_wildcards(caption: str, rng: np.random.Generator) -> str:
    """Replace each `{a|b|c}` by one of its choices; `{{` and `}}` become literal braces."""
    caption = caption.replace("{{", _OPEN_ESCAPE).replace("}}", _CLOSE_ESCAPE)

    def choose(match: re.Match[str]) -> str:
        choices = match.group(1).split("|")
        return choices[int(rng.integers(len(choices)))]

    caption = _WILDCARD.sub(choose, caption)
    return caption.replace(_OPEN_ESCAPE, "{").replace(_CLOSE_ESCAPE, "}")


def _split_tags(text: str, separator: str) -> list[str]:
    return [tag for tag in (part.strip() for part in text.split(separator)) if tag]


def _arrange_tags(caption: str, options: CaptionOptions, rng: np.random.Generator) -> str:
    separator, keep_separator = options.caption_separator, options.keep_tokens_separator
    has_fixed_parts = bool(keep_separator) and keep_separator in caption
    rearranges = options.shuffle_caption or options.caption_tag_dropout_rate > 0
    if not rearranges and not has_fixed_parts:
        return caption
    if has_fixed_parts:
        head, _, rest = caption.partition(keep_separator)
        middle, _, tail = rest.partition(keep_separator)
        # A third separator has no meaning of its own; its text stays in the tail.
        tail = tail.replace(keep_separator, separator)
        head_tags, tags, tail_tags = (_split_tags(part, separator) for part in (head, middle, tail))
    else:
        tags = _split_tags(caption, separator)
        head_tags, tags, tail_tags = tags[: options.keep_tokens], tags[options.keep_tokens :], []
    if options.shuffle_caption:
        tags = [tags[i] for i in rng.permutation(len(tags))]
    if options.caption_tag_dropout_rate > 0:
        keep = rng.random(len(tags)) >= options.caption_tag_dropout_rate
        tags = [tag for tag, kept in zip(tags, keep, strict=True) if kept]
    return join_string(separator).join(head_tags + tags + tail_tags)
