"""The weights a run is evaluated with (sample images, validation loss, saved files): trained modules in eval mode,
schedule-free optimizers at their evaluation point, the EMA weights where --ema_for_samples / --save_ema /
--save_both ask for them. One context, so every evaluation sees the weights its options name."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import torch

from library.training.ema import uses_ema
from library.training.optimizers import set_optimizer_mode

if TYPE_CHECKING:
    from library.training.trainer import Run

Purpose = Literal["samples", "validation", "result", "ema_result"]  # "ema_result": the EMA copy of --save_both


@contextlib.contextmanager
def evaluation_mode(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Put `modules` in eval mode (no dropout) and restore every submodule's own mode afterwards."""
    modes = [(module, module.training) for root in modules for module in root.modules()]
    for root in modules:
        root.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def evaluation_weights(run: Run, purpose: Purpose) -> Iterator[None]:
    """Inside: every model in eval mode and the weights `purpose` is evaluated with in place: the optimizer's
    evaluation weights (schedule-free optimizers train at another point than the one they evaluate), or the EMA's
    (library/training/ema.py `uses_ema`); afterwards the training weights and modes are back, bit for bit."""
    models = run.models
    modules = [models.denoiser, models.vae, *models.text_encoders, *run.method.trainable_modules()]
    weights = run.ema.in_place() if uses_ema(run.ema, purpose) else contextlib.nullcontext()
    set_optimizer_mode(run.optimizer, training=False)
    try:
        with evaluation_mode(modules), weights:
            yield
    finally:
        set_optimizer_mode(run.optimizer, training=True)
