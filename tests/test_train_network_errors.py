"""User mistakes end with one clear error line, no traceback, and a non-zero exit, before any training."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli
from tests.test_train_network_e2e import train_args


def assert_one_clear_error(result, *fragments: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    error_lines = [line for line in output.splitlines() if " ERROR " in line]
    assert len(error_lines) == 1, output
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]
    return error_lines[0]


def test_missing_checkpoint_path_is_one_error_line(toy_dataset, tokenizer_dir, tmp_path):
    missing = str(tmp_path / "no_such_model.safetensors")
    result = run_cli(train_args(missing, toy_dataset, str(tmp_path / "out"), tokenizer_dir), tmp_path)
    assert_one_clear_error(result, "not found", missing)
    assert not (tmp_path / "out").exists()


def test_checkpoint_with_missing_keys_names_them(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path):
    state = load_file(os.path.join(tiny_models_dir, "sd1.safetensors"))
    dropped = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    del state[dropped]
    broken = str(tmp_path / "broken.safetensors")
    save_file(state, broken)
    result = run_cli(train_args(broken, toy_dataset, str(tmp_path / "out"), tokenizer_dir), tmp_path)
    assert_one_clear_error(result, broken, dropped, "missing")


def test_sdxl_checkpoint_is_refused_with_the_right_script(toy_dataset, tokenizer_dir, tmp_path):
    sdxl_keys = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.1.model.token_embedding.weight",
        "first_stage_model.encoder.conv_in.weight",
    ]
    sdxl = str(tmp_path / "sd_xl_base.safetensors")
    save_file({key: torch.zeros(2, 2) for key in sdxl_keys}, sdxl)
    result = run_cli(train_args(sdxl, toy_dataset, str(tmp_path / "out"), tokenizer_dir), tmp_path)
    assert_one_clear_error(result, "SDXL", "sdxl_train_network.py")


def test_v2_checkpoint_without_v2_flag_says_to_add_it(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path):
    model = os.path.join(tiny_models_dir, "sd2-v.safetensors")
    result = run_cli(train_args(model, toy_dataset, str(tmp_path / "out"), tokenizer_dir), tmp_path)
    assert_one_clear_error(result, "--v2")
