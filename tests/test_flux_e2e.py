"""End to end: `accelerate launch flux_train_network.py` / `flux_train.py` on the tiny FLUX.1 model, outputs opened:
the LoRA loads in diffusers with the effect of our network, the fine-tuned transformer is a strict BFL file."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.checkpoints import flux_files, flux_keys
from library.families.flux import image_position_ids, pack_latents
from networks import lora_flux
from tests.conftest import run_cli
from tests.test_train_network_e2e import epoch_losses

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait


def flux_args(script: str, paths: dict[str, str], dataset: str, out_dir: str, *extra: str) -> list[str]:
    return [
        script,
        "--pretrained_model_name_or_path", paths["transformer"],
        "--ae", paths["ae"], "--clip_l", paths["clip_l"], "--t5xxl", paths["t5xxl"],
        "--tokenizer_cache_dir", paths["tokenizers"],
        "--t5xxl_max_token_length", "16",
        "--dataset_config", dataset,
        "--output_dir", out_dir,
        "--output_name", "result",
        "--learning_rate", "1e-3",
        "--max_train_steps", "2",
        "--seed", "7",
        "--max_data_loader_n_workers", "0",
        "--cpu_threads", "1",
        *extra,
    ]  # fmt: skip


def assert_finished(result) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    losses = epoch_losses(output)
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses
    return output


def run_transformer(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return model(hidden_states=pack_latents(torch.randn(1, 16, 4, 4, generator=generator)),
                 encoder_hidden_states=torch.randn(1, 5, 40, generator=generator),
                 pooled_projections=torch.randn(1, 32, generator=generator), timestep=torch.tensor([0.5]),
                 img_ids=image_position_ids(2, 2, "cpu"), txt_ids=torch.zeros(5, 3),
                 guidance=torch.tensor([3.5])).sample  # fmt: skip


def test_flux_lora_with_cached_text_and_block_swap_loads_in_diffusers(tiny_flux_dir, toy_dataset, tmp_path):
    from diffusers import FluxPipeline

    out_dir = tmp_path / "out"
    extra = ["--network_dim", "4", "--network_alpha", "2", "--network_train_unet_only", "--cache_text_encoder_outputs",
             "--blocks_to_swap", "2", "--gradient_checkpointing", "--timestep_sampling", "shift",
             "--model_prediction_type", "raw", "--network_args", "train_single_block_indices=none", "split_qkv=True"]
    result = run_cli(flux_args("flux_train_network.py", tiny_flux_dir, toy_dataset, str(out_dir), *extra), tmp_path)
    assert_finished(result)
    path = str(out_dir / "result.safetensors")
    with safe_open(path, "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert not any("single_blocks" in key or key.startswith("lora_te") for key in keys)
    assert metadata["ss_base_model_version"] == "flux1" and metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert metadata["ss_timestep_sampling"] == "shift" and metadata["ss_network_module"] == "networks.lora_flux"
    transformer = flux_files.load_transformer(tiny_flux_dir["transformer"], torch.float32)
    ours_model = copy.deepcopy(transformer)
    network, _ = lora_flux.create_network_from_weights(1.0, path, None, [], ours_model)
    network.apply_to([], ours_model, False, True)
    network.load_weights(path)
    pipeline = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=transformer)  # fmt: skip
    pipeline.load_lora_weights(path)
    with torch.no_grad():
        ours, theirs = run_transformer(ours_model), run_transformer(transformer)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_flux_lora_from_diffusers_folder_trains_clip_and_draws_samples(tiny_flux_dir, toy_dataset, tmp_path):
    out_dir = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --l 3.5\n", encoding="utf-8")
    args = flux_args("flux_train_network.py", tiny_flux_dir, toy_dataset, str(out_dir), "--network_dim", "4",
                     "--apply_t5_attn_mask", "--sample_prompts", str(prompts), "--sample_every_n_steps", "2",
                     "--network_args", "save_format=diffusers")  # fmt: skip
    args[args.index(tiny_flux_dir["transformer"])] = tiny_flux_dir["diffusers"]
    for option in ("--ae", "--clip_l", "--t5xxl"):  # the folder holds every model
        del args[args.index(option) : args.index(option) + 2]
    assert_finished(run_cli(args, tmp_path))
    keys = set(load_file(str(out_dir / "result.safetensors")))
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in keys
    assert any(key.startswith("text_encoder.") and key.endswith("q_proj.lora_A.weight") for key in keys)
    assert not any(key.startswith("text_encoder_2.") for key in keys)  # T5 trains only with train_t5xxl=True
    samples = os.listdir(out_dir / "sample")
    assert len(samples) == 1 and samples[0].startswith("result_000002_00_")


def test_flux_train_saves_strict_bfl_transformer(tiny_flux_dir, toy_dataset, tmp_path):
    out_dir = tmp_path / "out"
    extra = ["--blocks_to_swap", "2", "--gradient_checkpointing", "--blockwise_fused_optimizers",
             "--cache_text_encoder_outputs_to_disk", "--learning_rate", "1e-2"]  # fmt: skip
    assert_finished(run_cli(flux_args("flux_train.py", tiny_flux_dir, toy_dataset, str(out_dir), *extra), tmp_path))
    saved = load_file(str(out_dir / "result.safetensors"))
    original = load_file(tiny_flux_dir["transformer"])
    assert saved.keys() == original.keys()
    config, _ = flux_keys.split_transformer(saved, "result.safetensors")  # every key consumed
    assert flux_keys.variant(config) == "dev"
    changed = [key for key in original if not torch.equal(saved[key], original[key])]
    assert "double_blocks.0.img_attn.qkv.weight" in changed and "single_blocks.3.linear1.weight" in changed
    data_dir = os.path.dirname(toy_dataset)
    assert any(name.endswith("_flux_te.safetensors") for _, _, files in os.walk(data_dir) for name in files)
