"""Collect the tag file of every image of a folder (from a tagger) into a metadata JSON (key "tags").

Usage: python finetune/merge_dd_tags_to_metadata.py --full_path train_data --in_json meta_cap.json meta_cap_dd.json
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
    add_merge_arguments(parser, default_extension=".txt", what="tag")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and merge the tags."""
    merge_text_files(MergeOptions.from_args(build_parser().parse_args(argv)), field="tags")


if __name__ == "__main__":
    run_tool(main)
