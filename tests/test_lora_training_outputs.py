"""A LoRA trained through the CLI: loads in diffusers, is a no-op at multiplier 0, resumes, and plugins work."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.test_train_network_e2e import train_args


@pytest.fixture(scope="module")
def trained_lora(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path_factory) -> str:
    out_dir = tmp_path_factory.mktemp("trained")
    model = os.path.join(tiny_models_dir, "sd1-diffusers")
    result = run_cli(train_args(model, toy_dataset, str(out_dir), tokenizer_dir), out_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return str(out_dir / "lora.safetensors")


def unet_inputs(unet, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([500]), hidden


def load_family_models(tiny_models_dir: str, tokenizer_dir: str):
    from library.families.sd import SDFamily
    from tests.training_helpers import parsed_args

    args = parsed_args("sd", ["--pretrained_model_name_or_path", os.path.join(tiny_models_dir, "sd1.safetensors"),
                              "--tokenizer_cache_dir", tokenizer_dir])
    return SDFamily(args).load(torch.float32)


def test_lora_at_multiplier_zero_reproduces_base_output_exactly(trained_lora, tiny_models_dir, tokenizer_dir):
    import networks.lora as lora

    models = load_family_models(tiny_models_dir, tokenizer_dir)
    latents, timesteps, hidden = unet_inputs(models.denoiser)
    with torch.no_grad():
        base = models.denoiser(latents, timesteps, hidden).sample
        network, _ = lora.create_network_from_weights(
            0.0, trained_lora, models.vae, models.text_encoders[0], models.denoiser
        )
        network.apply_to(models.text_encoders[0], models.denoiser, True, True)
        network.load_weights(trained_lora)
        at_zero = models.denoiser(latents, timesteps, hidden).sample
        network.set_multiplier(1.0)
        at_one = models.denoiser(latents, timesteps, hidden).sample
    assert torch.equal(base, at_zero)
    assert not torch.allclose(base, at_one)


def test_network_weights_continues_from_saved_lora(trained_lora, tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path):
    model = os.path.join(tiny_models_dir, "sd1.safetensors")
    args = train_args(model, toy_dataset, str(tmp_path / "out"), tokenizer_dir, "--network_weights", trained_lora)
    args[args.index("--max_train_steps") + 1] = "1"
    args[args.index("--learning_rate") + 1] = "1e-5"
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    before = load_file(trained_lora)
    after = load_file(str(tmp_path / "out" / "lora.safetensors"))
    assert before.keys() == after.keys()
    up_keys = [key for key in before if key.endswith("lora_up.weight")]
    moved = sum((after[key] - before[key]).norm() for key in up_keys)
    trained = sum(before[key].norm() for key in up_keys)  # distance of the saved LoRA from a fresh start (zeros)
    assert trained > 0 and moved < 0.1 * trained


def test_lycoris_network_module_trains_and_saves(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path):
    pytest.importorskip("lycoris")
    model = os.path.join(tiny_models_dir, "sd1.safetensors")
    extra = ["--network_module", "lycoris.kohya", "--network_args", "preset=attn-mlp"]
    result = run_cli(train_args(model, toy_dataset, str(tmp_path / "out"), tokenizer_dir, *extra), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    with safe_open(str(tmp_path / "out" / "lora.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata()
    assert any(key.startswith("lora_unet_") for key in keys)
    # the kohya file format's text-encoder names, whatever the transformers version
    assert any(key.startswith("lora_te_text_model_encoder_layers_0_") for key in keys)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert metadata["ss_network_args"] == '{"preset": "attn-mlp"}'


def test_trained_lora_loads_in_diffusers_and_matches_our_network(trained_lora, tiny_models_dir, tokenizer_dir):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    import networks.lora as lora

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(tiny_models_dir, "sd1-diffusers"))
    latents, timesteps, hidden = unet_inputs(pipe.unet)
    with torch.no_grad():
        base = pipe.unet(latents, timesteps, hidden).sample
        pipe.load_lora_weights(trained_lora)
        with_lora = pipe.unet(latents, timesteps, hidden).sample

        models = load_family_models(tiny_models_dir, tokenizer_dir)
        network, _ = lora.create_network_from_weights(
            1.0, trained_lora, models.vae, models.text_encoders[0], models.denoiser
        )
        network.apply_to(models.text_encoders[0], models.denoiser, True, True)
        network.load_weights(trained_lora)
        ours = models.denoiser(latents, timesteps, hidden).sample
    assert not torch.allclose(base, with_lora)
    torch.testing.assert_close(with_lora, ours, rtol=1e-4, atol=1e-5)
