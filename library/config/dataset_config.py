"""Load a dataset config (TOML or JSON): validate each table, merge [general] < [[datasets]] < [[datasets.subsets]].

The result is a `DatasetGroupConfig` of typed, frozen dataclasses; errors are `ConfigError`s naming the file,
the table path (`datasets[0].subsets[1].num_repeats`), the bad value and the allowed values.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import voluptuous as vol

from library.config.dataset_options import OPTIONS_BY_NAME, Level, options_at, options_of
from library.errors import ConfigError

logger = logging.getLogger(__name__)

_TABLE_NAMES: dict[Level, str] = {"general": "[general]", "dataset": "[[datasets]]", "subset": "[[datasets.subsets]]"}
_CONTAINERS: dict[str, str] = {
    "general": "a table: [general]",
    "datasets": "an array of tables: [[datasets]]",
    "subsets": "an array of tables: [[datasets.subsets]]",
}


@dataclass(frozen=True)
class SubsetConfig:
    """One image folder or metadata file and how its images and captions are used. Field names are the options."""

    image_dir: Path | None
    metadata_file: Path | None  # set: a fine-tuning subset; None: a DreamBooth subset
    class_tokens: str | None
    is_reg: bool
    conditioning_data_dir: Path | None
    caption_extension: str
    cache_info: bool
    num_repeats: int
    shuffle_caption: bool
    keep_tokens: int
    keep_tokens_separator: str
    secondary_separator: str
    caption_separator: str
    caption_prefix: str | None
    caption_suffix: str | None
    enable_wildcard: bool
    caption_dropout_rate: float
    caption_dropout_every_n_epochs: int
    caption_tag_dropout_rate: float
    flip_aug: bool
    color_aug: bool
    random_crop: bool
    face_crop_aug_range: tuple[float, float] | None
    resize_interpolation: str | None
    alpha_mask: bool
    skip_corrupt_images: bool
    where: str  # table path for messages, e.g. "datasets[0].subsets[1]"
    is_val: bool = False  # validation images: held out of training, used for the validation loss

    @property
    def is_finetune(self) -> bool:
        """Fine-tuning subsets take captions (and optionally latents) from a metadata file."""
        return self.metadata_file is not None


@dataclass(frozen=True)
class DatasetConfig:
    """Options shared by the subsets of one [[datasets]] table."""

    resolution: tuple[int, int] | None  # (width, height); None only for fine-tuning datasets with prepared latents
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    subsets: tuple[SubsetConfig, ...]
    where: str  # e.g. "datasets[0]"
    validation_split: float = 0.0  # share of the non-reg, non-is_val images held out for validation
    validation_seed: int | None = None  # seed of that choice; None: the run's seed


@dataclass(frozen=True)
class DatasetGroupConfig:
    """Every dataset of a run; `source` names where they came from (the config file) for messages."""

    source: str
    datasets: tuple[DatasetConfig, ...]


def load_dataset_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> DatasetGroupConfig:
    """Read, validate and merge a dataset config file.

    `overrides` are values that rank below [general] (the seed guide: the config file wins over command-line
    options of the same name); keys must be option names.
    """
    path = Path(path)
    return parse_dataset_config(_read_file(path), str(path), overrides)


def parse_dataset_config(data: Any, source: str, overrides: Mapping[str, Any] | None = None) -> DatasetGroupConfig:
    """Validate and merge already-parsed config data; `source` is used in error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of [general] and [[datasets]] at the top level.")
    try:
        validated = _top_schema()(data)
    except vol.MultipleInvalid as err:
        lines = [_describe_error(error, data) for error in err.errors]
        raise ConfigError(_join_messages(source, lines)) from None
    general = validated.get("general", {})
    base = {spec.name: spec.default for spec in OPTIONS_BY_NAME.values()} | _validate_overrides(overrides or {})
    datasets_data = validated.get("datasets", [])
    if not datasets_data:
        raise ConfigError(f"{source}: no [[datasets]] table; add one with at least one [[datasets.subsets]].")
    datasets = tuple(
        _build_dataset(base | general | dataset_data, dataset_data, f"datasets[{index}]", source)
        for index, dataset_data in enumerate(datasets_data)
    )
    return DatasetGroupConfig(source=source, datasets=datasets)


def _read_file(path: Path) -> Any:
    if path.is_dir():
        raise ConfigError(f"--dataset_config {path} is a folder; give the .toml or .json dataset config file")
    if not path.is_file():
        raise ConfigError(f"Dataset config file {path} does not exist (--dataset_config).")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"Cannot read dataset config {path}: {err}.") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        hint = ""
        if "escape" in str(err).lower():
            hint = " Write Windows paths in single quotes, e.g. image_dir = 'C:\\images', so backslashes stay as-is."
        raise ConfigError(f"{path} is not valid TOML: {err}.{hint}") from None


def _validate_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    result = {}
    for name, value in overrides.items():
        if value is None:
            continue
        spec = OPTIONS_BY_NAME[name]
        try:
            result[name] = spec.validate(value)
        except vol.Invalid as err:
            raise ConfigError(f"{spec.cli or name} {_show(value)} is invalid: {err.msg}.") from None
    return result


# ---------------------------------------------------------------------------------------------------------------
# Schema and error messages


def _level_fields(level: Level) -> dict[Any, Any]:
    return {vol.Optional(spec.name): spec.validate for spec in options_at(level)}


def _top_schema() -> vol.Schema:
    subset = vol.Schema(_level_fields("subset"))
    dataset = vol.Schema(_level_fields("dataset") | {vol.Optional("subsets"): [subset]})
    general = vol.Schema(_level_fields("general"))
    return vol.Schema({vol.Optional("general"): general, vol.Optional("datasets"): [dataset]})


def _table_path(path: list[Any]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "the top level"


def _level_of(table: list[Any]) -> Level | None:
    """Which kind of table a path (without the key) points into; None for the top level."""
    if table == ["general"]:
        return "general"
    if len(table) == 2 and table[0] == "datasets":
        return "dataset"
    if len(table) == 4 and table[2] == "subsets":
        return "subset"
    return None


def _lookup(data: Any, path: list[Any]) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _describe_error(error: vol.Invalid, data: Any) -> str:
    path = list(error.path)
    key = path[-1] if path else None
    if error.error_message == "extra keys not allowed":
        return _describe_unknown_key(str(key), path[:-1])
    value = _lookup(data, path)
    if isinstance(key, str) and key in _CONTAINERS:
        return f"{_table_path(path)} = {_show(value)} is invalid: expected {_CONTAINERS[key]}."
    if isinstance(key, int):
        return f"{_table_path(path)} = {_show(value)} is invalid: expected a table."
    spec = OPTIONS_BY_NAME.get(str(key))
    allowed = f"expected {spec.allowed}" if spec else error.error_message
    return f"{_table_path(path)} = {_show(value)} is invalid: {allowed}."


def _describe_unknown_key(key: str, table: list[Any]) -> str:
    level = _level_of(table)
    where = _table_path(table)
    spec = OPTIONS_BY_NAME.get(key)
    if spec is not None and level is not None:
        allowed_in = " or ".join(_TABLE_NAMES[lvl] for lvl in ("general", "dataset", "subset") if lvl in spec.levels)
        return f"{where}: option '{key}' cannot be set in {_TABLE_NAMES[level]}; it belongs in {allowed_in}."
    candidates = _keys_at(level)
    kind = "table" if level is None else "option"
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return f"{where}: unknown {kind} '{key}'; did you mean '{close[0]}'?"
    return f"{where}: unknown {kind} '{key}'. Allowed here: {', '.join(sorted(candidates))}."


def _keys_at(level: Level | None) -> list[str]:
    if level is None:
        return ["general", "datasets"]
    keys = [spec.name for spec in options_at(level)]
    return keys + ["subsets"] if level == "dataset" else keys


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "{...}"
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _join_messages(source: str, lines: list[str]) -> str:
    if len(lines) == 1:
        return f"{source}: {lines[0]}"
    return f"{source} has {len(lines)} errors:\n" + "\n".join(f"  {line}" for line in lines)


# ---------------------------------------------------------------------------------------------------------------
# Merging and cross-checks


def _build_dataset(values: dict[str, Any], dataset_data: dict[str, Any], where: str, source: str) -> DatasetConfig:
    """`values` holds defaults < overrides < [general] < this [[datasets]] table; subsets add their own layer."""
    subsets_data = dataset_data.get("subsets", [])
    if not subsets_data:
        raise ConfigError(f"{source}: {where} has no [[datasets.subsets]]; add one with image_dir = '...'.")
    subsets: list[SubsetConfig] = []
    seen: dict[Path, str] = {}
    for index, subset_data in enumerate(subsets_data):
        subset = _build_subset(values | subset_data, subset_data, f"{where}.subsets[{index}]", source)
        if subsets and subset.is_finetune != subsets[0].is_finetune:
            raise _mixed_kinds_error(subsets[0], subset, where, source)
        key = _dedup_key(subset)
        if key in seen:
            option = "metadata_file" if subset.is_finetune else "image_dir"
            logger.warning("%s: %s uses the same %s as %s; it is ignored.", source, subset.where, option, seen[key])
            continue
        seen[key] = subset.where
        subsets.append(subset)
    dataset = DatasetConfig(
        **{spec.name: values[spec.name] for spec in options_of("dataset")}, subsets=tuple(subsets), where=where
    )
    _check_dataset(dataset, source)
    return dataset


def _mixed_kinds_error(first: SubsetConfig, other: SubsetConfig, where: str, source: str) -> ConfigError:
    finetune, dreambooth = (first, other) if first.is_finetune else (other, first)
    return ConfigError(
        f"{source}: {where} mixes a fine-tuning subset ({finetune.where} has metadata_file) with a DreamBooth "
        f"subset ({dreambooth.where} has none). A dataset uses one method: put them in separate [[datasets]]."
    )


def _build_subset(values: dict[str, Any], subset_data: dict[str, Any], where: str, source: str) -> SubsetConfig:
    paths = {
        name: None if values[name] is None else Path(os.path.expanduser(values[name]))
        for name in ("image_dir", "metadata_file", "conditioning_data_dir")
    }
    chosen = {spec.name: values[spec.name] for spec in options_of("subset")} | paths
    subset = SubsetConfig(**chosen, where=where)
    if subset.is_finetune:
        _check_finetune_subset(subset, subset_data, source)
    else:
        _check_dreambooth_subset(subset, source)
    if subset.is_val and subset.is_reg:
        raise ConfigError(
            f"{source}: {where} sets both is_val and is_reg; regularization images are never validated, "
            "so choose one."
        )
    if subset.keep_tokens_separator and subset.keep_tokens_separator == subset.caption_separator:
        raise ConfigError(
            f"{source}: {where}.keep_tokens_separator = {_show(subset.keep_tokens_separator)} is the same as "
            "caption_separator; choose a separator that does not occur inside tags, such as '|||'."
        )
    return subset


def _check_dreambooth_subset(subset: SubsetConfig, source: str) -> None:
    where = subset.where
    if subset.image_dir is None:
        raise ConfigError(
            f"{source}: {where} has no image_dir; set it to the folder holding the images "
            "(or set metadata_file for a fine-tuning subset)."
        )
    _check_folder(subset.image_dir, f"{where}.image_dir", source)
    if subset.conditioning_data_dir is not None:
        _check_folder(subset.conditioning_data_dir, f"{where}.conditioning_data_dir", source)


def _check_finetune_subset(subset: SubsetConfig, subset_data: dict[str, Any], source: str) -> None:
    where = subset.where
    dreambooth_only = sorted(
        name for name in subset_data if name in OPTIONS_BY_NAME and OPTIONS_BY_NAME[name].kind == "dreambooth"
    )
    if dreambooth_only:
        raise ConfigError(
            f"{source}: {where} has metadata_file, so it is a fine-tuning subset, which cannot use "
            f"{', '.join(dreambooth_only)} (DreamBooth subsets only): captions come from the metadata file, and "
            "regularization images and mask folders need a DreamBooth dataset."
        )
    if not subset.metadata_file.is_file():
        raise ConfigError(f"{source}: {where}.metadata_file = {_show(str(subset.metadata_file))} does not exist.")
    if subset.image_dir is not None:
        _check_folder(subset.image_dir, f"{where}.image_dir", source)


def _check_folder(folder: Path, name: str, source: str) -> None:
    if not folder.is_dir():
        raise ConfigError(f"{source}: {name} = {_show(str(folder))} is not an existing folder.")


def _dedup_key(subset: SubsetConfig) -> Path:
    """DreamBooth subsets are the same when they read the same folder, fine-tuning ones the same metadata file."""
    path = subset.metadata_file if subset.is_finetune else subset.image_dir
    return path.resolve()


def _check_dataset(dataset: DatasetConfig, source: str) -> None:
    where = dataset.where
    # A fine-tuning dataset may do without a resolution when every image has prepared latents; that is known only
    # once its metadata is read (library/data/image_dataset.py checks it then).
    if dataset.resolution is None and not dataset.subsets[0].is_finetune:
        raise ConfigError(
            f"{source}: {where} has no resolution; set e.g. resolution = 512 or [width, height] "
            "in [[datasets]] or [general] (or --resolution on the command line)."
        )
    if not dataset.enable_bucket or dataset.resolution is None:
        return
    steps, low, high = dataset.bucket_reso_steps, dataset.min_bucket_reso, dataset.max_bucket_reso
    for name, value in (("min_bucket_reso", low), ("max_bucket_reso", high)):
        if value % steps:
            raise ConfigError(
                f"{source}: {where}.{name} = {value} is invalid: expected a multiple of bucket_reso_steps ({steps})."
            )
    if low > min(dataset.resolution) or high < max(dataset.resolution):
        raise ConfigError(
            f"{source}: {where}: bucket sizes min_bucket_reso = {low} .. max_bucket_reso = {high} must include "
            f"the resolution {list(dataset.resolution)}; lower min_bucket_reso or raise max_bucket_reso."
        )
