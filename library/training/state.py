"""Training state folders: everything needed to continue a run exactly where it stopped.

A state folder holds accelerate's state (trainable weights, optimizer, LR scheduler, grad scaler, RNG states),
the noise generator, the run's own parts (the EMA with --ema, the best-checkpoint tracking) and `train_state.json`
(step, epoch, position inside the epoch, seed). It is written into a temporary folder that is renamed only when
complete, and `train_state.json` is written last, so a process killed during a save never leaves a folder that looks
like a valid state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import torch

from library.atomic import atomic_path
from library.errors import ConfigError

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
GENERATOR_FILE = "noise_generator.pt"
FORMAT_VERSION = 1
# The parts a state saved before states listed their files must have (one process).
LEGACY_PARTS = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", GENERATOR_FILE)


@dataclass
class Position:
    """Where a run stands: steps taken, the epoch (0-based) being trained and batches done in it."""

    global_step: int
    epoch: int
    step_in_epoch: int
    seed: int
    steps_per_epoch: int
    format_version: int = FORMAT_VERSION
    family: str | None = None  # what saved it: a state of another family or method cannot continue here
    method: str | None = None
    files: dict[str, int] | None = None  # every other file of the folder with its size, checked before resuming


class StatePart(Protocol):
    """A part of the run that a state folder holds beside accelerate's state (the EMA, the best-checkpoint tracking),
    in files of its own, so that a state saved with or without it still resumes."""

    def save_to(self, folder: str) -> None:
        """Write the part's files into `folder` (inside the state's atomic write)."""

    def load_from(self, folder: str, global_step: int) -> None:
        """Restore the part from a state folder (after the weights); say so when the folder lacks it."""


def save_state(
    accelerator, folder: str, position: Position, generator: torch.Generator, parts: Sequence[StatePart] = ()
) -> None:
    """Write a complete state folder atomically. All processes call this: each writes its own random states
    (accelerate's `random_states_<process>.pkl`), the main process everything else; the folder gets its name only
    when every process has written its part."""
    from library.training.parallel import broadcast_from_main

    accelerator.wait_for_everyone()
    if accelerator.num_processes == 1:
        with atomic_path(folder, suffix="") as temp:
            _write_state(accelerator, temp, position, generator, parts)
        logger.info("saved training state %s (step %d)", folder, position.global_step)
        return
    with atomic_path(folder, suffix="") if accelerator.is_main_process else contextlib.nullcontext() as temp:
        temp = broadcast_from_main(temp)  # the main process's temporary folder (a shared file system)
        accelerator.save_state(temp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_state(accelerator, temp, position, generator, parts, accelerate_state_written=True)
    accelerator.wait_for_everyone()  # renamed: every process sees the complete folder from here on
    if accelerator.is_main_process:
        logger.info("saved training state %s (step %d)", folder, position.global_step)


def _write_state(
    accelerator,
    temp: str,
    position: Position,
    generator: torch.Generator,
    parts: Sequence[StatePart],
    accelerate_state_written: bool = False,
) -> None:
    if not accelerate_state_written:
        accelerator.save_state(temp)
    torch.save(generator.get_state(), os.path.join(temp, GENERATOR_FILE))
    for part in parts:
        part.save_to(temp)
    position = replace(position, files=_file_sizes(temp))
    with open(os.path.join(temp, STATE_FILE), "w", encoding="utf-8") as handle:
        json.dump(asdict(position), handle, indent=1)


def _file_sizes(folder: str) -> dict[str, int]:
    """Size of every file below `folder` (relative paths), the state file itself left out."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            sizes[os.path.relpath(path, folder)] = os.path.getsize(path)
    sizes.pop(STATE_FILE, None)
    return sizes


def read_position(folder: str) -> Position:
    """The position stored in a state folder; a folder without a complete state is refused clearly."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(path):
        raise ConfigError(
            f"--resume: {folder} is not a complete training state (no {STATE_FILE}); it may be the leftover of an "
            "interrupted save. Resume from an earlier ...-state folder"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
        version = values.get("format_version")
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"--resume: {path} is damaged ({err}); resume from another ...-state folder") from None
    if version != FORMAT_VERSION:
        raise ConfigError(f"--resume: {folder} was written by an incompatible version (format {version})")
    try:
        position = Position(**values)
    except TypeError as err:
        raise ConfigError(f"--resume: {path} is damaged ({err}); resume from another ...-state folder") from None
    check_files(folder, position)
    return position


def check_files(folder: str, position: Position) -> None:
    """Every file the state was saved with is there, at its size; else ConfigError naming what is missing or cut
    short (a state missing a part would resume inexactly without a word)."""
    expected = position.files if position.files is not None else dict.fromkeys(LEGACY_PARTS, None)
    problems = []
    for name, size in expected.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
        elif size is not None and os.path.getsize(path) != size:
            problems.append(f"{name} has {os.path.getsize(path)} of its {size} bytes")
    if problems:
        raise ConfigError(
            f"--resume: the training state {folder} is damaged: {'; '.join(problems)}. Resume from another "
            "...-state folder (or start over)"
        )


def check_origin(folder: str, position: Position, family: str, method: str) -> None:
    """A state of another family or method cannot continue this run."""
    saved = (position.family, position.method)
    if None not in saved and saved != (family, method):
        raise ConfigError(
            f"--resume: {folder} was saved by a {position.family} {position.method} run; this script trains "
            f"{family} with the {method} method. Use the script that saved it"
        )


def load_state(accelerator, folder: str, generator: torch.Generator, parts: Sequence[StatePart] = ()) -> Position:
    """Restore weights, optimizer, scheduler, RNG, noise generator and the run's other `parts` from a state folder."""
    position = read_position(folder)
    try:
        accelerator.load_state(folder)
        generator.set_state(torch.load(os.path.join(folder, GENERATOR_FILE), weights_only=True))
    except (RuntimeError, ValueError, KeyError) as err:
        detail = str(err).strip().splitlines()[0][:300]
        raise ConfigError(
            f"--resume: {folder} does not fit this run ({detail}); resume with the options of the run that saved it "
            "(the same --network_dim, --network_args, model and script)"
        ) from None
    for part in parts:
        part.load_from(folder, position.global_step)
    logger.info(
        "resumed from %s: step %d, epoch %d, %d batches into the epoch",
        folder,
        position.global_step,
        position.epoch + 1,
        position.step_in_epoch,
    )
    return position
