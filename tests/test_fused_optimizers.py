"""--fused_backward_pass / --blockwise_fused_optimizers: same weights as the unfused step, gradients freed during
backward, per-tensor clipping, exact resume, option checks, and end-to-end runs."""

from __future__ import annotations

import argparse
import io
import os

import pytest
import torch
from safetensors.torch import load_file

from library.errors import ConfigError
from library.training.fused_optimizers import (
    FusedOptions,
    add_fused_arguments,
    build_fused_optimizers,
    default_blocks,
)
from library.training.optimizers import (
    OptimizerOptions,
    add_optimizer_arguments,
    build_lr_scheduler,
    build_optimizer,
    current_learning_rates,
)
from tests.conftest import run_cli
from tests.test_full_model_training import UNET, changed_prefixes, cli_args, train_in_process
from tests.test_sdxl_e2e import sdxl_args

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait


ADAFACTOR = ["--optimizer_type", "AdaFactor"]  # relative_step=True: AdaFactor's own schedule
ADAFACTOR_COSINE = ["--optimizer_type", "AdaFactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
                    "--learning_rate", "1e-2", "--lr_scheduler", "cosine"]  # fmt: skip
ADAMW_WARMUP_COSINE = ["--optimizer_type", "AdamW", "--optimizer_args", "weight_decay=0.1", "--learning_rate", "1e-2",
                       "--lr_scheduler", "cosine", "--lr_warmup_steps", "2"]  # fmt: skip
TOTAL_STEPS = 6  # schedule length; the tests train 3 of them


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    add_fused_arguments(parser)
    parser.add_argument("--mixed_precision", default="no")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    return parser.parse_args(list(argv))


def optimizer_options(*argv: str) -> OptimizerOptions:
    return OptimizerOptions.from_args(parse("--max_grad_norm", "0", *argv))


def make_model() -> torch.nn.Sequential:
    """Six small layers, twelve tensors; blocks are its children."""
    torch.manual_seed(0)
    layers = [
        torch.nn.Linear(8, 16),
        torch.nn.LayerNorm(16),
        torch.nn.Linear(16, 16),
        torch.nn.GELU(),
        torch.nn.Linear(16, 16),
        torch.nn.LayerNorm(16),
        torch.nn.Linear(16, 4),
    ]
    return torch.nn.Sequential(*layers)


class Trainer:
    """One model with its proxy optimizer and schedule, stepped unfused, per tensor or per block."""

    def __init__(self, options: OptimizerOptions, mode: str = "unfused"):
        self.model = make_model()
        self.optimizer = build_optimizer(
            options, [{"params": list(self.model.parameters()), "lr": options.learning_rate}]
        )
        self.scheduler = build_lr_scheduler(options, self.optimizer, TOTAL_STEPS)
        blocks = default_blocks(self.model) if mode == "blockwise" else None
        self.fused = None if mode == "unfused" else build_fused_optimizers(options, self.optimizer, blocks)

    def step(self, index: int) -> None:
        inputs = torch.randn(4, 8, generator=torch.Generator().manual_seed(index))
        loss = self.model(inputs).pow(2).mean()
        loss.backward()
        if self.fused is not None:
            self.fused.finish_backward()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train(self, steps: range) -> Trainer:
        for index in steps:
            self.step(index)
        return self


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, left), right in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(left, right, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", ["fused", "blockwise"])
@pytest.mark.parametrize(
    "argv", [ADAFACTOR, ADAFACTOR_COSINE, ADAMW_WARMUP_COSINE], ids=["adafactor_relative", "adafactor_cosine", "adamw"]
)
def test_fused_step_gives_the_unfused_weights_after_three_steps(mode, argv):
    options = optimizer_options(*argv)
    unfused = Trainer(options).train(range(3))
    fused = Trainer(options, mode).train(range(3))
    assert not torch.equal(unfused.model[0].weight, make_model()[0].weight)  # it trained
    assert_same_weights(unfused.model, fused.model)
    rates = fused.fused.learning_rates(fused.scheduler)
    assert rates == pytest.approx(current_learning_rates(unfused.optimizer, unfused.scheduler))
    assert 0 < rates["lr/group0"] < 1e-2


@pytest.mark.parametrize("mode, most", [("fused", 1), ("blockwise", 2)])
def test_fused_step_frees_gradients_during_backward(mode, most):
    trainer = Trainer(optimizer_options(*ADAFACTOR_COSINE), mode)
    params = list(trainer.model.parameters())
    live: list[int] = []
    for param in params:  # runs after the fused hook of the same tensor: counts the gradients still held
        param.register_post_accumulate_grad_hook(lambda _: live.append(sum(p.grad is not None for p in params)))
    before = [param.detach().clone() for param in params]
    trainer.model(torch.randn(4, 8)).sum().backward()
    assert len(live) == len(params) == 12
    assert max(live) < most  # a block's gradients live until its last one arrives (Linear: weight and bias)
    assert all(param.grad is None for param in params)
    assert all(not torch.equal(old, param) for old, param in zip(before, params))  # stepped inside backward


def test_blockwise_steps_a_block_whose_tensor_got_no_gradient_after_backward():
    options = optimizer_options(*ADAMW_WARMUP_COSINE)
    unfused, blockwise = Trainer(options), Trainer(options, "blockwise")
    for trainer in (unfused, blockwise):
        trainer.model[6].bias.requires_grad_(True)
        trainer.model[6].register_forward_hook(lambda module, inputs, output: inputs[0] @ module.weight.T)  # no bias
        trainer.train(range(2))
    assert blockwise.model[6].bias.grad is None
    assert_same_weights(unfused.model, blockwise.model)


def test_fused_clipping_clips_each_tensor_on_its_own():
    options = OptimizerOptions.from_args(
        parse("--optimizer_type", "SGD", "--learning_rate", "1", "--max_grad_norm", "0.01")
    )
    fused = Trainer(options, "fused")
    reference = make_model()
    fused.step(0)
    reference(torch.randn(4, 8, generator=torch.Generator().manual_seed(0))).pow(2).mean().backward()
    for (name, param), start, trained in zip(
        reference.named_parameters(), make_model().parameters(), fused.model.parameters()
    ):
        start, trained = start.detach(), trained.detach()
        expected = start - param.grad * min(1.0, 0.01 / (param.grad.norm() + 1e-6))  # its own norm, not the global
        torch.testing.assert_close(trained, expected, msg=name)
        assert (start - trained).norm().item() == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize("mode", ["fused", "blockwise"])
def test_fused_state_resumes_exactly(mode):
    options = optimizer_options(*ADAMW_WARMUP_COSINE)
    uninterrupted = Trainer(options, mode).train(range(3))
    first = Trainer(options, mode).train(range(1))
    saved = io.BytesIO()
    # what a state folder holds: weights, the proxy (its group rates), the fused optimizers, the schedule
    parts = (first.model, first.optimizer, first.fused, first.scheduler)
    torch.save([part.state_dict() for part in parts], saved)
    saved.seek(0)
    weights, proxy_state, fused_state, schedule_state = torch.load(saved, weights_only=True)
    resumed = Trainer(options, mode)
    resumed.model.load_state_dict(weights)
    resumed.optimizer.load_state_dict(proxy_state)
    resumed.fused.load_state_dict(fused_state)
    resumed.scheduler.load_state_dict(schedule_state)
    resumed.train(range(1, 3))
    assert_same_weights(uninterrupted.model, resumed.model)


def test_default_blocks_split_lists_of_blocks():
    class Denoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in = torch.nn.Conv2d(4, 8, 1)
            self.down_blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)])
            self.mid_block = torch.nn.Linear(8, 8)

    names = [name for name, _ in default_blocks(Denoiser())]
    assert names == ["conv_in", "down_blocks.0", "down_blocks.1", "mid_block"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--fused_backward_pass", "--gradient_accumulation_steps", "2"], "gradient_accumulation_steps 2"),
        (["--fused_backward_pass", "--mixed_precision", "fp16"], "fp16"),
        (["--fused_backward_pass", "--blockwise_fused_optimizers"], "choose one"),
        (["--fused_backward_pass", "--optimizer_type", "Prodigy"], "all gradients together"),
        (["--blockwise_fused_optimizers", "--optimizer_type", "AdamWScheduleFree"], "schedule-free"),
        (["--fused_backward_pass", "--optimizer_type", "LBFGS"], "closure"),
    ],
)
def test_fused_options_refuse_what_cannot_step_per_tensor(argv, message):
    args = parse("--learning_rate", "1.0", *argv)
    with pytest.raises(ConfigError, match=message):
        FusedOptions.from_args(args, OptimizerOptions.from_args(args))


def test_blockwise_is_refused_for_lora_and_fused_is_accepted():
    options = FusedOptions(blockwise_fused_optimizers=True)
    with pytest.raises(ConfigError, match="network method"):
        options.check_method("network")
    options.check_method("finetune")
    FusedOptions(fused_backward_pass=True).check_method("network")


# ---- through the real loop ------------------------------------------------------------------------------------


def train_sdxl_in_process(argv: list[str]) -> None:
    from library.families.sdxl import SDXLFamily
    from library.methods.finetune import FineTuneMethod
    from library.training.entry import build_parser
    from library.training.trainer import train

    args = build_parser(SDXLFamily, FineTuneMethod, "test").parse_args(argv)
    train(SDXLFamily(args), FineTuneMethod(args), args)


def test_sdxl_train_fused_adafactor_gives_the_unfused_weights(tiny_sdxl_dir, toy_dataset, tokenizer_dir, tmp_path):
    model = os.path.join(tiny_sdxl_dir, "sdxl.safetensors")
    extra = ["--optimizer_type", "AdaFactor", "--max_grad_norm", "0", "--max_train_steps", "3"]
    fused_args = sdxl_args(
        "sdxl_train.py", model, toy_dataset, str(tmp_path / "fused"), tokenizer_dir, "--fused_backward_pass", *extra
    )
    result = run_cli(fused_args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "optimizers stepped inside the backward pass (one per tensor)" in result.stderr
    train_sdxl_in_process(sdxl_args("", model, toy_dataset, str(tmp_path / "unfused"), tokenizer_dir, *extra)[1:])
    base = load_file(model)
    fused = load_file(str(tmp_path / "fused" / "result.safetensors"))
    unfused = load_file(str(tmp_path / "unfused" / "result.safetensors"))
    assert changed_prefixes(base, fused) == {UNET}
    for key in unfused:
        torch.testing.assert_close(fused[key], unfused[key], rtol=1e-5, atol=1e-6, msg=key)


def test_fine_tune_blockwise_saves_state_that_resumes_exactly(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path):
    from library.methods.finetune import FineTuneMethod

    base = os.path.join(tiny_models_dir, "sd1.safetensors")
    extra = ["--blockwise_fused_optimizers", "--lr_scheduler", "cosine", "--cpu_threads", "1", "--max_train_steps", "3"]
    full = cli_args("fine_tune.py", base, toy_dataset, str(tmp_path / "full"), tokenizer_dir, *extra,
                    "--save_every_n_steps", "2", "--save_state")  # fmt: skip
    result = run_cli(full, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "9 optimizers stepped inside the backward pass (one per block)" in result.stderr
    state = tmp_path / "full" / "model-step00000002-state"
    fused_state = torch.load(state / "custom_checkpoint_1.pkl", weights_only=False)  # registered after the UNet
    assert fused_state["units"][:3] == ["conv_in", "time_embedding", "down_blocks.0"]
    assert fused_state["optimizers"][0]["state"][0]["exp_avg"].shape == (32, 4, 3, 3)  # conv_in.weight's moments
    # the last step again, resumed in this process from the state folder
    resumed_args = cli_args(
        "", base, toy_dataset, str(tmp_path / "resumed"), tokenizer_dir, *extra, "--resume", str(state)
    )[1:]
    train_in_process(resumed_args, FineTuneMethod)
    full_weights = load_file(str(tmp_path / "full" / "model.safetensors"))
    resumed_weights = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert changed_prefixes(load_file(base), full_weights) == {UNET}
    for key in full_weights:
        torch.testing.assert_close(full_weights[key], resumed_weights[key], rtol=1e-5, atol=1e-6, msg=key)
