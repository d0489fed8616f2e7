"""Optimizers and learning-rate schedules, built from the command-line strings."""

from __future__ import annotations

import argparse
import ast
import logging
from dataclasses import dataclass

import torch

from library.errors import ConfigError

logger = logging.getLogger(__name__)

OPTIMIZERS = {"adamw": torch.optim.AdamW}
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    """Optimizer and schedule options."""
    parser.add_argument("--optimizer_type", type=str, default="AdamW", help="optimizer (case-insensitive): AdamW")
    parser.add_argument(
        "--optimizer_args",
        type=str,
        nargs="*",
        default=[],
        help='extra optimizer arguments as key=value, e.g. "weight_decay=0.01" "betas=0.9,0.999"',
    )
    parser.add_argument("--learning_rate", type=float, default=2e-6, help="learning rate")
    parser.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this value (0 disables clipping)"
    )
    parser.add_argument(
        "--lr_scheduler", type=str, default="constant", choices=SCHEDULERS, help="learning-rate schedule"
    )
    parser.add_argument(
        "--lr_warmup_steps",
        type=float,
        default=0,
        help="warm-up steps of the schedule; a value below 1 is a fraction of the total steps",
    )


@dataclass
class OptimizerOptions:
    """Typed optimizer options."""

    optimizer_type: str
    optimizer_args: dict
    learning_rate: float
    max_grad_norm: float
    lr_scheduler: str
    lr_warmup_steps: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "OptimizerOptions":
        options = cls(
            optimizer_type=args.optimizer_type,
            optimizer_args=parse_key_values(args.optimizer_args or [], "--optimizer_args"),
            learning_rate=args.learning_rate,
            max_grad_norm=args.max_grad_norm,
            lr_scheduler=args.lr_scheduler,
            lr_warmup_steps=args.lr_warmup_steps,
        )
        if options.optimizer_type.lower() not in OPTIMIZERS:
            raise ConfigError(
                f"--optimizer_type {options.optimizer_type!r} is not supported; choose one of: "
                + ", ".join(sorted(OPTIMIZERS))
            )
        if options.lr_warmup_steps < 0:
            raise ConfigError(f"--lr_warmup_steps must not be negative, got {options.lr_warmup_steps}")
        return options


def parse_value(text: str):
    """A command-line value as a Python literal: numbers, booleans, tuples (`0.9,0.999`), else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_key_values(items: list[str], option: str) -> dict:
    """`["a=1", "b=0.9,0.999"]` -> `{"a": 1, "b": (0.9, 0.999)}`; a malformed item names the option."""
    result = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{option}: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        result[key.strip()] = parse_value(value)
    return result


def build_optimizer(options: OptimizerOptions, param_groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer over the given parameter groups (each may carry its own `lr`)."""
    optimizer_class = OPTIMIZERS[options.optimizer_type.lower()]
    try:
        optimizer = optimizer_class(param_groups, lr=options.learning_rate, **options.optimizer_args)
    except TypeError as err:
        raise ConfigError(f"--optimizer_args do not fit {optimizer_class.__name__}: {err}") from err
    logger.info("optimizer %s, args %s", optimizer_class.__name__, options.optimizer_args)
    return optimizer


def build_lr_scheduler(options: OptimizerOptions, optimizer: torch.optim.Optimizer, total_steps: int):
    """The learning-rate schedule (diffusers' implementations); warm-up as a count or a fraction of the steps."""
    from diffusers.optimization import get_scheduler

    warmup = options.lr_warmup_steps
    warmup_steps = int(warmup * total_steps) if 0 < warmup < 1 else int(warmup)
    if options.lr_scheduler == "constant" and warmup_steps:
        raise ConfigError("--lr_warmup_steps needs a schedule with warm-up, e.g. --lr_scheduler constant_with_warmup")
    return get_scheduler(
        options.lr_scheduler, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps
    )
