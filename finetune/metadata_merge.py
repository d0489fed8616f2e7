"""Merge per-image text files (captions or tags) into a metadata JSON; shared by the two merge tools."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from tqdm import tqdm

from finetune.image_files import SkippedFiles, check_unique_stems, image_key, list_images, shorten, side_file
from finetune.metadata_io import metadata_to_update, write_metadata
from library.errors import DatasetError

logger = logging.getLogger(__name__)


def add_merge_arguments(parser: argparse.ArgumentParser, default_extension: str, what: str) -> None:
    """The arguments both merge tools take; `what` ("caption", "tag") words the help."""
    parser.add_argument("train_data_dir", help="folder with the images and their text files")
    parser.add_argument(
        "out_json", help="metadata file to write; without --in_json an existing file is read and updated"
    )
    parser.add_argument(
        "--in_json", default=None, help="metadata file to read and extend (default: the output file, if it exists)"
    )
    parser.add_argument(
        "--full_path",
        action="store_true",
        help="key images by absolute path (needed to merge several folders into one file); without it the key "
        "is the file name without extension and the training config must name the image folder",
    )
    parser.add_argument(
        "--caption_extension",
        default=default_extension,
        help=f"extension of the {what} files next to the images (default {default_extension})",
    )
    parser.add_argument("--recursive", action="store_true", help="also search subfolders of train_data_dir")


@dataclass(frozen=True)
class MergeOptions:
    """What a merge reads and writes."""

    train_data_dir: str
    out_json: str
    in_json: str | None
    full_path: bool
    caption_extension: str
    recursive: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MergeOptions:
        return cls(
            args.train_data_dir, args.out_json, args.in_json, args.full_path, args.caption_extension, args.recursive
        )


def read_text_file(path: str) -> str:
    """The text of a caption or tag file: lines stripped, empty lines dropped, joined with newlines."""
    with open(path, encoding="utf-8-sig") as handle:
        lines = [line.strip() for line in handle.read().splitlines()]
    return "\n".join(line for line in lines if line)


def merge_text_files(options: MergeOptions, field: str) -> None:
    """Put each image's text file into `metadata[key][field]` and write the output file."""
    paths = list_images(options.train_data_dir, options.recursive)
    check_unique_stems(paths)
    metadata = metadata_to_update(options.in_json, options.out_json)
    skipped = SkippedFiles(what=f"{field} text")
    missing = []
    merged = 0
    for path in tqdm(paths, desc=f"merging {field} files", unit="image"):
        text_path = side_file(path, options.caption_extension)
        try:
            text = read_text_file(text_path)
        except FileNotFoundError:
            missing.append(path)
            continue
        except UnicodeDecodeError:
            skipped.add(text_path, "not UTF-8 text; save it as UTF-8")
            continue
        except OSError as err:
            skipped.add(text_path, str(err))
            continue
        if not text:
            skipped.add(text_path, "empty")
            continue
        metadata.setdefault(image_key(path, options.train_data_dir, options.full_path), {})[field] = text
        merged += 1
    if merged == 0:
        raise DatasetError(
            f"none of the {len(paths)} images in {options.train_data_dir} has a usable {options.caption_extension} "
            f"file next to it; check --caption_extension. Nothing was written."
        )
    if missing:
        logger.warning("%d image(s) have no %s file: %s", len(missing), options.caption_extension, shorten(missing))
    skipped.report()
    logger.info("%s of %d images merged", field, merged)
    write_metadata(options.out_json, metadata)
