"""Training config files: command-line options kept in a TOML file (`--config_file`), and written by `--output_config`.

Keys are option names without the leading dashes. Tables only group options for the reader: they are flattened,
so `[optimizer] learning_rate = 1e-4` and a top-level `learning_rate = 1e-4` mean the same. Values from the file
become the parser's defaults, so anything given on the command line overrides them.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import tomllib
from pathlib import Path
from typing import Any

from library.atomic import atomic_write_text
from library.errors import ConfigError
from library.training.metadata import SECRET_OPTIONS, redact_secrets, secret_values

logger = logging.getLogger(__name__)

CONFIG_OPTIONS = ("config_file", "output_config")
DATASET_TABLES = ("general", "datasets")
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", Path: "a path (a string)"}


def add_config_file_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config_file` and `--output_config`."""
    parser.add_argument(
        "--config_file",
        type=str,
        default=None,
        help="TOML file of command-line options (keys without dashes, tables allowed); the command line overrides "
        "it. '.toml' is added when the name has no such extension",
    )
    parser.add_argument(
        "--output_config",
        action="store_true",
        help="write the options given (those that differ from the defaults, secrets left out) to --config_file and "
        "exit without training; an existing file is not overwritten",
    )


def config_path(name: str) -> str:
    """The file a --config_file name refers to."""
    return name if name.lower().endswith(".toml") else name + ".toml"


def parse_with_config_file(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; with --config_file (and no --output_config) its values are the defaults."""
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_config_file_arguments(early)
    found, _ = early.parse_known_args(argv)
    if found.config_file and not found.output_config:
        apply_config_file(parser, config_path(found.config_file))
    return parser.parse_args(argv)


def apply_config_file(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Check every key and value of a config file and make them the parser's defaults. Returns the values by dest."""
    actions = _options_by_name(parser)
    values = {}
    for key, (where, raw) in read_config_file(path).items():
        action = actions.get(key)
        if action is None:
            raise ConfigError(_unknown_key_message(path, key, where, actions))
        values[action.dest] = _convert(action, raw, f"{path}: {where}")
        action.required = False  # given by the file; the command line may still override it
    parser.set_defaults(**values)
    logger.info("options from %s: %s", path, ", ".join(sorted(values)) or "none")
    return values


def read_config_file(path: str) -> dict[str, tuple[str, Any]]:
    """The flattened keys of a config file: key -> (where it is, with its table path; raw TOML value)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config_file: file not found: {path}")
    try:
        with open(path, "rb") as handle:
            table = tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(
            f"--config_file {path} is not valid TOML: {err}. Write Windows paths in single quotes ('C:\\data')"
        ) from None
    flat: dict[str, tuple[str, Any]] = {}
    _flatten(table, path, (), flat)
    return flat


def _flatten(table: dict, path: str, tables: tuple[str, ...], flat: dict[str, tuple[str, Any]]) -> None:
    for key, value in table.items():
        if isinstance(value, dict):
            _flatten(value, path, (*tables, key), flat)
            continue
        where = ".".join((*tables, key))
        if key in flat:
            raise ConfigError(f"{path}: '{key}' is set twice ({flat[key][0]} and {where}); keep one of them")
        flat[key] = (where, value)


def _options_by_name(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long option names (without dashes) of the options a config file may set."""
    names = {}
    for action in parser._actions:  # argparse has no public list of its actions
        if action.dest in CONFIG_OPTIONS or isinstance(action, argparse._HelpAction):
            continue
        for option in action.option_strings:
            if option.startswith("--"):
                names[option[2:]] = action
    return names


def _unknown_key_message(path: str, key: str, where: str, actions: dict[str, argparse.Action]) -> str:
    if key in CONFIG_OPTIONS:
        return f"{path}: '{where}' only works on the command line, not inside a config file"
    if key in DATASET_TABLES:
        return f"{path}: '{where}' is a dataset config table; put datasets in the file given to --dataset_config"
    close = difflib.get_close_matches(key, list(actions), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "see --help for the options of this script"
    return f"{path}: unknown option '{where}'; {hint}"


def _is_switch(action: argparse.Action) -> bool:
    return isinstance(action, argparse._StoreConstAction)  # store_true / store_false / store_const


def _takes_list(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+") or isinstance(action.nargs, int)


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """A TOML value as the command line would have given it, converted with the option's own argparse type."""
    if _is_switch(action):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: this option is a switch; write true or false, not {value!r}")
        return action.const if value else action.default
    if _takes_list(action):
        if not isinstance(value, list):
            raise ConfigError(f'{where}: expected a list such as ["a", "b"], got {value!r}')
        return [_convert_one(action, item, where) for item in value]
    return _convert_one(action, value, where)


def _convert_one(action: argparse.Action, value: Any, where: str) -> Any:
    convert = action.type or str
    expected = _TYPE_NAMES.get(convert, f"a value as on the command line of {action.option_strings[-1]}")
    if isinstance(value, list):
        # An option whose command-line value is a comma-separated list ("512,768") also takes a TOML list.
        result = _call_type(convert, ",".join(str(item) for item in value), expected, value, where)
        if not isinstance(result, list):
            raise ConfigError(f"{where}: expected {expected}, not a list, got {value!r}")
        return result
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    if convert in (str, Path) and not isinstance(value, str):
        raise ConfigError(f"{where}: expected {expected} (in quotes), got {value!r}")
    result = _call_type(convert, value if isinstance(value, str) else str(value), expected, value, where)
    if action.choices is not None and result not in action.choices:
        choices = [str(choice) for choice in action.choices]
        close = difflib.get_close_matches(str(result), choices, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}{hint}")
    return result


def _call_type(convert, text: str, expected: str, value: Any, where: str) -> Any:
    try:
        return convert(text)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        raise ConfigError(f"{where}: expected {expected}, got {value!r} ({err})") from None


def write_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, dict]:
    """Write the options of `args` that differ from the defaults to --config_file, grouped by help section.

    Returns the tables written.
    """
    if not args.config_file:
        raise ConfigError("--output_config needs --config_file (the file to write)")
    if int(os.environ.get("RANK", "0")) != 0:
        return {}  # under a multi-process launch only the first process writes
    path = config_path(args.config_file)
    if os.path.exists(path):
        raise ConfigError(f"--output_config: {path} already exists; remove it or give another --config_file name")
    tables: dict[str, dict] = {}
    for group in parser._action_groups:
        for action in group._group_actions:
            value = _config_value(action, args)
            if value is not None:
                tables.setdefault(_table_name(group.title), {})[action.option_strings[-1].lstrip("-")] = value
    secrets = secret_values(args)
    tables = {name: redact_secrets(values, secrets, "config option") for name, values in tables.items()}
    header = (
        "# Training options written by --output_config (only those that differ from the defaults; secrets such as\n"
        "# tokens are never written). Use it with --config_file; options on the command line override it.\n\n"
    )
    body = "\n".join(
        f"[{table}]\n" + "".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items())
        for table, values in tables.items()
    )
    atomic_write_text(path, header + body)
    logger.info("wrote the options to %s", path)
    return tables


def _config_value(action: argparse.Action, args: argparse.Namespace) -> Any:
    """The TOML value of an option that was set, or None for defaults, secrets and options a file cannot hold."""
    if action.dest in CONFIG_OPTIONS or action.dest in SECRET_OPTIONS or not action.option_strings:
        return None
    if isinstance(action, argparse._HelpAction) or not hasattr(args, action.dest):
        return None
    value = getattr(args, action.dest)
    if value is None or value == _default(action):
        return None
    if _is_switch(action):
        return value == action.const
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return _plain(value)


def _default(action: argparse.Action) -> Any:
    """The default as argparse applies it (a string default goes through the option's type)."""
    default = action.default
    if isinstance(default, str) and action.type is not None:
        return action.type(default)
    return default


def _toml_value(value: Any) -> str:
    """A TOML literal: JSON's strings, numbers, booleans and arrays are valid TOML; non-finite floats are not."""
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML wants DEL escaped too


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _table_name(title: str | None) -> str:
    """'saving and resuming' -> 'saving_and_resuming'; 'model (sd)' -> 'model'."""
    name = (title or "options").split(" (")[0].strip().lower()
    return name.replace(" ", "_") or "options"
