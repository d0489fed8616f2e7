"""The table of dataset-config options: validator, default, where each may be written, and its allowed values.

Adding an option means adding one row here and one field to the matching dataclass in `dataset_config.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import voluptuous as vol

Level = Literal["general", "dataset", "subset"]
Scope = Literal["dataset", "subset"]

ALL_LEVELS: frozenset[Level] = frozenset({"general", "dataset", "subset"})
DATASET_LEVELS: frozenset[Level] = frozenset({"general", "dataset"})
SUBSET_ONLY: frozenset[Level] = frozenset({"subset"})


@dataclass(frozen=True)
class OptionSpec:
    """One option: `scope` says which object it configures, `levels` which tables may set it."""

    name: str
    validate: Callable[[Any], Any]
    allowed: str
    scope: Scope
    levels: frozenset[Level]
    default: Any = None


def _int_at_least(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        # bool is a subclass of int in Python; `num_repeats = true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise vol.Invalid(f"expected an integer >= {minimum}")
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise vol.Invalid("expected true or false")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise vol.Invalid("expected a string")
    return value


def _non_empty_string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise vol.Invalid("expected a non-empty string")
    return value


def _resolution(value: Any) -> tuple[int, int]:
    """`512` means 512x512; `[512, 768]` means width 512, height 768."""
    positive = _int_at_least(1)
    if isinstance(value, list) and len(value) == 2:
        try:
            return positive(value[0]), positive(value[1])
        except vol.Invalid:
            pass
    elif not isinstance(value, list):
        try:
            side = positive(value)
            return side, side
        except vol.Invalid:
            pass
    raise vol.Invalid("expected a positive integer or [width, height]")


def _dataset_option(name: str, validate: Callable[[Any], Any], allowed: str, default: Any) -> OptionSpec:
    return OptionSpec(name, validate, allowed, "dataset", DATASET_LEVELS, default)


def _subset_option(
    name: str, validate: Callable[[Any], Any], allowed: str, default: Any, levels: frozenset[Level] = ALL_LEVELS
) -> OptionSpec:
    return OptionSpec(name, validate, allowed, "subset", levels, default)


_POSITIVE = "an integer >= 1"
_BOOL = "true or false"

# Defaults follow the seed guide and the matching command-line options (`--caption_extension` is ".caption",
# buckets span 256..1024 in steps of 64). `resolution` has no default: every dataset must state it.
OPTIONS: tuple[OptionSpec, ...] = (
    _dataset_option("resolution", _resolution, "a positive integer or [width, height]", None),
    _dataset_option("batch_size", _int_at_least(1), _POSITIVE, 1),
    _dataset_option("enable_bucket", _boolean, _BOOL, False),
    _dataset_option("min_bucket_reso", _int_at_least(1), _POSITIVE, 256),
    _dataset_option("max_bucket_reso", _int_at_least(1), _POSITIVE, 1024),
    _dataset_option("bucket_reso_steps", _int_at_least(1), _POSITIVE, 64),
    _dataset_option("bucket_no_upscale", _boolean, _BOOL, False),
    _subset_option("image_dir", _non_empty_string, "a folder path (string)", None, SUBSET_ONLY),
    _subset_option("class_tokens", _string, "a string such as 'sks girl'", None, SUBSET_ONLY),
    _subset_option("is_reg", _boolean, _BOOL, False, SUBSET_ONLY),
    _subset_option("caption_extension", _non_empty_string, "a file extension such as '.txt'", ".caption"),
    _subset_option("num_repeats", _int_at_least(1), _POSITIVE, 1),
    _subset_option("shuffle_caption", _boolean, _BOOL, False),
    _subset_option("keep_tokens", _int_at_least(0), "an integer >= 0", 0),
    _subset_option("flip_aug", _boolean, _BOOL, False),
    _subset_option("caption_prefix", _string, "a string", None),
    _subset_option("caption_suffix", _string, "a string", None),
)

OPTIONS_BY_NAME: dict[str, OptionSpec] = {spec.name: spec for spec in OPTIONS}


def options_at(level: Level) -> tuple[OptionSpec, ...]:
    """The options that may be written in the table of `level`."""
    return tuple(spec for spec in OPTIONS if level in spec.levels)


def options_of(scope: Scope) -> tuple[OptionSpec, ...]:
    """The options that end up in a dataset (`scope="dataset"`) or a subset (`scope="subset"`)."""
    return tuple(spec for spec in OPTIONS if spec.scope == scope)
