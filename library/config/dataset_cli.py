"""Dataset options on the command line: the flags of the option table, and the legacy folder format.

With `--dataset_config`, the flags give values that rank below [general] (the config file wins), and
`--train_data_dir`, `--reg_data_dir` and `--in_json` are ignored with a warning. Without it, the legacy format
builds the config: `--train_data_dir` holds `<repeats>_<identifier> <class>` folders (DreamBooth), or with
`--in_json` is the image folder of a fine-tuning metadata file; `--reg_data_dir` holds `<repeats>_<class>` folders.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.config.dataset_config import DatasetGroupConfig, load_dataset_config, parse_dataset_config
from library.config.dataset_options import OptionSpec, command_line_options
from library.data.images import is_image_name, list_folder
from library.errors import ConfigError

logger = logging.getLogger(__name__)

LEGACY_SOURCE_OPTIONS = ("train_data_dir", "reg_data_dir", "in_json")
_REPEATS_FOLDER = re.compile(r"^(\d+)_(.*)$")


def add_dataset_option_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset source flags and one flag per command-line dataset option (default None: "not given")."""
    parser.add_argument("--dataset_config", type=Path, default=None, help="dataset config file (.toml or .json)")
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="without --dataset_config: folder of '<repeats>_<identifier> <class>' image folders, or with "
        "--in_json the image folder of the metadata",
    )
    parser.add_argument(
        "--reg_data_dir",
        type=str,
        default=None,
        help="without --dataset_config: folder of '<repeats>_<class>' regularization image folders",
    )
    parser.add_argument(
        "--in_json", type=str, default=None, help="without --dataset_config: fine-tuning metadata file (.json)"
    )
    for spec in command_line_options():
        _add_option_flag(parser, spec)


def _add_option_flag(parser: argparse.ArgumentParser, spec: OptionSpec) -> None:
    name = "" if spec.cli == f"--{spec.name}" else f" (config: {spec.name})"
    default = "" if spec.default in (None, "", False) else f", default {spec.default}"
    help_text = f"{spec.help}{name}{default}"
    if spec.parse_cli is None:
        parser.add_argument(spec.cli, action="store_true", default=None, help=help_text)
    else:
        parser.add_argument(spec.cli, type=spec.parse_cli, default=None, help=help_text)


@dataclass(frozen=True)
class DatasetSource:
    """Where a run's datasets come from: a config file or the legacy folders, and the option flags given."""

    dataset_config: Path | None = None
    train_data_dir: str | None = None
    reg_data_dir: str | None = None
    in_json: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # option name -> value of the flags given
    debug_dataset: bool = False
    max_image_pixels: int = 2 * 89_478_485  # library.data.images.DEFAULT_MAX_PIXELS

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DatasetSource:
        """The dataset options of a parsed command line (parsers without some of them leave them unset)."""
        return cls(
            dataset_config=getattr(args, "dataset_config", None),
            train_data_dir=getattr(args, "train_data_dir", None),
            reg_data_dir=getattr(args, "reg_data_dir", None),
            in_json=getattr(args, "in_json", None),
            overrides=command_line_overrides(args),
            debug_dataset=getattr(args, "debug_dataset", False),
            max_image_pixels=getattr(args, "max_image_pixels", cls.max_image_pixels),
        )


def command_line_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Option values given as flags, keyed by option name (flags not given are left out)."""
    values = {}
    for spec in command_line_options():
        value = getattr(args, spec.cli.lstrip("-"), None)
        if value is not None:
            values[spec.name] = value
    return values


def load_group_config(source: DatasetSource) -> DatasetGroupConfig:
    """The dataset config of a run: the config file with flags below it, or the legacy command-line format."""
    overrides = source.overrides
    if source.dataset_config is not None:
        ignored = [f"--{name}" for name in LEGACY_SOURCE_OPTIONS if getattr(source, name) is not None]
        if ignored:
            logger.warning("%s ignored: --dataset_config defines the datasets.", ", ".join(ignored))
        return load_dataset_config(source.dataset_config, overrides)
    if source.train_data_dir is None and source.in_json is None:
        raise ConfigError(
            "No dataset given: pass --dataset_config with a .toml or .json dataset config file, or --train_data_dir "
            "with '<repeats>_<identifier> <class>' folders, or --in_json with a fine-tuning metadata file."
        )
    return parse_dataset_config(legacy_config_data(source), "command line", overrides)


def legacy_config_data(args: DatasetSource) -> dict[str, Any]:
    """The config tables the legacy options stand for."""
    train_dir = args.train_data_dir
    if train_dir is not None and not os.path.isdir(train_dir):
        raise ConfigError(f"--train_data_dir {train_dir} is not an existing folder.")
    if args.in_json is not None:
        if not os.path.isfile(args.in_json):
            raise ConfigError(f"--in_json {args.in_json}: file not found; give the metadata file (.json)")
        if args.reg_data_dir is not None:
            raise ConfigError(
                "--reg_data_dir cannot be used with --in_json: fine-tuning datasets have no regularization images. "
                "Use a --dataset_config with a separate DreamBooth dataset for them."
            )
        subset = {"metadata_file": args.in_json} | ({} if train_dir is None else {"image_dir": train_dir})
        return {"datasets": [{"subsets": [subset]}]}
    if "num_repeats" in args.overrides:
        logger.warning("--dataset_repeats ignored: the repeats of DreamBooth folders come from their names.")
    subsets = _repeat_folders(train_dir, "--train_data_dir", is_reg=False)
    if args.reg_data_dir is not None:
        if not os.path.isdir(args.reg_data_dir):
            raise ConfigError(f"--reg_data_dir {args.reg_data_dir} is not an existing folder.")
        subsets += _repeat_folders(args.reg_data_dir, "--reg_data_dir", is_reg=True)
    return {"datasets": [{"subsets": subsets}]}


def _repeat_folders(parent: str, option: str, is_reg: bool) -> list[dict[str, Any]]:
    """One subset per `<repeats>_<class tokens>` folder of `parent`."""
    with os.scandir(parent) as entries:
        folders = sorted(entry.name for entry in entries if entry.is_dir())
    subsets = []
    for name in folders:
        match = _REPEATS_FOLDER.match(name)
        if match is None:
            if not name.startswith("."):
                logger.warning("%s: folder %s ignored: its name does not start with '<repeats>_'.", option, name)
            continue
        subset = {"image_dir": os.path.join(parent, name), "num_repeats": int(match.group(1)), "is_reg": is_reg}
        class_tokens = match.group(2).strip()
        if class_tokens:
            subset["class_tokens"] = class_tokens
        subsets.append(subset)
    if not subsets:
        raise ConfigError(_no_repeat_folders_message(parent, option, is_reg))
    return subsets


def _no_repeat_folders_message(parent: str, option: str, is_reg: bool) -> str:
    pattern = "<repeats>_<class>" if is_reg else "<repeats>_<identifier> <class>"
    example = os.path.join(parent, "1_girl" if is_reg else "10_sks girl")
    found = (
        " It holds images directly; move them into such a subfolder."
        if any(is_image_name(name) for name in list_folder(parent))
        else ""
    )
    return f"{option} {parent} has no '{pattern}' folders, e.g. {example}.{found}"
