"""Models and VAEs named by a Hugging Face model id (`owner/name`): read from the hub cache, downloaded only when
online. Offline (HF_HUB_OFFLINE=1) with nothing cached, the run stops before loading with one line naming what to
give instead."""

from __future__ import annotations

import os
import re

from library.errors import CheckpointError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FILE_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".json", ".toml")


def hub_offline() -> bool:
    """Whether hub downloads are forbidden (HF_HUB_OFFLINE=1, read now rather than at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return constants.HF_HUB_OFFLINE or value.strip().upper() in ("1", "ON", "YES", "TRUE")


def is_hub_id(value: str) -> bool:
    """`owner/name` that is not a local path: a model id on the hub."""
    return (
        not os.path.exists(value)
        and bool(_HUB_ID.match(value))
        and not value.lower().endswith(_FILE_EXTENSIONS)
        and not value.startswith(".")
    )


def cached_file(repo_id: str, filename: str) -> str | None:
    """The path of `filename` of `repo_id` in the hub cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None


def check_hub_model(repo_id: str, option: str, markers: tuple[str, ...], local_hint: str) -> None:
    """Before any load: offline, one of `markers` (e.g. `unet/config.json`) must be in the hub cache; online the
    model is downloaded into the cache when it loads."""
    if not hub_offline() or any(cached_file(repo_id, marker) for marker in markers):
        return
    raise CheckpointError(
        f"{option} {repo_id}: this Hugging Face model is not in the hub cache and HF_HUB_OFFLINE=1 forbids "
        f"downloading it; give {local_hint}, or run once without HF_HUB_OFFLINE to download it"
    )


def hub_vae_subfolder(repo_id: str) -> str | None:
    """Where a VAE repo keeps its config: the root (a VAE repo) or `vae/` (a whole diffusers model)."""
    if cached_file(repo_id, "config.json"):
        return None
    if cached_file(repo_id, "vae/config.json"):
        return "vae"
    if hub_offline():
        return None
    from huggingface_hub import file_exists

    return None if file_exists(repo_id, "config.json") else "vae"
