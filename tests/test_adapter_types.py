"""LoHa, LoKr and DoRA on the shared adapter layer: they train on every family, save under LyCORIS's key names, load
back (multiplier 0 bit-identical to the base), and load in LyCORIS and diffusers with the same effect."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from library.errors import CheckpointError, ConfigError
from library.testing.toy_data import write_toy_dataset
from networks import lokr, lora
from tests.lora_tool_helpers import FAMILIES, SUFFIXES, TYPES, load, network, output, train

pytestmark = pytest.mark.usefixtures("one_thread")

ZERO_INITIALISED = {"dora": ("lora_up.weight",), "loha": ("hada_w2_a",), "lokr": ("lokr_w2", "lokr_w2_b")}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> str:
    """Two images in one batch: the smallest run that trains."""
    return write_toy_dataset(str(tmp_path_factory.mktemp("data")), count=2, reg_count=0, batch_size=2)


def stored_modules(path: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    with safe_open(path, "pt") as handle:
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key in handle.keys():
            name, _, suffix = key.partition(".")
            modules.setdefault(name, {})[suffix] = handle.get_tensor(key)
        return modules, handle.metadata()


@pytest.mark.parametrize("adapter_type", ["dora", "loha", "lokr"])
@pytest.mark.parametrize("family_id", FAMILIES)
def test_adapter_type_trains_saves_and_loads_back(family_id, adapter_type, tiny_family, small_dataset, tmp_path):
    tiny = tiny_family(family_id)
    path = train(tiny, small_dataset, str(tmp_path), adapter_type)

    modules, metadata = stored_modules(path)
    assert metadata["ss_network_module"] == TYPES[adapter_type][0]
    assert all(set(tensors) <= SUFFIXES[adapter_type] for tensors in modules.values())
    assert all(name.startswith(("lora_unet_", "lora_te")) for name in modules)
    trained = [tensors[suffix] for tensors in modules.values() for suffix in tensors
               if suffix in ZERO_INITIALISED[adapter_type]]  # fmt: skip
    assert any(value.abs().max() > 0 for value in trained)  # the zero-initialised factors moved: it trained

    family, models = load(family_id, tiny.model_args)
    base = output(family, models)
    plugin = __import__(TYPES[adapter_type][0], fromlist=["create_network_from_weights"])
    loaded, _ = plugin.create_network_from_weights(1.0, path, models.vae, family.network_text_encoders(models),
                                                   family.network_denoiser(models),
                                                   adapter_targets=family.adapter_targets(models))  # fmt: skip
    loaded.apply_to(None, None, True, True)
    loaded.load_weights(path)
    stored_keys = {f"{name}.{suffix}" for name, tensors in modules.items() for suffix in tensors}
    assert set(loaded.file_state_dict()) == stored_keys
    assert not torch.allclose(output(family, models), base)
    loaded.set_multiplier(0.0)
    assert torch.equal(output(family, models), base)


@pytest.mark.parametrize("adapter_type", ["dora", "loha", "lokr"])
def test_lycoris_loads_our_files_with_the_same_effect(adapter_type, tiny_family, monkeypatch):
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    # LyCORIS builds its default network first, whose extra UNet names collide on this diffusers UNet
    monkeypatch.setattr(lycoris_kohya.LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])
    tiny = tiny_family("sd")
    family, models = load("sd", tiny.model_args)
    ours = network(adapter_type, family, models, conv_dim="2")
    weights = ours.file_state_dict()
    ours.apply_to(None, None, True, True)
    expected = output(family, models)

    family, models = load("sd", tiny.model_args)
    text_encoder = family.network_text_encoders(models)[0]
    theirs, _ = lycoris_kohya.create_network_from_weights(1.0, None, None, text_encoder, models.denoiser,
                                                          weights_sd=weights)  # fmt: skip
    theirs.apply_to(text_encoder, models.denoiser, True, True)
    theirs.load_state_dict(weights, strict=False)
    assert len(theirs.unet_loras) + len(theirs.text_encoder_loras) == len(ours.all_loras())
    # LyCORIS's forward (its merge_to applies alpha / dim twice to LoHa / LoKr; ComfyUI and we apply it once)
    torch.testing.assert_close(output(family, models), expected, atol=1e-5, rtol=1e-5)


def test_dora_converted_to_diffusers_loads_in_diffusers_with_our_effect(tiny_family, tmp_path):
    """diffusers reads DoRA in its own (PEFT) format; from kohya files it drops dora_scale. Denoiser only: the text
    encoders' loader (transformers' PEFT integration) does not find PEFT's `lora_magnitude_vector` keys."""
    from diffusers import StableDiffusionPipeline

    from library.lora_tools.convert import main as convert

    tiny = tiny_family("sd")
    family, models = load("sd", tiny.model_args)
    dora = network("dora", family, models, seed=4)
    dora.apply_to(None, None, False, True)
    kohya = str(tmp_path / "dora.safetensors")
    dora.save_weights(kohya, None, {"ss_base_model_version": "sd_v1"})
    expected = output(family, models)
    converted = str(tmp_path / "dora_diffusers.safetensors")
    convert(["--family", "sd", *tiny.model_args, "--src_path", kohya, "--dst", "diffusers", "--dst_path", converted])

    family, models = load("sd", tiny.model_args)
    base = output(family, models)
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(converted, return_lora_metadata=True)
    assert metadata["unet.use_dora"] and any(key.endswith("lora_magnitude_vector") for key in state)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, models.denoiser, metadata=metadata)
    assert (expected - base).abs().max() > 0.05
    torch.testing.assert_close(output(family, models), expected, atol=1e-5, rtol=1e-5)


def test_dora_split_qkv_file_is_the_exact_fused_equivalent(tiny_family):
    tiny = tiny_family("flux")
    family, models = load("flux", tiny.model_args)
    split = network("dora", family, models, split_qkv="True")
    split.apply_to(None, None, True, True)
    expected = output(family, models)
    weights = split.file_state_dict()
    assert weights["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"].shape == (3 * 64, 1)

    family, models = load("flux", tiny.model_args)
    fused, _ = lora.create_network_from_weights(1.0, None, None, family.network_text_encoders(models),
                                                models.denoiser, weights_sd=weights)  # fmt: skip
    fused.apply_to(None, None, True, True)
    fused.load_state_dict(weights)
    torch.testing.assert_close(output(family, models), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dimension", [127, 128, 250, 360, 768, 3072, 12288])
@pytest.mark.parametrize("factor", [-1, 2, 4, 8, 16])
def test_lokr_factorization_matches_lycoris(dimension, factor):
    general = pytest.importorskip("lycoris.functional.general")
    assert lokr.factorization(dimension, factor) == general.factorization(dimension, factor)


def test_lokr_with_factor_splits_layers_as_asked(tiny_family):
    family, models = load("sd", tiny_family("sd").model_args)
    created = network("lokr", family, models)  # factor 4
    tensors = created.file_state_dict()
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 32 x 32
    assert tensors[f"{name}.lokr_w1"].shape == (4, 4) and tensors[f"{name}.lokr_w2"].shape == (8, 8)
    assert float(tensors[f"{name}.alpha"]) == 4.0  # both factors full: scale 1, alpha = dim


@pytest.mark.parametrize("adapter_type", ["loha", "lokr"])
def test_types_without_a_diffusers_form_refuse_save_format_diffusers(adapter_type, tiny_family):
    family, models = load("flux", tiny_family("flux").model_args)
    with pytest.raises(ConfigError, match="diffusers has no form of Lo"):
        network(adapter_type, family, models, save_format="diffusers")


def test_networks_lora_names_the_plugin_of_a_loha_file(tiny_family):
    family, models = load("sd", tiny_family("sd").model_args)
    weights = network("loha", family, models).file_state_dict()
    with pytest.raises(CheckpointError, match=r"LoHa modules: load them with --network_module networks.loha"):
        lora.create_network_from_weights(1.0, None, None, family.network_text_encoders(models), models.denoiser,
                                         weights_sd=weights)  # fmt: skip
