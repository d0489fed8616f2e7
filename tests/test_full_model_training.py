"""DreamBooth (`train_db.py`) and fine-tuning (`fine_tune.py`): end-to-end runs, what trains, and the saved models."""

from __future__ import annotations

import json
import os
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from library.checkpoints.files import read_safetensors_metadata
from library.errors import ConfigError
from library.families.sd import SDFamily, tokenize_unpadded
from tests.conftest import run_cli
from tests.test_sd_family import family_args

UNET, TEXT, VAE = "model.diffusion_model.", "cond_stage_model.", "first_stage_model."


def cli_args(script: str, model: str, dataset: str, out_dir: str, tokenizer_dir: str, *extra: str) -> list[str]:
    return [
        script,
        "--pretrained_model_name_or_path", model,
        "--dataset_config", dataset,
        "--output_dir", out_dir,
        "--output_name", "model",
        "--learning_rate", "1e-4",
        "--max_train_steps", "2",
        "--seed", "3",
        "--tokenizer_cache_dir", tokenizer_dir,
        "--max_data_loader_n_workers", "0",
        *extra,
    ]  # fmt: skip


def changed_prefixes(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """Which of the UNet, text encoder and VAE have a tensor that differs."""
    assert before.keys() == after.keys()
    changed = {key for key in before if not torch.equal(before[key], after[key].to(before[key].dtype))}
    return {prefix for prefix in (UNET, TEXT, VAE) if any(key.startswith(prefix) for key in changed)}


def test_train_db_with_reg_images_trains_unet_and_text_encoder(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path):
    base = os.path.join(tiny_models_dir, "sd1.safetensors")
    args = cli_args("train_db.py", base, toy_dataset, str(tmp_path / "out"), tokenizer_dir,
                    "--prior_loss_weight", "0.5", "--no_token_padding")
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    saved = str(tmp_path / "out" / "model.safetensors")
    assert changed_prefixes(load_file(base), load_file(saved)) == {UNET, TEXT}
    metadata = read_safetensors_metadata(saved)
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert metadata["ss_num_reg_images"] == "2" and metadata["ss_prior_loss_weight"] == "0.5"
    assert metadata["ss_train_text_encoder"] == "True" and metadata["ss_steps"] == "2"


def write_latent_metadata_dataset(folder) -> str:
    """A fine-tuning dataset of metadata entries that have prepared latents (`<stem>.npz`) and no images at all."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    entries = {}
    for index in range(4):
        stem = str(folder / f"img{index}")
        np.savez(stem + ".npz", latents=rng.standard_normal((4, 8, 8)).astype(np.float16))
        np.savez(stem + "_flip.npz", latents=rng.standard_normal((4, 8, 8)).astype(np.float16))
        entries[stem] = {"caption": f"a toy shape number {index}", "tags": "toy, shape", "train_resolution": [64, 64]}
    (folder / "meta_lat.json").write_text(json.dumps(entries), encoding="utf-8")
    config = f"[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nmetadata_file = '{folder / 'meta_lat.json'}'\n"
    (folder / "dataset.toml").write_text(config, encoding="utf-8")
    return str(folder / "dataset.toml")


def test_fine_tune_from_metadata_latents_trains_unet_only_and_saves_v2_model_at_save_precision(
    tiny_models_dir, tokenizer_dir, tmp_path
):
    base = os.path.join(tiny_models_dir, "sd2-v.safetensors")
    dataset = write_latent_metadata_dataset(tmp_path / "data")
    args = cli_args("fine_tune.py", base, dataset, str(tmp_path / "out"), tokenizer_dir,
                    "--v2", "--v_parameterization", "--save_precision", "fp16", "--diffusers_xformers")
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    saved = str(tmp_path / "out" / "model.safetensors")
    original, written = load_file(base), load_file(saved)
    assert {tensor.dtype for tensor in written.values()} == {torch.float16}
    half = {key: tensor.half() for key, tensor in original.items()}
    assert changed_prefixes(half, written) == {UNET}
    metadata = read_safetensors_metadata(saved)
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert metadata["modelspec.prediction_type"] == "v" and metadata["ss_v2"] == "True"
    assert "--diffusers_xformers" in result.stderr
    assert metadata["ss_num_train_images"] == "4" and metadata["modelspec.resolution"] == "64x64"


def train_in_process(argv: list[str], method_class):
    """Run the trainer in this process (to look at the models afterwards); returns the method."""
    from library.training.entry import build_parser
    from library.training.trainer import train

    args = build_parser(SDFamily, method_class, "test").parse_args(argv)
    method = method_class(args)
    train(SDFamily(args), method, args)
    return method


def test_stop_text_encoder_training_freezes_text_encoder_after_that_step(tiny_models_dir, toy_dataset,
                                                                         tokenizer_dir, tmp_path):
    from library.methods.finetune import DreamBoothMethod

    class Recording(DreamBoothMethod):
        """Keeps the weights seen at the start of every step."""

        snapshots: ClassVar[list[tuple[dict, dict]]] = []

        def on_step_start(self, models, global_step):
            super().on_step_start(models, global_step)
            text, unet = models.text_encoders[0].state_dict(), models.denoiser.state_dict()
            self.snapshots.append(({k: v.clone() for k, v in text.items()}, {k: v.clone() for k, v in unet.items()}))

    argv = cli_args("", os.path.join(tiny_models_dir, "sd1.safetensors"), toy_dataset, str(tmp_path / "out"),
                    tokenizer_dir, "--stop_text_encoder_training", "1", "--max_train_steps", "3")[1:]
    method = train_in_process(argv, Recording)
    final = (method.models.text_encoders[0].state_dict(), method.models.denoiser.state_dict())
    states = [*method.snapshots, final]  # weights before steps 1, 2, 3 and after step 3

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[key], b[key]) for key in a)

    assert not same(states[0][0], states[1][0])  # the text encoder trained in step 1
    assert same(states[1][0], states[2][0]) and same(states[2][0], states[3][0])  # ... and never after
    assert not same(states[2][1], states[3][1])  # while the UNet kept training
    assert not method.trains_text_encoder


def test_no_token_padding_pads_only_to_the_longest_caption(tokenizer_dir):
    from library.checkpoints.tokenizers import load_clip_tokenizer

    tokenizer = load_clip_tokenizer(v2=False, cache_dir=tokenizer_dir)
    ids = tokenize_unpadded(tokenizer, ["a photo of a cat", "dog"])
    assert ids.tolist() == [[49406, 320, 1125, 539, 320, 2368, 49407], [49406, 1929, 49407, 49407, 49407, 49407, 49407]]


def test_no_token_padding_rejects_long_captions():
    family = SDFamily(family_args("model.safetensors", no_token_padding=True, max_token_length=150))
    with pytest.raises(ConfigError, match="--no_token_padding"):
        family.validate()


@pytest.mark.parametrize(
    ("method_id", "extra", "trains_text_encoder"),
    [("dreambooth", [], True), ("dreambooth", ["--stop_text_encoder_training", "0"], False),
     ("finetune", [], False), ("finetune", ["--train_text_encoder"], True)],
)
def test_text_encoder_trains_by_default_in_dreambooth_only(method_id, extra, trains_text_encoder):
    from library.methods import get_method_class
    from library.training.entry import build_parser

    method_class = get_method_class(method_id)
    argv = ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", "out", *extra]
    method = method_class(build_parser(SDFamily, method_class, "test").parse_args(argv))
    method.validate()
    assert method.trains_text_encoder is trains_text_encoder
