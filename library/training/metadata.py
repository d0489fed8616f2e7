"""Training metadata written into saved files: kohya-style `ss_*` keys and Stability's model-spec keys."""

from __future__ import annotations

import datetime
import json
import time
import uuid

MODEL_SPEC_VERSION = "1.0.0"
SECRET_OPTIONS = ("huggingface_token", "wandb_api_key")


def new_session() -> dict[str, str]:
    """Keys fixed at the start of a run: a random session id and the start time."""
    return {"ss_session_id": str(uuid.uuid4().int % 2**31), "ss_training_started_at": str(time.time())}


def model_spec(
    architecture: str,
    adapter: str | None,
    title: str,
    resolution: tuple[int, int],
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """`modelspec.*` keys (Stability AI model-spec 1.0) that inference tools read to recognise a file."""
    spec = {
        "modelspec.sai_model_spec": MODEL_SPEC_VERSION,
        "modelspec.architecture": f"{architecture}/{adapter}" if adapter else architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
    }
    spec.update(extra or {})
    return spec


def stringify(metadata: dict) -> dict[str, str]:
    """safetensors metadata must be str -> str: JSON-encode containers, str() the rest, drop None."""
    result = {}
    for key, value in metadata.items():
        if value is None:
            continue
        result[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)
    return result


def assert_no_secrets(metadata: dict[str, str], secrets: list[str]) -> None:
    """Internal guard: no secret value (hub token ...) may appear in anything we write."""
    for secret in secrets:
        if secret and any(secret in value for value in metadata.values()):
            raise RuntimeError("refusing to write metadata that contains a secret")
