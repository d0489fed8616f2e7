"""Tests of the SD 1.x / 2.x original-layout <-> diffusers key map and of the architecture inference."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel

from library.checkpoints.sd_keys import (
    SDArchitecture,
    SDComponents,
    detect_model_type,
    infer_architecture,
    join_ldm_checkpoint,
    ldm_key_names,
    split_ldm_checkpoint,
    split_ldm_vae,
    text_encoder_from_model_keys,
    text_encoder_to_model_keys,
)
from library.errors import CheckpointError
from library.testing import tiny_configs

VERSIONS = pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
LAST_TINY_V2_LAYER = "cond_stage_model.model.transformer.resblocks.2."


def _architecture(v2: bool, tiny: bool) -> SDArchitecture:
    """The configs a file of this kind holds; for v2 the text model has one layer fewer than the file."""
    if tiny:
        unet, vae = tiny_configs.tiny_unet_config(v2), tiny_configs.tiny_vae_config()
        text = tiny_configs.tiny_text_encoder_config(v2)
    else:
        unet = tiny_configs.sd2_unet_config() if v2 else tiny_configs.sd15_unet_config()
        vae = tiny_configs.sd_vae_config()
        text = tiny_configs.open_clip_h_config() if v2 else tiny_configs.clip_l_config()
    if v2:
        text = dict(text, num_hidden_layers=text["num_hidden_layers"] - 1)
    return SDArchitecture(v2=v2, unet_config=unet, vae_config=vae, text_config=text)


def _build_components(arch: SDArchitecture) -> SDComponents:
    return SDComponents(
        unet=UNet2DConditionModel(**arch.unet_config).state_dict(),
        vae=AutoencoderKL(**arch.vae_config).state_dict(),
        text_encoder=text_encoder_from_model_keys(CLIPTextModel(CLIPTextConfig(**arch.text_config)).state_dict()),
        extras={},
    )


def _file_extras(v2: bool) -> dict[str, torch.Tensor]:
    """Non-model keys as real LDM files carry them."""
    extras = {"betas": torch.linspace(0.00085, 0.012, 1000), "model_ema.decay": torch.tensor(0.9999)}
    if v2:
        extras["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
        extras["cond_stage_model.model.text_projection"] = torch.randn(32, 32)
    else:
        extras["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return extras


@functools.cache
def _tiny(v2: bool) -> tuple[SDArchitecture, SDComponents, dict[str, torch.Tensor]]:
    """A tiny model's components and its original-layout file (with extras; v2: a distinct last text layer)."""
    torch.manual_seed(0)
    arch = _architecture(v2, tiny=True)
    components = _build_components(arch)
    checkpoint = join_ldm_checkpoint(components, arch) | _file_extras(v2)
    for key in checkpoint:
        if key.startswith(LAST_TINY_V2_LAYER):
            checkpoint[key] = torch.randn_like(checkpoint[key])
    return arch, components, checkpoint


@functools.cache
def _full_size(v2: bool) -> tuple[SDArchitecture, dict[str, torch.Tensor]]:
    """The released architecture's original-layout key set, as tensors on the meta device."""
    arch = _architecture(v2, tiny=False)
    with torch.device("meta"):
        components = _build_components(arch)
    return arch, join_ldm_checkpoint(components, arch)


def _assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


def _assert_same_shapes(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    assert {k: tuple(v.shape) for k, v in actual.items()} == {k: tuple(v.shape) for k, v in expected.items()}


def _assert_config_matches(inferred: dict, expected: dict) -> None:
    """Every expected key but sample_size (not stored in a checkpoint) has the same value; tuples == lists."""

    def normal(value: object) -> object:
        return list(value) if isinstance(value, tuple | list) else value

    mismatches = {
        key: (normal(inferred.get(key)), normal(value))
        for key, value in expected.items()
        if key != "sample_size" and normal(inferred.get(key)) != normal(value)
    }
    assert mismatches == {}


# Round trips ----------------------------------------------------------------------------------------------------


@VERSIONS
def test_join_of_split_gives_back_the_file_bit_identically(v2: bool) -> None:
    arch, _, checkpoint = _tiny(v2)
    half = {key: t.half() if t.is_floating_point() else t for key, t in checkpoint.items()}

    for original in (checkpoint, half):
        _assert_same_tensors(join_ldm_checkpoint(split_ldm_checkpoint(original, arch), arch), original)


@VERSIONS
def test_split_of_join_gives_back_the_model_tensors(v2: bool) -> None:
    arch, components, _ = _tiny(v2)

    split = split_ldm_checkpoint(join_ldm_checkpoint(components, arch), arch)

    _assert_same_tensors(split.unet, components.unet)
    _assert_same_tensors(split.vae, components.vae)
    _assert_same_tensors(split.text_encoder, components.text_encoder)
    assert set(split.extras) == {key for key in ldm_key_names(arch) if key.startswith(LAST_TINY_V2_LAYER)}


@VERSIONS
def test_split_puts_non_model_keys_in_extras_under_original_names(v2: bool) -> None:
    arch, _, checkpoint = _tiny(v2)

    extras = split_ldm_checkpoint(checkpoint, arch).extras

    last_layer = {key for key in checkpoint if key.startswith(LAST_TINY_V2_LAYER)}
    assert set(extras) == set(_file_extras(v2)) | last_layer
    assert all(extras[key] is checkpoint[key] for key in extras)


@VERSIONS
def test_split_output_loads_strictly_into_models_built_from_the_inferred_architecture(v2: bool) -> None:
    _, _, checkpoint = _tiny(v2)
    arch = infer_architecture(checkpoint)
    components = split_ldm_checkpoint(checkpoint, arch)
    text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text_config))

    UNet2DConditionModel(**arch.unet_config).load_state_dict(components.unet, strict=True)
    AutoencoderKL(**arch.vae_config).load_state_dict(components.vae, strict=True)
    text_encoder.load_state_dict(text_encoder_to_model_keys(components.text_encoder, text_encoder), strict=True)


def test_v2_join_writes_a_copy_of_the_model_last_layer_when_extras_lack_the_file_last_layer() -> None:
    arch, components, _ = _tiny(True)

    checkpoint = join_ldm_checkpoint(components, arch)

    model_layer = "text_model.encoder.layers.1."
    qkv = [components.text_encoder[f"{model_layer}self_attn.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(checkpoint[LAST_TINY_V2_LAYER + "attn.in_proj_weight"], torch.cat(qkv))
    copied = checkpoint[LAST_TINY_V2_LAYER + "ln_1.weight"]
    assert torch.equal(copied, components.text_encoder[model_layer + "layer_norm1.weight"])
    assert copied.data_ptr() != components.text_encoder[model_layer + "layer_norm1.weight"].data_ptr()
    assert "cond_stage_model.model.text_projection" not in checkpoint


# Agreement with diffusers' own converters -----------------------------------------------------------------------


def _diffusers_text_encoder(checkpoint: dict, arch: SDArchitecture) -> dict[str, torch.Tensor]:
    """diffusers' conversion, without what our split keeps in extras (v2: projection, the unused last layer)."""
    if not arch.v2:
        converted = convert_ldm_clip_checkpoint(checkpoint)
        converted.pop("text_model.embeddings.position_ids", None)
        return converted
    text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=arch.text_config["hidden_size"]))
    converted = convert_open_clip_checkpoint(text_model, checkpoint)
    unused_layer = f"text_model.encoder.layers.{arch.text_config['num_hidden_layers']}."
    return {k: v for k, v in converted.items() if not k.startswith(unused_layer) and k != "text_projection.weight"}


@VERSIONS
def test_split_matches_diffusers_converters_on_tiny_models(v2: bool) -> None:
    arch, _, checkpoint = _tiny(v2)

    components = split_ldm_checkpoint(checkpoint, arch)

    _assert_same_tensors(components.unet, convert_ldm_unet_checkpoint(checkpoint, arch.unet_config))
    _assert_same_tensors(components.vae, convert_ldm_vae_checkpoint(checkpoint, arch.vae_config))
    _assert_same_tensors(components.text_encoder, _diffusers_text_encoder(checkpoint, arch))


@pytest.mark.parametrize("v2", [False, True], ids=["sd15", "sd2"])
def test_split_matches_diffusers_converters_on_full_size_models(v2: bool) -> None:
    arch, checkpoint = _full_size(v2)

    components = split_ldm_checkpoint(checkpoint, arch)

    _assert_same_shapes(components.unet, convert_ldm_unet_checkpoint(checkpoint, arch.unet_config))
    _assert_same_shapes(components.vae, convert_ldm_vae_checkpoint(checkpoint, arch.vae_config))
    _assert_same_shapes(components.text_encoder, _diffusers_text_encoder(checkpoint, arch))
    assert checkpoint["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_full_size_sd15_file_has_the_released_key_count() -> None:
    _, checkpoint = _full_size(False)

    # v1-5-pruned-emaonly: 686 UNet + 248 VAE + 196 text-encoder tensors (position_ids aside).
    assert sum(key.startswith("model.diffusion_model.") for key in checkpoint) == 686
    assert sum(key.startswith("first_stage_model.") for key in checkpoint) == 248
    assert sum(key.startswith("cond_stage_model.") for key in checkpoint) == 196


# Architecture inference -----------------------------------------------------------------------------------------


@VERSIONS
def test_infer_architecture_reproduces_tiny_configs(v2: bool) -> None:
    arch, _, checkpoint = _tiny(v2)

    inferred = infer_architecture(checkpoint)

    assert inferred.v2 is v2
    _assert_config_matches(inferred.unet_config, arch.unet_config)
    _assert_config_matches(inferred.vae_config, arch.vae_config)
    _assert_config_matches(inferred.text_config, arch.text_config)


@pytest.mark.parametrize("v2", [False, True], ids=["sd15", "sd2"])
def test_infer_architecture_reproduces_full_size_configs(v2: bool) -> None:
    arch, checkpoint = _full_size(v2)

    inferred = infer_architecture(checkpoint)

    assert inferred.v2 is v2
    _assert_config_matches(inferred.unet_config, arch.unet_config)
    _assert_config_matches(inferred.vae_config, arch.vae_config)
    _assert_config_matches(inferred.text_config, arch.text_config)
    assert inferred.text_config["num_hidden_layers"] == (23 if v2 else 12)


def test_infer_architecture_reads_v2_projection_dim_from_text_projection() -> None:
    _, _, checkpoint = _tiny(True)
    checkpoint = checkpoint | {"cond_stage_model.model.text_projection": torch.zeros(32, 16)}

    assert infer_architecture(checkpoint).text_config["projection_dim"] == 16


def _standalone_vae_file(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE of a checkpoint as a standalone VAE release has it, with a training-only loss tensor."""
    vae = {k.removeprefix("first_stage_model."): t for k, t in checkpoint.items() if k.startswith("first_stage_model.")}
    return vae | {"loss.logvar": torch.zeros(())}


@pytest.mark.parametrize("standalone", [False, True], ids=["full_checkpoint", "standalone"])
def test_split_ldm_vae_reads_config_and_weights(standalone: bool) -> None:
    arch, components, checkpoint = _tiny(False)
    source = _standalone_vae_file(checkpoint) if standalone else checkpoint

    config, state = split_ldm_vae(source, "vae.safetensors")

    _assert_config_matches(config, arch.vae_config)
    _assert_same_tensors(state, components.vae)


def test_split_ldm_vae_rejects_an_unknown_key_naming_the_file() -> None:
    _, _, checkpoint = _tiny(False)
    source = _standalone_vae_file(checkpoint) | {"decoder.extra.weight": torch.zeros(1)}

    with pytest.raises(CheckpointError, match=r"vae\.pt: .*unexpected key\(s\): first_stage_model\.decoder\.extra"):
        split_ldm_vae(source, "vae.pt")


def test_split_ldm_vae_sends_diffusers_weights_to_the_folder_loader() -> None:
    _, components, _ = _tiny(False)

    with pytest.raises(CheckpointError, match="diffusers VAE weights; give the diffusers VAE folder"):
        split_ldm_vae(components.vae, "diffusion_pytorch_model.safetensors")


# Errors and detection -------------------------------------------------------------------------------------------


@VERSIONS
def test_split_rejects_an_unknown_key(v2: bool) -> None:
    arch, _, checkpoint = _tiny(v2)
    checkpoint = checkpoint | {"model.diffusion_model.input_blocks.1.2.weight": torch.zeros(1)}

    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): model\.diffusion_model\.input_blocks\.1\.2"):
        split_ldm_checkpoint(checkpoint, arch)


@VERSIONS
def test_split_rejects_a_missing_key(v2: bool) -> None:
    arch, _, checkpoint = _tiny(v2)
    missing = "first_stage_model.decoder.up.0.block.1.conv2.weight"
    checkpoint = {key: t for key, t in checkpoint.items() if key != missing}

    with pytest.raises(CheckpointError, match=rf"1 missing key\(s\): {missing}"):
        split_ldm_checkpoint(checkpoint, arch)


def test_split_rejects_the_v2_last_text_layer_missing() -> None:
    arch, _, checkpoint = _tiny(True)
    checkpoint = {key: t for key, t in checkpoint.items() if not key.startswith(LAST_TINY_V2_LAYER)}

    with pytest.raises(
        CheckpointError, match=r"12 missing key\(s\): cond_stage_model\.model\.transformer\.resblocks\.2"
    ):
        split_ldm_checkpoint(checkpoint, arch)


def test_join_rejects_a_model_state_dict_with_a_missing_key() -> None:
    arch, components, _ = _tiny(False)
    unet = {key: t for key, t in components.unet.items() if key != "conv_in.weight"}
    broken = SDComponents(unet=unet, vae=components.vae, text_encoder=components.text_encoder, extras={})

    with pytest.raises(CheckpointError, match=r"unet .*1 missing key\(s\): conv_in\.weight"):
        join_ldm_checkpoint(broken, arch)


def test_join_rejects_text_encoder_names_without_the_text_model_prefix() -> None:
    arch, components, _ = _tiny(False)
    bare = {key.removeprefix("text_model."): t for key, t in components.text_encoder.items()}
    broken = SDComponents(unet=components.unet, vae=components.vae, text_encoder=bare, extras={})

    with pytest.raises(CheckpointError, match=r"text_encoder .*unexpected key\(s\): embeddings\."):
        join_ldm_checkpoint(broken, arch)


def test_join_rejects_an_unknown_extra() -> None:
    arch, components, _ = _tiny(False)
    extras = {"lora_unet_down.weight": torch.zeros(1)}
    broken = SDComponents(unet=components.unet, vae=components.vae, text_encoder=components.text_encoder, extras=extras)

    with pytest.raises(CheckpointError, match="lora_unet_down.weight"):
        join_ldm_checkpoint(broken, arch)


def test_split_reads_legacy_clip_names_without_text_model() -> None:
    _, components, checkpoint = _tiny(False)
    legacy = {key.replace(".transformer.text_model.", ".transformer."): t for key, t in checkpoint.items()}

    split = split_ldm_checkpoint(legacy, infer_architecture(legacy))

    _assert_same_tensors(split.text_encoder, components.text_encoder)


SDXL_KEYS = [
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
    "model.diffusion_model.label_emb.0.0.weight",
    "model.diffusion_model.input_blocks.0.0.weight",
    "first_stage_model.encoder.conv_in.weight",
]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (SDXL_KEYS, "sdxl"),
        (["model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"], "sd3"),
        (["double_blocks.0.img_attn.norm.key_norm.scale", "single_blocks.0.linear1.weight"], "flux"),
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.token_embedding.weight"], "sd2"),
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x"], "sd1"),
        (["encoder.conv_in.weight"], "unknown"),
    ],
    ids=["sdxl", "sd3", "flux", "sd2", "sd1", "unknown"],
)
def test_detect_model_type_tells_the_family_from_key_names(keys: list[str], expected: str) -> None:
    assert detect_model_type(keys) == expected


@VERSIONS
def test_detect_model_type_tells_tiny_files_apart(v2: bool) -> None:
    assert detect_model_type(_tiny(v2)[2]) == ("sd2" if v2 else "sd1")


def test_infer_architecture_rejects_an_sdxl_checkpoint() -> None:
    checkpoint = dict.fromkeys(SDXL_KEYS, torch.zeros(1))

    with pytest.raises(CheckpointError, match="an SDXL checkpoint, not SD 1.x / 2.x; train it with the sdxl_"):
        infer_architecture(checkpoint)
