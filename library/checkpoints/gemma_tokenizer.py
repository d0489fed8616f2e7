"""The Gemma tokenizer of Lumina Image 2.0, found offline: a given folder, a diffusers model folder, a cache folder,
or the hub cache. A folder needs `tokenizer.json` (what diffusers folders ship), or `tokenizer.model` with the
sentencepiece package installed to convert it. Offline, a tokenizer asked of the hub can come back with nothing but
its five special tokens and no error, so every tokenizer is checked before use.
"""

from __future__ import annotations

import logging
import os

from library.atomic import atomic_path
from library.checkpoints import lumina_configs
from library.checkpoints.hub_models import hub_offline
from library.checkpoints.tokenizer_cache import cache_folders, our_folder, subfolder_names
from library.errors import CheckpointError

logger = logging.getLogger(__name__)

GEMMA_FILES = ("tokenizer.json", "tokenizer.model")
# Hub repos whose cached tokenizer is the one Lumina 2 was trained with: (repo, subfolder).
HUB_SOURCES = ((lumina_configs.GEMMA2_REPO, None), (lumina_configs.LUMINA_REPO, "tokenizer"))
_SPECIAL_TOKENS = 5  # <pad> <eos> <bos> <unk> <mask>: all an empty Gemma tokenizer holds


def _has_tokenizer(folder: str | None) -> bool:
    return folder is not None and any(os.path.isfile(os.path.join(folder, name)) for name in GEMMA_FILES)


def _load(source: str, **kwargs):
    from transformers import GemmaTokenizerFast

    try:
        return GemmaTokenizerFast.from_pretrained(source, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        logger.debug("no Gemma tokenizer at %s: %s", source, err)
        return None


def problem(tokenizer, min_size: int = _SPECIAL_TOKENS + 1) -> str | None:
    """Why `tokenizer` cannot serve Lumina 2 (too few tokens, no <bos> / <eos> / <pad>), or None when it can."""
    if len(tokenizer) < min_size:
        return f"it holds {len(tokenizer)} tokens"
    missing = [name for name in ("bos", "eos", "pad") if getattr(tokenizer, f"{name}_token_id") is None]
    return f"it has no {' / '.join(missing)} token" if missing else None


def candidate_folders(path: str | None, model_dir: str | None, cache_dir: str | None) -> list[str]:
    """Local folders to look in, in order."""
    folders = [path]
    if model_dir is not None:
        folders.append(os.path.join(model_dir, "tokenizer"))
    folders += cache_folders(cache_dir, "gemma2")
    return [folder for folder in folders if folder is not None]


def _from_folder(folder: str):
    tokenizer = _load(folder)
    reason = "it cannot be read" if tokenizer is None else problem(tokenizer)
    if reason is not None:
        raise CheckpointError(
            f"the Gemma tokenizer in {folder} is unusable ({reason}); a folder with only tokenizer.model needs the "
            "sentencepiece package (pip install sentencepiece==0.2.3), or add its tokenizer.json"
        )
    return tokenizer


def _from_hub_cache():
    """From the hub cache; online, downloaded into it first (a few small files)."""
    for repo, subfolder in HUB_SOURCES:
        kwargs = {"local_files_only": hub_offline()} | ({"subfolder": subfolder} if subfolder else {})
        tokenizer = _load(repo, **kwargs)
        if tokenizer is not None and problem(tokenizer, lumina_configs.GEMMA2_VOCAB_SIZE) is None:
            return tokenizer
        if tokenizer is not None:
            logger.debug("ignoring the %d-token tokenizer the offline hub lookup of %s returned", len(tokenizer), repo)
    return None


def load_gemma_tokenizer(path: str | None = None, model_dir: str | None = None, cache_dir: str | None = None):
    """The Gemma tokenizer from the first local folder that has one, else from the hub cache (never downloading),
    set to pad on the right as the reference and the diffusers pipeline do.

    With `cache_dir` given, a tokenizer found in the hub cache is saved there for fully offline runs.
    """
    if path is not None and not _has_tokenizer(path):
        raise CheckpointError(f"--gemma2_tokenizer {path}: no tokenizer.json or tokenizer.model in that folder")
    folder = next((f for f in candidate_folders(path, model_dir, cache_dir) if _has_tokenizer(f)), None)
    tokenizer = _from_folder(folder) if folder is not None else None
    if tokenizer is None:
        tokenizer = _from_hub_cache()
        if tokenizer is None:
            where = "offline" if hub_offline() else "locally or on the hub"
            raise CheckpointError(
                f"no Gemma tokenizer found {where}: give --gemma2_tokenizer <folder with tokenizer.json>, a diffusers "
                f"Lumina 2 folder (its tokenizer/), or --tokenizer_cache_dir with a {subfolder_names('gemma2')} "
                f"subfolder; a tokenizer of {lumina_configs.GEMMA2_REPO} or {lumina_configs.LUMINA_REPO} in the "
                "Hugging Face cache is used too"
            )
        if cache_dir is not None:
            with atomic_path(our_folder(cache_dir, "gemma2"), suffix="") as temp:
                tokenizer.save_pretrained(temp)
    tokenizer.padding_side = "right"
    return tokenizer
