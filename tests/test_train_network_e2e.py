"""End to end: `accelerate launch train_network.py` on tiny models in every input format, outputs opened and checked."""

from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors import safe_open

from tests.conftest import run_cli
from tests.tokenizer_helpers import assert_sd_scripts_folder_untouched

KOHYA_UNET_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
KOHYA_TE_KEY = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"
REQUIRED_METADATA = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_base_model_version",
    "ss_learning_rate",
    "ss_optimizer",
    "ss_steps",
    "ss_epoch",
    "ss_num_train_images",
    "ss_num_reg_images",
    "ss_datasets",
    "ss_session_id",
    "ss_training_started_at",
    "ss_output_name",
    "modelspec.architecture",
    "modelspec.sai_model_spec",
)


def train_args(model: str, dataset: str, out_dir: str, tokenizer_dir: str, *extra: str) -> list[str]:
    return [
        "train_network.py",
        "--pretrained_model_name_or_path", model,
        "--dataset_config", dataset,
        "--output_dir", out_dir,
        "--output_name", "lora",
        "--network_dim", "4",
        "--network_alpha", "2",
        "--learning_rate", "1e-3",
        "--max_train_steps", "4",
        "--seed", "7",
        "--tokenizer_cache_dir", tokenizer_dir,
        "--max_data_loader_n_workers", "0",
        "--cpu_threads", "1",  # tiny models run fastest on one thread
        *extra,
    ]


def epoch_losses(output: str) -> list[float]:
    return [float(value) for value in re.findall(r"average loss (\S+)", output)]


def assert_trained_lora(result, path: str, architecture: str) -> dict[str, str]:
    assert result.returncode == 0, result.stdout + result.stderr
    losses = epoch_losses(result.stderr + result.stdout)
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses
    with safe_open(path, "pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    assert KOHYA_UNET_KEY in keys and KOHYA_TE_KEY in keys
    assert {key.split(".")[0] for key in keys if key.endswith(".alpha")}  # every module carries its alpha
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    assert not missing, missing
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert metadata["ss_steps"] == "4"
    return metadata


@pytest.mark.parametrize(
    ("source", "extra", "architecture"),
    [
        ("sd1.safetensors", [], "stable-diffusion-v1/lora"),
        ("sd1.ckpt", [], "stable-diffusion-v1/lora"),
        ("sd1-diffusers", [], "stable-diffusion-v1/lora"),
        ("sd2-v.safetensors", ["--v2", "--v_parameterization"], "stable-diffusion-v2-768-v/lora"),
    ],
)
def test_train_network_writes_kohya_lora_from_each_format(
    tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path, source, extra, architecture
):
    out_dir = tmp_path / "out"
    model = os.path.join(tiny_models_dir, source)
    result = run_cli(train_args(model, toy_dataset, str(out_dir), tokenizer_dir, *extra), tmp_path)
    metadata = assert_trained_lora(result, str(out_dir / "lora.safetensors"), architecture)
    assert metadata["ss_num_reg_images"] == "2"
    assert metadata["ss_base_model_version"] == ("sd_v2" if "--v2" in extra else "sd_v1")


def test_train_network_reads_a_tokenizer_cache_filled_by_sd_scripts(
    tiny_models_dir, toy_dataset, sd_scripts_tokenizer_dir, tmp_path
):
    out_dir = tmp_path / "out"
    model = os.path.join(tiny_models_dir, "sd1.safetensors")
    args = train_args(model, toy_dataset, str(out_dir), sd_scripts_tokenizer_dir, "--max_train_steps", "1")
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "building the CLIP tokenizer from open-clip-torch" not in result.stdout + result.stderr
    assert (out_dir / "lora.safetensors").is_file()
    assert_sd_scripts_folder_untouched(sd_scripts_tokenizer_dir)
