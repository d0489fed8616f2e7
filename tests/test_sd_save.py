"""Saving SD 1.x / 2.x models: original-layout round trips, diffusers loading of what we write, precision, --vae."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.checkpoints.files import load_state_dict, read_safetensors_metadata
from library.families.sd import SDFamily
from tests.test_sd_family import family_args

VARIANTS = {"sd1": {}, "sd2-v": {"v2": True, "v_parameterization": True}}


@pytest.fixture(scope="module")
def tokenizer_dirs(tokenizer_dir, tmp_path_factory) -> dict[str, str]:
    """A tokenizer folder per variant: SD 2.x pads with "!"."""
    from library.checkpoints.tokenizers import write_clip_tokenizer_files

    return {"sd1": tokenizer_dir, "sd2-v": write_clip_tokenizer_files(str(tmp_path_factory.mktemp("tok2")), "!")}


def load_models(path: str, tokenizer_dirs: dict[str, str], variant: str, **options):
    family = SDFamily(family_args(path, tokenizer_cache_dir=tokenizer_dirs[variant], **VARIANTS[variant], **options))
    family.validate()
    return family, family.load(torch.float32)


def assert_same_weights(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    assert all(torch.equal(ours_state[key], theirs_state[key]) for key in ours_state)


@pytest.fixture(scope="module")
def saved_files(tiny_models_dir, tokenizer_dirs, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Per variant: (original file with an EMA key added, the file saved after loading it)."""
    out = tmp_path_factory.mktemp("saved")
    files = {}
    for variant in VARIANTS:
        original = load_file(os.path.join(tiny_models_dir, f"{variant}.safetensors"))
        original["model_ema.decay"] = torch.tensor(0.9999)  # EMA state is dropped on save: stale after training
        source = str(out / f"{variant}-source.safetensors")
        save_file(original, source)
        family, models = load_models(source, tokenizer_dirs, variant)
        saved = str(out / f"{variant}-saved.safetensors")
        family.save_model(models, saved, "safetensors", None, {"modelspec.title": "round trip"})
        files[variant] = (source, saved)
    return files


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_single_file_round_trip_gives_same_keys_and_bit_identical_tensors(saved_files, variant):
    source, saved = saved_files[variant]
    original, written = load_file(source), load_file(saved)
    del original["model_ema.decay"]
    assert written.keys() == original.keys()
    assert all(torch.equal(written[key], original[key]) for key in original)
    metadata = read_safetensors_metadata(saved)
    assert metadata["modelspec.title"] == "round trip"
    assert metadata["modelspec.implementation"].startswith("https://github.com/Stability-AI")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_single_file_loads_in_diffusers_with_identical_weights(saved_files, tiny_models_dir, variant):
    from diffusers import StableDiffusionPipeline

    config = os.path.join(tiny_models_dir, f"{variant}-diffusers")
    pipeline = StableDiffusionPipeline.from_single_file(saved_files[variant][1], config=config, local_files_only=True)
    reference = StableDiffusionPipeline.from_pretrained(config, local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(pipeline, name), getattr(reference, name))


def test_diffusers_folder_save_loads_with_from_pretrained(tiny_models_dir, tokenizer_dirs, tmp_path):
    from diffusers import StableDiffusionPipeline

    family, models = load_models(os.path.join(tiny_models_dir, "sd2-v.safetensors"), tokenizer_dirs, "sd2-v")
    folder = str(tmp_path / "model")
    family.save_model(models, folder, "diffusers_safetensors", None, {})
    pipeline = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert_same_weights(pipeline.unet, models.denoiser)
    assert_same_weights(pipeline.vae, models.vae)
    assert_same_weights(pipeline.text_encoder, models.text_encoders[0])
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    assert pipeline.tokenizer.pad_token == "!"
    assert os.path.isfile(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no temporary folder left


def test_diffusers_format_writes_bin_weights(tiny_models_dir, tokenizer_dirs, tmp_path):
    family, models = load_models(os.path.join(tiny_models_dir, "sd1.safetensors"), tokenizer_dirs, "sd1")
    family.save_model(models, str(tmp_path / "model"), "diffusers", None, {})
    assert os.path.isfile(tmp_path / "model" / "unet" / "diffusion_pytorch_model.bin")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_from_diffusers_folder_saves_a_single_file_that_loads_back(tiny_models_dir, tokenizer_dirs, tmp_path,
                                                                         variant):
    family, models = load_models(os.path.join(tiny_models_dir, f"{variant}-diffusers"), tokenizer_dirs, variant)
    path = str(tmp_path / "model.safetensors")
    family.save_model(models, path, "safetensors", None, {})
    _, loaded = load_models(path, tokenizer_dirs, variant)
    for ours, theirs in [(loaded.denoiser, models.denoiser), (loaded.vae, models.vae),
                         (loaded.text_encoders[0], models.text_encoders[0])]:
        assert_same_weights(ours, theirs)


def test_save_precision_casts_every_tensor_of_a_ckpt(tiny_models_dir, tokenizer_dirs, tmp_path):
    family, models = load_models(os.path.join(tiny_models_dir, "sd1.safetensors"), tokenizer_dirs, "sd1")
    path = str(tmp_path / "model.ckpt")
    family.save_model(models, path, "ckpt", torch.float16, {"ss_steps": "3"})
    written = load_state_dict(path)  # the weights-only loader: nothing but tensors and plain data inside
    original = load_file(os.path.join(tiny_models_dir, "sd1.safetensors"))
    assert written.keys() == original.keys()
    assert all(tensor.dtype == torch.float16 for tensor in written.values() if tensor.is_floating_point())
    key = "model.diffusion_model.out.2.weight"
    torch.testing.assert_close(written[key], original[key].half())


def test_vae_given_at_training_is_the_vae_saved(tiny_models_dir, tokenizer_dirs, tmp_path):
    from library.testing.tiny_models import build_models, write_single_file

    other = write_single_file(build_models("sd1", seed=5), str(tmp_path / "other.safetensors"))
    family, models = load_models(os.path.join(tiny_models_dir, "sd1.safetensors"), tokenizer_dirs, "sd1", vae=other)
    path = str(tmp_path / "model.safetensors")
    family.save_model(models, path, "safetensors", None, {})
    written, vae_source = load_file(path), load_file(other)
    vae_keys = [key for key in written if key.startswith("first_stage_model.")]
    assert vae_keys and all(torch.equal(written[key], vae_source[key]) for key in vae_keys)
    unet_key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(written[unet_key], vae_source[unet_key])  # the rest is still the base model
