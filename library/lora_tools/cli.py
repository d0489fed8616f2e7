"""What every script in `networks/` that runs a LoRA tool shares: the reference's option spellings, parsing with the
chosen family's model options, logging set up once, user errors as one line and exit status 1."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from library.errors import ConfigError, UserError
from library.lora_tools.models import FamilySpec, add_family_options, detect_family, family_ids

logger = logging.getLogger("networks")

# The reference names the base model per script; our families name it --pretrained_model_name_or_path.
MODEL_SPELLINGS = ("--sd_model", "--flux_model")
FAMILY_FLAGS = {"--sdxl": "sdxl"}  # extract_lora_from_models.py --sdxl


@dataclass
class ToolArgs:
    """Parsed options of a tool, and the family whose model options were added (None: no family chosen)."""

    args: argparse.Namespace
    family: FamilySpec | None


def reference_spellings(argv: list[str]) -> list[str]:
    """The reference's per-script spellings in our names: `--sd_model X` -> `--pretrained_model_name_or_path X`,
    `--sdxl` -> `--family sdxl`."""
    converted = []
    for item in argv:
        name, equals, value = item.partition("=")
        if name in MODEL_SPELLINGS:
            converted.append("--pretrained_model_name_or_path" + equals + value)
        elif item in FAMILY_FLAGS:
            converted += ["--family", FAMILY_FLAGS[item]]
        else:
            converted.append(item)
    return converted


def add_family_choice(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument(
        "--family",
        type=str,
        default=default,
        choices=family_ids(),
        help="model family of the base model and LoRA"
        + (f" (default {default})" if default else "; default: read from the LoRA's ss_base_model_version")
        + ". Its model options (e.g. --pretrained_model_name_or_path, --v2, --ae, --clip_l) are listed with "
        "--family ID --help",
    )


def parse_tool_args(
    build: Callable[[], argparse.ArgumentParser],
    argv: list[str] | None,
    default_family: str | None = None,
    lora_paths: Callable[[argparse.Namespace], list[str]] = lambda args: [],
) -> ToolArgs:
    """Parse a tool's command line. The family is --family, else the one the first LoRA's metadata names, else
    `default_family`; its model options are added to the parser before the real parse."""
    argv = reference_spellings(list(sys.argv[1:] if argv is None else argv))
    probe_parser = build()
    add_family_choice(probe_parser, None)
    probe, _ = probe_parser.parse_known_args([item for item in argv if item not in ("-h", "--help")])
    family_id = probe.family or _detected(lora_paths(probe)) or default_family
    if family_id is None and any(item.partition("=")[0] == "--pretrained_model_name_or_path" for item in argv):
        raise ConfigError("a base model was given but no family: add --family (one of "
                          f"{', '.join(family_ids())}); the LoRA's metadata does not name one")
    parser = build()
    add_family_choice(parser, family_id)
    spec = add_family_options(parser, family_id) if family_id else None
    return ToolArgs(parser.parse_args(argv), spec)


def _detected(paths: list[str]) -> str | None:
    from library.checkpoints.files import read_safetensors_metadata

    for path in paths:
        if path and path.lower().endswith(".safetensors"):
            try:
                family_id = detect_family(read_safetensors_metadata(path))
            except Exception:  # an unreadable file is reported by the tool itself, with its name
                return None
            if family_id:
                logger.info("family %s, from the ss_base_model_version of %s", family_id, path)
            return family_id
    return None


def run_tool(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Call `main(argv)` as a script does: logging configured, a `UserError` as one line and exit status 1."""
    from library.training.entry import configure_logging

    configure_logging()
    try:
        main(argv)
    except UserError as err:
        logger.error("%s", err)
        sys.exit(1)
    except KeyboardInterrupt:
        logger.error("interrupted")
        sys.exit(130)
