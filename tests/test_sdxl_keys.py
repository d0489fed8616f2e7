"""Tests of the SDXL SGM single-file <-> diffusers key map, its architecture inference and --block_lr grouping."""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)

from library.checkpoints import sdxl_keys
from library.errors import CheckpointError
from library.testing import tiny_sdxl

TE1 = sdxl_keys.TE1_PREFIX
TE2 = sdxl_keys.TE2_PREFIX


@functools.cache
def _tiny() -> tuple[tiny_sdxl.SDXLModels, dict[str, torch.Tensor]]:
    models = tiny_sdxl.build_models(seed=0)
    return models, tiny_sdxl.sgm_state_dict(models)


@functools.cache
def _full_size() -> tuple[tiny_sdxl.SDXLModels, dict[str, torch.Tensor]]:
    """The released SDXL 1.0 base architecture on the meta device (no memory) and its SGM key set."""
    with torch.device("meta"):
        models = tiny_sdxl.build_models(arch=tiny_sdxl.architecture(full_size=True))
    return models, tiny_sdxl.sgm_state_dict(models)


def _assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), key


def _diffusers_conversion(models: tiny_sdxl.SDXLModels, checkpoint: dict) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' own single-file converters applied to an SGM checkpoint, per component."""
    text1 = convert_ldm_clip_checkpoint(checkpoint)
    text1.pop("text_model.embeddings.position_ids")  # a constant buffer; our split keeps the file's copy in extras
    return {
        "unet": convert_ldm_unet_checkpoint(checkpoint, dict(models.unet.config)),
        "vae": convert_ldm_vae_checkpoint(checkpoint, dict(models.vae.config)),
        "text_encoder1": text1,
        "text_encoder2": convert_open_clip_checkpoint(models.text_encoder2, checkpoint, prefix=TE2),
    }


# Round trips ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_sgm_file_to_models_to_file_is_bit_identical(dtype: torch.dtype) -> None:
    _, checkpoint = _tiny()
    original = {key: t.to(dtype) if t.is_floating_point() else t for key, t in checkpoint.items()}
    arch = sdxl_keys.infer_architecture(original)

    rebuilt = sdxl_keys.join_sgm_checkpoint(sdxl_keys.split_sgm_checkpoint(original, arch), arch)

    _assert_same_tensors(rebuilt, original)


def test_split_gives_the_models_own_state_dicts() -> None:
    models, checkpoint = _tiny()

    parts = sdxl_keys.split_sgm_checkpoint(checkpoint, sdxl_keys.infer_architecture(checkpoint))

    _assert_same_tensors(parts.unet, dict(models.unet.state_dict()))
    _assert_same_tensors(parts.text_encoder2, dict(models.text_encoder2.state_dict()))
    assert set(parts.extras) == {TE1 + "embeddings.position_ids", TE2 + "logit_scale"}


def test_text_projection_is_stored_transposed_and_qkv_fused() -> None:
    models, checkpoint = _tiny()
    projection = models.text_encoder2.text_projection.weight  # (40, 48): Linear from width 48 to 40
    attention = models.text_encoder2.text_model.encoder.layers[0].self_attn

    assert torch.equal(checkpoint[TE2 + "text_projection"], projection.T)
    fused = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert torch.equal(checkpoint[TE2 + "transformer.resblocks.0.attn.in_proj_weight"], fused)


# Agreement with diffusers' converters ---------------------------------------------------------------------------


def test_split_matches_diffusers_converters_on_the_tiny_model() -> None:
    models, checkpoint = _tiny()

    parts = sdxl_keys.split_sgm_checkpoint(checkpoint, sdxl_keys.infer_architecture(checkpoint))

    for name, converted in _diffusers_conversion(models, checkpoint).items():
        _assert_same_tensors(getattr(parts, name), converted)


def test_full_size_key_set_matches_diffusers_converters_with_nothing_missing_or_extra() -> None:
    models, checkpoint = _full_size()
    arch = sdxl_keys.infer_architecture(checkpoint)

    parts = sdxl_keys.split_sgm_checkpoint(checkpoint, arch)

    for name, converted in _diffusers_conversion(models, checkpoint).items():
        ours = getattr(parts, name)
        assert (sorted(set(converted) - set(ours)), sorted(set(ours) - set(converted))) == ([], []), name
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in converted.items()}, name
    # sd_xl_base_1.0.safetensors: 1680 UNet, 248 VAE, 197 CLIP-L (with position_ids) and 390 bigG tensors.
    counts = [
        sum(key.startswith(prefix) for key in checkpoint) for prefix in ("model.", "first_stage_model.", TE1, TE2)
    ]
    assert counts == [1680, 248, 197, 390]


def test_infer_architecture_reproduces_full_size_configs() -> None:
    models, checkpoint = _full_size()

    arch = sdxl_keys.infer_architecture(checkpoint)

    for inferred, model in ((arch.unet_config, models.unet), (arch.vae_config, models.vae)):
        expected = dict(model.config)
        assert {key: inferred[key] for key in inferred} == {
            key: type(inferred[key])(expected[key]) if isinstance(inferred[key], tuple) else expected[key]
            for key in inferred
        }
    for inferred, expected in (
        (arch.text_config1, models.arch.text_config1),
        (arch.text_config2, models.arch.text_config2),
    ):
        assert inferred == {key: expected[key] for key in inferred}


# Errors -----------------------------------------------------------------------------------------------------------


def test_split_rejects_an_unknown_key() -> None:
    _, checkpoint = _tiny()
    arch = sdxl_keys.infer_architecture(checkpoint)
    broken = checkpoint | {"model.diffusion_model.input_blocks.4.1.extra.weight": torch.zeros(1)}

    with pytest.raises(
        CheckpointError, match=r"1 unexpected key\(s\): model\.diffusion_model\.input_blocks\.4\.1\.extra"
    ):
        sdxl_keys.split_sgm_checkpoint(broken, arch)


def test_split_rejects_a_missing_key() -> None:
    _, checkpoint = _tiny()
    arch = sdxl_keys.infer_architecture(checkpoint)
    missing = TE2 + "transformer.resblocks.1.attn.in_proj_bias"

    with pytest.raises(CheckpointError, match=rf"1 missing key\(s\): {missing}"):
        sdxl_keys.split_sgm_checkpoint({k: t for k, t in checkpoint.items() if k != missing}, arch)


def test_join_rejects_an_unknown_extra() -> None:
    _, checkpoint = _tiny()
    arch = sdxl_keys.infer_architecture(checkpoint)
    parts = sdxl_keys.split_sgm_checkpoint(checkpoint, arch)
    parts.extras["lora_unet_x.weight"] = torch.zeros(1)

    with pytest.raises(CheckpointError, match="lora_unet_x.weight"):
        sdxl_keys.join_sgm_checkpoint(parts, arch)


def test_refiner_and_sd15_checkpoints_are_refused_with_the_reason() -> None:
    refiner = {"conditioner.embedders.0.model.token_embedding.weight": torch.zeros(1)}
    sd15 = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(1),
    }

    with pytest.raises(CheckpointError, match="refiner"):
        sdxl_keys.infer_architecture(refiner, "refiner.safetensors")
    with pytest.raises(CheckpointError, match="is an SD 1.x checkpoint, not SDXL; train it with train_network.py"):
        sdxl_keys.infer_architecture(sd15, "v1-5.safetensors")


# Module names and blocks ---------------------------------------------------------------------------------------


def test_unet_module_names_give_sgm_paths() -> None:
    names = sdxl_keys.unet_module_names(dict(_full_size()[0].unet.config))

    assert names["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == (
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    )
    assert (
        names["mid_block.attentions.0.transformer_blocks.9.ff.net.2"] == "middle_block.1.transformer_blocks.9.ff.net.2"
    )
    assert names["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert names["down_blocks.0.resnets.0.conv1"] == "input_blocks.1.0.in_layers.2"


def test_block_lr_groups_follow_the_23_sgm_blocks() -> None:
    unet = _full_size()[0].unet
    names = [name for name, _ in unet.named_parameters()]

    groups = sdxl_keys.block_lr_groups(dict(unet.config), names)

    assert sdxl_keys.block_count(dict(unet.config)) == sdxl_keys.SDXL_BLOCK_COUNT == 23
    assert sorted(set(groups.values())) == list(range(23))
    assert groups["add_embedding.linear_1.weight"] == 0 and groups["time_embedding.linear_2.bias"] == 0
    assert groups["conv_in.weight"] == 1  # input_blocks.0
    assert groups["down_blocks.1.attentions.0.proj_in.weight"] == 5  # input_blocks.4
    assert groups["mid_block.attentions.0.norm.weight"] == 11  # middle_block.1
    assert groups["up_blocks.2.resnets.2.conv2.weight"] == 21  # output_blocks.8
    assert groups["conv_out.weight"] == 22
