"""Metadata of files the LoRA tools write: the input's `ss_*` / `modelspec.*` keys carried through, the values the
tool changed, the tool and its arguments appended to a history, and no secret (hub or tracker token) in any of it."""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections import Counter

from library.training.metadata import redact_secrets, secret_values

HISTORY_KEY = "ss_lora_tools"  # JSON list: one {"tool", "args", "date"} per tool run, oldest first
STALE_PREFIXES = ("sshs_",)  # hashes of the input's tensors: wrong for the output, so dropped
LEFT_OUT_ARGS = ("family_spec",)


def recorded_args(args: argparse.Namespace) -> dict[str, object]:
    """The arguments worth recording: set ones only, files by their base name (as the trainer records models)."""
    recorded = {}
    for key, value in sorted(vars(args).items()):
        if value in (None, False, [], ()) or key in LEFT_OUT_ARGS:
            continue
        recorded[key] = _file_names(value)
    return recorded


def _file_names(value: object) -> object:
    if isinstance(value, str) and (os.sep in value or "/" in value or os.path.exists(value)):
        return os.path.basename(value.rstrip("/\\"))
    if isinstance(value, (list, tuple)):
        return [_file_names(item) for item in value]
    return value


def tool_metadata(
    carried: dict[str, str], tool: str, args: argparse.Namespace, updates: dict[str, object] | None = None
) -> dict[str, str]:
    """`carried` (the input's metadata) less stale keys, with `updates` applied (None deletes a key) and this run
    appended to the tool history; every secret replaced by `***`."""
    metadata = {key: value for key, value in carried.items() if not key.startswith(STALE_PREFIXES)}
    for key, value in (updates or {}).items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value if isinstance(value, str) else json.dumps(value) \
                if isinstance(value, (dict, list)) else str(value)
    history = _history(metadata.get(HISTORY_KEY))
    date = datetime.datetime.now().replace(microsecond=0).isoformat()
    history.append({"tool": tool, "args": recorded_args(args), "date": date})
    metadata[HISTORY_KEY] = json.dumps(history)
    return redact_secrets(metadata, secret_values(args))


def _history(text: str | None) -> list:
    try:
        history = json.loads(text) if text else []
    except json.JSONDecodeError:
        return []
    return history if isinstance(history, list) else []


def common_value(values: list[object], dynamic: bool = False) -> str:
    """The most common value of the modules (as the trainer records ranks), or `Dynamic` (the reference's word for
    ranks chosen per module) when `dynamic`."""
    return "Dynamic" if dynamic or not values else str(Counter(values).most_common(1)[0][0])
