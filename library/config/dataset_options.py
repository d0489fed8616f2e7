"""The table of dataset-config options: validator, default, where each may be written, and its allowed values.

Adding an option means adding one row here and one field to the matching dataclass in `dataset_config.py`; the
command-line flag (where the option has one) is generated from the same row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import voluptuous as vol

Level = Literal["general", "dataset", "subset"]
Scope = Literal["dataset", "subset"]
# Which kind of subset an option is meant for: DreamBooth subsets read an image folder (captions from files),
# fine-tuning subsets read a metadata file. "any" options work for both.
Kind = Literal["any", "dreambooth", "finetune"]

ALL_LEVELS: frozenset[Level] = frozenset({"general", "dataset", "subset"})
DATASET_LEVELS: frozenset[Level] = frozenset({"general", "dataset"})
SUBSET_ONLY: frozenset[Level] = frozenset({"subset"})

RESIZE_INTERPOLATIONS: tuple[str, ...] = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


@dataclass(frozen=True)
class OptionSpec:
    """One option: `scope` says which object it configures, `levels` which tables may set it.

    `cli` is the command-line flag that sets it (None: config file only) and `parse_cli` turns the flag's text
    into the value the validator expects (None: a switch without value).
    """

    name: str
    validate: Callable[[Any], Any]
    allowed: str
    scope: Scope
    levels: frozenset[Level]
    default: Any = None
    help: str = ""
    kind: Kind = "any"
    cli: str | None = None
    parse_cli: Callable[[str], Any] | None = None


def _int_at_least(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        # bool is a subclass of int in Python; `num_repeats = true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise vol.Invalid(f"expected an integer >= {minimum}")
        return value

    return check


def _probability(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise vol.Invalid("expected a number from 0 to 1")
    return float(value)


def _fraction_below_one(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise vol.Invalid("expected a number from 0 up to (not including) 1")
    return float(value)


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
    if isinstance(value, (list, tuple)) and len(value) == 2:
        try:
            return positive(value[0]), positive(value[1])
        except vol.Invalid:
            pass
    elif not isinstance(value, (list, tuple)):
        try:
            side = positive(value)
            return side, side
        except vol.Invalid:
            pass
    raise vol.Invalid("expected a positive integer or [width, height]")


def _face_range(value: Any) -> tuple[float, float]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        low, high = value
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if numbers and 0 < low <= high:
            return float(low), float(high)
    raise vol.Invalid("expected [min, max] with 0 < min <= max")


def _interpolation(value: Any) -> str:
    if value not in RESIZE_INTERPOLATIONS:
        raise vol.Invalid("expected one of " + ", ".join(RESIZE_INTERPOLATIONS))
    return value


def _cli_int(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text  # the validator reports it with the allowed values


def _cli_float(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def _cli_pair(number: Callable[[str], Any]) -> Callable[[str], Any]:
    """'512' -> 512, '512,768' -> [512, 768] (the seed guide writes command-line sizes as "width,height")."""

    def parse(text: str) -> Any:
        parts = [part.strip() for part in text.split(",")]
        return number(parts[0]) if len(parts) == 1 else [number(part) for part in parts]

    return parse


def _cli_list(number: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: [number(part.strip()) for part in text.split(",")]


def _cli_text(text: str) -> str:
    return text


SWITCH = "switch"  # `cli=SWITCH`: a true/false option whose flag takes no value


def _flag(name: str, cli: Callable[[str], Any] | str | None, flag: str | None) -> tuple[str | None, Any]:
    if cli is None:
        return None, None
    return flag or f"--{name}", None if cli == SWITCH else cli


def _dataset_option(
    name: str,
    validate: Callable[[Any], Any],
    allowed: str,
    default: Any,
    help: str,
    cli: Callable[[str], Any] | str | None = None,
    flag: str | None = None,
) -> OptionSpec:
    """A [general]/[[datasets]] option; `cli` is the flag's parser (or SWITCH), `flag` its name if not --name."""
    cli_name, parse = _flag(name, cli, flag)
    return OptionSpec(name, validate, allowed, "dataset", DATASET_LEVELS, default, help, "any", cli_name, parse)


def _subset_option(
    name: str,
    validate: Callable[[Any], Any],
    allowed: str,
    default: Any,
    help: str,
    cli: Callable[[str], Any] | str | None = None,
    flag: str | None = None,
    levels: frozenset[Level] = ALL_LEVELS,
    kind: Kind = "any",
) -> OptionSpec:
    """An option of subsets, settable at `levels` (default: all three tables)."""
    cli_name, parse = _flag(name, cli, flag)
    return OptionSpec(name, validate, allowed, "subset", levels, default, help, kind, cli_name, parse)


_POSITIVE = "an integer >= 1"
_NATURAL = "an integer >= 0"
_BOOL = "true or false"
_PROBABILITY = "a number from 0 to 1"
_FOLDER = "a folder path (string)"
_INTERPOLATIONS = "one of " + ", ".join(RESIZE_INTERPOLATIONS)
_DB, _FT = "dreambooth", "finetune"

# Defaults follow the seed guide and the matching command-line options (`--caption_extension` is ".caption",
# buckets span 256..1024 in steps of 64). `resolution` has no default: every dataset must state it (fine-tuning
# datasets whose latents were prepared with prepare_buckets_latents.py take their sizes from the metadata).
OPTIONS: tuple[OptionSpec, ...] = (
    _dataset_option(
        "resolution",
        _resolution,
        "a positive integer or [width, height]",
        None,
        "512 or width,height",
        _cli_pair(_cli_int),
    ),
    _dataset_option("batch_size", _int_at_least(1), _POSITIVE, 1, "images per batch", _cli_int, "--train_batch_size"),
    _dataset_option("enable_bucket", _boolean, _BOOL, False, "aspect-ratio bucketing", SWITCH),
    _dataset_option("min_bucket_reso", _int_at_least(1), _POSITIVE, 256, "smallest bucket side", _cli_int),
    _dataset_option("max_bucket_reso", _int_at_least(1), _POSITIVE, 1024, "largest bucket side", _cli_int),
    _dataset_option("bucket_reso_steps", _int_at_least(1), _POSITIVE, 64, "bucket sides are multiples of it", _cli_int),
    _dataset_option("bucket_no_upscale", _boolean, _BOOL, False, "never enlarge images to fit a bucket", SWITCH),
    _dataset_option(
        "validation_split",
        _fraction_below_one,
        "a number from 0 up to (not including) 1",
        0.0,
        "share of the training images held out for the validation loss",
        _cli_float,
    ),
    _dataset_option(
        "validation_seed",
        _int_at_least(0),
        _NATURAL,
        None,
        "seed choosing the validation images (default --seed)",
        _cli_int,
    ),
    _subset_option("image_dir", _non_empty_string, _FOLDER, None, "folder of the images", levels=SUBSET_ONLY),
    _subset_option(
        "metadata_file",
        _non_empty_string,
        "a metadata .json file path (string)",
        None,
        "fine-tuning metadata",
        levels=SUBSET_ONLY,
        kind=_FT,
    ),
    _subset_option(
        "class_tokens",
        _string,
        "a string such as 'sks girl'",
        None,
        "caption of images without a caption file",
        levels=SUBSET_ONLY,
        kind=_DB,
    ),
    _subset_option("is_reg", _boolean, _BOOL, False, "regularization images", levels=SUBSET_ONLY, kind=_DB),
    _subset_option("is_val", _boolean, _BOOL, False, "validation images, never trained on", levels=SUBSET_ONLY),
    _subset_option(
        "conditioning_data_dir",
        _non_empty_string,
        _FOLDER,
        None,
        "mask images (R channel = loss weight)",
        levels=SUBSET_ONLY,
        kind=_DB,
    ),
    _subset_option(
        "caption_extension",
        _non_empty_string,
        "a file extension such as '.txt'",
        ".caption",
        "extension of caption files",
        _cli_text,
        kind=_DB,
    ),
    _subset_option(
        "cache_info", _boolean, _BOOL, False, "keep image sizes and captions in metadata_cache.json", SWITCH, kind=_DB
    ),
    _subset_option(
        "num_repeats", _int_at_least(1), _POSITIVE, 1, "uses of each image per epoch", _cli_int, "--dataset_repeats"
    ),
    _subset_option("shuffle_caption", _boolean, _BOOL, False, "shuffle the tags of captions", SWITCH),
    _subset_option("keep_tokens", _int_at_least(0), _NATURAL, 0, "leading tags that stay in place", _cli_int),
    _subset_option("keep_tokens_separator", _string, "a string such as '|||'", "", "ends fixed parts", _cli_text),
    _subset_option("secondary_separator", _string, "a string such as ';;;'", "", "joins words into one tag", _cli_text),
    _subset_option("caption_separator", _non_empty_string, "a non-empty string", ",", "separates tags", _cli_text),
    _subset_option("caption_prefix", _string, "a string", None, "text before every caption", _cli_text),
    _subset_option("caption_suffix", _string, "a string", None, "text after every caption", _cli_text),
    _subset_option("enable_wildcard", _boolean, _BOOL, False, "{a|b} wildcards, multi-line captions", SWITCH),
    _subset_option(
        "caption_dropout_rate", _probability, _PROBABILITY, 0.0, "chance of training without caption", _cli_float
    ),
    _subset_option(
        "caption_dropout_every_n_epochs", _int_at_least(0), _NATURAL, 0, "every N-th epoch without captions", _cli_int
    ),
    _subset_option(
        "caption_tag_dropout_rate", _probability, _PROBABILITY, 0.0, "chance to leave out each tag", _cli_float
    ),
    _subset_option("flip_aug", _boolean, _BOOL, False, "mirror half of the samples", SWITCH),
    _subset_option("color_aug", _boolean, _BOOL, False, "shift the hue slightly", SWITCH),
    _subset_option("random_crop", _boolean, _BOOL, False, "crop at a random place, not the centre", SWITCH),
    _subset_option(
        "face_crop_aug_range",
        _face_range,
        "[min, max] with 0 < min <= max",
        None,
        "zoom range around faces",
        _cli_list(_cli_float),
    ),
    _subset_option("resize_interpolation", _interpolation, _INTERPOLATIONS, None, "resize filter", _cli_text),
    _subset_option("alpha_mask", _boolean, _BOOL, False, "alpha channel as loss mask", SWITCH),
    _subset_option("skip_corrupt_images", _boolean, _BOOL, False, "leave out damaged images, warn", SWITCH),
)

OPTIONS_BY_NAME: dict[str, OptionSpec] = {spec.name: spec for spec in OPTIONS}


def options_at(level: Level) -> tuple[OptionSpec, ...]:
    """The options that may be written in the table of `level`."""
    return tuple(spec for spec in OPTIONS if level in spec.levels)


def options_of(scope: Scope) -> tuple[OptionSpec, ...]:
    """The options that end up in a dataset (`scope="dataset"`) or a subset (`scope="subset"`)."""
    return tuple(spec for spec in OPTIONS if spec.scope == scope)


def command_line_options() -> tuple[OptionSpec, ...]:
    """The options that also have a command-line flag."""
    return tuple(spec for spec in OPTIONS if spec.cli is not None)
