"""The one atomic-write helper: write to a temporary sibling, then rename over the target."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

OLD_SUFFIX = ".old"
# `.{target name}.{8 random characters}.tmp{extension}`, with OLD_SUFFIX for a folder moved aside (see atomic_path).
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp[^/]*?(?P<old>\.old)?$")


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
            _replace_folder(temp, target)
        else:
            os.replace(temp, target)
    except BaseException:
        if os.path.isdir(temp):
            shutil.rmtree(temp, ignore_errors=True)
        elif os.path.exists(temp):
            os.remove(temp)
        raise


def _replace_folder(new: str, target: str) -> None:
    """Put the complete folder `new` in place of the folder `target`: the old one moves aside first (a rename) and
    is deleted only once the new one has its name, so a kill at any moment leaves a complete folder under the name,
    or a complete one aside that `recover_interrupted_writes` puts back."""
    aside = new + OLD_SUFFIX
    os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside, ignore_errors=True)


def recover_interrupted_writes(folder: str) -> list[str]:
    """Undo what a process killed inside `atomic_path` left in `folder`: a complete folder moved aside goes back
    under its name when the name is free; temporaries and leftovers are removed. Returns what was done, for logs."""
    if not os.path.isdir(folder):
        return []
    done = []
    names = sorted(os.listdir(folder))
    for name in names:
        match = _TEMP_NAME.match(name)
        if match is None:
            continue
        path = os.path.join(folder, name)
        target = os.path.join(folder, match.group("name"))
        if match.group("old") and not os.path.exists(target):
            os.replace(path, target)
            done.append(f"restored {target} (a replacement of it was interrupted)")
            continue
        size = _size(path)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
        done.append(f"removed {path} ({size / 2**20:.1f} MiB left by an interrupted save)")
    return done


def _size(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(path) for name in files)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    with atomic_path(target) as temp:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
