"""A --tokenizer_cache_dir folder laid out as kohya-ss sd-scripts fills it, built from the offline test tokenizers."""

from __future__ import annotations

import os

from library.atomic import atomic_write_text
from library.checkpoints.tokenizers import EOS_TOKEN, write_clip_tokenizer_files
from library.testing.tiny_flux import write_t5_tokenizer
from library.testing.tiny_lumina import write_gemma_tokenizer

# Spelled out, not taken from library/checkpoints/tokenizer_cache.py, so that a wrong name there fails the tests.
CLIP_L = "openai_clip-vit-large-patch14"
CLIP_SD2 = "stabilityai_stable-diffusion-2"
CLIP_G = "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"
T5XXL = "google_t5-v1_1-xxl"
GEMMA2 = "models--google--gemma-2-2b"  # sd-scripts passes cache_dir to from_pretrained: the hub cache layout
GEMMA2_COMMIT = "0123456789abcdef0123456789abcdef01234567"  # any id: refs/main names the snapshot folder
SUBFOLDERS = (CLIP_L, CLIP_SD2, CLIP_G, T5XXL, GEMMA2)


def gemma2_snapshot(cache_dir: str) -> str:
    """The folder holding the Gemma tokenizer's files."""
    return os.path.join(cache_dir, GEMMA2, "snapshots", GEMMA2_COMMIT)


def write_sd_scripts_tokenizer_cache(out_dir: str) -> str:
    """The CLIP (SD 1.x, SD 2.x, bigG), T5 and Gemma tokenizers where sd-scripts saves them; nothing at the top."""
    write_clip_tokenizer_files(os.path.join(out_dir, CLIP_L), EOS_TOKEN)
    write_clip_tokenizer_files(os.path.join(out_dir, CLIP_SD2), "!")
    # padded with the end token (sd-scripts sets "!" after loading), so a test sees the loader set "!" itself
    write_clip_tokenizer_files(os.path.join(out_dir, CLIP_G), EOS_TOKEN)
    write_t5_tokenizer(os.path.join(out_dir, T5XXL))
    write_gemma_tokenizer(gemma2_snapshot(out_dir))
    atomic_write_text(os.path.join(out_dir, GEMMA2, "refs", "main"), GEMMA2_COMMIT)
    return out_dir
