"""Tests of the LoRA network plugin (networks/lora.py) on tiny SD 1.x / 2.x models built in code."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from library.errors import CheckpointError, ConfigError
from library.testing.tiny_configs import tiny_text_encoder_config, tiny_unet_config
from networks import lora

UNET_EXAMPLE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TE_EXAMPLE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
# Tiny UNet: 6 transformer blocks x (proj_in, proj_out, 8 attention projections, 2 feed-forward layers).
UNET_ATTENTION_LORAS = 6 * 12
# Tiny CLIP: 3 layers x (q, k, v, out, fc1, fc2).
TEXT_ENCODER_LORAS = 3 * 6


def tiny_models(v2: bool = False, seed: int = 0) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_encoder_config(v2))).eval()
    unet = UNet2DConditionModel(**tiny_unet_config(v2)).eval()
    return text_encoder, unet


def model_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(1, 4, 8, 8, generator=generator),  # (B, C, H, W) latents
        "encoder_hidden_states": torch.randn(1, 4, 32, generator=generator),  # (B, tokens, width)
        "input_ids": torch.tensor([[49406, 320, 1929, 49407]]),
    }


@torch.no_grad()
def run_models(text_encoder: CLIPTextModel, unet: UNet2DConditionModel) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = model_inputs()
    text_embeds = text_encoder(inputs["input_ids"]).last_hidden_state
    noise_pred = unet(inputs["sample"], 10, inputs["encoder_hidden_states"]).sample
    return text_embeds, noise_pred


@torch.no_grad()
def randomize(network: lora.LoRANetwork, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in network.parameters():
        param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def applied_network(
    v2: bool = False, **network_args: str
) -> tuple[lora.LoRANetwork, CLIPTextModel, UNet2DConditionModel]:
    text_encoder, unet = tiny_models(v2)
    network = lora.create_network(1.0, 4, 2, None, text_encoder, unet, **network_args)
    network.apply_to(text_encoder, unet, True, True)
    return network, text_encoder, unet


@pytest.mark.parametrize("v2", [False, True])
def test_create_network_names_keys_in_kohya_format(v2: bool) -> None:
    text_encoder, unet = tiny_models(v2)
    network = lora.create_network(1.0, 8, 4, None, text_encoder, unet)
    state = network.state_dict()

    for name in (UNET_EXAMPLE, TE_EXAMPLE):
        assert state[f"{name}.lora_down.weight"].shape[0] == 8
        assert f"{name}.lora_up.weight" in state
        assert state[f"{name}.alpha"].shape == () and float(state[f"{name}.alpha"]) == 4.0
    assert len(network.unet_loras) == UNET_ATTENTION_LORAS
    assert len(network.text_encoder_loras) == TEXT_ENCODER_LORAS
    assert len(state) == 3 * (UNET_ATTENTION_LORAS + TEXT_ENCODER_LORAS)
    proj_in = state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    assert proj_in.shape == ((8, 32) if v2 else (8, 32, 1, 1))  # SD2 linear projections, SD1 1x1 convs
    assert all(value.dtype == torch.float32 for value in state.values())


def test_create_network_uses_te1_te2_prefixes_for_two_text_encoders() -> None:
    first, unet = tiny_models()
    second, _ = tiny_models(seed=1)
    network = lora.create_network(1.0, 4, 1, None, [first, second], unet)
    prefixes = {key.split("_text_model_")[0] for key in network.state_dict() if key.startswith("lora_te")}
    assert prefixes == {"lora_te1", "lora_te2"}


def test_network_output_is_bit_identical_to_base_at_multiplier_zero() -> None:
    base = run_models(*tiny_models())
    network, text_encoder, unet = applied_network()
    randomize(network)
    network.set_multiplier(0.0)

    text_embeds, noise_pred = run_models(text_encoder, unet)
    assert torch.equal(text_embeds, base[0])
    assert torch.equal(noise_pred, base[1])


def test_network_changes_output_when_up_weights_are_set() -> None:
    base = run_models(*tiny_models())
    network, text_encoder, unet = applied_network()
    randomize(network)

    text_embeds, noise_pred = run_models(text_encoder, unet)
    assert not torch.allclose(text_embeds, base[0])
    assert not torch.allclose(noise_pred, base[1])


def test_saved_network_round_trips_through_create_network_from_weights(tmp_path) -> None:
    network, text_encoder, unet = applied_network(conv_dim="2", conv_alpha="1")
    randomize(network)
    expected = run_models(text_encoder, unet)
    path = tmp_path / "lora.safetensors"
    network.save_weights(path, None, None)

    fresh_te, fresh_unet = tiny_models()
    loaded, weights = lora.create_network_from_weights(1.0, str(path), None, fresh_te, fresh_unet)
    loaded.apply_to(fresh_te, fresh_unet, True, True)
    loaded.load_weights(path)

    assert set(loaded.state_dict()) == set(network.state_dict()) == set(weights)
    conv = loaded.get_submodule("lora_unet_down_blocks_0_resnets_0_conv1")
    assert (conv.lora_dim, conv.scale) == (2, 0.5)
    assert loaded.get_submodule(UNET_EXAMPLE).scale == 0.5  # dim 4, alpha 2
    for ours, theirs in zip(run_models(fresh_te, fresh_unet), expected, strict=True):
        assert torch.equal(ours, theirs)


def test_dropouts_apply_in_training_mode_only() -> None:
    text_encoder, unet = tiny_models()
    network = lora.create_network(1.0, 4, 2, None, text_encoder, unet, 0.3, conv_dim="2", rank_dropout="0.3")
    network.apply_to(text_encoder, unet, True, True)
    randomize(network)
    network.eval()
    first, second = run_models(text_encoder, unet), run_models(text_encoder, unet)
    network.on_epoch_start(text_encoder, unet)
    dropped = run_models(text_encoder, unet)

    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert all(not torch.allclose(a, b) and torch.isfinite(b).all() for a, b in zip(first, dropped, strict=True))


def test_save_weights_writes_metadata_and_casts_dtype(tmp_path) -> None:
    network, _, _ = applied_network()
    path = tmp_path / "lora.safetensors"
    network.save_weights(path, torch.float16, {"ss_network_dim": "4", "ss_base_model_version": "sd_v1"})

    with safe_open(path, "pt") as handle:
        assert handle.metadata() == {"ss_network_dim": "4", "ss_base_model_version": "sd_v1"}
        assert handle.get_tensor(f"{UNET_EXAMPLE}.lora_down.weight").dtype == torch.float16
        assert float(handle.get_tensor(f"{UNET_EXAMPLE}.alpha")) == 2.0
    assert list(tmp_path.iterdir()) == [path]  # the temporary file was renamed


def test_save_weights_uses_torch_save_for_other_extensions(tmp_path) -> None:
    network, _, _ = applied_network()
    path = tmp_path / "lora.pt"
    network.save_weights(path, None, None)
    assert torch.load(path, weights_only=True).keys() == network.state_dict().keys()


def test_diffusers_load_lora_weights_matches_network_at_multiplier_one(tmp_path) -> None:
    network, text_encoder, unet = applied_network(conv_dim="2", conv_alpha="1")
    randomize(network)
    expected = run_models(text_encoder, unet)
    path = tmp_path / "lora.safetensors"
    network.save_weights(path, None, {"ss_network_module": "networks.lora"})
    base_te, base_unet = tiny_models()
    base = run_models(base_te, base_unet)

    # The loading path of StableDiffusionPipeline.load_lora_weights, without building a tokenizer.
    state_dict, network_alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(state_dict, network_alphas, base_unet)
    StableDiffusionPipeline.load_lora_into_text_encoder(state_dict, network_alphas, base_te)
    text_embeds, noise_pred = run_models(base_te, base_unet)

    assert not torch.allclose(noise_pred, base[1])
    torch.testing.assert_close(noise_pred, expected[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(text_embeds, expected[0], atol=1e-5, rtol=0)


def test_create_network_rejects_unknown_network_arg() -> None:
    text_encoder, unet = tiny_models()
    with pytest.raises(ConfigError, match=r"'conv_dims'.*Did you mean 'conv_dim'.*Known keys: conv_dim, conv_alpha"):
        lora.create_network(1.0, 4, 1, None, text_encoder, unet, conv_dims="4")


def test_create_network_rejects_bad_network_arg_value() -> None:
    text_encoder, unet = tiny_models()
    with pytest.raises(ConfigError, match="rank_dropout must be a number, got 'high'"):
        lora.create_network(1.0, 4, 1, None, text_encoder, unet, rank_dropout="high")


def test_conv_dim_adds_3x3_conv_loras_to_resnet_and_resampler_blocks() -> None:
    text_encoder, unet = tiny_models()
    network = lora.create_network(1.0, 4, 1, None, text_encoder, unet, conv_dim="2", conv_alpha="1")
    state = network.state_dict()

    assert state["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert state["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 2, 1, 1)
    assert state["lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight"].shape == (2, 32, 3, 3)
    assert state["lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight"].shape == (2, 64, 3, 3)
    assert state["lora_unet_up_blocks_0_resnets_0_conv_shortcut.lora_down.weight"].shape == (4, 128, 1, 1)
    assert state["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"].shape[0] == 4
    assert len(network.unet_loras) > UNET_ATTENTION_LORAS


def test_prepare_optimizer_params_uses_unet_and_text_encoder_lrs() -> None:
    network, _, _ = applied_network()
    groups, descriptions = network.prepare_optimizer_params(5e-5, 1e-4, 1e-3)

    assert descriptions == ["textencoder", "unet"]
    assert [group["lr"] for group in groups] == [5e-5, 1e-4]
    assert len(groups[0]["params"]) == 2 * TEXT_ENCODER_LORAS
    assert len(groups[1]["params"]) == 2 * UNET_ATTENTION_LORAS
    assert len(torch.optim.AdamW(groups).param_groups) == 2


def test_prepare_optimizer_params_freezes_text_encoder_when_its_lr_is_zero() -> None:
    network, _, _ = applied_network()
    _, descriptions = network.prepare_optimizer_params(0.0, 1e-4, 1e-3)
    network.prepare_grad_etc(None, None)

    assert descriptions == ["unet"]
    assert not any(
        param.requires_grad for lora_module in network.text_encoder_loras for param in lora_module.parameters()
    )
    assert len(network.get_trainable_params()) == 2 * UNET_ATTENTION_LORAS


def test_prepare_optimizer_params_splits_lora_up_with_loraplus_ratio() -> None:
    network, _, _ = applied_network(loraplus_lr_ratio="16")
    groups, descriptions = network.prepare_optimizer_params(None, None, 1e-4)

    assert descriptions == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [group["lr"] for group in groups] == pytest.approx([1e-4, 1.6e-3, 1e-4, 1.6e-3])


def test_apply_to_without_text_encoder_drops_its_modules() -> None:
    text_encoder, unet = tiny_models()
    network = lora.create_network(1.0, 4, 1, None, text_encoder, unet)
    network.apply_to(text_encoder, unet, apply_text_encoder=False, apply_unet=True)
    assert not any(key.startswith("lora_te") for key in network.state_dict())
    assert network.prepare_optimizer_params(1e-4, 1e-4, 1e-4)[1] == ["unet"]


def test_load_weights_rejects_unknown_keys(tmp_path) -> None:
    network, _, _ = applied_network()
    path = tmp_path / "lora.safetensors"
    network.save_weights(path, None, None)
    _, unet = tiny_models()
    unet_only = lora.create_network(1.0, 4, 2, None, None, unet)
    with pytest.raises(CheckpointError, match=r"keys match no module of this network: lora_te_text_model"):
        unet_only.load_weights(path)


def test_load_weights_rejects_other_dims(tmp_path) -> None:
    network, _, _ = applied_network()
    path = tmp_path / "lora.safetensors"
    network.save_weights(path, None, None)
    text_encoder, unet = tiny_models()
    other = lora.create_network(1.0, 8, 2, None, text_encoder, unet)
    with pytest.raises(CheckpointError, match=r"another shape.*\(4, 32\) != \(8, 32\)"):
        other.load_weights(path)


def test_create_network_from_weights_rejects_modules_without_a_layer() -> None:
    network, _, _ = applied_network()
    _, unet = tiny_models()
    with pytest.raises(CheckpointError, match=r"match no layer of the given models: lora_te_text_model_encoder"):
        lora.create_network_from_weights(1.0, None, None, None, unet, weights_sd=network.state_dict())


def test_create_network_from_weights_rejects_lycoris_keys() -> None:
    _, unet = tiny_models()
    weights = {f"{UNET_EXAMPLE}.hada_w1_a": torch.zeros(4, 32), f"{UNET_EXAMPLE}.alpha": torch.tensor(1.0)}
    with pytest.raises(CheckpointError, match=r"Not a plain LoRA file.*hada_w1_a.*lycoris.kohya"):
        lora.create_network_from_weights(1.0, None, None, None, unet, weights_sd=weights)


def test_create_network_logs_module_counts(caplog) -> None:
    text_encoder, unet = tiny_models()
    with caplog.at_level("INFO", logger="networks.lora"):
        lora.create_network(1.0, 4, 1, None, text_encoder, unet)
    assert f"{UNET_ATTENTION_LORAS} U-Net modules, {TEXT_ENCODER_LORAS} text encoder modules" in caplog.text


def test_merge_to_gives_same_outputs_as_applied_network(tmp_path) -> None:
    network, text_encoder, unet = applied_network(conv_dim="2", conv_alpha="1")
    randomize(network)
    network.set_multiplier(0.7)
    expected = run_models(text_encoder, unet)
    weights = network.state_dict()

    base_te, base_unet = tiny_models()
    merger, _ = lora.create_network_from_weights(0.7, None, None, base_te, base_unet, weights_sd=weights)
    merger.merge_to(base_te, base_unet, weights, torch.float32, "cpu")

    for merged, applied in zip(run_models(base_te, base_unet), expected, strict=True):
        torch.testing.assert_close(merged, applied, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def largest_delta_norm(network: lora.LoRANetwork) -> float:
    return max(float(module.delta().norm()) for module in network.all_loras())


def test_max_norm_regularization_scales_large_modules_down() -> None:
    network, _, _ = applied_network()
    randomize(network)
    before = largest_delta_norm(network)

    scaled, mean_norm, max_norm = network.apply_max_norm_regularization(before / 4, "cpu")

    assert scaled > 0
    assert max_norm == pytest.approx(before / 4, rel=1e-4)
    assert mean_norm <= max_norm
    assert largest_delta_norm(network) == pytest.approx(before / 4, rel=1e-4)


def test_lycoris_kohya_network_follows_the_same_plugin_calls() -> None:
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    text_encoder, unet = tiny_models()
    network = lycoris_kohya.create_network(1.0, 4, 1, None, text_encoder, unet, preset="attn-mlp")
    network.apply_to(text_encoder, unet, True, True)

    groups, descriptions = network.prepare_optimizer_params(1e-4, 1e-4, 1e-4)

    # Same shape as ours, except "params" is a dict_values view rather than a list.
    assert descriptions == ["textencoder", "unet"]
    assert all(set(group) == {"params", "lr"} for group in groups)
    assert all(isinstance(param, torch.nn.Parameter) for group in groups for param in group["params"])
    assert len(torch.optim.AdamW(groups).param_groups) == 2


def test_verbose_logs_every_adapter_rank_and_the_layers_left_out(caplog) -> None:
    text_encoder, unet = tiny_models()
    with caplog.at_level("INFO", logger="networks.lora"):
        network = lora.create_network(1.0, 4, 2, None, text_encoder, unet, verbose="True")
    lines = [record.getMessage() for record in caplog.records]
    assert sum("rank 4, alpha 2" in line for line in lines) == len(network.all_loras())
    assert any("layers without an adapter" in line for line in lines)  # the ResNet blocks, without conv_dim
