"""The weights a run is evaluated with (sample images, validation loss, saved files): trained modules in eval mode,
schedule-free optimizers at their evaluation point. One context, so every evaluation sees the same weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from library.training.optimizers import set_optimizer_mode

if TYPE_CHECKING:
    from library.training.trainer import Run


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
def evaluation_weights(run: Run) -> Iterator[None]:
    """Inside: every model in eval mode and the optimizer's evaluation weights in place (schedule-free optimizers
    train at another point than the one they evaluate); afterwards the training weights and modes are back."""
    models = run.models
    modules = [models.denoiser, models.vae, *models.text_encoders, *run.method.trainable_modules()]
    set_optimizer_mode(run.optimizer, training=False)
    try:
        with evaluation_mode(modules):
            yield
    finally:
        set_optimizer_mode(run.optimizer, training=True)
