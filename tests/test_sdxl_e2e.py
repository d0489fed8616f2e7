"""End to end: `accelerate launch sdxl_train_network.py` / `sdxl_train.py` on the tiny SDXL model, outputs opened."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.checkpoints import sdxl_keys
from tests.conftest import run_cli
from tests.test_train_network_e2e import epoch_losses

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait


UNET_KEY = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"
TE1_KEY = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"
TE2_KEY = "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"


def sdxl_args(script: str, model: str, dataset: str, out_dir: str, tokenizer_dir: str, *extra: str) -> list[str]:
    return [
        script,
        "--pretrained_model_name_or_path", model,
        "--dataset_config", dataset,
        "--output_dir", out_dir,
        "--output_name", "result",
        "--learning_rate", "1e-3",
        "--max_train_steps", "2",
        "--seed", "7",
        "--tokenizer_cache_dir", tokenizer_dir,
        "--max_data_loader_n_workers", "0",
        "--cpu_threads", "1",  # tiny models: more threads only wait on each other, badly so on a busy machine
        *extra,
    ]  # fmt: skip


def assert_finished(result) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    losses = epoch_losses(result.stderr + result.stdout)
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses


@pytest.fixture(scope="module")
def trained_lora(tiny_sdxl_dir, toy_dataset, tokenizer_dir, tmp_path_factory) -> str:
    """A LoRA on UNet and both text encoders, from the SGM single file, with 150-token captions."""
    out_dir = tmp_path_factory.mktemp("sdxl_lora")
    model = os.path.join(tiny_sdxl_dir, "sdxl.safetensors")
    extra = [
        "--network_dim",
        "4",
        "--network_alpha",
        "2",
        "--text_encoder_lr1",
        "1e-4",
        "--text_encoder_lr2",
        "2e-4",
        "--max_token_length",
        "150",
    ]
    result = run_cli(
        sdxl_args("sdxl_train_network.py", model, toy_dataset, str(out_dir), tokenizer_dir, *extra), out_dir
    )
    assert_finished(result)
    return str(out_dir / "result.safetensors")


def test_sdxl_lora_has_sgm_and_two_encoder_names_and_sdxl_metadata(trained_lora):
    with safe_open(trained_lora, "pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()

    assert {UNET_KEY, TE1_KEY, TE2_KEY} <= keys
    assert not any(key.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_te_")) for key in keys)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["ss_max_token_length"] == "150" and metadata["ss_steps"] == "2"


def test_sdxl_lora_loads_in_diffusers_and_matches_our_network(trained_lora, tiny_sdxl_dir, tokenizer_dir):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionXLPipeline

    from library.families.sdxl import SDXLFamily
    from networks import lora
    from tests.test_sdxl_family import sdxl_args as family_args

    pipe = StableDiffusionXLPipeline.from_pretrained(os.path.join(tiny_sdxl_dir, "sdxl-diffusers"))
    generator = torch.Generator().manual_seed(0)
    latents, hidden = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 80, generator=generator)
    added = {
        "text_embeds": torch.randn(1, 40, generator=generator),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
    }
    ids = torch.tensor([[49406, 320, 1125, 49407]])

    def outputs(unet, encoder2) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return unet(latents, torch.tensor([500]), hidden, added_cond_kwargs=added).sample, encoder2(ids).text_embeds

    base = outputs(pipe.unet, pipe.text_encoder_2)
    pipe.load_lora_weights(trained_lora)
    theirs = outputs(pipe.unet, pipe.text_encoder_2)

    family = SDXLFamily(family_args(os.path.join(tiny_sdxl_dir, "sdxl.safetensors"), tokenizer_dir))
    models = family.load(torch.float32)
    network, _ = lora.create_network_from_weights(
        1.0, trained_lora, models.vae, family.network_text_encoders(models), family.network_denoiser(models)
    )
    network.apply_to(None, None, True, True)
    network.load_weights(trained_lora)
    ours = outputs(models.denoiser, models.text_encoders[1])

    for before, after, own in zip(base, theirs, ours, strict=True):
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, own, rtol=1e-4, atol=1e-5)


def test_sdxl_lora_from_diffusers_folder_with_text_outputs_and_latents_cached_on_disk(
    tiny_sdxl_dir, tokenizer_dir, tmp_path
):
    from library.testing.toy_data import write_toy_dataset

    dataset = write_toy_dataset(str(tmp_path / "data"), count=4, batch_size=2)
    model = os.path.join(tiny_sdxl_dir, "sdxl-diffusers")
    extra = ["--cache_text_encoder_outputs_to_disk", "--cache_latents_to_disk", "--network_train_unet_only",
             "--network_dim", "4"]
    result = run_cli(
        sdxl_args("sdxl_train_network.py", model, dataset, str(tmp_path / "out"), tokenizer_dir, *extra), tmp_path
    )

    assert_finished(result)
    keys = load_file(str(tmp_path / "out" / "result.safetensors")).keys()
    assert UNET_KEY in keys and not any(key.startswith("lora_te") for key in keys)
    cache_files = [name for name in os.listdir(tmp_path / "data" / "images") if name.endswith("_sdxl_te.safetensors")]
    assert len(cache_files) == 4
    assert "4 captions encoded, 0 read from disk" in result.stderr + result.stdout
    assert "latent cache: 4 images encoded, 0 reused" in result.stderr + result.stdout
    latent_files = [name for name in os.listdir(tmp_path / "data" / "images") if name.endswith("_latents.safetensors")]
    assert len(latent_files) == 4


def test_sdxl_train_fine_tunes_with_per_encoder_and_block_rates_and_saves_sgm(
    tiny_sdxl_dir, toy_dataset, tokenizer_dir, tmp_path
):
    model = os.path.join(tiny_sdxl_dir, "sdxl.safetensors")
    block_lr = ",".join(["1e-3"] * 22 + ["0"])  # the output layers (out.*) frozen
    extra = ["--train_text_encoder", "--learning_rate_te1", "1e-4", "--learning_rate_te2", "0", "--block_lr", block_lr]
    result = run_cli(
        sdxl_args("sdxl_train.py", model, toy_dataset, str(tmp_path / "out"), tokenizer_dir, *extra), tmp_path
    )

    assert_finished(result)
    before, after = load_file(model), load_file(str(tmp_path / "out" / "result.safetensors"))
    assert sorted(after) == sorted(before)  # loads back through the same key map
    sdxl_keys.split_sgm_checkpoint(after, sdxl_keys.infer_architecture(after))

    def changed(key: str) -> bool:
        return not torch.equal(before[key], after[key])

    assert changed("model.diffusion_model.input_blocks.4.1.proj_in.weight")
    assert not changed("model.diffusion_model.out.2.weight")  # --block_lr 0
    assert changed(sdxl_keys.TE1_PREFIX + "encoder.layers.0.mlp.fc1.weight")
    assert not changed(sdxl_keys.TE2_PREFIX + "transformer.resblocks.0.mlp.c_fc.weight")  # --learning_rate_te2 0
