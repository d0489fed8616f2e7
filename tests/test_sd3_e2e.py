"""End to end: `accelerate launch sd3_train_network.py` / `sd3_train.py` on the tiny SD3 models, outputs opened: LoRA
keys and ranks as the network args chose them, the step-2 sample equal to diffusers' pipeline with that LoRA, the
fine-tuned single file loading in diffusers with its frozen blocks untouched. Three runs go through the CLI; the
other sources, options and the refusals of other families' files run the same entry in this process (seconds
instead of the interpreter start-up each)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.checkpoints import sd3_files, sd3_keys
from library.families.sd3 import SD3Family
from networks import lora_sd3
from tests.conftest import run_cli
from tests.test_train_network_e2e import epoch_losses
from tests.training_helpers import train_in_process

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

T5_TOKENS = "16"


@pytest.fixture(scope="module")
def files(tiny_family) -> dict[str, str]:
    return tiny_family("sd3").files


def sd3_run(script: str, files: dict, model: str, dataset: str, out_dir: str, *extra: str) -> list[str]:
    return [
        script, "--pretrained_model_name_or_path", files[model], "--tokenizer_cache_dir", files["tokenizers"],
        "--t5xxl_max_token_length", T5_TOKENS, "--dataset_config", dataset, "--output_dir", out_dir,
        "--output_name", "result", "--learning_rate", "1e-3", "--max_train_steps", "2", "--seed", "7",
        "--max_data_loader_n_workers", "0", "--cpu_threads", "1", *extra,
    ]  # fmt: skip


def finished(result) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    losses = epoch_losses(output)
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses
    return output


def file_ranks(path: str) -> dict[str, tuple[int, float]]:
    tensors = load_file(path)
    return {key[: -len(".lora_down.weight")]: (value.shape[0], float(tensors[key.replace("lora_down.weight", "alpha")]))
            for key, value in tensors.items() if key.endswith(".lora_down.weight")}  # fmt: skip


def expected_ranks() -> dict[str, int]:
    """What the first run's network args give the tiny SD3.5-M-like MMDiT (3 blocks, attn2 in blocks 0 and 1, the
    last block's context block without projection and MLP): blocks 0 and 2; context attention 2, x modulation none."""
    ranks = {"context_embedder": 2, "y_embedder_mlp_0": 3, "y_embedder_mlp_2": 3, "final_layer_linear": 5}
    for block, parts in ((0, ("attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "adaLN_modulation_1")),
                         (2, ("attn_qkv", "adaLN_modulation_1"))):  # fmt: skip
        for part in parts:
            ranks[f"joint_blocks_{block}_context_block_{part}"] = 2 if part.startswith("attn") else 4
    for block, dual in ((0, True), (2, False)):
        for part in ("attn_qkv", "attn_proj", *(("attn2_qkv", "attn2_proj") if dual else ()), "mlp_fc1", "mlp_fc2"):
            ranks[f"joint_blocks_{block}_x_block_{part}"] = 4
    return {f"lora_unet_{name}": rank for name, rank in ranks.items()}


def pipeline_image(files: dict, lora_path: str) -> np.ndarray:
    """diffusers' StableDiffusion3Pipeline on the base models with the LoRA applied, encoding the prompt itself."""
    models = sd3_files.load_models(sd3_files.SD3Sources(files["sd3.5m"]), torch.float32, torch.float32)
    table = SD3Family.adapter_targets_for([], models.transformer)
    network, _ = lora_sd3.create_network_from_weights(1.0, lora_path, None, [], models.transformer,
                                                      adapter_targets=table)  # fmt: skip
    network.apply_to([], models.transformer, False, True)
    network.load_weights(lora_path)
    pipeline = sd3_files.build_pipeline(models, sd3_files.load_tokenizers(cache_dir=files["tokenizers"]))
    with torch.no_grad():
        image = pipeline(prompt="a red circle", negative_prompt="blurry", width=80, height=64, num_inference_steps=3,
                         guidance_scale=4.0, generator=torch.Generator().manual_seed(5),
                         max_sequence_length=int(T5_TOKENS)).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.int16)


def test_sd3_lora_network_args_cached_text_block_swap_and_sample_equal_to_pipeline(files, toy_dataset, tmp_path):
    out_dir = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --n blurry --w 80 --h 64 --s 3 --l 4 --d 5\n", encoding="utf-8")
    extra = ["--network_dim", "4", "--network_alpha", "2", "--network_train_unet_only", "--cache_text_encoder_outputs",
             "--blocks_to_swap", "1", "--gradient_checkpointing", "--weighting_scheme", "logit_normal",
             "--training_shift", "3", "--sample_prompts", str(prompts), "--sample_every_n_steps", "2",
             "--network_args", "context_attn_dim=2", "x_mod_dim=0", "emb_dims=[2,0,0,3,0,5]",
             "train_block_indices=0,2", "verbose=True"]  # fmt: skip
    output = finished(run_cli(sd3_run("sd3_train_network.py", files, "sd3.5m", toy_dataset, str(out_dir), *extra),
                              tmp_path))  # fmt: skip
    path = str(out_dir / "result.safetensors")
    ranks = file_ranks(path)
    assert {name: rank for name, (rank, _) in ranks.items()} == expected_ranks()
    assert {alpha for _, alpha in ranks.values()} == {2.0}
    assert "lora_unet_joint_blocks_0_context_block_attn_qkv" in output and "rank 2, alpha 2" in output  # verbose
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "networks.lora_sd3" and metadata["ss_base_model_version"] == "sd3.5-medium"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v3.5-medium/lora"
    assert metadata["ss_weighting_scheme"] == "logit_normal" and metadata["ss_training_shift"] == "3.0"
    assert json.loads(metadata["ss_network_args"])["train_block_indices"] == [0, 2]
    samples = os.listdir(out_dir / "sample")
    assert len(samples) == 1 and samples[0].startswith("result_000002_00_")
    ours = np.asarray(Image.open(out_dir / "sample" / samples[0]).convert("RGB"), dtype=np.int16)
    assert ours.shape == (64, 80, 3)
    assert np.abs(ours - pipeline_image(files, path)).max() <= 1  # within 1/255


def test_sd3_lora_from_separate_files_trains_all_three_text_encoders(files, toy_dataset, tmp_path):
    out_dir = tmp_path / "out"
    separate = ["--clip_l", files["clip_l"], "--clip_g", files["clip_g"], "--t5xxl", files["t5xxl"]]
    extra = [*separate, "--network_module", "networks.lora", "--network_dim", "4", "--network_args", "train_t5xxl=True",
             "--apply_lg_attn_mask", "--apply_t5_attn_mask", "--clip_l_dropout_rate", "0.5", "--weighting_scheme",
             "sigma_sqrt", "--gradient_checkpointing"]  # fmt: skip
    finished(run_cli(sd3_run("sd3_train_network.py", files, "sd3-no-te", toy_dataset, str(out_dir), *extra), tmp_path))
    path = str(out_dir / "result.safetensors")
    prefixes = {key.split("_")[1] for key in file_ranks(path)}
    assert prefixes == {"te1", "te2", "te3", "unet"}
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in file_ranks(path)
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-v3-medium/lora"
    assert metadata["ss_apply_lg_attn_mask"] == "True" and metadata["ss_clip_l"] == "clip_l.safetensors"


def test_sd3_train_from_diffusers_folder_freezes_last_blocks_and_loads_in_diffusers(files, toy_dataset, tmp_path):
    from diffusers import SD3Transformer2DModel

    out_dir = tmp_path / "out"
    extra = ["--num_last_block_to_freeze", "2", "--train_text_encoder", "--learning_rate", "1e-2",
             "--learning_rate_te1", "1e-3", "--blocks_to_swap", "1"]  # fmt: skip
    finished(run_cli(sd3_run("sd3_train.py", files, "sd3.5m-diffusers", toy_dataset, str(out_dir), *extra), tmp_path))
    path = str(out_dir / "result.safetensors")
    saved = load_file(path)
    parts = sd3_keys.split_checkpoint(saved, path)  # strict: every key consumed
    assert set(parts.states) == {"transformer", "vae", "clip_l", "clip_g"}  # trained CLIPs are written in
    folder = files["sd3.5m-diffusers"]
    loaded = SD3Transformer2DModel.from_single_file(path, config=folder, subfolder="transformer",
                                                    local_files_only=True)  # fmt: skip
    base = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", local_files_only=True)
    trained, frozen = loaded.state_dict(), base.state_dict()
    first = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(trained[first], frozen[first])
    last_two = [key for key in frozen if key.startswith(("transformer_blocks.1.", "transformer_blocks.2."))]
    assert last_two and all(torch.equal(trained[key], frozen[key]) for key in last_two)
    with safe_open(path, "pt") as handle:
        assert handle.metadata()["modelspec.architecture"] == "stable-diffusion-v3.5-medium"


def refusal(caplog, family: str, method: str, argv: list[str]) -> str:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="library"), pytest.raises(SystemExit) as stop:
        train_in_process(argv, family, method)
    assert stop.value.code == 1
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    return errors[0]


def test_other_families_files_are_refused_naming_the_right_script(files, toy_dataset, tmp_path, caplog):
    flux = str(tmp_path / "flux1-dev.safetensors")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, flux)
    sdxl = str(tmp_path / "sd_xl_base.safetensors")
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, sdxl)
    out_dir = tmp_path / "out"
    common = ["--dataset_config", toy_dataset, "--output_dir", str(out_dir), "--max_train_steps", "1"]
    cases = [
        ("sd3", "network", flux, "flux_train_network.py"), ("sd3", "finetune", flux, "flux_train.py"),
        ("sd3", "network", sdxl, "sdxl_train_network.py"), ("flux", "network", files["sd3.5m"], "sd3_train_network.py"),
        ("sdxl", "network", files["sd3.5m"], "sd3_train_network.py"),
    ]  # fmt: skip
    for family, method, model, script in cases:
        message = refusal(caplog, family, method, ["--pretrained_model_name_or_path", model, *common])
        assert script in message and model in message, message
        if family == "sd3":  # refused before anything runs (SDXL finds out while loading)
            assert not out_dir.exists()
    assert not [name for _, _, names in os.walk(out_dir) for name in names]  # nothing written


def test_sd3_train_from_separate_files_with_cached_text_and_blockwise_optimizers(files, toy_dataset, tmp_path):
    out_dir = tmp_path / "out"
    separate = ["--clip_l", files["clip_l"], "--clip_g", files["clip_g"], "--t5xxl", files["t5xxl"]]
    extra = [*separate, "--cache_text_encoder_outputs", "--blockwise_fused_optimizers", "--save_t5xxl"]
    train_in_process(sd3_run("sd3_train.py", files, "sd3-no-te", toy_dataset, str(out_dir), *extra)[1:], "sd3",
                     "finetune")  # fmt: skip
    saved = load_file(str(out_dir / "result.safetensors"))
    assert set(sd3_keys.split_checkpoint(saved, "result").states) == {"transformer", "vae", "t5xxl"}
    base = load_file(files["sd3-no-te"])
    changed = [key for key in base if not torch.equal(saved[key], base[key])]
    assert "model.diffusion_model.joint_blocks.3.x_block.attn.qkv.weight" in changed
    assert not [key for key in changed if key.startswith("first_stage_model.")]  # the VAE stays as it was


@pytest.mark.parametrize(("method", "model"), [("network", "sd3.5m-diffusers"), ("finetune", "sd3.5m")])
def test_sd3_scripts_train_from_the_other_sources(files, toy_dataset, tmp_path, method, model):
    """The sources the runs above leave out: LoRA from a diffusers folder, fine-tuning from a file with encoders."""
    out_dir = tmp_path / "out"
    extra = ("--network_dim", "2") if method == "network" else ()
    train_in_process(sd3_run("unused", files, model, toy_dataset, str(out_dir), *extra)[1:], "sd3", method)
    with safe_open(str(out_dir / "result.safetensors"), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert metadata["ss_steps"] == "2" and metadata["ss_base_model_version"] == "sd3.5-medium"
    if method == "network":
        assert any(key.startswith("lora_unet_joint_blocks_") for key in keys)
    else:
        assert keys == set(load_file(files["sd3.5m-no-te"]))  # MMDiT and VAE, as sd3_medium.safetensors holds them
