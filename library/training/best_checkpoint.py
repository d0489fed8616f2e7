"""Validation that acts: --save_best keeps the result with the lowest validation loss as `<output_name>-best`, and
--early_stopping_patience ends the run when the loss stops improving. The tracking is part of the training state."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from library.errors import ConfigError

if TYPE_CHECKING:
    from library.training.trainer import Run
    from library.training.validation import ValidationOptions

logger = logging.getLogger(__name__)

STATE_FILE = "best_checkpoint.json"  # in a training state folder
BEST_SUFFIX = "-best"
LOSS_KEY = "ss_validation_loss"  # metadata of the -best file: the loss that made it the best (ss_steps: its step)


def add_best_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """What the validation loss decides: the best checkpoint kept, and when to stop."""
    parser.add_argument(
        "--save_best",
        action="store_true",
        help="after each validation whose loss is the lowest so far, save the result as <output_name>-best (its step "
        f"in ss_steps, its loss in {LOSS_KEY}); needs validation images",
    )
    parser.add_argument(
        "--early_stopping_patience",
        type=int,
        default=None,
        help="stop training after N validations in a row without improvement (the final result and state are saved "
        "as at the end of a run); needs validation images",
    )
    parser.add_argument(
        "--early_stopping_min_delta",
        type=float,
        default=None,
        help="with --early_stopping_patience: a validation improves when its loss is lower than the best one by more "
        "than this (default 0)",
    )


@dataclass
class BestCheckpointOptions:
    """Typed --save_best / early-stopping options."""

    save_best: bool = False
    patience: int | None = None
    min_delta: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BestCheckpointOptions:
        options = cls(
            getattr(args, "save_best", False),
            getattr(args, "early_stopping_patience", None),
            getattr(args, "early_stopping_min_delta", None),
        )
        options.validate()
        return options

    @property
    def enabled(self) -> bool:
        return self.save_best or self.patience is not None

    def validate(self) -> None:
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"--early_stopping_patience must be 1 or more, got {self.patience}")
        if self.min_delta is not None:
            if self.patience is None:
                raise ConfigError("--early_stopping_min_delta needs --early_stopping_patience (it defines improvement)")
            if self.min_delta < 0 or not math.isfinite(self.min_delta):
                raise ConfigError(f"--early_stopping_min_delta must be 0 or more, got {self.min_delta}")

    def check_validation(self, validation: ValidationOptions) -> None:
        """Both act on validation losses: refused without validation images (before any model loads)."""
        if self.enabled and not validation.has_data:
            asked = (("--save_best", self.save_best), ("--early_stopping_patience", self.patience is not None))
            given = " and ".join(name for name, on in asked if on)
            raise ConfigError(
                f"{given} act on the validation loss, and the dataset has no validation images: set validation_split "
                "in a [[datasets]] table or is_val = true in a [[datasets.subsets]] table of the dataset config"
            )


@dataclass
class BestCheckpoint:
    """The best validation so far and the evaluations since the last improvement; the same on every process."""

    options: BestCheckpointOptions
    best_loss: float | None = None
    best_step: int | None = None
    best_path: str | None = None  # the -best file (--save_best)
    improved_loss: float | None = None  # the loss of the last improvement by more than --early_stopping_min_delta
    evaluations_since: int = 0  # validations since that improvement
    stopped: bool = field(default=False, compare=False)  # early stopping ended this run

    def after_validation(self, run: Run, losses: dict[str, float]) -> None:
        """Keep the best result and count towards early stopping (every process calls this)."""
        loss = _shared_loss(run.accelerator, losses)
        step = run.state.global_step
        if math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss):
            self._keep(run, loss, step)
        if self.options.patience is None:
            return
        min_delta = self.options.min_delta or 0.0
        if math.isfinite(loss) and (self.improved_loss is None or loss < self.improved_loss - min_delta):
            self.improved_loss, self.evaluations_since = loss, 0
            return
        self.evaluations_since += 1
        if self.evaluations_since >= self.options.patience:
            self.stopped = True
            logger.info("early stopping at step %d: %d validation(s) in a row without a loss below %s by more than "
                        "%g", step, self.evaluations_since, _number(self.improved_loss), min_delta)  # fmt: skip

    def _keep(self, run: Run, loss: float, step: int) -> None:
        if self.options.save_best:
            from library.training.run_outputs import save_result

            name = run.options.loop.output_name + BEST_SUFFIX
            path = save_result(run, name, metadata={LOSS_KEY: repr(loss)})
            if path is None:  # no room: the previous -best file stays, and stays the best on record
                return
            self.best_path = path
        self.best_loss, self.best_step = loss, step

    def report(self) -> None:
        """Say which checkpoint was best (at the end of the run)."""
        if self.best_step is None:
            logger.warning("no validation gave a finite loss: there is no best checkpoint")
            return
        where = f", saved as {self.best_path}" if self.best_path else ""
        logger.info("best validation loss %.6f at step %d%s", self.best_loss, self.best_step, where)

    # ---- the training state -------------------------------------------------------------------------------------

    def save_to(self, folder: str) -> None:
        values = {key: value for key, value in asdict(self).items() if key not in ("options", "stopped")}
        with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump(values, handle, indent=1)

    def load_from(self, folder: str, global_step: int) -> None:
        """Continue the tracking of the run that saved the state (a state without it starts afresh)."""
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            logger.info("the state %s holds no validation tracking; the best checkpoint is tracked from step %d on",
                        folder, global_step)  # fmt: skip
            return
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
        for key, value in values.items():
            setattr(self, key, value)


def start_best_checkpoint(options: BestCheckpointOptions) -> BestCheckpoint | None:
    return BestCheckpoint(options) if options.enabled else None


def _shared_loss(accelerator, losses: dict[str, float]) -> float:
    """The validation loss, which only the main process computes, on every process."""
    loss = losses.get("val/loss", math.nan)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        loss = broadcast_object_list([loss], from_process=0)[0]
    return loss


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:.6f}"
