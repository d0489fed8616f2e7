"""WD14 tagger outputs -> tag lists: the tag table (`selected_tags.csv`), thresholds and the ordering rules."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from library.errors import CheckpointError

RATING_CATEGORY = 9  # general / sensitive / questionable / explicit
CHARACTER_CATEGORY = 4
SHORT_TAG_LENGTH = 3  # tags this short keep their underscores: they are emoticons such as "^_^" or "o_o"


@dataclass(frozen=True)
class TagTable:
    """The tagger's output classes, in output order."""

    names: list[str]
    categories: np.ndarray  # (N,) int


def read_tag_table(path: str) -> TagTable:
    """Read `selected_tags.csv` (columns include `name` and `category`)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise CheckpointError(f"cannot read the tag list {path}: {err}.") from None
    if not rows or "name" not in rows[0] or "category" not in rows[0]:
        raise CheckpointError(f"{path} is not a tagger tag list: it needs a header with 'name' and 'category'.")
    try:
        categories = np.array([int(row["category"]) for row in rows], dtype=np.int64)
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: the 'category' column must hold integers.") from None
    return TagTable(names=[row["name"] for row in rows], categories=categories)


@dataclass(frozen=True)
class TagOptions:
    """How probabilities become the tag list of one image."""

    general_threshold: float
    character_threshold: float
    remove_underscore: bool = False
    undesired_tags: frozenset[str] = frozenset()
    character_tags_first: bool = False
    character_tag_expand: bool = False
    use_rating_tags: bool = False
    use_rating_tags_as_last_tag: bool = False
    always_first_tags: tuple[str, ...] = ()


def split_tag_list(text: str, separator: str) -> list[str]:
    """Tags of a separator-joined list, stripped, empty ones dropped (`--undesired_tags`, existing tag files)."""
    mark = separator.strip() or separator
    return [tag.strip() for tag in text.split(mark) if tag.strip()]


def display_name(tag: str, options: TagOptions) -> str:
    """The tag as written: with `remove_underscore`, underscores become spaces except in short emoticon tags."""
    if options.remove_underscore and len(tag) > SHORT_TAG_LENGTH:
        return tag.replace("_", " ")
    return tag


def character_names(tag: str, options: TagOptions) -> list[str]:
    """A character tag; with `character_tag_expand`, "name_(series)" becomes the two tags "name" and "series"."""
    if options.character_tag_expand and tag.endswith(")") and "_(" in tag:
        name, series = tag[:-1].rsplit("_(", 1)
        return [display_name(name, options), display_name(series, options)]
    return [display_name(tag, options)]


def _above(probabilities: np.ndarray, mask: np.ndarray, threshold: float) -> list[int]:
    """Indices where `mask` holds and the probability reaches `threshold`, most confident first."""
    chosen = np.flatnonzero(mask & (probabilities >= threshold))
    return chosen[np.argsort(-probabilities[chosen], kind="stable")].tolist()


def select_tags(probabilities: np.ndarray, table: TagTable, options: TagOptions) -> list[str]:
    """Tags of one image (probabilities (N,)), in this order: `always_first_tags` present, rating (unless it goes
    last), then general and character tags (characters first with `character_tags_first`), each group most
    confident first. Undesired tags (written with underscores or spaces) are left out."""
    is_rating = table.categories == RATING_CATEGORY
    is_character = table.categories == CHARACTER_CATEGORY
    other = ~(is_rating | is_character)
    general = [display_name(table.names[i], options) for i in _above(probabilities, other, options.general_threshold)]
    characters = [
        name
        for i in _above(probabilities, is_character, options.character_threshold)
        for name in character_names(table.names[i], options)
    ]
    body = characters + general if options.character_tags_first else general + characters
    rating: list[str] = []
    if options.use_rating_tags and is_rating.any():
        ratings = np.flatnonzero(is_rating)
        rating = [display_name(table.names[ratings[np.argmax(probabilities[ratings])]], options)]
    tags = body + rating if options.use_rating_tags_as_last_tag else rating + body
    undesired = {form for tag in options.undesired_tags for form in spellings(tag, options)}
    return move_first(unique(tag for tag in tags if tag not in undesired), first_tags(options))


def spellings(tag: str, options: TagOptions) -> tuple[str, ...]:
    """A tag named by the user as it may appear in the output: as written, and as the tagger's tag would be written
    (so "long hair" and "long_hair" name the same tag)."""
    return tuple(dict.fromkeys((display_name(tag.replace(" ", "_"), options), tag)))


def first_tags(options: TagOptions) -> tuple[str, ...]:
    """`always_first_tags` in every spelling, in the user's order."""
    return tuple(form for tag in options.always_first_tags for form in spellings(tag, options))


def unique(tags: Iterable[str]) -> list[str]:
    """The tags in order, each once."""
    return list(dict.fromkeys(tags))


def move_first(tags: list[str], first: tuple[str, ...]) -> list[str]:
    """`tags` with those named in `first` moved to the front, in the order of `first`."""
    present = set(tags)
    front = [tag for tag in first if tag in present]
    return unique(front + tags)


def append_to_existing(existing: list[str], new: list[str], options: TagOptions) -> list[str]:
    """`--append_tags`: the tags already in the file keep their order; new tags follow, each once; then
    `always_first_tags` move to the front."""
    return move_first(unique(existing + new), first_tags(options))
