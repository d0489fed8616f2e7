"""Lumina Image 2.0 key maps and files: round trips of the released transformer layout and Gemma2 files, the
full-size key sets against diffusers' converter, strict key checks, single files vs the diffusers folder, the
ComfyUI all-in-one checkpoint, and the offline Gemma tokenizer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.checkpoints import flux_keys, lumina_configs, lumina_files, lumina_keys
from library.checkpoints.gemma_tokenizer import load_gemma_tokenizer
from library.errors import CheckpointError
from library.testing import tiny_configs, tiny_lumina
from library.testing.sd_scripts_tokenizers import gemma2_snapshot
from tests.tokenizer_helpers import assert_sd_scripts_folder_untouched, assert_tokenizer_from

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait


@pytest.fixture(scope="module")
def tiny_lumina_dir(tmp_path_factory) -> dict[str, str]:
    """The tiny Lumina 2 as transformer / gemma2 / ae files, a diffusers folder and a tokenizer folder (paths)."""
    return tiny_lumina.write_tiny_lumina(str(tmp_path_factory.mktemp("lumina")))


def _single_file_models(paths: dict[str, str], dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Module]:
    sources = lumina_files.LuminaSources(None, paths["transformer"], paths["gemma2"], paths["ae"])
    return lumina_files.load_models(sources, dtype, dtype)


def _assert_same_tensors(written: dict, original: dict) -> None:
    assert written.keys() == original.keys()
    assert all(written[key].dtype == t.dtype and torch.equal(written[key], t) for key, t in original.items())


@pytest.mark.parametrize(
    "prefix, dtype", [("", torch.float32), (lumina_keys.COMFY_PREFIX, torch.float32), ("", torch.bfloat16)]
)
def test_lumina_keys_transformer_file_round_trips_bit_identical(tiny_lumina_dir, tmp_path, prefix, dtype):
    original = {key: value.to(dtype) for key, value in load_file(tiny_lumina_dir["transformer"]).items()}
    path = str(tmp_path / "lumina.safetensors")
    save_file({prefix + key: value for key, value in original.items()}, path)
    transformer = lumina_files.load_transformer(path, dtype)
    written = lumina_keys.join_transformer(transformer.state_dict(), dict(transformer.config))
    _assert_same_tensors(written, original)
    assert written[lumina_keys.UNUSED_NORM].shape == (24,)
    assert lumina_keys.infer_transformer_config(original) == tiny_lumina.tiny_transformer_config()


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_lumina_keys_gemma2_file_round_trips_with_and_without_prefix(tiny_lumina_dir, tmp_path, prefix):
    original = {key.removeprefix("model."): value for key, value in load_file(tiny_lumina_dir["gemma2"]).items()}
    path = str(tmp_path / "gemma2.safetensors")
    save_file({prefix + key: value for key, value in original.items()}, path)
    gemma2 = lumina_files.load_gemma2(path, torch.float32)
    written = lumina_keys.join_gemma2(gemma2.state_dict(), gemma2.config.num_hidden_layers, prefix)
    _assert_same_tensors(written, {prefix + key: value for key, value in original.items()})


def test_lumina_keys_gemma2_file_extras_are_consumed(tiny_lumina_dir):
    state = load_file(tiny_lumina_dir["gemma2"])
    state["spiece_model"] = torch.zeros(7, dtype=torch.uint8)  # ComfyUI embeds the tokenizer's bytes
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    config, model_state = lumina_keys.split_gemma2(state, "gemma_2_2b_fp16.safetensors")
    assert "spiece_model" not in model_state and "lm_head.weight" not in model_state
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (2, 2, 1)


def test_lumina_keys_full_size_match_diffusers_converter_on_meta_device():
    from accelerate import init_empty_weights
    from diffusers import Lumina2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    config = lumina_configs.transformer_config()
    with init_empty_weights():
        model_state = Lumina2Transformer2DModel(**config).state_dict()
    original = lumina_keys.join_transformer(model_state, config)
    assert lumina_keys.infer_transformer_config(original) == config
    leftover = dict(original)
    converted = convert_lumina2_to_diffusers(leftover)  # pops every key it consumes, norm_final included
    assert not leftover  # 0 extra: our original names are all names the converter reads
    assert converted.keys() == model_state.keys()  # 0 missing
    ours = lumina_keys.split_transformer(original, "meta")[1]
    assert ours.keys() == converted.keys()
    assert all(ours[key].shape == converted[key].shape == model_state[key].shape for key in ours)


def test_lumina_configs_release_shapes_on_meta_device():
    from accelerate import init_empty_weights
    from diffusers import Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    with init_empty_weights():
        transformer = Lumina2Transformer2DModel(**lumina_configs.transformer_config())
        gemma2 = Gemma2Model(Gemma2Config(**lumina_configs.gemma2_config()))
    original = lumina_keys.join_transformer(transformer.state_dict(), lumina_configs.transformer_config())
    shapes = {key: tuple(value.shape) for key, value in original.items()}
    assert shapes["x_embedder.weight"] == (2304, 2 * 2 * 16)
    assert shapes["layers.25.attention.qkv.weight"] == (2304 + 768 + 768, 2304)  # 24 query, 8 key/value heads of 96
    assert shapes["layers.0.feed_forward.w1.weight"] == (9216, 2304)
    assert shapes["layers.0.adaLN_modulation.1.weight"] == (4 * 2304, 1024)
    assert shapes["cap_embedder.1.weight"] == (2304, 2304) and shapes["t_embedder.mlp.0.weight"] == (1024, 256)
    assert shapes["final_layer.linear.weight"] == (64, 2304) and "context_refiner.1.ffn_norm2.weight" in shapes
    assert round(sum(value.numel() for value in transformer.parameters()) / 1e9, 2) == 2.61
    gemma_file = lumina_keys.join_gemma2(gemma2.state_dict(), 26)
    assert lumina_keys.split_gemma2(gemma_file, "meta")[0] == lumina_configs.gemma2_config()
    assert tuple(gemma_file["model.layers.0.self_attn.k_proj.weight"].shape) == (4 * 256, 2304)
    assert round(sum(value.numel() for value in gemma2.parameters()) / 1e9, 2) == 2.61


def test_lumina_keys_split_qkv_and_modulations_like_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    config = lumina_configs.transformer_config()
    names = (
        "layers.0.attention.qkv.weight",
        "layers.0.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.weight",
    )
    entries = [entry for entry in lumina_keys.transformer_entries(config) if entry.original in names]
    generator = torch.Generator().manual_seed(0)
    original = {name: torch.randn(size, 8, generator=generator) for name, size in zip(names, (3840, 9216, 2304))}
    ours = lumina_keys.KeyMap(entries).to_model(original)
    theirs = convert_lumina2_to_diffusers(dict(original))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert ours["layers.0.attn.to_k.weight"].shape == (768, 8)


def test_lumina_keys_reject_unknown_and_missing_keys(tiny_lumina_dir):
    state = load_file(tiny_lumina_dir["transformer"])
    state["layers.0.attention.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"x\.safetensors.*unexpected.*layers\.0\.attention\.extra"):
        lumina_keys.split_transformer(state, "x.safetensors")
    del state["layers.0.attention.extra.weight"], state["noise_refiner.0.ffn_norm1.weight"]
    with pytest.raises(CheckpointError, match=r"x\.safetensors.*missing.*noise_refiner\.0\.ffn_norm1\.weight"):
        lumina_keys.split_transformer(state, "x.safetensors")
    gemma = load_file(tiny_lumina_dir["gemma2"])
    del gemma["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"g\.safetensors.*missing.*model\.layers\.1\.mlp\.up_proj"):
        lumina_keys.split_gemma2(gemma, "g.safetensors")


def test_lumina_files_single_files_and_diffusers_folder_give_identical_outputs(tiny_lumina_dir):
    from_files = _single_file_models(tiny_lumina_dir)
    folder = lumina_files.LuminaSources(tiny_lumina_dir["diffusers"], None, None, None)
    from_folder = lumina_files.load_models(folder, torch.float32, torch.float32)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 4, 4, generator=generator)  # (B, C, H, W)
    captions = torch.randn(2, 6, 32, generator=generator)  # (B, tokens, Gemma2 width)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    timesteps = torch.tensor([0.3, 0.8])
    ids = torch.tensor([[2, 10, 20, 30]])
    loaded = (from_files, from_folder)
    with torch.no_grad():
        outputs = [models["transformer"](latents, timesteps, captions, mask).sample for models in loaded]
        hidden = [models["gemma2"](ids, output_hidden_states=True).hidden_states[-2] for models in loaded]
    assert outputs[0].shape == latents.shape and torch.isfinite(outputs[0]).all()
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(hidden[0], hidden[1])
    assert torch.equal(from_files["ae"].encoder.conv_in.weight, from_folder["ae"].encoder.conv_in.weight)


def test_lumina_files_read_comfy_all_in_one_checkpoint(tiny_lumina_dir, tmp_path):
    parts = {"transformer": "model.diffusion_model.", "gemma2": "text_encoders.gemma2_2b.transformer.", "ae": "vae."}
    checkpoint = {"text_encoders.gemma2_2b.logit_scale": torch.tensor(4.6)}
    for component, prefix in parts.items():
        checkpoint.update({prefix + key: value for key, value in load_file(tiny_lumina_dir[component]).items()})
    path = str(tmp_path / "lumina_2.safetensors")
    save_file(checkpoint, path)
    assert lumina_keys.component_of(checkpoint) == "checkpoint" and lumina_keys.is_lumina_transformer(checkpoint)
    single = _single_file_models(tiny_lumina_dir)
    combined = _single_file_models({component: path for component in parts})
    for component in parts:
        expected, found = single[component].state_dict(), combined[component].state_dict()
        assert found.keys() == expected.keys() and all(torch.equal(found[key], expected[key]) for key in expected)


def test_lumina_keys_linear_modules_cover_every_linear_once(tiny_lumina_dir):
    transformer = lumina_files.load_transformer(tiny_lumina_dir["transformer"], torch.float32)
    modules = lumina_keys.linear_modules(dict(transformer.config))
    linears = {name for name, layer in transformer.named_modules() if isinstance(layer, torch.nn.Linear)}
    parts = [part for _, module_parts in modules for part in module_parts]
    assert sorted(parts) == sorted(linears)
    file_keys = load_file(tiny_lumina_dir["transformer"]).keys()
    assert all(original + ".weight" in file_keys for original, _ in modules)
    assert ("layers.0.attention.qkv", ("layers.0.attn.to_q", "layers.0.attn.to_k", "layers.0.attn.to_v")) in modules
    assert "context_refiner.0.adaLN_modulation.1" not in dict(modules)


def test_lumina_tokenizer_loads_offline_and_is_not_empty(tiny_lumina_dir, tmp_path):
    from transformers import AutoTokenizer

    tiny_lumina.write_gemma_tokenizer(str(tmp_path / "gemma2"))
    for tokenizer in (
        load_gemma_tokenizer(tiny_lumina_dir["tokenizer"]),
        load_gemma_tokenizer(model_dir=tiny_lumina_dir["diffusers"]),
        load_gemma_tokenizer(cache_dir=str(tmp_path)),
    ):
        assert len(tokenizer) == len(tiny_lumina.gemma_vocab()[0]) > 256
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 1, 0)
        prompt = lumina_configs.with_system_prompt("a photo of a red cat", lumina_configs.SYSTEM_PROMPTS["general"])
        encoded = tokenizer([prompt, "a dog"], padding="max_length", max_length=32, truncation=True)
        assert encoded.input_ids[1][:3] == tokenizer.convert_tokens_to_ids(["<bos>", "a", "▁dog"])
        assert encoded.input_ids[1][3:] == [0] * 29 and sum(encoded.attention_mask[1]) == 3  # padded on the right
    assert type(AutoTokenizer.from_pretrained(tiny_lumina_dir["tokenizer"])).__name__ == "GemmaTokenizer"


def test_lumina_tokenizer_is_read_from_sd_scripts_layout_without_writing_there(sd_scripts_tokenizer_dir):
    tokenizer = load_gemma_tokenizer(cache_dir=sd_scripts_tokenizer_dir)
    assert_tokenizer_from(tokenizer, gemma2_snapshot(sd_scripts_tokenizer_dir), "a photo of a red cat")
    assert tokenizer.padding_side == "right"
    assert_sd_scripts_folder_untouched(sd_scripts_tokenizer_dir)


def test_lumina_tokenizer_refuses_empty_offline_hub_answer_and_unreadable_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no Gemma tokenizer found offline: give --gemma2_tokenizer"):
        load_gemma_tokenizer(cache_dir=str(tmp_path))  # the offline hub answers with a 5-token tokenizer
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match="is unusable.*sentencepiece"):
        load_gemma_tokenizer(str(tmp_path / "spm"))


def test_lumina_keys_recognise_flux_file_as_not_lumina(tiny_lumina_dir, tmp_path):
    from diffusers import FluxTransformer2DModel

    flux = FluxTransformer2DModel(**tiny_configs.tiny_flux_transformer_config())
    flux_state = flux_keys.join_transformer(flux.state_dict(), dict(flux.config))
    path = str(tmp_path / "flux1-dev.safetensors")
    save_file(flux_state, path)
    assert not lumina_keys.is_lumina_transformer(flux_state) and lumina_keys.component_of(flux_state) == "unknown"
    with pytest.raises(CheckpointError, match="flux1-dev.safetensors holds no Lumina 2 component"):
        lumina_files.load_transformer(path, torch.float32)
    assert flux_keys.component_of(load_file(tiny_lumina_dir["transformer"])) == "unknown"
    with pytest.raises(CheckpointError, match="--gemma2 .*ae.safetensors holds the FLUX.1 autoencoder"):
        lumina_files.load_gemma2(tiny_lumina_dir["ae"], torch.float32)


def test_lumina_files_save_transformer_writes_released_layout(tiny_lumina_dir, tmp_path):
    transformer = lumina_files.load_transformer(tiny_lumina_dir["transformer"], torch.float32)
    path = str(tmp_path / "out" / "lumina-ft.safetensors")
    lumina_files.save_transformer(transformer, path, torch.bfloat16, {"ss_network_module": "none"})
    written = load_file(path)
    original = load_file(tiny_lumina_dir["transformer"])
    assert written.keys() == original.keys()
    assert all(value.dtype == torch.bfloat16 for value in written.values())
    assert torch.equal(written["layers.1.attention.qkv.weight"], original["layers.1.attention.qkv.weight"].bfloat16())
    assert lumina_files.release_scheduler().config.shift == lumina_configs.DISCRETE_FLOW_SHIFT
