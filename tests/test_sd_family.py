"""The `sd` family: tokenizer, long-caption chunking, clip skip, loading paths, objective."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from library.checkpoints.tokenizers import EOS_TOKEN, load_clip_tokenizer, write_clip_tokenizer_files
from library.errors import CheckpointError
from library.families.sd import SDFamily, frame_token_chunks, merge_chunk_states
from library.testing.sd_scripts_tokenizers import CLIP_L, CLIP_SD2
from tests.tokenizer_helpers import assert_sd_scripts_folder_untouched, assert_tokenizer_from
from tests.training_helpers import parsed_args


def default_noise_options():
    from library.training.noise import NoiseOptions, add_noise_arguments

    parser = argparse.ArgumentParser()
    add_noise_arguments(parser)
    return NoiseOptions.from_args(parser.parse_args([]))


def family_args(model: str, **overrides) -> argparse.Namespace:
    args = parsed_args("sd", ["--pretrained_model_name_or_path", model])
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def test_rebuilt_tokenizer_gives_the_real_clip_ids(tokenizer_dir):
    tokenizer = load_clip_tokenizer(v2=False, cache_dir=tokenizer_dir)
    # ids of OpenAI's CLIP ViT-L/14 tokenizer for this text
    assert tokenizer("a photo of a cat, masterpiece").input_ids == [49406, 320, 1125, 539, 320, 2368, 267, 12066, 49407]
    assert len(tokenizer) == 49408


def test_sd2_tokenizer_pads_with_exclamation_mark(tmp_path):
    tokenizer = load_clip_tokenizer(v2=True, cache_dir=str(tmp_path / "tok2"))
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0


@pytest.mark.parametrize(("v2", "subfolder", "pad_token"), [(False, CLIP_L, "<|endoftext|>"), (True, CLIP_SD2, "!")])
def test_clip_tokenizer_is_read_from_sd_scripts_layout_without_writing_there(
    sd_scripts_tokenizer_dir, v2, subfolder, pad_token
):
    tokenizer = load_clip_tokenizer(v2=v2, cache_dir=sd_scripts_tokenizer_dir)
    assert_tokenizer_from(tokenizer, os.path.join(sd_scripts_tokenizer_dir, subfolder), "a photo of a cat, masterpiece")
    assert tokenizer.pad_token == pad_token
    assert_sd_scripts_folder_untouched(sd_scripts_tokenizer_dir)


@pytest.mark.parametrize(("v2", "only", "pad_token"), [(True, CLIP_L, "!"), (False, CLIP_SD2, "<|endoftext|>")])
def test_clip_tokenizer_of_the_other_sd_version_in_sd_scripts_layout_serves_with_this_versions_padding(
    tmp_path, v2, only, pad_token
):
    cache = tmp_path / "cache"
    write_clip_tokenizer_files(str(cache / only), EOS_TOKEN if only == CLIP_L else "!")
    tokenizer = load_clip_tokenizer(v2=v2, cache_dir=str(cache))
    assert_tokenizer_from(tokenizer, str(cache / only), "a photo of a cat, masterpiece")
    assert tokenizer.pad_token == pad_token and os.listdir(cache) == [only]  # nothing rebuilt at the top


def test_frame_token_chunks_gives_each_chunk_its_own_bos_and_eos():
    ids = list(range(1000, 1100))  # 100 caption tokens
    framed = frame_token_chunks(ids, chunks=3, bos=1, eos=2, pad=0)
    assert len(framed) == 3 * 77
    first, second, third = framed[:77], framed[77:154], framed[154:]
    assert first == [1, *range(1000, 1075), 2]
    assert second == [1, *range(1075, 1100), 2] + [0] * 50
    assert third == [1, 2] + [0] * 75


@pytest.mark.parametrize(("max_token_length", "length"), [(75, 77), (150, 152), (225, 227)])
def test_encode_text_length_follows_max_token_length(tiny_models_dir, tokenizer_dir, max_token_length, length):
    family = SDFamily(family_args(os.path.join(tiny_models_dir, "sd1.safetensors"),
                                  max_token_length=max_token_length, tokenizer_cache_dir=tokenizer_dir))
    models = family.load(torch.float32)
    with torch.no_grad():
        states = family.encode_text(models, ["a red circle, " * 60, "short"])["encoder_hidden_states"]
    assert states.shape == (2, length, 32)


def test_merge_chunk_states_keeps_first_bos_inner_tokens_and_last_eos():
    hidden = torch.arange(2 * 77, dtype=torch.float32).reshape(1, 2, 77, 1)
    merged = merge_chunk_states(hidden)[0, :, 0]
    assert merged[0] == 0 and merged[-1] == 2 * 77 - 1
    assert merged[1:76].tolist() == list(range(1, 76)) and merged[76:151].tolist() == list(range(78, 153))


def test_clip_skip_two_uses_normalised_penultimate_layer(tiny_models_dir, tokenizer_dir):
    path = os.path.join(tiny_models_dir, "sd1.safetensors")
    family = SDFamily(family_args(path, clip_skip=2, tokenizer_cache_dir=tokenizer_dir))
    models = family.load(torch.float32)
    encoder = models.text_encoders[0]
    ids = family.tokenize(models.tokenizers[0], ["a blue square"])
    with torch.no_grad():
        states = family.encode_text(models, ["a blue square"])["encoder_hidden_states"]
        hidden = encoder(ids, output_hidden_states=True).hidden_states
        expected = getattr(encoder, "text_model", encoder).final_layer_norm(hidden[-2])
        last = encoder(ids).last_hidden_state
    torch.testing.assert_close(states, expected)
    assert not torch.allclose(states, last)


def test_single_file_and_diffusers_folder_load_the_same_weights(tiny_models_dir, tokenizer_dir):
    single = SDFamily(family_args(os.path.join(tiny_models_dir, "sd2-v.safetensors"), v2=True,
                                  tokenizer_cache_dir=tokenizer_dir)).load(torch.float32)
    folder = SDFamily(family_args(os.path.join(tiny_models_dir, "sd2-v-diffusers"), v2=True)).load(torch.float32)
    for a, b in [(single.denoiser, folder.denoiser), (single.vae, folder.vae),
                 (single.text_encoders[0], folder.text_encoders[0])]:
        state_a, state_b = a.state_dict(), b.state_dict()
        assert state_a.keys() == state_b.keys()
        assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)
    assert folder.tokenizers[0].pad_token == "!"


def test_vae_option_replaces_the_vae(tiny_models_dir, tokenizer_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(os.path.join(tiny_models_dir, "sd1.safetensors"))
    vae_state = {key.removeprefix("first_stage_model."): value * 0.5
                 for key, value in state.items() if key.startswith("first_stage_model.")}
    vae_path = str(tmp_path / "vae.safetensors")
    save_file(vae_state, vae_path)
    family = SDFamily(family_args(os.path.join(tiny_models_dir, "sd1.safetensors"), vae=vae_path,
                                  tokenizer_cache_dir=tokenizer_dir))
    family.validate()
    models = family.load(torch.float32)
    weight = models.vae.state_dict()["encoder.conv_in.weight"]
    torch.testing.assert_close(weight, state["first_stage_model.encoder.conv_in.weight"] * 0.5)


def test_pickled_checkpoint_with_code_is_refused_without_allow_pickle(tmp_path, tokenizer_dir):
    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": argparse.Namespace(a=1)}, path)
    family = SDFamily(family_args(path, tokenizer_cache_dir=tokenizer_dir))
    with pytest.raises(CheckpointError, match="--allow_pickle"):
        family.load(torch.float32)


@pytest.mark.parametrize("v_parameterization", [False, True])
def test_objective_target_is_noise_or_velocity(tiny_models_dir, v_parameterization):
    family = SDFamily(family_args("unused", v_parameterization=v_parameterization))
    latents = torch.randn(2, 4, 8, 8)
    inputs = family.training_inputs(latents, torch.Generator().manual_seed(0), default_noise_options())
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    alphas = family.noise_scheduler.alphas_cumprod[inputs.timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(inputs.noisy_latents, alphas.sqrt() * latents + (1 - alphas).sqrt() * noise)
    expected = alphas.sqrt() * noise - (1 - alphas).sqrt() * latents if v_parameterization else noise
    torch.testing.assert_close(inputs.target, expected)


def test_shared_tokenizer_cache_gives_each_version_its_padding(tmp_path):
    shared = str(tmp_path / "shared")
    v1 = load_clip_tokenizer(v2=False, cache_dir=shared)
    v2 = load_clip_tokenizer(v2=True, cache_dir=shared)
    again_v1 = load_clip_tokenizer(v2=False, cache_dir=shared)
    assert (v1.pad_token, v2.pad_token, again_v1.pad_token) == ("<|endoftext|>", "!", "<|endoftext|>")


def test_weighted_captions_scale_token_states_and_keep_their_mean(tiny_models_dir, tokenizer_dir):
    path = os.path.join(tiny_models_dir, "sd1.safetensors")
    plain = SDFamily(family_args(path, tokenizer_cache_dir=tokenizer_dir))
    weighted = SDFamily(family_args(path, tokenizer_cache_dir=tokenizer_dir, weighted_captions=True))
    models = plain.load(torch.float32)
    with torch.no_grad():
        reference = plain.encode_text(models, ["a red dog"])["encoder_hidden_states"]
        neutral = weighted.encode_text(models, ["a red dog"])["encoder_hidden_states"]
        emphasised = weighted.encode_text(models, ["a (red:1.5) dog"])["encoder_hidden_states"]
    torch.testing.assert_close(neutral, reference)  # no markup: same as unweighted
    assert not torch.allclose(emphasised, reference)
    torch.testing.assert_close(emphasised.mean(), reference.mean())  # mean-preserving rescale
