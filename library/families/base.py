"""The family interface: everything that differs between model architectures, so the loop never asks which."""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class LoadedModels:
    """The models of one family, ready for training."""

    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingInputs:
    """What the objective produces for one batch: model input, timesteps, target and per-sample weights."""

    noisy_latents: torch.Tensor  # (B, C, h, w)
    timesteps: torch.Tensor  # (B,)
    target: torch.Tensor  # (B, C, h, w)
    weights: torch.Tensor  # (B,) loss weight of each sample from the objective (1 when unweighted)


class ModelFamily(ABC):
    """One model architecture: options, loading, conditioning, objective, prediction, metadata."""

    id: ClassVar[str]

    def __init__(self, args: argparse.Namespace):
        self.args = args

    @classmethod
    @abstractmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the family's own command-line options."""

    @abstractmethod
    def validate(self) -> None:
        """Check the family's options (no model loading). Raise ConfigError on conflicts."""

    @abstractmethod
    def load(self, weight_dtype: torch.dtype) -> LoadedModels:
        """Load denoiser, VAE, text encoders and tokenizers from the user's files, offline when local."""

    @abstractmethod
    def encode_images(self, models: LoadedModels, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> raw VAE latents (B, C, H/f, W/f), as latent caches store them."""

    @abstractmethod
    def scale_latents(self, models: LoadedModels, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (fresh or cached) -> the denoiser's latent space (scale and shift applied)."""

    @abstractmethod
    def encode_text(self, models: LoadedModels, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions -> the conditioning tensors `predict` takes."""

    @abstractmethod
    def training_inputs(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> TrainingInputs:
        """Noise the latents at sampled timesteps and give the target the denoiser should predict."""

    @abstractmethod
    def predict(
        self, models: LoadedModels, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict
    ) -> torch.Tensor:
        """Run the denoiser."""

    def network_text_encoders(self, models: LoadedModels) -> list[torch.nn.Module]:
        """The text encoders as adapter-network plugins should see them (module names define LoRA key names)."""
        return models.text_encoders

    @abstractmethod
    def training_metadata(self) -> dict[str, str]:
        """`ss_*` keys describing the base model (version, v2, v-parameterization, clip skip ...)."""

    @abstractmethod
    def model_spec_architecture(self) -> str:
        """The `modelspec.architecture` base id, e.g. `stable-diffusion-v1` (the method appends `/lora`)."""
