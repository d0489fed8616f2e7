"""Validation loss on held-out images, at fixed timesteps and fixed noise so values are comparable across steps.

The images come from `validation_split` / `is_val` in the dataset config (library/data/validation_split.py). Each
validation batch is noised with the same noise at every timestep of `VALIDATION_TIMESTEPS`, drawn from a CPU
generator seeded by the batch's index, so the numbers change only when the weights change; the training run's own
random numbers are not touched.
"""

from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from library.errors import ConfigError
from library.training.forward import encode_batch, predict_noised
from library.training.noise import NoiseOptions

if TYPE_CHECKING:
    from library.families.base import LoadedModels, ModelFamily
    from library.methods.base import TrainingMethod
    from library.training.trainer import Run

logger = logging.getLogger(__name__)

# Spread over the whole schedule (every family numbers its training timesteps 0..999): low timesteps show detail,
# high ones composition.
VALIDATION_TIMESTEPS = (100, 300, 500, 700, 900)
NOISE_SEED = 0  # the same noise in every run, so runs with different --seed compare too
PLAIN_NOISE = NoiseOptions()  # no offset / pyramid / input perturbation: the plain denoising error


def add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    """When the validation loss is computed (the images come from the dataset config)."""
    parser.add_argument(
        "--validate_every_n_steps",
        type=int,
        default=None,
        help="compute the validation loss every N steps (needs validation_split or is_val subsets in the dataset)",
    )
    parser.add_argument(
        "--validate_every_n_epochs",
        type=int,
        default=None,
        help="compute the validation loss every N epochs (default: every epoch when the dataset has validation "
        "images and no --validate_every_n_steps is given)",
    )


@dataclass
class ValidationOptions:
    """Typed validation options."""

    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    has_data: bool = False  # set by `check_dataset` once the dataset is built

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ValidationOptions:
        options = cls(getattr(args, "validate_every_n_steps", None), getattr(args, "validate_every_n_epochs", None))
        for name in ("every_n_steps", "every_n_epochs"):
            value = getattr(options, name)
            if value is not None and value < 1:
                raise ConfigError(f"--validate_{name} must be 1 or more, got {value}")
        return options

    def check_dataset(self, dataset) -> None:
        """Match the options with the dataset's validation images (before any model loads)."""
        validation = getattr(dataset, "validation", None)
        self.has_data = validation is not None and len(validation) > 0
        asked = self.every_n_steps is not None or self.every_n_epochs is not None
        if asked and not self.has_data:
            raise ConfigError(
                "--validate_every_n_steps / --validate_every_n_epochs need validation images: set validation_split "
                "in a [[datasets]] table or is_val = true in a [[datasets.subsets]] table of the dataset config"
            )
        if self.has_data and not asked:
            self.every_n_epochs = 1
            logger.info("validation loss after every epoch (--validate_every_n_steps / _epochs change this)")

    def due_after_step(self, global_step: int) -> bool:
        return self.has_data and self.every_n_steps is not None and global_step % self.every_n_steps == 0

    def due_after_epoch(self, epoch: int) -> bool:
        """`epoch` counts the finished epochs."""
        return self.has_data and self.every_n_epochs is not None and epoch % self.every_n_epochs == 0


def validation_losses(
    family: ModelFamily,
    models: LoadedModels,
    group,
    device: torch.device,
    autocast,
    method: TrainingMethod | None = None,
) -> dict[str, float]:
    """{"val/loss": mean over images and timesteps, "val/loss_t<T>": mean over images at timestep T}.

    `group` is the validation DatasetGroup; `autocast` a context factory (the run's `accelerator.autocast`); the
    method prepares the captions as in training (textual inversion spells out its token). The loss is the mean
    squared error against the family's target, unweighted and without masks.
    """
    sums = torch.zeros(len(VALIDATION_TIMESTEPS), dtype=torch.float64)
    count = 0
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), torch.no_grad():
        for index in range(len(group)):
            batch = group[index]
            torch.manual_seed(NOISE_SEED + index)  # VAE sampling draws from the global generator
            with autocast():
                sums += _batch_losses(family, method, models, batch, index, device)
            count += len(batch["captions"])
    means = (sums / max(count, 1)).tolist()
    losses = {f"val/loss_t{timestep}": value for timestep, value in zip(VALIDATION_TIMESTEPS, means, strict=True)}
    return {"val/loss": sum(means) / len(means), **losses}


def _batch_losses(
    family: ModelFamily, method: TrainingMethod | None, models: LoadedModels, batch: dict, index: int, device
) -> torch.Tensor:
    """Summed per-sample losses of one batch at each validation timestep (T,) float64."""
    encoded = encode_batch(family, method, models, batch, device, random.Random(NOISE_SEED + index))
    sums = []
    for timestep in VALIDATION_TIMESTEPS:
        generator = torch.Generator().manual_seed(NOISE_SEED + index)  # the same noise at every timestep
        timesteps = torch.full((encoded.latents.shape[0],), timestep, dtype=torch.long, device=device)
        prediction, inputs = predict_noised(family, models, encoded, generator, PLAIN_NOISE, timesteps)
        per_sample = F.mse_loss(prediction.float(), inputs.target.float(), reduction="none").mean(dim=(1, 2, 3))
        sums.append(per_sample.sum().double().cpu())
    return torch.stack(sums)


def run_validation(run: Run) -> dict[str, float]:
    """Compute, log and return the validation losses with the evaluation weights; main process only (every process
    with sharded modules)."""
    from library.training.evaluation import evaluation_weights

    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    losses: dict[str, float] = {}
    if accelerator.is_main_process or run.parallel.every_process_evaluates:  # sharded modules need every process
        with evaluation_weights(run, "validation"):
            losses = validation_losses(run.family, run.models, run.dataset.validation, accelerator.device,
                                       accelerator.autocast, run.method)  # fmt: skip
        if accelerator.is_main_process:
            _log(run, losses)
    accelerator.wait_for_everyone()
    return losses


def _log(run: Run, losses: dict[str, float]) -> None:
    step = run.state.global_step
    by_timestep = ", ".join(f"t{timestep} {losses[f'val/loss_t{timestep}']:.6f}" for timestep in VALIDATION_TIMESTEPS)
    logger.info("validation loss %.6f at step %d (%s)", losses["val/loss"], step, by_timestep)
    if run.options.tracking.trackers:
        from library.training.tracking import log_step_metrics

        log_step_metrics(run.accelerator, run.state.pending_metrics)  # trackers want the steps in order
        run.accelerator.log(losses, step=step)
