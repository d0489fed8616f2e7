"""Training state folders: everything needed to continue a run exactly where it stopped.

A state folder holds accelerate's state (trainable weights, optimizer, LR scheduler, grad scaler, RNG states),
the noise generator and `train_state.json` (step, epoch, position inside the epoch, seed). It is written into a
temporary folder that is renamed only when complete, and `train_state.json` is written last, so a process killed
during a save never leaves a folder that looks like a valid state.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass

import torch

from library.atomic import atomic_path
from library.errors import ConfigError

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
GENERATOR_FILE = "noise_generator.pt"
FORMAT_VERSION = 1


@dataclass
class Position:
    """Where a run stands: steps taken, the epoch (0-based) being trained and batches done in it."""

    global_step: int
    epoch: int
    step_in_epoch: int
    seed: int
    steps_per_epoch: int
    format_version: int = FORMAT_VERSION


def save_state(accelerator, folder: str, position: Position, generator: torch.Generator) -> None:
    """Write a complete state folder atomically (all processes call this; the main process writes)."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    with atomic_path(folder, suffix="") as temp:
        accelerator.save_state(temp)
        torch.save(generator.get_state(), os.path.join(temp, GENERATOR_FILE))
        with open(os.path.join(temp, STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump(asdict(position), handle, indent=1)
    logger.info("saved training state %s (step %d)", folder, position.global_step)
    accelerator.wait_for_everyone()


def read_position(folder: str) -> Position:
    """The position stored in a state folder; a folder without a complete state is refused clearly."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise ConfigError(
            f"--resume: {folder} is not a complete training state (no {STATE_FILE}); it may be the leftover of an "
            "interrupted save. Resume from an earlier ...-state folder"
        )
    with open(path, encoding="utf-8") as handle:
        values = json.load(handle)
    if values.get("format_version") != FORMAT_VERSION:
        version = values.get("format_version")
        raise ConfigError(f"--resume: {folder} was written by an incompatible version (format {version})")
    return Position(**values)


def load_state(accelerator, folder: str, generator: torch.Generator) -> Position:
    """Restore weights, optimizer, scheduler, RNG and noise generator from a state folder."""
    position = read_position(folder)
    accelerator.load_state(folder)
    generator.set_state(torch.load(os.path.join(folder, GENERATOR_FILE), weights_only=True))
    logger.info(
        "resumed from %s: step %d, epoch %d, %d batches into the epoch",
        folder,
        position.global_step,
        position.epoch + 1,
        position.step_in_epoch,
    )
    return position
