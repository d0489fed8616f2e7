"""XTI (P+) textual inversion: one vector set per UNet cross-attention layer, saved under the layers' names."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import CheckpointError, ConfigError
from library.methods.textual_inversion_xti import XTIMethod, cross_attention_layers
from tests.test_full_model_training import cli_args, train_in_process
from tests.test_textual_inversion import TOKEN_EMBEDDING

SD1_LAYERS = ["IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID"] + [f"OUT{index:02d}" for index in range(3, 12)]


def test_cross_attention_layers_of_the_sd1_unet_carry_the_reference_names():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280))
    assert [label for label, _ in cross_attention_layers(unet)] == SD1_LAYERS


def test_xti_trains_one_vector_set_per_layer_and_saves_them_by_layer_name(
    tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path, one_thread
):
    argv = cli_args("", os.path.join(tiny_models_dir, "sd1.safetensors"), toy_dataset, str(tmp_path / "out"),
                    tokenizer_dir, "--token_string", "mychar4", "--init_word", "toy", "--num_vectors_per_token", "2",
                    "--use_object_template", "--learning_rate", "1e-2")[1:]  # fmt: skip
    method = train_in_process(argv, XTIMethod)
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    layers = method.layer_names
    assert list(saved) == sorted(layers) and len(layers) >= 3 and "MID" in layers
    assert all(saved[name].shape == (2, 32) for name in layers)
    toy_row = load_file(os.path.join(tiny_models_dir, "sd1.safetensors"))[TOKEN_EMBEDDING][5988]  # the init word
    # every layer attends to its own encoding, so each layer's vectors moved away from the shared start on their own
    assert all(not torch.equal(saved[name][0], toy_row) for name in layers)
    assert len({tuple(saved[name][0].tolist()) for name in layers}) == len(layers)
    assert torch.equal(torch.stack([saved[name] for name in layers]), method.embedding.vectors.detach())


def test_xti_weights_continue_from_a_saved_file_and_a_plain_embedding_is_refused(tmp_path):
    good = tmp_path / "xti.safetensors"
    save_file({"MID": torch.ones(2, 4), "IN01": torch.zeros(2, 4), "OUT03": torch.full((2, 4), 2.0)}, str(good))
    vectors = XTIMethod.read_start_vectors(str(good))
    assert vectors.shape == (3, 2, 4) and vectors[:, 0, 0].tolist() == [0.0, 1.0, 2.0]  # IN, MID, OUT order
    plain = tmp_path / "plain.safetensors"
    save_file({"emb_params": torch.zeros(2, 4)}, str(plain))
    with pytest.raises(CheckpointError, match="not an XTI embedding"):
        XTIMethod.read_start_vectors(str(plain))


def test_xti_refuses_sample_prompts_and_weighted_captions(tmp_path):
    from library.families.sd import SDFamily
    from library.training.entry import build_parser

    base = ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", str(tmp_path), "--token_string", "x1"]
    parser = build_parser(SDFamily, XTIMethod, "test")
    with pytest.raises(ConfigError, match="--sample_prompts"):
        XTIMethod(parser.parse_args([*base, "--sample_prompts", "p.txt"])).validate()
    with pytest.raises(ConfigError, match="--weighted_captions does not work with textual inversion"):
        XTIMethod(parser.parse_args([*base, "--weighted_captions"])).validate()
