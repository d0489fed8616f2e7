"""SD3 / SD3.5 key maps: single-file round trips, the full-size key sets against diffusers' converter, strict key
checks, and loading every tiny format (single file with or without encoders, separate files, diffusers folder)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.checkpoints import flux_keys, sd3_configs, sd3_files, sd3_keys
from library.errors import CheckpointError
from library.testing import tiny_configs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory) -> dict[str, str]:
    """Both tiny variants as single files with and without encoders, the encoder files, the SD3.5-M-like diffusers
    folder and a tokenizer cache (paths by name)."""
    from library.testing.tiny_sd3 import write_tiny_sd3

    return write_tiny_sd3(str(tmp_path_factory.mktemp("sd3")), diffusers_variants=("sd3.5m",))


def _load(tiny_sd3_dir, name: str, separate: bool = False) -> sd3_files.SD3Models:
    files = {key: tiny_sd3_dir[key] for key in sd3_keys.TEXT_ENCODERS} if separate else {}
    return sd3_files.load_models(sd3_files.SD3Sources(tiny_sd3_dir[name], **files), torch.float32, torch.float32)


def _assert_same_tensors(written: dict, original: dict) -> None:
    assert written.keys() == original.keys()
    assert all(
        written[key].dtype == original[key].dtype and torch.equal(written[key], original[key]) for key in original
    )


def _meta_model_state(config: dict) -> dict:
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):  # the position grid is a buffer; on the meta device it takes no memory either
        return SD3Transformer2DModel(**config).state_dict()


@pytest.mark.parametrize("variant", ["sd3", "sd3.5m"])
def test_sd3_keys_single_file_round_trips_bit_identical(tiny_sd3_dir, variant, tmp_path):
    original = load_file(tiny_sd3_dir[variant])
    models = _load(tiny_sd3_dir, variant)
    path = str(tmp_path / "saved.safetensors")
    sd3_files.save_checkpoint(models, path, None, {"note": "x"}, text_encoders=sd3_keys.TEXT_ENCODERS)
    _assert_same_tensors(load_file(path), original)
    assert "text_encoders.clip_l.transformer.text_projection.weight" in original  # an extra, written back unchanged
    assert models.variant == {"sd3": "sd3-medium", "sd3.5m": "sd3.5-medium"}[variant]


@pytest.mark.parametrize("variant", ["sd3", "sd3.5m"])
def test_sd3_keys_file_without_encoders_round_trips_through_the_key_map(tiny_sd3_dir, variant):
    original = load_file(tiny_sd3_dir[f"{variant}-no-te"])
    parts = sd3_keys.split_checkpoint(original, "no-te.safetensors")
    assert set(parts.states) == {"transformer", "vae"} and not parts.extras
    _assert_same_tensors(sd3_keys.join_checkpoint(parts), original)


@pytest.mark.parametrize("variant", sd3_configs.VARIANTS)
def test_sd3_keys_full_size_match_diffusers_converter_on_meta_device(variant):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    config = sd3_configs.transformer_config(variant)
    model_state = _meta_model_state(config)
    original = sd3_keys.join_transformer(model_state, config)
    assert sd3_keys.infer_transformer_config(original) == config
    assert sd3_keys.variant(config) == variant
    leftover = {sd3_keys.TRANSFORMER_PREFIX + key: value for key, value in original.items()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(leftover)  # pops every key it consumes
    assert not leftover  # 0 extra: every SAI name we write is one the converter reads
    assert converted.keys() == model_state.keys()  # 0 missing
    ours = sd3_keys.split_transformer(original, "meta")[1]
    assert all(ours[key].shape == converted[key].shape == model_state[key].shape for key in model_state)


def test_sd3_keys_tiny_split_equals_diffusers_converter_values(tiny_sd3_dir):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    state = load_file(tiny_sd3_dir["sd3.5m-no-te"])
    transformer = {key: value for key, value in state.items() if key.startswith(sd3_keys.TRANSFORMER_PREFIX)}
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(dict(transformer))
    ours = sd3_keys.split_transformer(transformer, "tiny")[1]
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)  # fused q|k|v splits and half swaps included


def test_sd3_keys_reject_unknown_and_missing_keys(tiny_sd3_dir):
    state = load_file(tiny_sd3_dir["sd3"])
    state["model.diffusion_model.joint_blocks.0.x_block.attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"x\.safetensors.*unexpected.*joint_blocks\.0\.x_block\.attn\.extra"):
        sd3_keys.split_checkpoint(state, "x.safetensors")
    del state["model.diffusion_model.joint_blocks.0.x_block.attn.extra.weight"]
    del state["text_encoders.clip_g.transformer.text_model.final_layer_norm.bias"]
    with pytest.raises(CheckpointError, match=r"x\.safetensors.*missing.*clip_g\.transformer\.text_model\.final_layer"):
        sd3_keys.split_checkpoint(state, "x.safetensors")


def test_sd3_keys_join_refuses_a_model_state_with_a_stray_key(tiny_sd3_dir):
    models = _load(tiny_sd3_dir, "sd3")
    state = dict(models.transformer.state_dict(), **{"transformer_blocks.0.extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected.*transformer_blocks.0.extra"):
        sd3_keys.join_transformer(state, dict(models.transformer.config))


def test_sd3_keys_bare_transformer_file_reads_like_prefixed(tiny_sd3_dir):
    state = load_file(tiny_sd3_dir["sd3.5m-no-te"])
    bare = {key[len(sd3_keys.TRANSFORMER_PREFIX) :]: value for key, value in state.items()
            if key.startswith(sd3_keys.TRANSFORMER_PREFIX)}  # fmt: skip
    parts = sd3_keys.split_checkpoint(bare, "bare.safetensors")
    assert list(parts.states) == ["transformer"]
    assert sd3_keys.contents(bare) == ("transformer",)
    assert parts.configs["transformer"]["dual_attention_layers"] == (0, 1)


def test_sd3_files_every_format_gives_the_same_models_and_transformer_output(tiny_sd3_dir):
    loaded = [_load(tiny_sd3_dir, "sd3.5m"), _load(tiny_sd3_dir, "sd3.5m-no-te", separate=True),
              _load(tiny_sd3_dir, "sd3.5m-diffusers")]  # fmt: skip
    for name in sd3_keys.COMPONENTS:
        first = getattr(loaded[0], name).state_dict()
        for models in loaded[1:]:
            _assert_same_tensors(getattr(models, name).state_dict(), first)
    identity = torch.eye(16)  # SD3 reads CLIP-L unprojected, whatever projection the separate file carries
    assert torch.equal(loaded[1].clip_l.text_projection.weight, identity)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 8, 8, generator=generator)  # (B, C, H, W)
    text = torch.randn(1, 5, 40, generator=generator)  # (B, tokens, joint_attention_dim)
    pooled = torch.randn(1, 36, generator=generator)  # (B, pooled_projection_dim)
    with torch.no_grad():
        outputs = [models.transformer(latents, text, pooled, torch.tensor([500.0])).sample for models in loaded]
    assert outputs[0].shape == latents.shape
    # Same weights; CPU kernels round differently with the weights' memory alignment, hence not bit-equal.
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0], rtol=0, atol=1e-6)


def test_sd3_files_missing_encoders_are_named_before_loading(tiny_sd3_dir):
    sources = sd3_files.SD3Sources(tiny_sd3_dir["sd3-no-te"])
    assert sources.missing() == ["--clip_l", "--clip_g", "--t5xxl"]
    assert sd3_files.SD3Sources(tiny_sd3_dir["sd3"]).missing() == []
    with pytest.raises(CheckpointError, match="holds no clip_l, clip_g, t5xxl: give --clip_l and --clip_g and --t5xxl"):
        sd3_files.load_models(sources, torch.float32, torch.float32)


def test_sd3_files_refuse_swapped_clip_files_and_wrong_components(tiny_sd3_dir):
    files = {"clip_l": tiny_sd3_dir["clip_g"], "clip_g": tiny_sd3_dir["clip_l"], "t5xxl": tiny_sd3_dir["t5xxl"]}
    with pytest.raises(CheckpointError, match="swapped"):
        sd3_files.load_models(sd3_files.SD3Sources(tiny_sd3_dir["sd3-no-te"], **files), torch.float32, torch.float32)
    with pytest.raises(CheckpointError, match="--t5xxl .*clip_l.safetensors holds a CLIP text encoder, not T5-XXL"):
        sd3_files.load_component_file(tiny_sd3_dir["clip_l"], "t5xxl", torch.float32)


def test_sd3_files_t5_fp8_file_is_upcast_on_load(tiny_sd3_dir, tmp_path):
    fp8 = {key: value.to(torch.float8_e4m3fn) for key, value in load_file(tiny_sd3_dir["t5xxl"]).items()}
    path = str(tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    save_file(fp8, path)
    model = sd3_files.load_component_file(path, "t5xxl", torch.float32)
    assert model.shared.weight.dtype == torch.float32
    assert torch.equal(model.shared.weight, fp8["shared.weight"].float())
    assert model.encoder.embed_tokens is model.shared


def test_sd3_keys_flux_file_is_recognised_as_not_sd3(tmp_path):
    from diffusers import FluxTransformer2DModel

    config = tiny_configs.tiny_flux_transformer_config()
    with torch.device("meta"):
        keys = flux_keys.join_transformer(FluxTransformer2DModel(**config).state_dict(), config).keys()
    assert not sd3_keys.detect(keys)
    assert sd3_keys.component_of(keys) == "flux"
    path = str(tmp_path / "flux1-dev.safetensors")
    save_file({key: torch.zeros(1) for key in keys}, path)
    with pytest.raises(CheckpointError, match="flux1-dev.safetensors holds a FLUX.1 transformer, not an SD3"):
        sd3_files.load_models(sd3_files.SD3Sources(path), torch.float32, torch.float32)


def test_sd3_keys_linear_modules_cover_every_linear_once(tiny_sd3_dir):
    models = _load(tiny_sd3_dir, "sd3.5m")
    config = dict(models.transformer.config)
    modules = sd3_keys.linear_modules(config)
    parts = [part for _, module_parts in modules for part in module_parts]
    linears = [name for name, module in models.transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    assert sorted(parts) == sorted(linears)
    assert dict(modules)["joint_blocks.1.x_block.attn2.qkv"] == tuple(
        f"transformer_blocks.1.attn2.to_{name}" for name in "qkv"
    )
    assert sd3_keys.half_swapped_modules(config) == {
        "final_layer.adaLN_modulation.1", "joint_blocks.2.context_block.adaLN_modulation.1"
    }  # fmt: skip


def test_sd3_files_tokenizers_pad_like_the_release(tiny_sd3_dir):
    clip_l, clip_g, t5 = sd3_files.load_tokenizers(model_dir=tiny_sd3_dir["sd3.5m-diffusers"])
    assert (clip_l.pad_token, clip_g.pad_token) == ("<|endoftext|>", "!")
    ids = clip_g("a red circle", padding="max_length", max_length=sd3_configs.CLIP_MAX_TOKENS).input_ids
    assert len(ids) == 77 and ids[-1] == clip_g.convert_tokens_to_ids("!")
    assert t5("a red circle").input_ids[-1] == 1  # T5 appends </s>
