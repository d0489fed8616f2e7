"""The `sdxl` family: conditioning (two encoders, pooled output, size embeddings), LoRA names, caches, options."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from library.data.dataset import build_dataset_group
from library.errors import ConfigError
from library.families.sdxl import SDXLFamily, size_conditioning
from library.methods.network import NetworkMethod
from library.testing.sd_scripts_tokenizers import CLIP_G, CLIP_L
from library.training.entry import build_parser, run_training
from tests.tokenizer_helpers import assert_sd_scripts_folder_untouched, assert_tokenizer_from

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait


LONG_CAPTION = "a red circle on a blue square, " * 20  # well over 75 tokens


def sdxl_args(model: str, tokenizer_dir: str, *extra: str, method=NetworkMethod):
    argv = ["--pretrained_model_name_or_path", model, "--output_dir", "unused", "--tokenizer_cache_dir", tokenizer_dir]
    return build_parser(SDXLFamily, method, "test").parse_args([*argv, *extra])


@pytest.fixture(scope="module")
def loaded(tiny_sdxl_dir, tokenizer_dir):
    family = SDXLFamily(sdxl_args(os.path.join(tiny_sdxl_dir, "sdxl.safetensors"), tokenizer_dir))
    return family, family.load(torch.float32)


def test_loaded_models_save_back_to_the_same_file_bit_identically(loaded, tiny_sdxl_dir):
    from safetensors.torch import load_file

    from library.checkpoints.sdxl_save import sgm_checkpoint

    original = load_file(os.path.join(tiny_sdxl_dir, "sdxl.safetensors"))

    saved = sgm_checkpoint(loaded[1])

    assert sorted(saved) == sorted(original)
    assert all(torch.equal(saved[key], original[key]) and saved[key].dtype == original[key].dtype for key in original)


def test_tokenizers_are_read_from_sd_scripts_layout_without_writing_there(tiny_sdxl_dir, sd_scripts_tokenizer_dir):
    family = SDXLFamily(sdxl_args(os.path.join(tiny_sdxl_dir, "sdxl.safetensors"), sd_scripts_tokenizer_dir))
    tokenizer1, tokenizer2 = family.load(torch.float32).tokenizers
    for tokenizer, subfolder in ((tokenizer1, CLIP_L), (tokenizer2, CLIP_G)):
        assert_tokenizer_from(tokenizer, os.path.join(sd_scripts_tokenizer_dir, subfolder), "a photo of a cat")
    assert (tokenizer1.pad_token, tokenizer2.pad_token) == ("<|endoftext|>", "!")
    assert_sd_scripts_folder_untouched(sd_scripts_tokenizer_dir)


def test_encode_text_joins_penultimate_states_of_both_encoders_and_pools_encoder_2(loaded):
    family, models = loaded
    encoder1, encoder2 = models.text_encoders
    with torch.no_grad():
        text = family.encode_text(models, ["a photo of a cat"])
        ids1 = models.tokenizers[0](["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt")
        ids2 = models.tokenizers[1](["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt")
        out1 = encoder1(ids1.input_ids, output_hidden_states=True)
        out2 = encoder2(ids2.input_ids, output_hidden_states=True)

    expected = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)  # (1, 77, 32 + 48)
    torch.testing.assert_close(text["encoder_hidden_states"], expected)
    torch.testing.assert_close(text["text_embeds"], out2.text_embeds)  # (1, 40)
    assert models.tokenizers[1].pad_token == "!" and models.tokenizers[0].pad_token == "<|endoftext|>"


@pytest.mark.parametrize(("max_token_length", "length"), [(150, 152), (225, 227)])
def test_long_captions_are_chunked_and_pooled_from_the_first_chunk(
    loaded, tiny_sdxl_dir, tokenizer_dir, max_token_length, length
):
    family, models = loaded
    model = os.path.join(tiny_sdxl_dir, "sdxl.safetensors")
    long_family = SDXLFamily(sdxl_args(model, tokenizer_dir, "--max_token_length", str(max_token_length)))
    with torch.no_grad():
        long = long_family.encode_text(models, [LONG_CAPTION, "short"])
        short = family.encode_text(models, [LONG_CAPTION, "short"])

    assert long["encoder_hidden_states"].shape == (2, length, 80)
    # The first chunk is the caption cut at 75 tokens: its pooled output is what a 75-token run gives.
    torch.testing.assert_close(long["text_embeds"], short["text_embeds"])


def test_size_conditioning_is_original_size_crop_and_target_per_image():
    batch = {"original_sizes": [(600, 800), (512, 512)], "crop_top_lefts": [(0, 37), (0, 0)], "target_size": (512, 576)}

    time_ids = size_conditioning(batch)

    assert time_ids.tolist() == [[600, 800, 0, 37, 512, 576], [512, 512, 0, 0, 512, 576]]


def test_predict_uses_the_size_conditioning(loaded):
    family, models = loaded
    batch = {"original_sizes": [(64, 64)], "crop_top_lefts": [(0, 0)], "target_size": (64, 64)}
    cropped = dict(batch, original_sizes=[(128, 64)], crop_top_lefts=[(32, 0)])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = family.predict(models, latents, torch.tensor([500]), family.encode_conditioning(models, ["x"], batch))
        other = family.predict(models, latents, torch.tensor([500]), family.encode_conditioning(models, ["x"], cropped))

    assert plain.shape == (1, 4, 8, 8) and not torch.allclose(plain, other)


def test_batches_carry_the_sizes_the_dataset_engine_used(toy_dataset):
    from PIL import Image

    group = build_dataset_group(group_args(toy_dataset), 0, 1.0)
    batch = group[0]

    time_ids = size_conditioning(batch)
    for row, path in zip(time_ids.tolist(), batch["image_paths"], strict=True):
        with Image.open(path) as image:
            assert row[:2] == [image.height, image.width]
        assert row[4:] == list(batch["images"].shape[2:])


def test_lora_names_use_sgm_blocks_and_both_encoders(loaded):
    from networks import lora

    family, models = loaded
    network = lora.create_network(
        1.0, 4, 1.0, models.vae, family.network_text_encoders(models), family.network_denoiser(models), conv_dim=4
    )
    names = {module.lora_name for module in network.all_loras()}
    plain = lora.create_network(1.0, 4, 1.0, None, [], models.denoiser, conv_dim=4)

    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2" in names
    assert {
        "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_input_blocks_7_0_skip_connection",
    } <= names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc2" in names
    assert not any("down_blocks" in name or "up_blocks" in name for name in names)
    assert len([n for n in names if n.startswith("lora_unet")]) == len(plain.unet_loras)  # every layer still found


def test_cache_text_encoder_outputs_refuses_caption_shuffle_before_loading(toy_dataset, tmp_path):
    shuffled = tmp_path / "shuffled.toml"
    config = Path(toy_dataset).read_text().replace("num_repeats = 1", "num_repeats = 1\n  shuffle_caption = true")
    shuffled.write_text(config)
    family = SDXLFamily(sdxl_args("missing.safetensors", "t", "--cache_text_encoder_outputs"))
    group = build_dataset_group(group_args(str(shuffled)), 0, 1.0)

    with pytest.raises(
        ConfigError, match=r"datasets\[0\]\.subsets\[0\] sets shuffle_caption.*--cache_text_encoder_out"
    ):
        family.validate_run(group, trains_text_encoder=False)
    with pytest.raises(ConfigError, match="--network_train_unet_only"):
        family.validate_run(build_dataset_group(group_args(toy_dataset), 0, 1.0), trains_text_encoder=True)


def group_args(dataset_config: str):
    from library.config.dataset_cli import DatasetSource

    return DatasetSource(dataset_config=dataset_config)


def test_disk_cache_is_reused_only_for_the_same_caption(loaded, tiny_sdxl_dir, tokenizer_dir, tmp_path):
    from library.testing.toy_data import write_toy_dataset

    _, models = loaded
    model = os.path.join(tiny_sdxl_dir, "sdxl.safetensors")
    group = build_dataset_group(group_args(write_toy_dataset(str(tmp_path), count=3)), 0, 1.0)
    first = SDXLFamily(sdxl_args(model, tokenizer_dir, "--cache_text_encoder_outputs_to_disk"))
    first.before_training(models, group)
    files = [os.path.splitext(path)[0] + "_sdxl_te.safetensors" for path in group.datasets[0].image_paths]
    assert all(os.path.isfile(file) for file in files)

    captions = group.datasets[0].captions[:2]
    batch = {"original_sizes": [(64, 64)] * 2, "crop_top_lefts": [(0, 0)] * 2, "target_size": (64, 64)}
    cached = first.encode_conditioning(models, captions, batch)
    assert all(encoder.device.type == "cpu" for encoder in models.text_encoders)  # freed from the device
    with torch.no_grad():
        fresh = first.encode_text(models, captions)
    torch.testing.assert_close(cached["encoder_hidden_states"], fresh["encoder_hidden_states"])
    torch.testing.assert_close(cached["text_embeds"], fresh["text_embeds"])

    group.datasets[0].captions[0] = "a changed caption"
    second = SDXLFamily(sdxl_args(model, tokenizer_dir, "--cache_text_encoder_outputs_to_disk"))
    second.before_training(models, group)
    assert sorted(second.text_cache.entries) == sorted(["a changed caption", *group.datasets[0].captions[1:]])
    assert second.text_cache_counts == (1, 2)  # one caption encoded, two files still valid


def test_text_fingerprint_changes_when_any_encoder_layer_changes(loaded):
    from library.data.text_cache import tensors_fingerprint

    _, models = loaded
    weights = [param.detach().clone() for encoder in models.text_encoders for param in encoder.parameters()]
    before = tensors_fingerprint(weights, "sdxl", 75)
    weights[len(weights) // 2][0, 0] += 1e-3  # a middle layer, as a text-encoder fine-tune would change it

    assert tensors_fingerprint(weights, "sdxl", 75) != before
    assert tensors_fingerprint(weights, "sdxl", 150) != tensors_fingerprint(weights, "sdxl", 75)


def test_text_encoder_learning_rates_fall_back_to_text_encoder_lr(tiny_sdxl_dir, tokenizer_dir):
    family = SDXLFamily(sdxl_args("m.safetensors", tokenizer_dir, "--text_encoder_lr2", "3e-5"))

    assert family.text_encoder_learning_rates(1e-5) == [1e-5, 3e-5]


def test_block_lr_with_22_values_fails_before_loading_naming_23(toy_dataset, tmp_path, caplog):
    from library.methods.finetune import FineTuneMethod

    argv = [
        "--pretrained_model_name_or_path",
        str(tmp_path / "not_loaded.safetensors"),
        "--dataset_config",
        toy_dataset,
        "--output_dir",
        str(tmp_path / "out"),
        "--block_lr",
        ",".join(["1e-5"] * 22),
    ]
    with pytest.raises(SystemExit) as stop:
        run_training("sdxl", "finetune", "test", argv)

    assert stop.value.code == 1
    assert "--block_lr needs 23 comma-separated learning rates" in caplog.text and "got 22" in caplog.text
    assert not (tmp_path / "out").exists()
    assert FineTuneMethod.name == "finetune"


def test_block_lr_freezes_blocks_with_rate_zero(loaded, tiny_sdxl_dir, tokenizer_dir):
    from library.methods.finetune import FineTuneMethod

    _, models = loaded
    rates = ["0"] + ["1e-5"] * 21 + ["0"]  # embeddings and output layers frozen
    args = sdxl_args("m.safetensors", tokenizer_dir, "--block_lr", ",".join(rates), method=FineTuneMethod)
    family = SDXLFamily(args)
    unet = models.denoiser

    groups = family.denoiser_param_groups(unet, 1e-4)

    trained = {id(param) for group in groups for param in group["params"]}
    assert id(unet.conv_out.weight) not in trained and not unet.conv_out.weight.requires_grad
    assert id(unet.add_embedding.linear_1.weight) not in trained
    assert id(unet.down_blocks[1].attentions[0].proj_in.weight) in trained
    unet.requires_grad_(False)
