"""FLUX.1 key maps: BFL file round trips, the full-size key sets against diffusers' converter, the AE and the text
encoder single files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.checkpoints import flux_configs, flux_files, flux_keys
from library.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait


def test_flux_keys_transformer_file_round_trips_bit_identical(tiny_flux_dir):
    original = load_file(tiny_flux_dir["transformer"])
    transformer = flux_files.load_transformer(tiny_flux_dir["transformer"], torch.float32)
    written = flux_keys.join_transformer(transformer.state_dict(), dict(transformer.config))
    assert written.keys() == original.keys()
    assert all(torch.equal(written[key], original[key]) for key in original)


def test_flux_keys_ae_file_round_trips_and_carries_flux_latent_scale(tiny_flux_dir):
    original = load_file(tiny_flux_dir["ae"])
    ae = flux_files.load_ae(tiny_flux_dir["ae"], torch.float32)
    written = flux_keys.join_ae(ae.state_dict(), dict(ae.config))
    assert written.keys() == original.keys()
    assert all(torch.equal(written[key], original[key]) for key in original)
    assert (ae.config.latent_channels, ae.config.scaling_factor, ae.config.shift_factor) == (16, 0.3611, 0.1159)
    assert not ae.config.use_quant_conv and not ae.config.use_post_quant_conv


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_keys_full_size_match_diffusers_converter_on_meta_device(variant):
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = flux_configs.transformer_config(variant)
    with init_empty_weights():
        model_state = FluxTransformer2DModel(**config).state_dict()
    bfl = flux_keys.join_transformer(model_state, config)
    assert flux_keys.infer_transformer_config(bfl) == dict(config, out_channels=64)
    assert ("guidance_in.in_layer.weight" in bfl) == (variant == "dev")
    leftover = dict(bfl)
    converted = convert_flux_transformer_checkpoint_to_diffusers(leftover)  # pops every key it consumes
    assert not leftover  # 0 extra: our BFL names are all names the converter reads
    assert converted.keys() == model_state.keys()  # 0 missing
    ours = flux_keys.split_transformer(bfl, "meta")[1]
    assert ours.keys() == converted.keys()
    assert all(ours[key].shape == converted[key].shape == model_state[key].shape for key in ours)


def test_flux_keys_swap_final_modulation_halves_like_diffusers():
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = flux_configs.transformer_config("schnell")
    with init_empty_weights():
        bfl = flux_keys.join_transformer(FluxTransformer2DModel(**config).state_dict(), config)
    shift, scale = torch.full((3, 2), 1.0), torch.full((3, 2), 2.0)
    bfl[flux_keys.FINAL_MODULATION + ".weight"] = torch.cat([shift, scale])  # real values; the rest stays on meta
    ours = flux_keys.split_transformer(bfl, "x")[1]["norm_out.linear.weight"]
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))["norm_out.linear.weight"]
    assert torch.equal(ours, torch.cat([scale, shift])) and torch.equal(ours, theirs)


def test_flux_keys_single_block_linear1_splits_into_qkv_and_mlp():
    config = dict(flux_configs.transformer_config("schnell"), num_attention_heads=1, attention_head_dim=32)
    entry = next(e for e in flux_keys.transformer_entries(config) if e.original == "single_blocks.0.linear1.weight")
    fused = torch.arange(7 * 32 * 2, dtype=torch.float32).reshape(7 * 32, 2)  # q|k|v (32 each) | mlp (128)
    parts = flux_keys.KeyMap([entry]).to_model({entry.original: fused})
    assert [parts[name].shape[0] for name in entry.model] == [32, 32, 32, 128]
    assert torch.equal(parts["single_transformer_blocks.0.proj_mlp.weight"], fused[96:])


def test_flux_keys_reject_unknown_and_missing_keys(tiny_flux_dir):
    state = load_file(tiny_flux_dir["transformer"])
    state["double_blocks.0.img_attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected.*img_attn.extra"):
        flux_keys.split_transformer(state, "x.safetensors")
    del state["double_blocks.0.img_attn.extra.weight"], state["double_blocks.1.txt_mlp.0.bias"]
    with pytest.raises(CheckpointError, match="missing.*txt_mlp.0.bias"):
        flux_keys.split_transformer(state, "x.safetensors")


def test_flux_keys_read_comfy_prefixed_files_and_infer_schnell(tiny_flux_dir):
    state = {flux_keys.COMFY_PREFIX + key: value for key, value in load_file(tiny_flux_dir["schnell"]).items()}
    config, model_state = flux_keys.split_transformer(state, "comfy.safetensors")
    assert flux_keys.variant(config) == "schnell"
    assert (config["num_layers"], config["num_single_layers"], config["axes_dims_rope"]) == (3, 4, (4, 14, 14))
    assert "time_text_embed.guidance_embedder.linear_1.weight" not in model_state


def test_flux_keys_t5_fp8_file_is_upcast_on_load(tiny_flux_dir, tmp_path):
    state = load_file(tiny_flux_dir["t5xxl"])
    fp8 = {key: value.to(torch.float8_e4m3fn) for key, value in state.items()}
    path = str(tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    save_file(fp8, path)
    model = flux_files.load_t5xxl(path, torch.float32)
    assert model.shared.weight.dtype == torch.float32
    assert torch.equal(model.shared.weight, fp8["shared.weight"].float())
    assert model.encoder.embed_tokens is model.shared


def test_flux_keys_refuse_scaled_fp8_t5_and_wrong_component(tiny_flux_dir, tmp_path):
    state = dict(load_file(tiny_flux_dir["t5xxl"]), scaled_fp8=torch.zeros(1))
    path = str(tmp_path / "t5_scaled.safetensors")
    save_file(state, path)
    with pytest.raises(CheckpointError, match="scaled fp8"):
        flux_files.load_t5xxl(path, torch.float32)
    with pytest.raises(CheckpointError, match="--t5xxl .*ae.safetensors holds the FLUX.1 autoencoder"):
        flux_files.load_t5xxl(tiny_flux_dir["ae"], torch.float32)


def test_flux_keys_clip_file_with_projection_loads(tiny_flux_dir):
    model = flux_files.load_clip_l(tiny_flux_dir["clip_l"], torch.float32)
    original = load_file(tiny_flux_dir["clip_l"])
    assert "text_projection.weight" in original
    token_embedding = model.get_input_embeddings().weight
    assert torch.equal(token_embedding, original["text_model.embeddings.token_embedding.weight"])
