"""Checks shared by the tokenizer tests: a loader returned the tokenizer saved in a given folder."""

from __future__ import annotations

import os

from library.testing.sd_scripts_tokenizers import SUBFOLDERS


def assert_tokenizer_from(tokenizer, folder: str, text: str) -> None:
    """`tokenizer` was loaded from `folder` and gives that folder's tokenizer's vocabulary size and ids for `text`."""
    source = type(tokenizer).from_pretrained(folder)
    assert os.path.normpath(tokenizer.name_or_path) == os.path.normpath(folder)
    assert len(tokenizer) == len(source)
    assert tokenizer(text).input_ids == source(text).input_ids


def assert_sd_scripts_folder_untouched(cache_dir: str) -> None:
    """Nothing was written at the top of a --tokenizer_cache_dir in sd-scripts' layout."""
    assert sorted(os.listdir(cache_dir)) == sorted(SUBFOLDERS)
