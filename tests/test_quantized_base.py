"""--quantize_base int8 | nf4: frozen Linear weights stored by bitsandbytes, adapters trained on top."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from library.errors import ConfigError
from library.families import get_family_class
from library.training.quantized_base import QuantizationOptions, dense_weight, quantize_module
from networks import lora
from networks.adapters import LoRAModule
from tests.conftest import run_cli
from tests.test_families_e2e import denoiser_output, lora_run
from tests.test_train_network_e2e import epoch_losses
from tests.training_helpers import parsed_args

# mean absolute error of the output relative to its mean magnitude, for a random 256 x 256 layer
TOLERANCE = {"int8": 0.02, "nf4": 0.15}


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_linear_computes_close_to_the_original_and_passes_gradients(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 64))
    x = torch.randn(8, 256)
    expected = model(x).detach()
    original = model[0].weight.detach().clone()
    assert quantize_module(model, kind, torch.float32, skip=(r"^2$",)) == 1  # the skipped layer stays
    assert type(model[0]) is not nn.Linear and isinstance(model[0], nn.Linear) and type(model[2]) is nn.Linear
    assert model[0].weight.dtype in (torch.int8, torch.uint8)
    error = (dense_weight(model[0]) - original).abs().mean() / original.abs().mean()
    assert 0 < error < TOLERANCE[kind]
    x.requires_grad_(True)
    output = model(x)
    assert ((output - expected).abs().mean() / expected.abs().mean()) < TOLERANCE[kind]
    output.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(not param.requires_grad for param in model[0].parameters())


def test_lora_on_a_quantized_layer_has_the_unquantized_shapes_and_changes_its_output():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    quantized = nn.Sequential(nn.Linear(64, 32))
    quantized[0].load_state_dict(layer.state_dict())
    quantize_module(quantized, "nf4", torch.float32, skip=())
    plain, on_quantized = LoRAModule("lora_x", [layer], lora_dim=4), LoRAModule("lora_x", [quantized[0]], lora_dim=4)
    assert on_quantized.fused_shape == plain.fused_shape == (32, 64)
    assert {k: v.shape for k, v in on_quantized.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }
    on_quantized.apply_to()
    x = torch.randn(2, 64)
    before = quantized(x).detach()
    with torch.no_grad():
        on_quantized.lora_up.weight.fill_(0.1)
    assert not torch.allclose(quantized(x), before)


def test_quantized_base_is_refused_where_it_cannot_work():
    from types import SimpleNamespace

    options = QuantizationOptions("nf4")
    lora_method = SimpleNamespace(name="network", trains_base_weights=False)
    options.check(lora_method, fp8=False, block_swap=False)
    with pytest.raises(ConfigError, match="the finetune method trains those weights"):
        options.check(SimpleNamespace(name="finetune", trains_base_weights=True), fp8=False, block_swap=False)
    with pytest.raises(ConfigError, match="--fp8_base .* choose one"):
        options.check(lora_method, fp8=True, block_swap=False)
    with pytest.raises(ConfigError, match="--blocks_to_swap"):
        options.check(lora_method, fp8=False, block_swap=True)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_lora_trained_on_a_quantized_base_loads_on_the_unquantized_model(kind, tiny_family, toy_dataset, tmp_path):
    tiny = tiny_family("sd")
    result = run_cli(lora_run(tiny, toy_dataset, str(tmp_path / "out")) + ["--quantize_base", kind], tmp_path,
                     launcher=False)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"--quantize_base {kind}: " in output
    losses = epoch_losses(output)
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses

    path = str(tmp_path / "out" / "lora.safetensors")
    with safe_open(path, "pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    family = get_family_class("sd")(parsed_args("sd", list(tiny.model_args)))
    family.validate()
    models = family.load(torch.float32)
    fresh = lora.create_network(1.0, 4, 2, models.vae, family.network_text_encoders(models),
                                family.network_denoiser(models), adapter_targets=family.adapter_targets(models))
    assert shapes == {key: tuple(value.shape) for key, value in fresh.file_state_dict().items()}

    base = denoiser_output(family, models)
    network, _ = lora.create_network_from_weights(1.0, path, models.vae, family.network_text_encoders(models),
                                                  family.network_denoiser(models),
                                                  adapter_targets=family.adapter_targets(models))  # fmt: skip
    network.apply_to(None, None, True, True)
    network.load_weights(path)
    assert not torch.allclose(base, denoiser_output(family, models))
