"""Tokens never reach what a run writes: file metadata, written config files, tracker settings and the log."""

from __future__ import annotations

import logging
import os

import pytest
from safetensors import safe_open

from library.training.metadata import REDACTED, SecretFilter, redact_secrets, secret_values
from tests.conftest import run_cli
from tests.test_train_network_e2e import train_args

TOKEN = "hf_guardTestToken0123456789"


def test_redact_secrets_replaces_tokens_and_names_the_keys(caplog):
    with caplog.at_level(logging.WARNING):
        clean = redact_secrets({"ss_output_name": f"run-{TOKEN}", "ss_steps": "4", "count": 3}, [TOKEN])

    assert clean == {"ss_output_name": f"run-{REDACTED}", "ss_steps": "4", "count": 3}
    assert "ss_output_name held a secret" in caplog.text and TOKEN not in caplog.text


def test_secret_values_come_from_options_and_environment(monkeypatch):
    import argparse

    monkeypatch.setenv("WANDB_API_KEY", "wandb-key-0123456789")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    args = argparse.Namespace(huggingface_token=TOKEN, wandb_api_key="short")

    assert secret_values(args) == sorted([TOKEN, "wandb-key-0123456789"])  # "short" would match ordinary text


def test_log_filter_hides_tokens_in_any_message():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "saved %s", (f"/out/{TOKEN}.safetensors",), None)
    SecretFilter([TOKEN]).filter(record)
    assert record.getMessage() == f"saved /out/{REDACTED}.safetensors"


@pytest.mark.slow
def test_training_writes_no_token_into_metadata_config_or_log(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path):
    model = os.path.join(tiny_models_dir, "sd1.safetensors")
    out_dir = tmp_path / "out"
    args = train_args(model, toy_dataset, str(out_dir), tokenizer_dir, "--huggingface_token", TOKEN,
                      "--logging_dir", str(tmp_path / f"logs-{TOKEN}"))  # fmt: skip
    args[args.index("--output_name") + 1] = f"lora-{TOKEN}"  # a token pasted into a recorded option
    args[args.index("--max_train_steps") + 1] = "1"
    result = run_cli(args, tmp_path, launcher=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    with safe_open(str(out_dir / f"lora-{TOKEN}.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_output_name"] == f"lora-{REDACTED}" and metadata["modelspec.title"] == f"lora-{REDACTED}"
    assert not any(TOKEN in value for value in metadata.values())
    assert TOKEN not in output and f"lora-{REDACTED}.safetensors" in output

    config = tmp_path / "run.toml"
    written = run_cli([*args, "--config_file", str(config), "--output_config"], tmp_path, launcher=False)
    assert written.returncode == 0, written.stdout + written.stderr
    text = config.read_text()
    assert TOKEN not in text and f"logs-{REDACTED}" in text
