"""Textual inversion: only the new word's vectors train; the embedding loads in diffusers; options and errors."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.checkpoints.files import read_safetensors_metadata
from library.errors import ConfigError
from library.families.sd import SDFamily
from library.methods.textual_inversion import OBJECT_TEMPLATES, TextualInversionMethod, read_embedding
from tests.conftest import run_cli
from tests.test_full_model_training import cli_args, train_in_process
from tests.test_sd_family import family_args

TOKEN_EMBEDDING = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def method_args(tmp_path, *extra: str) -> argparse.Namespace:
    from library.training.entry import build_parser

    argv = ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", str(tmp_path), *extra]
    return build_parser(SDFamily, TextualInversionMethod, "test").parse_args(argv)


def load_tiny(tiny_models_dir: str, tokenizer_dir: str):
    family = SDFamily(family_args(os.path.join(tiny_models_dir, "sd1.safetensors"), tokenizer_cache_dir=tokenizer_dir))
    return family, family.load(torch.float32)


def test_trained_embedding_loads_in_diffusers_under_its_token(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    base = os.path.join(tiny_models_dir, "sd1.safetensors")
    args = cli_args("train_textual_inversion.py", base, toy_dataset, str(tmp_path / "out"), tokenizer_dir,
                    "--token_string", "mychar4", "--init_word", "toy", "--num_vectors_per_token", "2",
                    "--use_object_template", "--learning_rate", "1e-2")
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    path = str(tmp_path / "out" / "model.safetensors")
    vectors = load_file(path)["emb_params"]
    assert vectors.shape == (2, 32)
    toy_row = load_file(base)[TOKEN_EMBEDDING][5988]  # "toy</w>": the init word, one token, for both vectors
    assert not torch.equal(vectors[0], toy_row) and not torch.equal(vectors[1], toy_row)
    metadata = read_safetensors_metadata(path)
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert metadata["ss_token_string"] == "mychar4" and metadata["ss_num_vectors_per_token"] == "2"

    pipeline = StableDiffusionPipeline.from_pretrained(os.path.join(tiny_models_dir, "sd1-diffusers"),
                                                       local_files_only=True)
    pipeline.load_textual_inversion(path, token="mychar4")
    ids = pipeline.tokenizer.convert_tokens_to_ids(["mychar4", "mychar4_1"])
    table = pipeline.text_encoder.get_input_embeddings().weight
    assert ids == [49408, 49409]
    assert torch.equal(table[ids], vectors)


def test_only_the_new_vectors_change_during_training(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path):
    _, fresh = load_tiny(tiny_models_dir, tokenizer_dir)
    argv = cli_args("", os.path.join(tiny_models_dir, "sd1.safetensors"), toy_dataset, str(tmp_path / "out"),
                    tokenizer_dir, "--token_string", "mystyle", "--use_style_template", "--learning_rate", "1e-2",
                    "--num_vectors_per_token", "2")[1:]
    method = train_in_process(argv, TextualInversionMethod)
    trained = method.models
    encoder = trained.text_encoders[0]
    assert torch.equal(encoder.get_input_embeddings().base.weight, fresh.text_encoders[0].get_input_embeddings().weight)
    fresh_text = fresh.text_encoders[0].state_dict()
    trained_text = encoder.state_dict()
    others = [key for key in fresh_text if "token_embedding" not in key]
    assert others and all(torch.equal(trained_text[key], fresh_text[key]) for key in others)
    assert all(torch.equal(a, b) for a, b in zip(trained.denoiser.state_dict().values(),
                                                 fresh.denoiser.state_dict().values()))
    # nothing decodes in this run, so the VAE decoder leaves memory; what stays is unchanged
    trained_vae, fresh_vae = trained.vae.state_dict(), fresh.vae.state_dict()
    decoder = [name for name in trained_vae if name.startswith(("decoder.", "post_quant_conv."))]
    assert decoder and all(trained_vae[name].is_meta for name in decoder)
    kept = [name for name in trained_vae if name not in decoder]
    assert kept and all(torch.equal(trained_vae[name], fresh_vae[name]) for name in kept)
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))["emb_params"]
    assert torch.equal(saved, method.embedding.vectors.detach())


def test_templates_replace_captions_and_spell_out_every_vector(tmp_path):
    method = TextualInversionMethod(method_args(tmp_path, "--token_string", "mychar4", "--num_vectors_per_token",
                                                "3", "--use_object_template"))
    method.validate()
    captions = method.prepare_captions(["ignored caption", "another one"])
    spelt = "mychar4 mychar41 mychar42"
    assert all(spelt in caption for caption in captions)
    assert all(any(caption == t.format(spelt) for t in OBJECT_TEMPLATES) for caption in captions)


def test_token_string_in_captions_is_spelt_out_and_missing_token_warns(tmp_path, caplog):
    method = TextualInversionMethod(method_args(tmp_path, "--token_string", "mychar4", "--num_vectors_per_token", "2"))
    method.validate()
    with caplog.at_level("WARNING"):
        captions = method.prepare_captions(["MyChar4 smiling, outdoors", "a plain caption"])
    assert captions == ["mychar4 mychar41 smiling, outdoors", "a plain caption"]
    assert "lack --token_string" in caplog.text


def test_weights_continue_from_a_saved_embedding(tiny_models_dir, tokenizer_dir, tmp_path):
    family, models = load_tiny(tiny_models_dir, tokenizer_dir)
    previous = torch.randn(2, 32)
    save_file({"emb_params": previous}, str(tmp_path / "prev.safetensors"))
    method = TextualInversionMethod(method_args(tmp_path, "--token_string", "mychar4", "--num_vectors_per_token", "2",
                                                "--weights", str(tmp_path / "prev.safetensors")))
    method.validate()
    method.setup(family, models)
    assert torch.equal(method.embedding.vectors.detach(), previous)


def test_weights_with_other_vector_count_is_rejected(tmp_path):
    save_file({"emb_params": torch.zeros(3, 32)}, str(tmp_path / "prev.safetensors"))
    method = TextualInversionMethod(method_args(tmp_path, "--token_string", "mychar4",
                                                "--weights", str(tmp_path / "prev.safetensors")))
    with pytest.raises(ConfigError, match="--num_vectors_per_token is 1"):
        method.validate()


def test_token_string_that_is_a_known_word_is_rejected(tiny_models_dir, tokenizer_dir, tmp_path):
    family, models = load_tiny(tiny_models_dir, tokenizer_dir)
    method = TextualInversionMethod(method_args(tmp_path, "--token_string", "cat"))
    method.validate()
    with pytest.raises(ConfigError, match="already knows cat"):
        method.setup(family, models)


def test_pt_format_holds_the_automatic1111_layout(tiny_models_dir, tokenizer_dir, tmp_path):
    family, models = load_tiny(tiny_models_dir, tokenizer_dir)
    method = TextualInversionMethod(method_args(tmp_path, "--token_string", "mychar4", "--init_word", "red",
                                                "--save_model_as", "pt"))
    method.validate()
    method.setup(family, models)
    path = str(tmp_path / "emb.pt")
    method.save(path, {"ss_steps": "5"}, lambda module: module)
    data = torch.load(path, weights_only=True)
    assert data["name"] == "mychar4" and data["step"] == 5
    red_row = models.text_encoders[0].get_input_embeddings().base.weight[736]  # "red</w>"
    assert torch.equal(data["string_to_param"]["*"], red_row.unsqueeze(0))
    assert torch.equal(read_embedding(path), data["string_to_param"]["*"])


def test_validation_loss_sees_the_captions_training_sees(tiny_models_dir, tokenizer_dir, tmp_path):
    """Regression: validation fed the captions without the method's preparation, so a word of two vectors was
    validated with its first vector only."""
    import contextlib

    from library.training.validation import validation_losses
    from tests.dataset_helpers import group_of, write_config, write_images
    from tests.test_validation import load_config_text

    family, models = load_tiny(tiny_models_dir, tokenizer_dir)
    method = TextualInversionMethod(method_args(tmp_path, "--token_string", "mychar4", "--num_vectors_per_token", "2"))
    method.validate()
    method.setup(family, models)
    images = write_images(tmp_path / "images", [(64, 64)] * 4, {index: "mychar4 toy" for index in range(4)})
    validation = group_of(write_config(tmp_path, load_config_text(images, 0.5)), seed=0).validation

    def losses() -> float:
        return validation_losses(family, models, validation, torch.device("cpu"), contextlib.nullcontext, method)

    before = losses()["val/loss"]
    with torch.no_grad():
        method.embedding.vectors[1] += 1.0  # the second vector only: it counts once "mychar4" is spelt out

    assert losses()["val/loss"] != before
