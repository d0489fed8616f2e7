"""The method interface: which parameters train, with which learning rates, and how the result is saved."""

from __future__ import annotations

import argparse
import dataclasses
import random
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from library.families.base import LoadedModels, ModelFamily


class MethodOptions:
    """Base of a method's typed options: a dataclass whose fields are named like the options they come from."""

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


class TrainingMethod(ABC):
    """One way of training a family's models."""

    name: ClassVar[str]
    adapter: ClassVar[str | None] = None  # model-spec adapter suffix, e.g. "lora"
    trains_base_weights: ClassVar[bool] = False  # the base model's own weights train (fine-tuning, DreamBooth)
    options_class: ClassVar[type[MethodOptions]]  # the typed options the method reads (built from the parsed args)

    def __init__(self, args: argparse.Namespace):
        self.options = self.options_class.from_args(args)

    @classmethod
    @abstractmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the method's own options."""

    @classmethod
    def default_options(cls) -> dict:
        """Defaults of shared options that suit this method better (e.g. a learning rate); applied by the parser."""
        return {}

    @abstractmethod
    def validate(self) -> None:
        """Check the method's options before any model loads."""

    @abstractmethod
    def setup(self, family: ModelFamily, models: LoadedModels) -> list[dict]:
        """Make the trainable parameters; return optimizer parameter groups (each may carry its `lr`)."""

    @property
    @abstractmethod
    def trains_text_encoder(self) -> bool:
        """Whether gradients flow through the text encoders (else text is encoded without grad)."""

    @abstractmethod
    def trainable_modules(self) -> list[torch.nn.Module]:
        """Modules whose parameters train (handed to accelerate)."""

    @property
    def uses_every_trained_parameter(self) -> bool:
        """Whether every step uses the same trained parameters (some may never get a gradient). With several
        processes, a method whose set changes (module dropout, a part that stops training mid-run) makes DDP look
        for the unused ones in every step."""
        return True

    def check_dataset(self, family: ModelFamily, dataset) -> None:
        """Checks of the method against the scanned datasets (before any model loads); warnings only by default."""

    def on_epoch_start(self, models: LoadedModels) -> None:
        """Hook at the start of every epoch."""

    def on_step_start(self, models: LoadedModels, global_step: int) -> None:
        """Hook before every step (`global_step` counts the steps already taken)."""

    def prepare_captions(self, captions: list[str], rng: random.Random | None = None) -> list[str]:
        """The captions the text encoders see for a batch (e.g. with a learned token's placeholders spelt out).

        Random choices draw from `rng` when given (validation), else from the method's own generator.
        """
        return captions

    def encode_conditioning(
        self, family: ModelFamily, models: LoadedModels, captions: list[str], batch: dict
    ) -> dict[str, torch.Tensor]:
        """The conditioning of a batch's (prepared) captions; the family's, unless the method conditions otherwise
        (XTI encodes the captions once per UNet cross-attention layer)."""
        return family.encode_conditioning(models, captions, batch)

    @abstractmethod
    def output_extension(self) -> str:
        """File extension of the saved result, with the dot."""

    @abstractmethod
    def save(self, path: str, metadata: dict[str, str], unwrap) -> None:
        """Write the trained result to `path` atomically. `unwrap` undoes accelerate's wrapping of a module."""

    def metadata(self) -> dict[str, str]:
        """`ss_*` keys describing the method's settings."""
        return {}
