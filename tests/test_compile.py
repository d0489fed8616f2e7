"""--compile: the denoiser's blocks compiled in place give the eager results."""

from __future__ import annotations

import re

import pytest
import torch

from library.errors import ConfigError
from library.training.compile import CompileOptions, _cpp_compiler, compile_blocks
from tests.conftest import run_cli
from tests.test_families_e2e import lora_run


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip


def _step(unet, sample):
    unet.zero_grad(set_to_none=True)
    context = torch.linspace(-1, 1, 2 * 7 * 32).reshape(2, 7, 32)
    output = unet(sample, torch.tensor([10, 500]), context).sample
    output.square().mean().backward()
    return output.detach(), {name: param.grad.clone() for name, param in unet.named_parameters()}


class _Block(torch.nn.Module):
    """A transformer-style MLP block (its forward is traced: dynamo compiles model code, not torch's own modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.up, self.down = torch.nn.LayerNorm(32), torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


@pytest.mark.usefixtures("one_thread")
def test_inductor_compiled_blocks_give_the_eager_outputs_and_gradients():
    if not _cpp_compiler():
        pytest.skip("no C++ compiler for inductor's CPU code")
    # small blocks: inductor generates and builds C++ kernels for each graph (minutes for a whole UNet on 2 cores)
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(_Block() for _ in range(2))
    x = torch.randn(4, 9, 32)

    def step():
        blocks.zero_grad(set_to_none=True)
        output = blocks[1](blocks[0](x))
        output.square().mean().backward()
        return output.detach(), [param.grad.clone() for param in blocks.parameters()]

    output, grads = step()
    assert compile_blocks(CompileOptions(True, "inductor"), list(enumerate(blocks)), blocks) == 2
    from torch._dynamo.utils import counters

    counters.clear()
    compiled_output, compiled_grads = step()
    assert counters["stats"]["unique_graphs"] >= 2  # each block really went through the compiler
    torch.testing.assert_close(compiled_output, output, rtol=1e-4, atol=1e-5)
    for compiled, grad in zip(compiled_grads, grads, strict=True):
        torch.testing.assert_close(compiled, grad, rtol=1e-3, atol=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_compiled_unet_blocks_give_the_eager_outputs_and_gradients_at_two_sizes():
    # aot_eager: dynamo and AOTAutograd trace forward and backward of every block, as with inductor, without codegen
    from library.training.fused_optimizers import default_blocks

    unet = _tiny_unet()
    samples = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
               torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(2))]  # two buckets
    eager = [_step(unet, sample) for sample in samples]
    keys = set(unet.state_dict())
    assert compile_blocks(CompileOptions(True, "aot_eager"), default_blocks(unet), unet) >= 3
    assert set(unet.state_dict()) == keys  # compiled in place: the same module, the same keys
    from torch._dynamo.utils import counters

    counters.clear()
    for sample, (output, grads) in zip(samples, eager, strict=True):
        compiled_output, compiled_grads = _step(unet, sample)
        torch.testing.assert_close(compiled_output, output, rtol=1e-4, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    assert counters["stats"]["unique_graphs"] >= 3


def test_compile_is_refused_with_block_swap():
    with pytest.raises(ConfigError, match="--compile cannot be combined with --blocks_to_swap"):
        CompileOptions(True, "aot_eager").check(block_swap=True)
    CompileOptions(True, "aot_eager").check(block_swap=False)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_lora_training_with_compile_logs_the_eager_losses(tiny_family, toy_dataset, tmp_path):
    tiny = tiny_family("sd")
    losses = []
    for name, extra in (("eager", []), ("compiled", ["--compile", "--compile_backend", "aot_eager"])):
        result = run_cli(lora_run(tiny, toy_dataset, str(tmp_path / name)) + extra, tmp_path, launcher=False)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        losses.append([float(value) for value in re.findall(r"average loss (\S+)", output)])
        if extra:
            assert re.search(r"--compile: [1-9]\d* denoiser blocks compiled with aot_eager", output)
    assert losses[0] and losses[1] == pytest.approx(losses[0], rel=1e-4)
