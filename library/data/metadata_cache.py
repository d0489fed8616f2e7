"""`cache_info`: image sizes and caption texts of a folder, kept in `<image_dir>/metadata_cache.json`.

An entry is reused only while its file has the same size and modification time, so edited or replaced files are
read again; the cache never needs deleting by hand. A folder that cannot be written to only costs a warning.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from library.atomic import atomic_write_text

logger = logging.getLogger(__name__)

CACHE_FILE_NAME = "metadata_cache.json"
_FORMAT = 1


def _stamp(path: str) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


class MetadataCache:
    """Sizes and caption lines of the files of one folder; a disabled cache stores nothing and finds nothing."""

    def __init__(self, folder: str, enabled: bool) -> None:
        self.folder = folder
        self.enabled = enabled
        self.path = os.path.join(folder, CACHE_FILE_NAME)
        self._entries: dict[str, dict[str, Any]] = self._read() if enabled else {}
        self._used: set[str] = set()
        self._changed = False

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as file:
                data = json.load(file)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            logger.warning("Ignoring unreadable %s (%s); it will be rewritten.", self.path, err)
            return {}
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("files"), dict):
            return {}
        return data["files"]

    def get(self, name: str, field: str) -> Any:
        """The cached `field` of file `name` if the file is unchanged since it was cached, else None."""
        if not self.enabled:
            return None
        entry = self._entries.get(name)
        if entry is None or field not in entry:
            return None
        try:
            if entry.get("stamp") != _stamp(os.path.join(self.folder, name)):
                return None
        except OSError:
            return None
        self._used.add(name)
        return entry[field]

    def put(self, name: str, field: str, value: Any) -> None:
        """Remember `value` as `field` of file `name` (stamped with the file's current size and time)."""
        if not self.enabled:
            return
        try:
            stamp = _stamp(os.path.join(self.folder, name))
        except OSError:
            return
        entry = self._entries.get(name)
        if entry is None or entry.get("stamp") != stamp:
            entry = {"stamp": stamp}
            self._entries[name] = entry
        entry[field] = value
        self._used.add(name)
        self._changed = True

    def save(self) -> None:
        """Write the cache if anything changed; entries of files no longer used are dropped."""
        stale = set(self._entries) - self._used
        if not self.enabled or not (self._changed or stale):
            return
        files = {name: self._entries[name] for name in sorted(self._used)}
        try:
            atomic_write_text(self.path, json.dumps({"format": _FORMAT, "files": files}, ensure_ascii=False))
        except OSError as err:
            logger.warning("Cannot write %s (%s); cache_info has no effect for this folder.", self.path, err)
