"""LR schedules built from command-line strings follow their formulas, per parameter group."""

import argparse
import logging
import math

import pytest
import torch

from library.errors import ConfigError, MissingPackageError
from library.training.lr_schedulers import warmup_step_count
from library.training.optimizers import OptimizerOptions, add_optimizer_arguments, build_lr_scheduler

UNET_LR = 1e-4
TEXT_ENCODER_LR = 1e-5
TOTAL_STEPS = 20


def _options(*cli: str) -> OptimizerOptions:
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    return OptimizerOptions.from_args(parser.parse_args(["--optimizer_type", "SGD", "--learning_rate", "1e-4", *cli]))


def _rates_per_step(*cli: str, total_steps: int = TOTAL_STEPS) -> list[tuple[float, float]]:
    """(unet, text encoder) rates before each of `total_steps` steps, for two groups as the network method makes."""
    options = _options(*cli)
    optimizer = torch.optim.SGD(
        [
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": UNET_LR},
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": TEXT_ENCODER_LR},
        ],
        lr=options.learning_rate,
    )
    scheduler = build_lr_scheduler(options, optimizer, total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(tuple(group["lr"] for group in optimizer.param_groups))
        optimizer.step()
        scheduler.step()
    return rates


def _assert_follows(rates: list[tuple[float, float]], factor) -> None:
    """Both groups follow `factor(step)` times their own base rate, so their ratio never changes."""
    for step, (unet, text_encoder) in enumerate(rates):
        assert unet == pytest.approx(UNET_LR * factor(step), abs=1e-15), f"step {step}"
        assert text_encoder == pytest.approx(TEXT_ENCODER_LR * factor(step), abs=1e-16), f"step {step}"


def test_constant_keeps_each_group_rate() -> None:
    _assert_follows(_rates_per_step("--lr_scheduler", "constant"), lambda step: 1.0)


def test_constant_with_warmup_ramps_then_holds() -> None:
    rates = _rates_per_step("--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "4")

    _assert_follows(rates, lambda step: min(step / 4, 1.0))


def test_linear_warms_up_then_decays_to_zero() -> None:
    rates = _rates_per_step("--lr_scheduler", "LINEAR", "--lr_warmup_steps", "4")

    _assert_follows(rates, lambda step: step / 4 if step < 4 else (TOTAL_STEPS - step) / (TOTAL_STEPS - 4))


def test_cosine_follows_half_a_cosine_after_warmup() -> None:
    rates = _rates_per_step("--lr_scheduler", "cosine", "--lr_warmup_steps", "4")

    def factor(step: int) -> float:
        return step / 4 if step < 4 else 0.5 * (1 + math.cos(math.pi * (step - 4) / (TOTAL_STEPS - 4)))

    _assert_follows(rates, factor)


def test_cosine_with_restarts_restarts_num_cycles_times() -> None:
    rates = _rates_per_step("--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "4")

    _assert_follows(rates, lambda step: 0.5 * (1 + math.cos(math.pi * ((4 * step / TOTAL_STEPS) % 1.0))))
    assert [step for step in range(TOTAL_STEPS) if rates[step][0] == pytest.approx(UNET_LR)] == [0, 5, 10, 15]


def test_polynomial_decays_with_the_given_power() -> None:
    rates = _rates_per_step(
        "--lr_scheduler", "polynomial", "--lr_scheduler_power", "2", "--lr_warmup_steps", "2",
        "--scheduler_args", "lr_end=0",
    )  # fmt: skip

    _assert_follows(rates, lambda step: step / 2 if step < 2 else (1 - (step - 2) / (TOTAL_STEPS - 2)) ** 2)


def test_polynomial_ends_at_lr_end_relative_to_the_learning_rate() -> None:
    rates = _rates_per_step("--lr_scheduler", "polynomial", "--lr_scheduler_power", "0.5")

    end = 1e-7 / UNET_LR  # diffusers' default lr_end, relative to --learning_rate
    _assert_follows(rates, lambda step: (1 - end) * (1 - step / TOTAL_STEPS) ** 0.5 + end)


def test_warmup_ratio_is_a_fraction_of_the_total_steps() -> None:
    rates = _rates_per_step("--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "0.25")

    _assert_follows(rates, lambda step: min(step / 5, 1.0))
    assert warmup_step_count(0.1, 25) == 2 and warmup_step_count(7, 25) == 7


def test_module_class_schedule_takes_scheduler_args() -> None:
    rates = _rates_per_step(
        "--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--scheduler_args", "step_size=3", "gamma=0.5"
    )

    _assert_follows(rates, lambda step: 0.5 ** (step // 3))


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        (["--lr_scheduler", "cosin"], r"--lr_scheduler 'cosin' is unknown. Did you mean 'cosine'"),
        (["--lr_warmup_steps", "10"], r"--lr_warmup_steps has no effect with --lr_scheduler constant"),
        (["--lr_scheduler", "linear", "--lr_warmup_steps", "2.5"], r"give a whole step count"),
        (["--lr_scheduler", "linear", "--lr_warmup_steps", "-1"], r"must not be negative"),
        (["--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "0"], r"at least 1"),
        (["--lr_scheduler", "polynomial", "--lr_scheduler_power", "0"], r"--lr_scheduler_power must be positive"),
        (["--lr_scheduler", "polynomial", "--scheduler_args", "power=2"], r"set it with --lr_scheduler_power"),
        (["--lr_scheduler", "linear", "--scheduler_args", "lr_end=0"], r"linear schedule does not take it"),
        (
            ["--lr_scheduler", "torch.optim.lr_scheduler.StepLR", "--scheduler_args", "step=2"],
            r"step: the torch.optim.lr_scheduler.StepLR schedule does not take it; it takes: gamma, last_epoch",
        ),
        (["--lr_scheduler", "torch.optim.lr_scheduler.NoSuchLR"], r"has no attribute 'NoSuchLR'"),
    ],
)
def test_bad_schedule_options_are_config_errors(cli: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _options(*cli)


def test_schedule_from_a_missing_package_names_it() -> None:
    with pytest.raises(MissingPackageError, match="pip install no_such_schedule_pkg"):
        _options("--lr_scheduler", "no_such_schedule_pkg.Warmup")


def test_num_cycles_for_another_schedule_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="library.training.lr_schedulers"):
        _options("--lr_scheduler", "cosine", "--lr_scheduler_num_cycles", "3")

    assert "only used by cosine_with_restarts; ignored for cosine" in caplog.text


def test_schedule_that_fails_to_build_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="lr_end .* must be smaller than initial lr"):
        _rates_per_step("--lr_scheduler", "polynomial", "--scheduler_args", "lr_end=1")
