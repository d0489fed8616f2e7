"""Collect the caption file of every image of a folder into a metadata JSON (key "caption").

Usage: python finetune/merge_captions_to_metadata.py --full_path train_data meta_cap.json
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as `python finetune/<tool>.py`: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from finetune.metadata_merge import MergeOptions, add_merge_arguments, merge_text_files
from finetune.tool_entry import run_tool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    add_merge_arguments(parser, default_extension=".caption", what="caption")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and merge the captions."""
    merge_text_files(MergeOptions.from_args(build_parser().parse_args(argv)), field="caption")


if __name__ == "__main__":
    run_tool(main)
