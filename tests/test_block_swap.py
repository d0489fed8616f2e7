"""The memory engine on the CPU: block swapping and activation offload give the same outputs and gradients as plain
runs, the recorded residency follows the plan, and fp8 base weights are stored in float8 and still compute."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from library.checkpoints.flux_configs import transformer_config
from library.errors import ConfigError
from library.families.flux import FluxFamily, image_position_ids, pack_latents
from library.testing import tiny_configs
from library.training import fp8
from library.training.block_swap import (
    BlockRunner,
    OffloadOptions,
    ResidencyRecorder,
    make_runners,
    max_blocks_to_swap,
    swap_plan,
)
from networks import lora_flux

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait


class ToyBlock(nn.Module):
    """Two inputs and two outputs, like a FLUX block (text, image)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, hidden, context):
        return context * 0.9, torch.tanh(self.second(torch.relu(self.first(hidden + context)))) + hidden


def run_toy(blocks, hidden):
    context = torch.full((2, 8), 0.1)
    for block in blocks:
        context, hidden = block(hidden, context)
    return hidden


def toy_blocks() -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(ToyBlock() for _ in range(5))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_swap_matches_plain_run_and_follows_plan(checkpointing):
    swapped, plain = toy_blocks(), toy_blocks()
    recorder = ResidencyRecorder()
    BlockRunner(swapped, "cpu", blocks_to_swap=3, checkpointing=checkpointing, recorder=recorder).prepare()
    hidden = torch.randn(2, 8)
    for _ in range(2):  # the second step starts where the first ended
        outputs = [run_toy(blocks, hidden) for blocks in (swapped, plain)]
        for output in outputs:
            output.square().sum().backward()
        assert torch.equal(outputs[0], outputs[1])
        for mine, reference in zip(swapped.parameters(), plain.parameters()):
            assert torch.equal(mine.grad, reference.grad)
            mine.grad = reference.grad = None
    one_step = [
        ("forward", 0, (0, 1)), ("forward", 1, (1, 2)), ("forward", 2, (2, 3)), ("forward", 3, (3, 4)),
        ("forward", 4, (3, 4)), ("backward", 4, (3, 4)), ("backward", 3, (2, 3)), ("backward", 2, (1, 2)),
        ("backward", 1, (0, 1)), ("backward", 0, (0, 1)),
    ]  # fmt: skip
    assert recorder.events == one_step * 2


def test_block_swap_carries_accumulated_gradients_with_the_weights():
    swapped, plain = toy_blocks(), toy_blocks()
    BlockRunner(swapped, "cpu", blocks_to_swap=2).prepare()
    for seed in range(3):  # gradient accumulation: gradients stay across passes while their blocks move
        hidden = torch.randn(2, 8, generator=torch.Generator().manual_seed(seed))
        for blocks in (swapped, plain):
            run_toy(blocks, hidden).square().sum().backward()
    assert all(torch.allclose(mine.grad, reference.grad) for mine, reference in zip(swapped.parameters(),
                                                                                    plain.parameters()))  # fmt: skip


def test_block_swap_with_steps_inside_backward_matches_plain_run():
    """--fused_backward_pass / --blockwise_fused_optimizers step each weight in its gradient hook, while its block
    is on the device; the updated weights must leave with the block and come back next step."""
    swapped, plain = toy_blocks(), toy_blocks()
    BlockRunner(swapped, "cpu", blocks_to_swap=3).prepare()

    def step(param: nn.Parameter) -> None:  # plain SGD, the gradient freed at once
        param.data.sub_(0.1 * param.grad)
        param.grad = None

    for blocks in (swapped, plain):
        for param in blocks.parameters():
            param.register_post_accumulate_grad_hook(step)
    hidden = torch.randn(2, 8)
    for _ in range(3):
        for blocks in (swapped, plain):
            run_toy(blocks, hidden).square().sum().backward()
    with torch.no_grad():
        assert torch.equal(run_toy(swapped, hidden), run_toy(plain, hidden))
    assert all(torch.equal(mine, reference) for mine, reference in zip(swapped.parameters(), plain.parameters()))


def test_block_swap_restores_residency_after_a_pass_without_backward():
    blocks = toy_blocks()
    runner = BlockRunner(blocks, "cpu", blocks_to_swap=2)
    runner.prepare()
    hidden = torch.randn(2, 8)
    with torch.no_grad():
        first = run_toy(blocks, hidden)
    assert runner.resident == [False, False, True, True, True]
    with torch.no_grad():
        assert torch.equal(run_toy(blocks, hidden), first)
    assert swap_plan(5, 2) == ([(0, 3), (1, 4)], [(4, 1), (3, 0)])


def test_block_swap_refuses_too_many_blocks():
    with pytest.raises(ConfigError, match="at most 3"):
        BlockRunner(toy_blocks(), "cpu", blocks_to_swap=4)
    with pytest.raises(ConfigError, match="cannot be combined"):
        OffloadOptions(blocks_to_swap=2, cpu_offload_checkpointing=True, gradient_checkpointing=True).validate()
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        full_size = FluxTransformer2DModel(**transformer_config("dev"))
    lengths = [len(full_size.transformer_blocks), len(full_size.single_transformer_blocks)]
    assert max_blocks_to_swap(lengths, FluxFamily.swap_counts) == 35


def flux_runners(transformer, recorder, **memory) -> list[BlockRunner]:
    """The runners the loop places for FLUX with these memory options."""
    options = OffloadOptions(**memory)
    lists = [getattr(transformer, name) for name in FluxFamily.block_list_names]
    return make_runners(lists, FluxFamily.swap_counts(options.blocks_to_swap or 0), "cpu", options, recorder)


def flux_step(model) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 4, 4, generator=generator)
    text = torch.randn(1, 5, 40, generator=generator)
    output = model(hidden_states=pack_latents(latents), encoder_hidden_states=text,
                   pooled_projections=torch.randn(1, 32, generator=generator), timestep=torch.tensor([0.5]),
                   img_ids=image_position_ids(2, 2, "cpu"), txt_ids=torch.zeros(5, 3),
                   guidance=torch.tensor([3.5])).sample  # fmt: skip
    output.square().mean().backward()
    return output.detach()


def lora_model(transformer):
    model = copy.deepcopy(transformer)
    torch.manual_seed(5)  # the same adapters for every call
    network = lora_flux.create_network(1.0, 4, 2, None, [], model)
    network.apply_to([], model, False, True)
    for lora in network.all_loras():  # trained-looking adapters, so every gradient is non-zero
        nn.init.normal_(lora.lora_up.weight, std=0.1)
    return model, network


@pytest.mark.parametrize(
    "memory", [{"blocks_to_swap": 2}, {"blocks_to_swap": 2, "gradient_checkpointing": True},
               {"cpu_offload_checkpointing": True, "gradient_checkpointing": True}],
)  # fmt: skip
def test_block_swap_flux_lora_gradients_equal_plain_run(memory):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**tiny_configs.tiny_flux_transformer_config()).requires_grad_(False)
    plain, plain_network = lora_model(transformer)
    swapped, swapped_network = lora_model(transformer)
    recorder = ResidencyRecorder()
    runners = flux_runners(swapped, recorder, **memory)
    for runner in runners:
        runner.prepare()
    assert [runner.swap for runner in runners] == ([1, 2] if memory.get("blocks_to_swap") else [0, 0])
    for _ in range(2):
        assert torch.equal(flux_step(swapped), flux_step(plain))
        for mine, reference in zip(swapped_network.parameters(), plain_network.parameters()):
            assert mine.grad is not None and torch.allclose(mine.grad, reference.grad, atol=1e-7)
            mine.grad = reference.grad = None
    if memory.get("blocks_to_swap"):
        resident_counts = {len(resident) for _, _, resident in recorder.events}
        assert resident_counts == {2}  # 3 double blocks with 1 swapped, 4 single with 2: two on the device always
        assert all(index in resident for _, index, resident in recorder.events)


def test_fp8_base_stores_weights_in_float8_and_runs_in_bfloat16():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    reference = FluxTransformer2DModel(**tiny_configs.tiny_flux_transformer_config()).to(torch.bfloat16)
    model = copy.deepcopy(reference)
    converted = fp8.store_in_fp8(model, torch.bfloat16, fp8.DENOISER_SKIP)
    attention = model.transformer_blocks[0].attn
    assert attention.to_q.weight.dtype == fp8.FP8_DTYPE and model.x_embedder.weight.dtype == fp8.FP8_DTYPE
    assert attention.norm_q.weight.dtype == torch.bfloat16  # precision-critical norms keep the compute dtype
    assert converted > 50
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        inputs = {
            "hidden_states": torch.randn(1, 4, 64, generator=generator).bfloat16(),
            "encoder_hidden_states": torch.randn(1, 5, 40, generator=generator).bfloat16(),
            "pooled_projections": torch.randn(1, 32, generator=generator).bfloat16(),
            "timestep": torch.tensor([0.5]),
            "img_ids": image_position_ids(2, 2, "cpu"),
            "txt_ids": torch.zeros(5, 3),
            "guidance": torch.tensor([3.5]),
        }
        output, expected = model(**inputs).sample, reference(**inputs).sample
    assert output.dtype == torch.bfloat16 and torch.isfinite(output).all()
    assert (output - expected).abs().mean() < 0.1 * expected.abs().mean()  # fp8 rounding, not another model
    assert attention.to_q.weight.dtype == fp8.FP8_DTYPE  # cast back after the forward
    with pytest.raises(ConfigError, match="--mixed_precision bf16"):
        fp8.check_compute_dtype(torch.float32)


class ShortToyBlock(ToyBlock):
    """A block with fewer tensors than the others of its list (like SD3's last joint block)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Identity()


def test_block_swap_handles_blocks_with_fewer_tensors():
    torch.manual_seed(0)
    plain = nn.ModuleList([*(ToyBlock() for _ in range(4)), ShortToyBlock()])
    swapped = copy.deepcopy(plain)
    BlockRunner(swapped, "cpu", blocks_to_swap=2).prepare()  # block 1 leaves its tensors to the short block 4
    hidden = torch.randn(2, 8)
    for _ in range(2):  # backward brings block 1 back into the short block's two tensors and two fresh ones
        outputs = [run_toy(blocks, hidden) for blocks in (swapped, plain)]
        assert torch.allclose(outputs[0], outputs[1], atol=1e-6)
        for output in outputs:
            output.square().sum().backward()
        for mine, reference in zip(swapped.parameters(), plain.parameters()):
            assert torch.allclose(mine.grad, reference.grad, atol=1e-6)
            mine.grad = reference.grad = None
