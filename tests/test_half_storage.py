"""Frozen fp16/bf16 weights kept in the file's precision in float32 runs: the same numbers at half the memory."""

from __future__ import annotations

import copy
import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from library.checkpoints.weights import assign_weights, empty_model
from library.training.half_storage import cast_as_it_runs, half_stored_layers, keeping_half_weights
from tests.conftest import run_cli
from tests.test_train_network_e2e import train_args


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make_layer, shape", [
    (lambda: nn.Linear(24, 16), (2, 5, 24)),
    (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 9, 9)),
    (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), (1, 8, 9, 9)),
])  # fmt: skip
def test_a_half_stored_layer_gives_the_float32_outputs_and_input_gradients_exactly(half, make_layer, shape):
    torch.manual_seed(0)
    plain = make_layer().requires_grad_(False)
    plain.weight.data = plain.weight.data.to(half).float()  # what a half-precision file holds
    stored = copy.deepcopy(plain)
    stored.weight.data = stored.weight.data.to(half)
    cast_as_it_runs(stored, torch.float32)
    x = torch.randn(shape, requires_grad=True)
    x_stored, x_checkpointed = (x.detach().clone().requires_grad_(True) for _ in range(2))
    expected, output = plain(x), stored(x_stored)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    output.backward(grad)
    torch.utils.checkpoint.checkpoint(stored, x_checkpointed, use_reentrant=False).backward(grad)  # recomputed
    assert output.dtype == torch.float32 and torch.equal(output, expected)
    assert torch.equal(x_stored.grad, x.grad) and torch.equal(x_checkpointed.grad, x.grad)
    assert stored.weight.dtype == half


def test_loading_keeps_half_weights_only_under_the_context_and_never_the_first_parameter():
    def build():
        return nn.Sequential(nn.Linear(4, 6), nn.Conv2d(6, 6, 1), nn.LayerNorm(6), nn.Linear(6, 2))

    state = {key: value.half() for key, value in build().state_dict().items()}
    with keeping_half_weights():
        kept = assign_weights(empty_model(build), dict(state), torch.float32, "model", "file")
    upcast = assign_weights(empty_model(build), dict(state), torch.float32, "model", "file")
    dtypes = {name: param.dtype for name, param in kept.named_parameters()}
    assert dtypes == {"0.weight": torch.float32, "0.bias": torch.float32, "1.weight": torch.float16,
                      "1.bias": torch.float32, "2.weight": torch.float32, "2.bias": torch.float32,
                      "3.weight": torch.float16, "3.bias": torch.float32}  # fmt: skip
    assert half_stored_layers(kept) == 2 and half_stored_layers(upcast) == 0
    assert all(param.dtype == torch.float32 for param in upcast.parameters())
    x = torch.randn(3, 4)
    assert torch.equal(kept[3](kept[0](x)), upcast[3](upcast[0](x)))
    with keeping_half_weights():  # loading into a half dtype converts as before
        bf16 = assign_weights(empty_model(build), dict(state), torch.bfloat16, "model", "file")
    assert half_stored_layers(bf16) == 0 and all(param.dtype == torch.bfloat16 for param in bf16.parameters())


def test_lora_on_an_fp16_checkpoint_trains_the_same_weights_with_the_half_stored_base(
    tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path
):
    fp16 = str(tmp_path / "sd1-fp16.safetensors")
    state = load_file(os.path.join(tiny_models_dir, "sd1.safetensors"))
    save_file({key: value.half() if value.is_floating_point() else value for key, value in state.items()}, fp16)
    outputs = {}
    for name, extra in [("kept", ()), ("upcast", ("--upcast_frozen_weights",))]:
        # plain SGD: Adam would turn last-bit gradient differences of near-zero gradients into whole steps
        args = train_args(fp16, toy_dataset, str(tmp_path / name), tokenizer_dir, "--network_args", "conv_dim=2",
                          "--optimizer_type", "torch.optim.SGD", "--learning_rate", "1e-1", *extra)  # fmt: skip
        result = run_cli(args, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        outputs[name] = result.stdout + result.stderr
    assert "frozen layers keep the checkpoint's fp16/bf16 weights" in outputs["kept"]
    assert "memory plan: denoiser: " in outputs["kept"] and "GiB float16 on cpu" in outputs["kept"]
    assert "frozen layers keep" not in outputs["upcast"] and "float16 on cpu" not in outputs["upcast"]
    kept, upcast = (load_file(str(tmp_path / name / "lora.safetensors")) for name in ("kept", "upcast"))
    assert kept.keys() == upcast.keys() and any("conv" in key for key in kept)
    # the same sums in another order where the text encoder's gradient paths meet (the UNet's are bit-identical)
    assert all(torch.allclose(kept[key], upcast[key], rtol=1e-5, atol=1e-8) for key in kept)
    assert all(kept[key].abs().max() > 0 for key in kept if key.endswith("lora_up.weight"))  # it trained (from 0)


def _average_loss(output: str) -> float:
    return float(re.findall(r"average loss ([0-9.]+)", output)[-1])


def test_fp8_base_on_a_unet_family_trains_under_gradient_checkpointing(tiny_models_dir, toy_dataset, tokenizer_dir,
                                                                       tmp_path):  # fmt: skip
    model = os.path.join(tiny_models_dir, "sd1.safetensors")
    runs = {}
    for name, extra in [("fp8", ("--fp8_base",)), ("bf16", ())]:
        args = train_args(model, toy_dataset, str(tmp_path / name), tokenizer_dir, "--mixed_precision", "bf16",
                          "--gradient_checkpointing", "--max_train_steps", "2", *extra)  # fmt: skip
        result = run_cli(args, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        runs[name] = result.stdout + result.stderr
    assert "UNet2DConditionModel: " in runs["fp8"] and "CLIPTextModel: " in runs["fp8"]
    assert "memory plan: denoiser: " in runs["fp8"] and "float8_e4m3fn on cpu" in runs["fp8"]
    assert "float8" not in runs["bf16"]
    fp8_loss, bf16_loss = _average_loss(runs["fp8"]), _average_loss(runs["bf16"])
    assert math.isfinite(fp8_loss) and abs(fp8_loss - bf16_loss) < 0.02 * bf16_loss  # fp8 rounding, not a new model
    fp8_lora, bf16_lora = (load_file(str(tmp_path / name / "lora.safetensors")) for name in ("fp8", "bf16"))
    assert {key: value.shape for key, value in fp8_lora.items()} == {k: v.shape for k, v in bf16_lora.items()}


@pytest.mark.parametrize("script, extra, fragment", [
    ("fine_tune.py", ("--mixed_precision", "bf16"), "trains those weights"),
    ("train_network.py", (), "--mixed_precision bf16"),
])  # fmt: skip
def test_fp8_base_on_a_unet_family_refuses_what_it_cannot_do(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path,
                                                             script, extra, fragment):  # fmt: skip
    args = train_args(os.path.join(tiny_models_dir, "sd1.safetensors"), toy_dataset, str(tmp_path / "out"),
                      tokenizer_dir, "--fp8_base", *extra)  # fmt: skip
    args[0] = script
    if script == "fine_tune.py":  # no network options there
        args = [arg for index, arg in enumerate(args) if not _network_option(args, index)]
    result = run_cli(args, tmp_path, launcher=False)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert result.returncode == 1 and len(errors) == 1 and fragment in errors[0] and "Traceback" not in output, output


def _network_option(args: list[str], index: int) -> bool:
    names = ("--network_dim", "--network_alpha")
    return args[index] in names or (index > 0 and args[index - 1] in names)
