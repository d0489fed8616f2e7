"""Logging of training metrics to TensorBoard / wandb through accelerate's trackers."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass

import torch

from library.errors import ConfigError, MissingPackageError

logger = logging.getLogger(__name__)
TRACKERS = ("tensorboard", "wandb", "all")


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and how metrics are logged."""
    parser.add_argument(
        "--logging_dir",
        type=str,
        default=None,
        help="log metrics under this folder, in a subfolder named <log_prefix><date-time> (TensorBoard by default)",
    )
    parser.add_argument("--log_prefix", type=str, default=None, help="prefix of the dated log subfolder")
    parser.add_argument(
        "--log_with", type=str, default=None, choices=TRACKERS, help="tracker(s): tensorboard (default), wandb, all"
    )
    parser.add_argument(
        "--log_tracker_name", type=str, default=None, help="run/project name for the trackers (default: script name)"
    )
    parser.add_argument(
        "--log_tracker_config", type=str, default=None, help="TOML file with extra init options per tracker"
    )
    parser.add_argument("--wandb_api_key", type=str, default=None, help="wandb API key (never written anywhere)")


@dataclass
class TrackingOptions:
    """Typed tracking options."""

    logging_dir: str | None
    log_prefix: str | None
    log_with: str | None
    log_tracker_name: str | None
    log_tracker_config: str | None
    wandb_api_key: str | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrackingOptions:
        options = cls(
            args.logging_dir, args.log_prefix, args.log_with, args.log_tracker_name, args.log_tracker_config,
            args.wandb_api_key,
        )
        if options.log_with in ("wandb", "all"):
            try:
                import wandb  # noqa: F401
            except ImportError as err:
                raise MissingPackageError("--log_with wandb needs the wandb package: pip install wandb") from err
        if options.log_with in ("tensorboard", "all") and options.logging_dir is None:
            raise ConfigError(f"--log_with {options.log_with} needs --logging_dir (where the logs are written)")
        if options.log_tracker_config is not None and not os.path.isfile(options.log_tracker_config):
            raise ConfigError(f"--log_tracker_config: file not found: {options.log_tracker_config}")
        return options

    @property
    def trackers(self) -> list[str]:
        if self.log_with == "all":
            return ["tensorboard", "wandb"]
        if self.log_with:
            return [self.log_with]
        return ["tensorboard"] if self.logging_dir else []

    def run_dir(self) -> str | None:
        """The dated folder of this run's logs."""
        if self.logging_dir is None:
            return None
        return os.path.join(self.logging_dir, (self.log_prefix or "") + time.strftime("%Y%m%d%H%M%S"))


def start_trackers(accelerator, options: TrackingOptions, default_name: str, config: dict) -> None:
    """Initialise the trackers on the main process (no-op when none are asked for)."""
    if not options.trackers:
        return
    if options.wandb_api_key:
        os.environ.setdefault("WANDB_API_KEY", options.wandb_api_key)
    init_kwargs = {}
    if options.log_tracker_config:
        import toml

        init_kwargs = toml.load(options.log_tracker_config)
    accelerator.init_trackers(options.log_tracker_name or default_name, config=hparams(config), init_kwargs=init_kwargs)
    logger.info("logging metrics with %s", ", ".join(options.trackers))


def hparams(config: dict) -> dict[str, int | float | str | bool]:
    """Options as TensorBoard hparams, which take only scalars and strings: paths as text, lists as JSON."""
    return {key: _hparam(value) for key, value in config.items()}


def _hparam(value: object) -> int | float | str | bool:
    if isinstance(value, (int, float, str, bool)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return json.dumps(value, default=str)


@dataclass
class StepMetrics:
    """One step's metrics: device tensors (read back later, all at once) and plain numbers."""

    step: int
    tensors: dict[str, torch.Tensor]
    values: dict[str, float]


def log_step_metrics(accelerator, pending: list[StepMetrics]) -> None:
    """Send buffered per-step metrics to the trackers with one device read-back, in step order; empty the buffer.

    Every step gets its own point in the curves while the device syncs only when the buffer is flushed (the loop's
    progress interval), not on every step.
    """
    if not pending:
        return
    read = iter(torch.stack([value.detach().float().reshape(()) for item in pending
                             for value in item.tensors.values()]).tolist())
    for item in pending:
        logs = {name: next(read) for name in item.tensors}
        logs.update(item.values)
        accelerator.log(logs, step=item.step)
    pending.clear()
