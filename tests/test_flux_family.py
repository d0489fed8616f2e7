"""The `flux` family: loading from single files and a diffusers folder, latent packing and position ids, text
conditioning (T5 length and mask, pooled CLIP-L), the prediction, options checked before loading."""

from __future__ import annotations

import os

import pytest
import torch

from library.checkpoints.t5_tokenizer import load_t5_tokenizer
from library.errors import CheckpointError, ConfigError
from library.families.flux import FluxFamily, image_position_ids, pack_latents, unpack_latents
from library.methods.finetune import FineTuneMethod
from library.methods.network import NetworkMethod
from library.testing.sd_scripts_tokenizers import T5XXL
from library.testing.tiny_flux import write_t5_tokenizer
from library.training.entry import build_parser
from library.training.noise import NoiseOptions
from tests.tokenizer_helpers import assert_sd_scripts_folder_untouched, assert_tokenizer_from

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait


def flux_args(paths: dict[str, str], *extra: str, single_files: bool = True, method=NetworkMethod):
    argv = ["--output_dir", "unused", "--tokenizer_cache_dir", paths["tokenizers"]]
    if single_files:
        argv += ["--pretrained_model_name_or_path", paths["transformer"], "--ae", paths["ae"],
                 "--clip_l", paths["clip_l"], "--t5xxl", paths["t5xxl"]]  # fmt: skip
    else:
        argv += ["--pretrained_model_name_or_path", paths["diffusers"]]
    return build_parser(FluxFamily, method, "test").parse_args([*argv, *extra])


@pytest.fixture(scope="module")
def loaded(tiny_flux_dir):
    family = FluxFamily(flux_args(tiny_flux_dir, "--t5xxl_max_token_length", "12", "--apply_t5_attn_mask"))
    family.validate()
    return family, family.load(torch.float32)


def test_flux_pack_and_ids_match_diffusers_pipeline():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 4)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 4))
    assert torch.equal(unpack_latents(packed, 6, 4), latents)
    expected_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32)
    assert torch.equal(image_position_ids(3, 2, "cpu"), expected_ids)


def test_flux_single_files_and_diffusers_folder_give_the_same_prediction(loaded, tiny_flux_dir):
    family, models = loaded
    assert family.variant == "dev" and family.model_spec_architecture() == "flux-1-dev"
    folder_family = FluxFamily(flux_args(tiny_flux_dir, "--t5xxl_max_token_length", "12", "--apply_t5_attn_mask",
                                         single_files=False))  # fmt: skip
    folder_models = folder_family.load(torch.float32)
    latents = torch.randn(1, 16, 4, 4)
    inputs = family.training_inputs(latents, torch.Generator().manual_seed(0), NoiseOptions())
    outputs = []
    for fam, mods in ((family, models), (folder_family, folder_models)):
        with torch.no_grad():
            conditioning = fam.encode_text(mods, ["a red circle, toy picture"])
            outputs.append(fam.predict(mods, inputs.noisy_latents, inputs.timesteps, conditioning))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)  # same weights; kernels may order sums differently


def test_flux_text_conditioning_shapes_and_t5_mask(loaded):
    family, models = loaded
    with torch.no_grad():
        encoded = family.encode_text(models, ["a red circle", "a blue square on a green toy picture"])
    assert encoded["pooled_projections"].shape == (2, 32)
    assert encoded["encoder_hidden_states"].shape == (2, 12, 40)
    mask = encoded["t5_attention_mask"]
    assert mask.shape == (2, 12) and mask[0].sum() < mask[1].sum() and mask[0, 0] == 1


def test_flux_attention_mask_hides_t5_padding(loaded):
    family, models = loaded
    with torch.no_grad():
        conditioning = family.encode_text(models, ["a red circle"])
        inputs = family.training_inputs(torch.randn(1, 16, 4, 4), torch.Generator().manual_seed(0), NoiseOptions())
        first = family.predict(models, inputs.noisy_latents, inputs.timesteps, conditioning)
        padding = conditioning["t5_attention_mask"][0] == 0
        changed = dict(conditioning, encoder_hidden_states=conditioning["encoder_hidden_states"].clone())
        changed["encoder_hidden_states"][0, padding] = 5.0
        second = family.predict(models, inputs.noisy_latents, inputs.timesteps, changed)
    assert padding.any() and torch.allclose(first, second, atol=1e-5)


def test_flux_guidance_scale_reaches_the_dev_model(loaded):
    family, models = loaded
    with torch.no_grad():
        conditioning = family.encode_text(models, ["a cat"])
        inputs = family.training_inputs(torch.randn(1, 16, 4, 4), torch.Generator().manual_seed(0), NoiseOptions())
        first = family.predict(models, inputs.noisy_latents, inputs.timesteps, conditioning)
        family.options.guidance_scale = 1.0
        second = family.predict(models, inputs.noisy_latents, inputs.timesteps, conditioning)
        family.options.guidance_scale = 3.5
    assert not torch.allclose(first, second)


def test_flux_scale_latents_uses_shift_and_scale(loaded):
    family, models = loaded
    scaled = family.scale_latents(models, torch.full((1, 16, 2, 2), 1.1159))  # (x - shift) * scale
    assert torch.allclose(scaled, torch.full((1, 16, 2, 2), 0.3611))


def test_flux_options_are_checked_before_loading(tiny_flux_dir, tmp_path):
    with pytest.raises(ConfigError, match="add --ae, --clip_l, --t5xxl"):
        argv = ["--output_dir", "x", "--pretrained_model_name_or_path", tiny_flux_dir["transformer"]]
        FluxFamily(build_parser(FluxFamily, NetworkMethod, "t").parse_args(argv)).validate()
    with pytest.raises(ConfigError, match="cannot be combined"):
        FluxFamily(flux_args(tiny_flux_dir, "--blocks_to_swap", "2", "--cpu_offload_checkpointing",
                             "--gradient_checkpointing")).validate()  # fmt: skip
    with pytest.raises(ConfigError, match="--mixed_precision bf16"):
        FluxFamily(flux_args(tiny_flux_dir, "--fp8_base")).validate()
    with pytest.raises(CheckpointError, match="--ae: file not found"):
        FluxFamily(flux_args(dict(tiny_flux_dir, ae=str(tmp_path / "missing.safetensors")))).validate()
    for extra, message in ((["--train_text_encoder"], "trains the transformer only"),
                           (["--fp8_base", "--mixed_precision", "bf16"], "flux_train.py trains the transformer's")):
        with pytest.raises(ConfigError, match=message):
            args = flux_args(tiny_flux_dir, *extra, method=FineTuneMethod)
            FluxFamily(args).validate(FineTuneMethod(args))


def test_flux_t5_tokenizer_is_read_from_sd_scripts_layout_without_writing_there(sd_scripts_tokenizer_dir):
    tokenizer = load_t5_tokenizer(cache_dir=sd_scripts_tokenizer_dir)
    assert_tokenizer_from(tokenizer, os.path.join(sd_scripts_tokenizer_dir, T5XXL), "a photo of a red cat")
    assert_sd_scripts_folder_untouched(sd_scripts_tokenizer_dir)


def test_flux_t5_tokenizer_prefers_our_layout_to_sd_scripts(tmp_path):
    for subfolder in ("t5xxl", T5XXL):
        write_t5_tokenizer(str(tmp_path / subfolder))
    assert load_t5_tokenizer(cache_dir=str(tmp_path)).name_or_path == str(tmp_path / "t5xxl")


def test_flux_t5_tokenizer_is_found_offline_or_named(tiny_flux_dir, tmp_path):
    tokenizer = load_t5_tokenizer(cache_dir=tiny_flux_dir["tokenizers"])
    assert tokenizer("a cat").input_ids[-1] == tokenizer.eos_token_id == 1
    assert load_t5_tokenizer(model_dir=tiny_flux_dir["diffusers"]).pad_token_id == 0
    with pytest.raises(CheckpointError, match="no T5 tokenizer found offline"):
        load_t5_tokenizer(cache_dir=str(tmp_path))
