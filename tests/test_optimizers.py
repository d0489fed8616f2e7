"""Optimizers built from command-line strings: every named optimizer steps, defaults, legacy flags, errors."""

import argparse
import logging
import math
import sys
import types

import pytest
import torch

from library.errors import ConfigError, MissingPackageError
from library.training.optimizers import (
    NAMED_OPTIMIZERS,
    OptimizerOptions,
    add_optimizer_arguments,
    build_lr_scheduler,
    build_optimizer,
    current_learning_rates,
    set_optimizer_mode,
)

pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")


def _options(*cli: str) -> OptimizerOptions:
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    return OptimizerOptions.from_args(parser.parse_args(list(cli)))


def _train(options: OptimizerOptions, steps: int = 6, groups: int = 1):
    """A few steps on a tiny linear layer (64x64 = 4096 weights, big enough for bitsandbytes' 8-bit state)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    if groups == 1:
        param_groups = [{"params": list(model.parameters())}]
    else:
        param_groups = [{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.5}]
    optimizer = build_optimizer(options, param_groups)
    scheduler = build_lr_scheduler(options, optimizer, total_steps=20)
    inputs = torch.randn(8, 64)
    start = model.weight.detach().clone()
    for _ in range(steps):
        model(inputs).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, scheduler, start


# (--optimizer_type as typed, the class it must build, its learning rate)
OPTIMIZER_CASES = [
    ("AdamW", "AdamW", "1e-2"),
    ("adamw8bit", "AdamW8bit", "1e-2"),
    ("PagedAdamW8bit", "PagedAdamW8bit", "1e-2"),
    ("Lion", "Lion", "1e-3"),
    ("LION8BIT", "Lion8bit", "1e-3"),
    ("PagedLion8bit", "PagedLion8bit", "1e-3"),
    ("SGDNesterov", "SGD", "1e-2"),
    ("SGDNesterov8bit", "SGD8bit", "1e-2"),
    ("DAdaptation", "DAdaptAdam", "1.0"),
    ("DAdaptAdam", "DAdaptAdam", "1.0"),
    ("DAdaptAdaGrad", "DAdaptAdaGrad", "1.0"),
    ("DAdaptAdan", "DAdaptAdan", "1.0"),
    ("DAdaptSGD", "DAdaptSGD", "1.0"),
    ("DAdaptLion", "DAdaptLion", "1.0"),
    ("DAdaptAdamPreprint", "DAdaptAdamPreprint", "1.0"),
    ("DAdaptAdanIP", "DAdaptAdanIP", "1.0"),
    ("Prodigy", "Prodigy", "1.0"),
    ("AdaFactor", "Adafactor", "1e-3"),
    ("RAdamScheduleFree", "RAdamScheduleFree", "1e-2"),
    ("AdamWScheduleFree", "AdamWScheduleFree", "1e-2"),
    ("SGDScheduleFree", "SGDScheduleFree", "1e-2"),
    ("RMSprop", "RMSprop", "1e-3"),
    ("sgd", "SGD", "1e-2"),
    ("torch.optim.adagrad.Adagrad", "Adagrad", "1e-2"),
    ("lion_pytorch.Lion", "Lion", "1e-3"),
]


def test_optimizer_cases_cover_every_named_optimizer() -> None:
    named = {case[0].lower() for case in OPTIMIZER_CASES}
    assert set(NAMED_OPTIMIZERS) <= named


@pytest.mark.parametrize(("optimizer_type", "class_name", "learning_rate"), OPTIMIZER_CASES)
def test_optimizer_from_cli_moves_parameters(optimizer_type: str, class_name: str, learning_rate: str) -> None:
    options = _options("--optimizer_type", optimizer_type, "--learning_rate", learning_rate)

    model, optimizer, _, start = _train(options)

    assert type(optimizer).__name__ == class_name
    moved = (model.weight.detach() - start).abs().max().item()
    assert 0 < moved < 1 and torch.isfinite(model.weight).all()


@pytest.mark.parametrize("optimizer_type", ["AdamW8bit", "Lion8bit", "SGDNesterov8bit"])
def test_8bit_optimizer_keeps_quantized_state(optimizer_type: str) -> None:
    model, optimizer, _, _ = _train(_options("--optimizer_type", optimizer_type, "--learning_rate", "1e-3"), steps=1)

    assert optimizer.state[model.weight]["state1"].dtype == torch.uint8


def test_optimizer_args_parse_numbers_booleans_and_tuples() -> None:
    options = _options("--optimizer_args", "weight_decay=0.01", "betas=.9,.999", "amsgrad=True")

    optimizer = build_optimizer(options, [{"params": [torch.nn.Parameter(torch.zeros(2))]}])

    assert options.optimizer_args == {"weight_decay": 0.01, "betas": (0.9, 0.999), "amsgrad": True}
    group = optimizer.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["amsgrad"]) == (0.01, (0.9, 0.999), True)


def test_sgd_nesterov_adds_momentum_and_nesterov_when_omitted(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="library.training.optimizers"):
        options = _options("--optimizer_type", "sgdnesterov")

    optimizer = build_optimizer(options, [{"params": [torch.nn.Parameter(torch.zeros(2))]}])

    assert options.optimizer_type == "SGDNesterov"
    assert (optimizer.param_groups[0]["momentum"], optimizer.param_groups[0]["nesterov"]) == (0.9, True)
    assert "momentum=0.9" in caplog.text


def test_sgd_nesterov_keeps_a_given_momentum() -> None:
    assert _options("--optimizer_type", "SGDNesterov", "--optimizer_args", "momentum=0.5").optimizer_args == {
        "momentum": 0.5,
        "nesterov": True,
    }


def test_sgd_nesterov_rejects_nesterov_false() -> None:
    with pytest.raises(ConfigError, match="--optimizer_type SGD"):
        _options("--optimizer_type", "SGDNesterov", "--optimizer_args", "nesterov=False")


def test_optimizer_is_adamw_when_not_given() -> None:
    assert _options().optimizer_type == "AdamW"


@pytest.mark.parametrize(("flag", "expected"), [("--use_8bit_adam", "AdamW8bit"), ("--use_lion_optimizer", "Lion")])
def test_legacy_flag_selects_its_optimizer(flag: str, expected: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="library.training.optimizers"):
        options = _options(flag)

    assert options.optimizer_type == expected
    assert caplog.text.count(f"older spelling of --optimizer_type {expected}") == 1


def test_legacy_flag_with_optimizer_type_is_rejected() -> None:
    with pytest.raises(ConfigError, match="--use_8bit_adam and --optimizer_type Lion"):
        _options("--use_8bit_adam", "--optimizer_type", "Lion")


def test_both_legacy_flags_are_rejected() -> None:
    with pytest.raises(ConfigError, match="exclude each other"):
        _options("--use_8bit_adam", "--use_lion_optimizer")


def test_unknown_optimizer_suggests_the_closest_name() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'AdamW8bit'"):
        _options("--optimizer_type", "AdamW8bt")


def test_missing_optional_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # makes `import lion_pytorch` fail

    with pytest.raises(MissingPackageError, match="pip install lion-pytorch"):
        _options("--optimizer_type", "Lion")


def test_module_class_from_a_missing_package_names_it() -> None:
    with pytest.raises(MissingPackageError, match="pip install no_such_optimizer_pkg"):
        _options("--optimizer_type", "no_such_optimizer_pkg.optim.Fast")


def test_module_class_with_unknown_attribute_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="has no attribute 'NoSuchOptimizer'"):
        _options("--optimizer_type", "torch.optim.NoSuchOptimizer")


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("betas=0.9", r"betas=0.9: AdamW expects 2 comma-separated numbers"),
        ("betas=0.9,0.99,0.999", r"betas=\(0.9, 0.99, 0.999\): AdamW expects 2 comma-separated numbers"),
        ("weight_decay=heavy", r"weight_decay='heavy': AdamW expects a number"),
        ("amsgrad=1", r"amsgrad=1: AdamW expects a boolean"),
        ("weight_decy=0.1", r"weight_decy: AdamW has no such argument. Did you mean 'weight_decay'"),
        ("lr=1e-4", r"--optimizer_args lr: set the learning rate with --learning_rate"),
        ("betas=1.5,0.9", r"Invalid beta parameter"),
    ],
)
def test_wrong_optimizer_argument_is_a_config_error_naming_it(argument: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _options("--optimizer_args", argument)


def test_optimizer_args_read_infinity() -> None:
    options = _options("--optimizer_type", "Prodigy", "--learning_rate", "1", "--optimizer_args", "growth_rate=inf")

    assert options.optimizer_args == {"growth_rate": math.inf}


def test_optimizer_argument_without_equals_is_rejected() -> None:
    with pytest.raises(ConfigError, match="--optimizer_args: expected key=value, got 'weight_decay'"):
        _options("--optimizer_args", "weight_decay")


def test_adafactor_defaults_to_relative_step_and_its_own_schedule(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="library.training.optimizers"):
        options = _options("--optimizer_type", "adafactor", "--lr_scheduler", "cosine", "--learning_rate", "1e-3")

    model, optimizer, scheduler, _ = _train(options, steps=3)

    assert options.optimizer_args == {"relative_step": True}
    assert options.lr_scheduler == "adafactor" and "using --lr_scheduler adafactor" in caplog.text
    assert optimizer.defaults["lr"] is None and type(scheduler).__name__ == "AdafactorSchedule"
    # relative step: min(1e-2, 1/sqrt(step)) scaled by the parameter's RMS (scale_parameter=True)
    rms = optimizer.state[model.weight]["RMS"]
    assert current_learning_rates(optimizer, scheduler) == {"lr/group0": pytest.approx(max(1e-3, rms) * 1e-2)}


def test_adafactor_without_relative_step_uses_the_given_rate_and_schedule() -> None:
    options = _options(
        "--optimizer_type", "AdaFactor", "--optimizer_args", "relative_step=False", "--learning_rate", "1e-3",
        "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "4", "--max_grad_norm", "0",
    )  # fmt: skip

    model, optimizer, _, start = _train(options, steps=2)

    assert options.lr_scheduler == "constant_with_warmup"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 2 / 4)
    assert (model.weight.detach() - start).abs().max() > 0


def test_adafactor_warmup_init_without_relative_step_is_rejected() -> None:
    with pytest.raises(ConfigError, match="warmup_init=True needs relative_step=True"):
        _options("--optimizer_type", "AdaFactor", "--optimizer_args", "relative_step=False", "warmup_init=True")


def test_adafactor_relative_step_with_warmup_steps_is_rejected() -> None:
    with pytest.raises(ConfigError, match="--lr_warmup_steps does not apply to AdaFactor"):
        _options("--optimizer_type", "AdaFactor", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "5")


def test_adafactor_schedule_with_another_optimizer_is_rejected() -> None:
    with pytest.raises(ConfigError, match="--lr_scheduler adafactor only works with --optimizer_type AdaFactor"):
        _options("--optimizer_type", "AdamW", "--lr_scheduler", "adafactor")


def test_adaptive_optimizer_warns_about_a_rate_far_from_one(caplog: pytest.LogCaptureFixture) -> None:
    options = _options("--optimizer_type", "Prodigy", "--learning_rate", "1e-4")

    with caplog.at_level(logging.WARNING, logger="library.training.optimizers"):
        build_optimizer(options, [{"params": [torch.nn.Parameter(torch.zeros(2))]}])

    assert "Prodigy estimates the learning rate itself" in caplog.text and "(0.0001)" in caplog.text


def test_dadapt_adam_keeps_per_group_rates_as_layer_scale() -> None:
    options = _options("--optimizer_type", "DAdaptation", "--learning_rate", "1.0")

    _, optimizer, _, _ = _train(options, steps=1, groups=2)

    assert [(group["lr"], group["layer_scale"]) for group in optimizer.param_groups] == [(1.0, 1.0), (1.0, 0.5)]


SPLIT_RATE_OPTIMIZERS = ["DAdaptAdaGrad", "DAdaptAdan", "DAdaptSGD", "DAdaptLion", "DAdaptAdamPreprint",
                         "DAdaptAdanIP", "Prodigy"]  # fmt: skip


@pytest.mark.parametrize("name", SPLIT_RATE_OPTIMIZERS)
def test_adaptive_optimizer_steps_each_group_by_its_share_of_the_adapted_rate(name: str) -> None:
    """The guide's `--unet_lr 1.0 --text_encoder_lr 0.5` works for every D-Adaptation variant: the second group
    moves exactly half as far as with equal rates, the first group exactly as far."""
    options = _options("--optimizer_type", name, "--learning_rate", "1.0", "--optimizer_args", "d0=0.01")

    def first_step(rates: tuple[float, float]) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64)
        start = [model.weight.detach().clone(), model.bias.detach().clone()]
        groups = [{"params": [model.weight], "lr": rates[0]}, {"params": [model.bias], "lr": rates[1]}]
        optimizer = build_optimizer(options, groups)
        model(torch.randn(8, 64)).pow(2).mean().backward()
        optimizer.step()
        return [(param.detach() - old).double() for param, old in zip((model.weight, model.bias), start)]

    even, split = first_step((1.0, 1.0)), first_step((1.0, 0.5))

    assert even[1].abs().max() > 1e-5
    assert torch.allclose(split[0], even[0], rtol=1e-3, atol=1e-9)
    assert torch.allclose(split[1], 0.5 * even[1], rtol=1e-2, atol=1e-7)


def test_adaptive_rates_are_d_times_each_group_rate() -> None:
    options = _options("--optimizer_type", "DAdaptAdam", "--learning_rate", "1.0")

    _, optimizer, scheduler, _ = _train(options, groups=2)

    d = optimizer.param_groups[0]["d"]
    assert d > 1e-6  # grew from its initial estimate d0
    rates = current_learning_rates(optimizer, scheduler, names=["unet", "textencoder"])
    assert rates == {"lr/unet": pytest.approx(d * 1.0), "lr/textencoder": pytest.approx(d * 0.5)}


def test_plain_rates_are_the_scheduled_group_rates() -> None:
    options = _options("--learning_rate", "1e-3", "--lr_scheduler", "linear")

    _, optimizer, scheduler, _ = _train(options, steps=5, groups=2)

    assert current_learning_rates(optimizer, scheduler) == {
        "lr/group0": pytest.approx(1.0 * 15 / 20),
        "lr/group1": pytest.approx(0.5 * 15 / 20),
    }


def test_schedule_free_mode_switches_between_train_and_eval_weights() -> None:
    model, optimizer, _, _ = _train(_options("--optimizer_type", "AdamWScheduleFree", "--learning_rate", "1e-2"))
    train_weights = model.weight.detach().clone()

    set_optimizer_mode(types.SimpleNamespace(optimizer=optimizer), training=False)  # as wrapped by accelerate
    eval_weights = model.weight.detach().clone()
    eval_mode = optimizer.param_groups[0]["train_mode"]
    set_optimizer_mode(optimizer, training=True)

    assert eval_mode is False and optimizer.param_groups[0]["train_mode"] is True
    assert not torch.allclose(eval_weights, train_weights)
    assert torch.allclose(model.weight.detach(), train_weights, atol=1e-6)


def test_schedule_free_starts_in_train_mode() -> None:
    options = _options("--optimizer_type", "SGDScheduleFree")

    optimizer = build_optimizer(options, [{"params": [torch.nn.Parameter(torch.zeros(2))]}])

    assert optimizer.param_groups[0]["train_mode"] is True


def test_set_optimizer_mode_leaves_other_optimizers_alone() -> None:
    model, optimizer, _, _ = _train(_options("--learning_rate", "1e-2"), steps=1)
    weights = model.weight.detach().clone()

    set_optimizer_mode(optimizer, training=False)

    assert torch.equal(model.weight.detach(), weights)


def test_schedule_free_with_a_decaying_schedule_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="library.training.optimizers"):
        _options("--optimizer_type", "AdamWScheduleFree", "--lr_scheduler", "cosine")

    assert "AdamWScheduleFree keeps its own schedule" in caplog.text


def test_adafactor_relative_step_warns_that_group_rates_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    options = _options("--optimizer_type", "AdaFactor")

    with caplog.at_level(logging.WARNING, logger="library.training.optimizers"):
        _train(options, steps=1, groups=2)

    assert "ignores the per-group learning rates [1.0, 0.5]" in caplog.text
