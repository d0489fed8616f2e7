"""The T5 tokenizer of FLUX.1 / SD3: a given folder, a diffusers model folder, a cache folder, or the hub cache
(downloaded into it only when online). A folder needs `tokenizer.json` (what diffusers folders ship), or
`spiece.model` with the sentencepiece package installed to convert it.
"""

from __future__ import annotations

import logging
import os

from library.checkpoints.hub_models import hub_offline
from library.checkpoints.tokenizer_cache import cache_folders, our_folder, subfolder_names
from library.errors import CheckpointError

logger = logging.getLogger(__name__)

T5_TOKENIZER_REPO = "google/t5-v1_1-xxl"
T5_FILES = ("tokenizer.json", "spiece.model")
T5_VOCAB_SIZE = 32100  # the real tokenizer's pieces and extra ids; an offline hub lookup may return an empty one


def _has_tokenizer(folder: str | None) -> bool:
    return folder is not None and any(os.path.isfile(os.path.join(folder, name)) for name in T5_FILES)


def _load(source: str, **kwargs):
    from transformers import T5TokenizerFast

    try:
        return T5TokenizerFast.from_pretrained(source, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        logger.debug("no T5 tokenizer at %s: %s", source, err)
        return None


def candidate_folders(path: str | None, model_dir: str | None, cache_dir: str | None) -> list[str]:
    """Local folders to look in, in order."""
    folders = [path]
    if model_dir is not None:
        folders.append(os.path.join(model_dir, "tokenizer_2"))
    folders += cache_folders(cache_dir, "t5xxl")
    return [folder for folder in folders if folder is not None]


def load_t5_tokenizer(path: str | None = None, model_dir: str | None = None, cache_dir: str | None = None):
    """The T5 tokenizer from the first local folder that has one, else from the hub cache (never downloading).

    With `cache_dir` given, a tokenizer found in the hub cache is saved there for fully offline runs.
    """
    if path is not None and not _has_tokenizer(path):
        raise CheckpointError(f"--t5xxl_tokenizer {path}: no tokenizer.json or spiece.model in that folder")
    for folder in candidate_folders(path, model_dir, cache_dir):
        if _has_tokenizer(folder):
            tokenizer = _load(folder)
            if tokenizer is None:
                raise CheckpointError(
                    f"cannot read the T5 tokenizer in {folder}; a folder with only spiece.model needs the "
                    "sentencepiece package (pip install sentencepiece==0.2.3), or add its tokenizer.json"
                )
            return tokenizer
    offline = hub_offline()
    if not offline:  # a few small files, fetched once into the hub cache, as the reference trainer does
        logger.info("no local T5 tokenizer: loading %s's from the Hugging Face hub (cached after the first run)",
                    T5_TOKENIZER_REPO)  # fmt: skip
    tokenizer = _load(T5_TOKENIZER_REPO, local_files_only=offline)
    if tokenizer is not None and len(tokenizer) < T5_VOCAB_SIZE:
        logger.debug("ignoring the %d-token tokenizer the hub lookup returned", len(tokenizer))
        tokenizer = None
    if tokenizer is None:
        where = "offline" if offline else "locally or on the hub"
        raise CheckpointError(
            f"no T5 tokenizer found {where}: give --t5xxl_tokenizer <folder with tokenizer.json>, a diffusers FLUX "
            f"folder (its tokenizer_2/), or --tokenizer_cache_dir with a {subfolder_names('t5xxl')} subfolder; a "
            f"tokenizer of {T5_TOKENIZER_REPO} in the Hugging Face cache is used too"
        )
    if cache_dir is not None:
        tokenizer.save_pretrained(our_folder(cache_dir, "t5xxl"))
    return tokenizer
