"""End to end: `accelerate launch lumina_train_network.py` / `lumina_train.py` on the tiny Lumina Image 2.0, outputs
opened: LoRA names and ranks from the family's network args, caches written, the fine-tuned file in the released
layout loading in diffusers, and the step-2 samples equal to what diffusers' Lumina2Pipeline draws with the saved
weights and its own prompt encoding (system prompt, negative prompt, CFG)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from library.checkpoints import lumina_files, lumina_keys
from networks import lora_lumina
from tests.conftest import run_cli
from tests.test_train_network_e2e import epoch_losses

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # tiny models: more threads only wait

SYSTEM = "You are an assistant designed to generate high quality images based on user prompts."
PROMPT = dict(prompt="a red circle", negative_prompt="a blue dog", width=64, height=64, steps=2, scale=4.0, seed=5)


@pytest.fixture(scope="module")
def tiny(tiny_family):
    return tiny_family("lumina")


def lumina_run(script: str, model_args, dataset: str, out_dir, prompts, *extra: str) -> list[str]:
    return [
        script, *model_args, "--dataset_config", dataset, "--output_dir", str(out_dir), "--output_name", "result",
        "--learning_rate", "1e-3", "--max_train_steps", "2", "--seed", "7", "--max_data_loader_n_workers", "0",
        "--cpu_threads", "1", "--gemma2_max_token_length", "32", "--system_prompt", SYSTEM,
        "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", *extra,
    ]  # fmt: skip


def write_prompts(tmp_path) -> str:
    path = tmp_path / "prompts.txt"
    line = (f"{PROMPT['prompt']} --n {PROMPT['negative_prompt']} --w {PROMPT['width']} --h {PROMPT['height']} "
            f"--s {PROMPT['steps']} --l {PROMPT['scale']} --d {PROMPT['seed']}\n")  # fmt: skip
    path.write_text(line, encoding="utf-8")
    return str(path)


def assert_finished(result) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    losses = epoch_losses(output)
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses


def diffusers_image(pipeline) -> np.ndarray:
    """What Lumina2Pipeline draws for PROMPT from the prompt strings (its own encoding, system prompt included)."""
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = pipeline(
            PROMPT["prompt"], negative_prompt=PROMPT["negative_prompt"], system_prompt=SYSTEM, max_sequence_length=32,
            width=PROMPT["width"], height=PROMPT["height"], num_inference_steps=PROMPT["steps"],
            guidance_scale=PROMPT["scale"], generator=torch.Generator().manual_seed(PROMPT["seed"]),
        ).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.int16)


def assert_sample_matches_diffusers(out_dir, pipeline) -> np.ndarray:
    """The step-2 sample equals Lumina2Pipeline's image within 1/255 per channel; returns the sample."""
    names = os.listdir(out_dir / "sample")
    assert len(names) == 1 and names[0].startswith("result_000002_00_")
    ours = np.asarray(Image.open(out_dir / "sample" / names[0]), dtype=np.int16)
    assert ours.shape == (64, 64, 3) and np.abs(ours - diffusers_image(pipeline)).max() <= 1
    return ours


def test_lumina_lora_with_caches_block_swap_and_network_args(tiny, toy_dataset, tmp_path):
    from diffusers import Lumina2Pipeline

    out_dir = tmp_path / "out"
    extra = ["--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-2", "--network_train_unet_only",
             "--cache_text_encoder_outputs_to_disk", "--cache_latents", "--blocks_to_swap", "2",
             "--gradient_checkpointing", "--timestep_sampling", "nextdit_shift",
             "--network_args", "attn_dim=8", "embedder_dims=[2,0,2]", "train_block_indices=0,1,3"]  # fmt: skip
    prompts = write_prompts(tmp_path)
    assert_finished(run_cli(lumina_run("lumina_train_network.py", tiny.model_args, toy_dataset, out_dir, prompts,
                                       *extra), tmp_path))  # fmt: skip
    path = str(out_dir / "result.safetensors")
    with safe_open(path, "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
        qkv_rank = handle.get_tensor("lora_unet_layers_0_attention_qkv.lora_down.weight").shape[0]
        ffn_rank = handle.get_tensor("lora_unet_layers_0_feed_forward_w1.lora_down.weight").shape[0]
    modules = {key.split(".")[0] for key in keys}
    assert (qkv_rank, ffn_rank) == (8, 4)
    assert {"lora_unet_x_embedder", "lora_unet_cap_embedder_1", "lora_unet_final_layer_linear"} <= modules
    assert not any(name.startswith(("lora_unet_layers_2_", "lora_unet_t_embedder", "lora_te")) for name in modules)
    assert metadata["ss_network_module"] == "networks.lora_lumina" and metadata["ss_base_model_version"] == "lumina2"
    assert metadata["modelspec.architecture"] == "lumina-2/lora" and metadata["ss_system_prompt"] == SYSTEM
    assert metadata["ss_timestep_sampling"] == "nextdit_shift" and metadata["ss_discrete_flow_shift"] == "6.0"
    data_dir = os.path.dirname(toy_dataset)
    assert any(name.endswith("_lumina_te.safetensors") for _, _, files in os.walk(data_dir) for name in files)

    pipeline = Lumina2Pipeline.from_pretrained(tiny.files["diffusers"])
    network, _ = lora_lumina.create_network_from_weights(1.0, path, None, [], pipeline.transformer)
    network.apply_to([], pipeline.transformer, False, True)
    network.load_weights(path)
    ours = assert_sample_matches_diffusers(out_dir, pipeline)
    network.set_multiplier(0.0)
    assert np.abs(ours - diffusers_image(pipeline)).max() > 1  # the sample shows the trained LoRA


def split_tiny_qkv_first(monkeypatch, config: dict) -> None:
    """diffusers' Lumina 2 converter splits q|k|v at the 2B model's widths (2304, 768, 768); for the tiny model the
    split is made first at its own widths and the converter maps every other name of the file."""
    from diffusers.loaders import single_file_model

    entry = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["Lumina2Transformer2DModel"]
    convert = entry["checkpoint_mapping_fn"]
    sizes = list(lumina_keys.qkv_sizes(config))

    def converter(checkpoint, **kwargs):
        for key in [key for key in checkpoint if key.endswith(".attention.qkv.weight")]:
            for part, value in zip(("to_q", "to_k", "to_v"), checkpoint.pop(key).split(sizes), strict=True):
                checkpoint[key.replace("qkv", part)] = value
        return convert(checkpoint, **kwargs)

    monkeypatch.setitem(entry, "checkpoint_mapping_fn", converter)


def test_lumina_train_from_diffusers_folder_saves_a_file_diffusers_loads(tiny, toy_dataset, tmp_path, monkeypatch):
    from diffusers import Lumina2Pipeline, Lumina2Transformer2DModel

    out_dir = tmp_path / "out"
    extra = ["--blockwise_fused_optimizers", "--gradient_checkpointing", "--learning_rate", "1e-2",
             "--timestep_sampling", "sigma", "--model_prediction_type", "sigma_scaled"]  # fmt: skip
    prompts = write_prompts(tmp_path)
    assert_finished(run_cli(lumina_run("lumina_train.py", tiny.diffusers_args, toy_dataset, out_dir, prompts, *extra),
                            tmp_path))  # fmt: skip
    path = str(out_dir / "result.safetensors")
    saved, original = load_file(path), load_file(tiny.files["transformer"])
    assert saved.keys() == original.keys()
    config, _ = lumina_keys.split_transformer(saved, "result.safetensors")  # every key consumed
    changed = [key for key in original if not torch.equal(saved[key], original[key])]
    assert "layers.0.attention.qkv.weight" in changed and "final_layer.linear.weight" in changed
    assert lumina_keys.UNUSED_NORM not in changed

    split_tiny_qkv_first(monkeypatch, config)
    transformer = Lumina2Transformer2DModel.from_single_file(
        path, config=tiny.files["diffusers"], subfolder="transformer", local_files_only=True
    )
    ours = lumina_files.load_transformer(path, torch.float32).state_dict()
    assert all(torch.equal(value, ours[key]) for key, value in transformer.state_dict().items())
    pipeline = Lumina2Pipeline.from_pretrained(tiny.files["diffusers"], transformer=transformer)
    assert_sample_matches_diffusers(out_dir, pipeline)


def test_lumina_scripts_train_from_the_other_sources_in_process(tiny, toy_dataset, tmp_path):
    """The combinations the CLI runs above leave out, run in this process: the LoRA script from the diffusers
    folder with captions and latents cached in memory, the fine-tuning script from single files with disk caches."""
    from tests.training_helpers import train_in_process

    common = ["--dataset_config", toy_dataset, "--output_name", "result", "--max_train_steps", "2", "--seed", "3",
              "--cpu_threads", "1", "--max_data_loader_n_workers", "0", "--gemma2_max_token_length", "32"]  # fmt: skip
    train_in_process([*tiny.diffusers_args, *common, "--output_dir", str(tmp_path / "lora"),
                      "--network_train_unet_only", "--cache_text_encoder_outputs", "--cache_latents"],
                     family="lumina")  # fmt: skip
    keys = set(load_file(str(tmp_path / "lora" / "result.safetensors")))
    assert "lora_unet_layers_3_attention_qkv.lora_up.weight" in keys and not any("lora_te" in key for key in keys)
    train_in_process([*tiny.model_args, *common, "--output_dir", str(tmp_path / "full"), "--cache_latents_to_disk",
                      "--cache_text_encoder_outputs_to_disk"], family="lumina", method="finetune")  # fmt: skip
    saved = load_file(str(tmp_path / "full" / "result.safetensors"))
    assert saved.keys() == load_file(tiny.files["transformer"]).keys()
    assert not os.path.exists(tmp_path / "full" / "result_gemma2.safetensors")  # Gemma2 stayed frozen
