"""Checks that every place a run writes to can take files, made before any model loads (a folder that refuses
writes would otherwise be found at the first save, after the training it was meant to keep)."""

from __future__ import annotations

import os
import tempfile

from library.errors import ConfigError


def check_writable_folder(path: str, option: str) -> None:
    """Create `path` if needed and write and remove a probe file in it; ConfigError naming `option` if that fails."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{option} {path} is a file, not a folder; give a folder to write into")
    try:
        os.makedirs(path, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(descriptor)
        os.remove(probe)
    except OSError as err:
        reason = err.strerror or str(err)
        raise ConfigError(
            f"{option}: cannot write into {path} ({reason}); give a folder this user can write to"
        ) from None


def check_run_outputs(folders: list[tuple[str, str]]) -> None:
    """Check each (folder, option that names it) once."""
    seen: set[str] = set()
    for path, option in folders:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            check_writable_folder(path, option)
