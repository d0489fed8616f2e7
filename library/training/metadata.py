"""Training metadata written into saved files: kohya-style `ss_*` keys and Stability's model-spec keys."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import time
import uuid

logger = logging.getLogger(__name__)

MODEL_SPEC_VERSION = "1.0.0"
SECRET_OPTIONS = ("huggingface_token", "wandb_api_key")
SECRET_ENVIRONMENT = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
MIN_SECRET_LENGTH = 8
REDACTED = "***"


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


def secret_values(args: argparse.Namespace | None = None) -> list[str]:
    """The run's secrets: tokens given as options or found in the environment. Short values are left out: they
    would match ordinary text and say too little to be worth hiding."""
    values = [getattr(args, name, None) for name in SECRET_OPTIONS] if args is not None else []
    values += [os.environ.get(name) for name in SECRET_ENVIRONMENT]
    return sorted({value for value in values if isinstance(value, str) and len(value) >= MIN_SECRET_LENGTH})


def redact_secrets(values: dict[str, str], secrets: list[str], what: str = "metadata") -> dict[str, str]:
    """`values` with every secret replaced by `***`, warning which keys held one (the guard of every write of
    metadata, configs and tracker settings)."""
    redacted, found = {}, []
    for key, value in values.items():
        clean = value
        for secret in secrets:
            if isinstance(clean, str) and secret in clean:
                clean = clean.replace(secret, REDACTED)
        if clean is not value:
            found.append(key)
        redacted[key] = clean
    if found:
        logger.warning("%s %s held a secret (hub or tracker token); written as %s", what, ", ".join(found), REDACTED)
    return redacted


class SecretFilter(logging.Filter):
    """Replaces the run's secrets in log messages, whatever module logs them."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            clean = message
            for secret in self.secrets:
                clean = clean.replace(secret, REDACTED)
            if clean != message:
                record.msg, record.args = clean, None
        return True
