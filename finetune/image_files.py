"""Image files of a training folder: listing, metadata keys, side files, background loading, skipped-image report."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from library.data.images import IMAGE_EXTENSIONS, list_folder, select_images
from library.errors import DatasetError, UserError

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
SHOWN_NAMES = 20  # names listed in a message before "... and N more"


def existing_folder(folder: str, option: str = "train_data_dir") -> Path:
    """`folder` as a Path, or a DatasetError naming `option` when it is not an existing folder."""
    path = Path(folder)
    if not path.is_dir():
        raise DatasetError(f"{option} {folder} does not exist or is not a folder.")
    return path


def list_images(folder: str, recursive: bool = False) -> list[str]:
    """Paths of the images in `folder` (and with `recursive` in its subfolders), in a stable sorted order.

    Hidden files and folders (".name") are skipped. An empty result is a DatasetError naming the folder.
    """
    root = existing_folder(folder)
    if recursive:
        paths = []
        for directory, subfolders, names in os.walk(root):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            paths += [os.path.join(directory, name) for name in select_images(sorted(names))]
    else:
        paths = [os.path.join(root, name) for name in select_images(list_folder(root))]
    if not paths:
        hint = "" if recursive else " Add --recursive to search subfolders."
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DatasetError(f"{folder} contains no images ({extensions}).{hint}")
    return paths


def image_key(path: str, root: str, full_path: bool) -> str:
    """The metadata key of an image: its absolute path with `full_path`, else its path below `root` without
    extension (just the file stem for images directly inside `root`), with "/" separators."""
    if full_path:
        return os.path.abspath(path)
    relative = os.path.relpath(os.path.splitext(path)[0], root)
    return relative.replace(os.sep, "/")


def side_file(image_path: str, extension: str) -> str:
    """The file next to an image with the same stem and `extension` (caption, tags, latents)."""
    return os.path.splitext(image_path)[0] + extension


def check_unique_stems(paths: list[str]) -> None:
    """Refuse images that would share side files (`a.png` and `a.jpg` would both write `a.txt`, `a.npz`)."""
    seen: dict[str, str] = {}
    clashes = []
    for path in paths:
        stem = os.path.splitext(path)[0]
        if stem in seen:
            clashes.append(f"{seen[stem]} and {path}")
        else:
            seen[stem] = path
    if clashes:
        raise DatasetError(
            f"{len(clashes)} image(s) share a file name with another image of a different extension, so their "
            f"caption, tag and latent files would overwrite each other: {shorten(clashes)}. Rename one of each pair."
        )


def shorten(names: list[str], count: int = SHOWN_NAMES) -> str:
    """The first `count` names joined, with how many more there are."""
    shown = ", ".join(names[:count])
    return shown + (f" ... and {len(names) - count} more" if len(names) > count else "")


@dataclass
class SkippedFiles:
    """Files a tool could not use; listed once at the end so a long run is not stopped by one bad file."""

    what: str = "image"
    entries: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def add(self, path: str, reason: str) -> None:
        logger.debug("skipping %s: %s", path, reason)
        self.entries.append((path, reason))

    def report(self) -> None:
        """Log every skipped file with its reason (a WARNING), or nothing when there is none."""
        if not self.entries:
            return
        lines = "\n".join(f"  {path}: {reason}" for path, reason in self.entries)
        logger.warning("%d %s file(s) could not be used and were skipped:\n%s", len(self.entries), self.what, lines)


@dataclass(frozen=True)
class Loaded:
    """An image loaded in the background: the `load` result, or the reason it failed."""

    path: str
    value: Any = None
    error: str | None = None


class _LoadDataset:
    """Map-style dataset for torch's DataLoader: one `Loaded` per path (errors are values, not exceptions)."""

    def __init__(self, paths: list[str], load: Callable[[str], Any]):
        self.paths = paths
        self.load = load

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Loaded:
        path = self.paths[index]
        try:
            return Loaded(path, self.load(path))
        except UserError as err:
            return Loaded(path, error=str(err))
        except (OSError, ValueError, SyntaxError) as err:
            return Loaded(path, error=f"{type(err).__name__}: {err}")


def _as_is(item: Loaded) -> Loaded:
    return item


def load_all(paths: list[str], load: Callable[[str], Any], workers: int | None) -> Iterator[Loaded]:
    """`load(path)` for every path, in order; with `workers` > 0 in that many background processes.

    `load` must be a module-level function (or a functools.partial of one) so that worker processes can run it.
    """
    dataset = _LoadDataset(paths, load)
    if not workers:
        yield from (dataset[index] for index in range(len(dataset)))
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is)
    yield from loader


def batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """Consecutive lists of `size` items (the last one may be shorter)."""
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
