"""Metadata JSON of the fine-tuning tools: `{image key: {"caption": ..., "tags": ..., "train_resolution": ...}}`.

Reading gives errors that name the file and the option; writing is atomic, so the input file survives a failed run
even when it is also the output.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from library.atomic import atomic_write_text
from library.errors import DatasetError

logger = logging.getLogger(__name__)

Metadata = dict[str, dict[str, Any]]


def read_metadata(path: str, option: str) -> Metadata:
    """Read and check a metadata file; `option` names the argument it came from, for messages."""
    if not os.path.isfile(path):
        raise DatasetError(f"{option}: metadata file {path} does not exist.")
    try:
        with open(path, encoding="utf-8-sig") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{option}: {path} is not valid JSON: {err}.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{option}: cannot read {path}: {err}.") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{option}: {path} must hold a JSON object of image keys, not {type(data).__name__}.")
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise DatasetError(
                f'{option}: {path}: the entry of {key!r} must be an object such as {{"caption": "..."}}, '
                f"not {json.dumps(entry, ensure_ascii=False)[:80]}."
            )
    return data


def write_metadata(path: str, metadata: Metadata) -> None:
    """Write the metadata atomically (UTF-8, readable indentation)."""
    atomic_write_text(path, json.dumps(metadata, ensure_ascii=False, indent=2) + "\n")
    logger.info("wrote %s (%d images)", path, len(metadata))


def metadata_to_update(in_json: str | None, out_json: str) -> Metadata:
    """The metadata a merge starts from: `--in_json` when given, else the output file when it exists.

    Omitting `--in_json` updates the output file, as the guide describes; a new output starts empty. The input is
    never written unless it is the output too.
    """
    if in_json is not None:
        if os.path.abspath(in_json) == os.path.abspath(out_json):
            logger.info("updating %s in place (--in_json is the output file)", out_json)
        return read_metadata(in_json, "--in_json")
    if os.path.isfile(out_json):
        logger.info("no --in_json: updating the existing %s", out_json)
        return read_metadata(out_json, "out_json")
    logger.info("no --in_json and %s does not exist yet: starting new metadata", out_json)
    return {}
