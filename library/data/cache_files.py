"""What the model-output caches share: fingerprints of the weights that make cached outputs valid, and cache files
(safetensors written atomically, read back tolerantly: a damaged file is reported and rebuilt, never fatal).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from library.atomic import atomic_path

logger = logging.getLogger(__name__)


def tensors_fingerprint(tensors: Iterable[torch.Tensor], *settings: object) -> str:
    """A short hash of model weights and settings: what makes cached outputs valid.

    Each tensor enters by its shape and its float64 sum and sum of squares, computed where it lives: any training
    of the model changes them, at a fraction of the cost of hashing every byte.
    """
    tensors = list(tensors)
    digest = hashlib.sha256(repr((settings, [tuple(t.shape) for t in tensors])).encode())
    with torch.no_grad():
        sums = [torch.stack([t.double().sum(), t.double().square().sum()]).cpu() for t in tensors]
    if sums:
        digest.update(torch.cat(sums).numpy().tobytes())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class CacheFileHeader:
    """The names and string metadata of a cache file, read without loading any tensor."""

    names: frozenset[str]
    metadata: dict[str, str]


def read_header(path: str) -> CacheFileHeader | None:
    """The header of the cache file at `path`; None when there is none or it is damaged (with a warning)."""
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            return CacheFileHeader(frozenset(handle.keys()), dict(handle.metadata() or {}))
    except (OSError, SafetensorError) as err:
        logger.warning("cache file %s is damaged (%s); it is rebuilt", path, err)
        return None


def read_tensors(path: str, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The named tensors of a cache file (all of them when `names` is None), on the CPU."""
    with safe_open(path, framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in (handle.keys() if names is None else names)}


def write_cache_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a cache file atomically (a crash leaves the old file or none, never a half-written one)."""
    contiguous = {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
    with atomic_path(path) as temp:
        save_file(contiguous, temp, metadata=metadata)
