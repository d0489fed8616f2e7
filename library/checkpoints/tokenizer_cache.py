"""Where --tokenizer_cache_dir holds each tokenizer: our layout first, then the one kohya-ss sd-scripts fills, so a
folder made by sd-scripts works as it is. We read sd-scripts' folders and never write into them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

TokenizerKind = Literal["clip_l", "clip_sd2", "clip_g", "t5xxl", "gemma2"]


@dataclass(frozen=True)
class CacheLayout:
    """Where one tokenizer lives inside --tokenizer_cache_dir."""

    ours: str | None  # our subfolder ("" for the top of the folder); None: we keep none there
    sd_scripts_repo: str  # the hub repo sd-scripts loads it from and names its copy after
    # sd-scripts saves most tokenizers in <cache>/<repo with "/" -> "_">/, but hands Lumina's cache folder to
    # from_pretrained(cache_dir=...), which leaves the hub cache layout (models--org--name/snapshots/<commit>/).
    sd_scripts_hub_cache: bool = False


LAYOUTS: dict[TokenizerKind, CacheLayout] = {
    # SD 1.x / 2.x share one CLIP vocabulary, so both read our top-level files (with their own padding token).
    "clip_l": CacheLayout("", "openai/clip-vit-large-patch14"),
    "clip_sd2": CacheLayout("", "stabilityai/stable-diffusion-2"),
    "clip_g": CacheLayout(None, "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"),
    "t5xxl": CacheLayout("t5xxl", "google/t5-v1_1-xxl"),
    "gemma2": CacheLayout("gemma2", "google/gemma-2-2b", sd_scripts_hub_cache=True),
}


def our_folder(cache_dir: str, kind: TokenizerKind) -> str:
    """The folder we save the `kind` tokenizer in."""
    ours = LAYOUTS[kind].ours
    if ours is None:
        raise ValueError(f"no {kind} tokenizer is saved in --tokenizer_cache_dir")
    return os.path.join(cache_dir, ours) if ours else cache_dir


def sd_scripts_subfolder(kind: TokenizerKind) -> str:
    """The name of the subfolder sd-scripts keeps the `kind` tokenizer in."""
    layout = LAYOUTS[kind]
    if layout.sd_scripts_hub_cache:
        return "models--" + layout.sd_scripts_repo.replace("/", "--")
    return layout.sd_scripts_repo.replace("/", "_")


def sd_scripts_folder(cache_dir: str, kind: TokenizerKind) -> str | None:
    """The folder of sd-scripts' copy of the `kind` tokenizer; None when a hub-cache copy is missing."""
    layout = LAYOUTS[kind]
    if not layout.sd_scripts_hub_cache:
        return os.path.join(cache_dir, sd_scripts_subfolder(kind))
    from huggingface_hub import try_to_load_from_cache

    # from_pretrained fetches tokenizer_config.json first; the snapshot folder it lies in holds the rest
    found = try_to_load_from_cache(layout.sd_scripts_repo, "tokenizer_config.json", cache_dir=cache_dir)
    return os.path.dirname(found) if isinstance(found, str) else None


def subfolder_names(kind: TokenizerKind) -> str:
    """The subfolders read for the `kind` tokenizer, for messages (`t5xxl/ or sd-scripts' google_t5-v1_1-xxl/`)."""
    ours = LAYOUTS[kind].ours
    theirs = f"sd-scripts' {sd_scripts_subfolder(kind)}/"
    return f"{ours}/ or {theirs}" if ours else theirs


def cache_folders(cache_dir: str | None, kind: TokenizerKind) -> list[str]:
    """The folders of `cache_dir` that may hold the `kind` tokenizer, in the order to try them: ours, sd-scripts'."""
    if cache_dir is None:
        return []
    folders = [our_folder(cache_dir, kind)] if LAYOUTS[kind].ours is not None else []
    theirs = sd_scripts_folder(cache_dir, kind)
    return folders + ([theirs] if theirs is not None else [])
