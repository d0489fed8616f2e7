"""When and under which names trained results and training states are saved, and which old ones are removed."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass

from library.errors import ConfigError
from library.training.state import STATE_FILE

logger = logging.getLogger(__name__)


def add_saving_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that decide when results and states are written."""
    parser.add_argument(
        "--save_precision",
        type=str,
        default=None,
        choices=["float", "fp16", "bf16"],
        help="precision of saved weights (default: as trained)",
    )
    parser.add_argument("--save_every_n_epochs", type=int, default=None, help="also save after every N epochs")
    parser.add_argument("--save_every_n_steps", type=int, default=None, help="also save after every N steps")
    parser.add_argument(
        "--save_last_n_epochs",
        type=int,
        default=None,
        help="keep only the results of the last N epoch saves (older ones are removed)",
    )
    parser.add_argument(
        "--save_last_n_steps",
        type=int,
        default=None,
        help="keep only the step saves of the last N steps (older ones are removed)",
    )
    parser.add_argument(
        "--save_state",
        action="store_true",
        help="with every save, also write the training state (<name>-state folder) that --resume continues from",
    )
    parser.add_argument(
        "--save_state_on_train_end", action="store_true", help="write the training state at the end of training"
    )
    parser.add_argument(
        "--resume", type=str, default=None, help="continue training from this state folder (a ...-state folder)"
    )


@dataclass
class SaveOptions:
    """Typed saving options."""

    output_dir: str
    output_name: str
    save_every_n_epochs: int | None
    save_every_n_steps: int | None
    save_last_n_epochs: int | None
    save_last_n_steps: int | None
    save_state: bool
    save_state_on_train_end: bool
    resume: str | None
    resume_from_hub: bool = False  # --resume names a state on the hub, downloaded after every check

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SaveOptions":
        options = cls(
            output_dir=args.output_dir,
            output_name=args.output_name,
            save_every_n_epochs=args.save_every_n_epochs,
            save_every_n_steps=args.save_every_n_steps,
            save_last_n_epochs=args.save_last_n_epochs,
            save_last_n_steps=args.save_last_n_steps,
            save_state=args.save_state,
            save_state_on_train_end=args.save_state_on_train_end,
            resume=args.resume,
            resume_from_hub=args.resume_from_huggingface,
        )
        options.validate()
        return options

    def validate(self) -> None:
        for name in ("save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs", "save_last_n_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be 1 or more, got {value}")
        if self.save_last_n_epochs and not self.save_every_n_epochs:
            raise ConfigError("--save_last_n_epochs needs --save_every_n_epochs (it limits those saves)")
        if self.save_last_n_steps and not self.save_every_n_steps:
            raise ConfigError("--save_last_n_steps needs --save_every_n_steps (it limits those saves)")
        if self.resume is not None and not self.resume_from_hub:
            self.resume = local_state_folder(self.resume)

    def epoch_name(self, epoch: int) -> str:
        return f"{self.output_name}-{epoch:06d}"

    def step_name(self, step: int) -> str:
        return f"{self.output_name}-step{step:08d}"

    def is_epoch_save(self, epoch: int) -> bool:
        return bool(self.save_every_n_epochs) and epoch % self.save_every_n_epochs == 0

    def is_step_save(self, step: int) -> bool:
        return bool(self.save_every_n_steps) and step % self.save_every_n_steps == 0

    def stale_epoch(self, epoch: int) -> int | None:
        """The epoch whose save falls out of the --save_last_n_epochs window when `epoch` is saved."""
        if not self.save_last_n_epochs:
            return None
        stale = epoch - self.save_every_n_epochs * self.save_last_n_epochs
        return stale if stale > 0 else None

    def stale_steps(self, step: int) -> int:
        """Step saves at or below this step fall out of the --save_last_n_steps window (0: none)."""
        if not self.save_last_n_steps:
            return 0
        return max(0, step - self.save_last_n_steps)


def local_state_folder(path: str) -> str:
    """The state folder --resume names: the folder itself, or in an output folder its newest state."""
    if os.path.isfile(path):
        raise ConfigError(
            f"--resume takes a training state folder (<name>-state) and {path} is a file; to start from saved network "
            "weights use --network_weights"
        )
    if not os.path.isdir(path):
        raise ConfigError(f"--resume: state folder not found: {path}")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    newest = newest_state(path)
    if newest is None:
        return path  # reading it names what is missing
    logger.info("--resume %s: continuing from its newest training state, %s", path, newest)
    return newest


def newest_state(folder: str) -> str | None:
    """The state folder below `folder` with the most steps (complete states only)."""
    best: tuple[int, str] | None = None
    for entry in os.scandir(folder):
        state_file = os.path.join(entry.path, STATE_FILE)
        if entry.is_dir() and not entry.name.startswith(".") and os.path.isfile(state_file):
            try:
                with open(state_file, encoding="utf-8") as handle:
                    step = int(json.load(handle)["global_step"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if best is None or step > best[0]:
                best = (step, entry.path)
    return None if best is None else best[1]


def remove_path(path: str) -> None:
    """Remove an old result file or state folder if present, and say so."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
    else:
        return
    logger.info("removed old %s", path)


def step_saves(output_dir: str, output_name: str) -> list[tuple[int, str]]:
    """(step, path) of every step save of this run's name in `output_dir`, results and states."""
    # results are files with an extension, or folders (diffusers format); states are -state folders
    pattern = re.compile(re.escape(output_name) + r"-step(\d{8})(?:-state|\.[A-Za-z0-9_]+)?$")
    found = []
    for entry in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = pattern.match(entry)
        if match:
            found.append((int(match.group(1)), os.path.join(output_dir, entry)))
    return found
