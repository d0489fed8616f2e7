"""The one atomic-write helper: write to a temporary sibling, then rename over the target."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[str]:
    """Yield a temporary path next to `target`; on success rename it onto `target`, on error remove it.

    `suffix` defaults to the target's extension, so writers that choose a format by extension still work.
    Works for files and for folders (a folder target is replaced as a whole).
    """
    target = os.fspath(target)
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    if suffix is None:
        suffix = os.path.splitext(target)[1]
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=f".tmp{suffix}", dir=directory)
    os.close(fd)
    os.remove(temp)
    try:
        yield temp
        if os.path.isfile(temp):
            os.chmod(temp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(temp, target)
    except BaseException:
        if os.path.isdir(temp):
            shutil.rmtree(temp, ignore_errors=True)
        elif os.path.exists(temp):
            os.remove(temp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    with atomic_path(target) as temp:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
