"""Precision and memory options: conflicts found before any model loads, attention choice, half-precision weights."""

from __future__ import annotations

import importlib.util
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from library.errors import ConfigError
from library.families.sd import SDFamily
from library.methods.network import NetworkMethod
from library.testing.toy_data import write_toy_dataset
from library.training.memory_options import MemoryOptions, allow_half_gradients, apply_attention
from tests.test_train_network_e2e import train_args
from tests.training_helpers import train_in_process


def parse(argv: list[str]):
    from library.training.entry import build_parser

    return build_parser(SDFamily, NetworkMethod, "test").parse_args(argv)


@pytest.fixture
def lora_argv(tiny_models_dir, tokenizer_dir, tmp_path):
    def argv(*extra: str, dataset_extra: str = "") -> list[str]:
        data = write_toy_dataset(str(tmp_path / "data"), count=2, batch_size=1)
        if dataset_extra:
            with open(data, "a", encoding="utf-8") as handle:
                handle.write(dataset_extra + "\n")
        model = os.path.join(tiny_models_dir, "sd1.safetensors")
        return train_args(model, data, str(tmp_path / "out"), tokenizer_dir, *extra)[1:]

    return argv


CONFLICTS = [
    (["--full_fp16"], ConfigError, r"--full_fp16 keeps the trained weights in float16 and needs .* \(got --mixed_p"),
    (["--full_bf16", "--mixed_precision", "fp16"], ConfigError, r"--full_bf16 .* needs --mixed_precision bf16"),
    (["--full_fp16", "--full_bf16", "--mixed_precision", "fp16"], ConfigError, "exclude each other"),
    (["--sdpa", "--mem_eff_attn"], ConfigError, "--sdpa and --mem_eff_attn are different attention .* choose one"),
    (["--lowvram"], ConfigError, "--lowvram is not supported .* --gradient_checkpointing"),
    (["--gradient_accumulation_steps", "0"], ConfigError, "--gradient_accumulation_steps must be 1 or more, got 0"),
    (["--cache_latents", "--vae_batch_size", "0"], ConfigError, "--vae_batch_size must be 1 or more"),
]


@pytest.mark.parametrize(("extra", "error", "message"), CONFLICTS)
def test_conflicts_are_refused_before_any_model_loads(lora_argv, monkeypatch, extra, error, message):
    from library.training.trainer import train

    monkeypatch.setattr(SDFamily, "load", lambda *args: pytest.fail("a model was loaded"))
    args = parse(lora_argv(*extra))
    with pytest.raises(error, match=message):
        train(SDFamily(args), NetworkMethod(args), args)


def test_cache_with_color_aug_is_refused_before_any_model_loads(lora_argv, monkeypatch):
    from library.training.trainer import train

    monkeypatch.setattr(SDFamily, "load", lambda *args: pytest.fail("a model was loaded"))
    args = parse(lora_argv("--cache_latents", dataset_extra="  color_aug = true"))
    with pytest.raises(ConfigError, match=r"subsets\[0\] sets color_aug, .* but --cache_latents encodes each image"):
        train(SDFamily(args), NetworkMethod(args), args)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_without_the_package_falls_back_to_sdpa_with_a_warning(caplog):
    """The guides' commands carry --xformers; without the optional package they run on PyTorch's SDPA."""
    with caplog.at_level(logging.WARNING):
        options = MemoryOptions.from_args(
            parse(["--pretrained_model_name_or_path", "m", "--output_dir", "o", "--xformers"]), "no"
        )
    assert options.attention == "sdpa"
    assert "xformers package is not installed (pip install xformers" in caplog.text


def test_lowram_is_accepted_and_explained(caplog):
    args = parse(["--pretrained_model_name_or_path", "m", "--output_dir", "o", "--lowram"])
    with caplog.at_level(logging.INFO):
        assert MemoryOptions.from_args(args, "no") == MemoryOptions(None, "sdpa")
    assert "--lowram: models are always built on the meta device" in caplog.text


def test_mem_eff_attn_slices_attention_with_the_same_output():
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import SlicedAttnProcessor

    from library.testing.tiny_configs import tiny_unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config(v2=False)).eval()
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, unet.config.cross_attention_dim))
    with torch.no_grad():
        before = unet(*inputs).sample
        apply_attention(SimpleNamespace(denoiser=unet, vae=None), "mem_eff_attn")
        after = unet(*inputs).sample
    assert {type(processor) for processor in unet.attn_processors.values()} == {SlicedAttnProcessor}
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_full_fp16_lets_the_scaler_unscale_half_gradients():
    weight = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    weight.grad = torch.full((3,), 8.0, dtype=torch.float16)  # a gradient scaled by 4
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.tensor(1.0))  # as a backward pass would
    with pytest.raises(ValueError, match="FP16 gradients"):
        scaler.unscale_(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.tensor(1.0))
    allow_half_gradients(SimpleNamespace(scaler=scaler), MemoryOptions(full_precision="fp16"))
    scaler.unscale_(optimizer)
    assert weight.grad.tolist() == [2.0, 2.0, 2.0]


def test_full_bf16_trains_and_saves_bfloat16_weights(lora_argv, tmp_path):
    argv = lora_argv("--mixed_precision", "bf16", "--full_bf16")
    argv[argv.index("--max_train_steps") + 1] = "1"
    train_in_process(argv)
    weights = load_file(str(tmp_path / "out" / "lora.safetensors"))
    assert {value.dtype for value in weights.values()} == {torch.bfloat16}
    ups = [value for key, value in weights.items() if key.endswith("lora_up.weight")]
    assert all(torch.isfinite(value.float()).all() for value in ups) and any(value.abs().max() > 0 for value in ups)


def test_vae_weights_leave_memory_once_every_latent_is_cached(lora_argv, caplog, monkeypatch):
    from library.training import trainer

    seen = {}
    original = trainer._free_unused_vae

    def free_and_look(options, method, models):
        original(options, method, models)
        seen["device"] = next(models.vae.parameters()).device.type
        seen["decoder"] = next(models.vae.decoder.parameters()).device.type

    monkeypatch.setattr(trainer, "_free_unused_vae", free_and_look)
    argv = lora_argv("--cache_latents", "--network_train_unet_only")
    argv[argv.index("--max_train_steps") + 1] = "2"
    with caplog.at_level(logging.INFO):
        train_in_process(argv)
    assert seen["device"] == "meta" and "VAE weights freed" in caplog.text
    with caplog.at_level(logging.INFO):
        caplog.clear()
        train_in_process(lora_argv("--network_train_unet_only", "--max_train_steps", "1"))  # latents not cached
    # the encoder encodes every step; the decoder is never used without sample images
    assert seen["device"] == "cpu" and "VAE weights freed" not in caplog.text
    assert seen["decoder"] == "meta" and "VAE decoder freed" in caplog.text
