"""The family interface: everything that differs between model architectures, so the loop never asks which."""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from library.adapters.targets import TargetTable
from library.data.cache_files import tensors_fingerprint
from library.data.text_cache import TextCacheOptions, TextOutputCache, cache_text_outputs
from library.errors import ConfigError
from library.models import LoadedModels
from library.training.block_swap import OffloadOptions, check_blocks_to_swap
from library.training.noise import NoiseOptions

if TYPE_CHECKING:
    from library.methods.base import TrainingMethod

__all__ = ["LoadedModels", "ModelFamily", "TrainingInputs"]


@dataclass
class TrainingInputs:
    """What the objective produces for one batch: model input, timesteps, target and per-sample weights."""

    noisy_latents: torch.Tensor  # (B, C, h, w)
    timesteps: torch.Tensor  # (B,)
    target: torch.Tensor  # (B, C, h, w)
    weights: torch.Tensor  # (B,) loss weight of each sample from the objective (1 when unweighted)


class ModelFamily(ABC):
    """One model architecture: options, loading, conditioning, objective, prediction, metadata.

    Shared machinery runs from what a family declares: `text_cache_suffix` gives it the text-encoder output cache
    (options, checks, filling, lookups), `block_list_names` and `offload` give it block swapping and activation
    offload (placed by the loop through library/training/block_swap.py).
    """

    id: ClassVar[str]
    # Side of sample images drawn without --w / --h; None: the family cannot draw sample images yet.
    default_sample_size: ClassVar[int | None] = None
    # CFG scale of sample images whose prompt gives none (--l); FLUX uses it as the guidance its dev model embeds
    default_sample_scale: ClassVar[float] = 7.5
    # Image sides must be multiples of this many pixels (the VAE's downscaling times the denoiser's patch size).
    image_size_multiple: ClassVar[int] = 8
    # File suffix of disk-cached text-encoder outputs (`<image><suffix>`); None: this family cannot cache them.
    text_cache_suffix: ClassVar[str | None] = None
    # The denoiser's lists of repeated blocks (attribute names), for block swapping and activation offload.
    block_list_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, args: argparse.Namespace):
        self.text_cache_options = TextCacheOptions.from_args(args, self.text_cache_suffix)
        self.text_cache: TextOutputCache | None = None  # filled by `before_training` when caching
        self.text_cache_counts = (0, 0)  # (captions encoded, cache files read) by `before_training`
        # block swap, activation offload and fp8 storage: the options exist for families with block lists
        self.offload = OffloadOptions.from_args(args) if self.block_list_names else None

    @classmethod
    @abstractmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the family's own command-line options."""

    @classmethod
    def add_method_arguments(cls, method: str, parser: argparse.ArgumentParser) -> None:
        """Options that exist only for this family with this method (e.g. one learning rate per text encoder)."""

    def validate(self, method: TrainingMethod | None = None) -> None:
        """Check the family's options and their fit with `method` (None: the models are only loaded, e.g. by the
        LoRA tools) without loading anything. Raise ConfigError. Families extend it and call this one."""
        if self.offload is not None:
            self.offload.validate()
            check_blocks_to_swap(self.offload, self.block_list_lengths(), self.swap_counts)

    def validate_run(self, dataset, trains_text_encoder: bool) -> None:
        """Check the family's options against the dataset, before any model loads: image sizes the denoiser can
        take and, when caching text-encoder outputs, fixed captions and frozen text encoders."""
        multiple = self.image_size_multiple
        for group in dataset.datasets:
            wrong = [size for size in group.bucket_sizes if size[0] % multiple or size[1] % multiple]
            if wrong:
                raise ConfigError(
                    f"{group.source}: {group.config.where}: the {self.id} family needs image sides in multiples of "
                    f"{multiple} pixels, but "
                    f"buckets {', '.join(f'{w}x{h}' for w, h in wrong[:3])} are not; set resolution and "
                    f"bucket_reso_steps to multiples of {multiple}"
                )
        self.text_cache_options.check_run(dataset, trains_text_encoder)

    def block_list_lengths(self) -> list[int] | None:
        """Blocks in each of `block_list_names`, read from the checkpoint's config without loading weights (for the
        --blocks_to_swap limit); None when that needs the weights."""
        return None

    @classmethod
    def swap_counts(cls, blocks_to_swap: int) -> list[int]:
        """How many blocks of each block list `--blocks_to_swap N` keeps in CPU memory (default: all from the first)."""
        return [blocks_to_swap] + [0] * (len(cls.block_list_names) - 1)

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
    def training_inputs(
        self,
        latents: torch.Tensor,
        generator: torch.Generator | None,
        noise: NoiseOptions,
        timesteps: torch.Tensor | None = None,
    ) -> TrainingInputs:
        """Noise the latents at sampled timesteps and give the target the denoiser should predict.

        `timesteps` (B,) in the family's 0..999 numbering replaces the sampled ones (fixed-timestep validation).
        """

    @property
    def alphas_cumprod(self) -> torch.Tensor | None:
        """The DDPM schedule's cumulative alphas (for SNR-based loss weights); None for flow-matching families."""
        return None

    @property
    def v_prediction(self) -> bool:
        """Whether the denoiser predicts v (changes SNR-based weights)."""
        return False

    @abstractmethod
    def predict(
        self, models: LoadedModels, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict
    ) -> torch.Tensor:
        """Run the denoiser."""

    def network_text_encoders(self, models: LoadedModels) -> list[torch.nn.Module]:
        """The text encoders as adapter-network plugins should see them (module names define LoRA key names)."""
        return models.text_encoders

    def network_denoiser(self, models: LoadedModels) -> torch.nn.Module:
        """The denoiser as adapter-network plugins should see it (module names define LoRA key names)."""
        return models.denoiser

    @classmethod
    def adapter_targets_for(
        cls, text_encoders: Sequence[torch.nn.Module], denoiser: torch.nn.Module | None
    ) -> TargetTable | None:
        """The adapter targets of models as plugins see them (`network_text_encoders`, `network_denoiser`), or None
        when they are not this family's models. The table the LoRA network, the LoRA tools and the loaders share."""
        return None

    def adapter_targets(self, models: LoadedModels) -> TargetTable:
        """The adapter targets of the loaded models (see `adapter_targets_for`)."""
        table = self.adapter_targets_for(self.network_text_encoders(models), self.network_denoiser(models))
        if table is None:
            raise ConfigError(f"the {self.id} family names no layers for adapter networks")
        return table

    def text_encoder_learning_rates(self, default: float | None) -> list[float | None]:
        """One learning rate per text encoder (`default` unless a family option sets one; None: the base rate)."""
        return [default]

    def denoiser_param_groups(self, denoiser: torch.nn.Module, learning_rate: float) -> list[dict]:
        """Optimizer groups for training the whole denoiser (a family may split it, e.g. by block)."""
        return [{"params": list(denoiser.parameters()), "lr": learning_rate}]

    def place_models(self, models: LoadedModels, device: torch.device) -> None:
        """Move the models to the compute device before training (a family may keep parts in CPU memory)."""
        for model in [models.denoiser, models.vae, *models.text_encoders]:
            model.to(device)

    def denoiser_blocks(self, models: LoadedModels) -> list[tuple[str, torch.nn.Module]]:
        """The denoiser cut into named blocks, one optimizer each with --blockwise_fused_optimizers (default: its
        top-level children, lists of blocks split into their items)."""
        from library.training.fused_optimizers import default_blocks

        return default_blocks(models.denoiser)

    def encode_conditioning(self, models: LoadedModels, captions: list[str], batch: dict) -> dict[str, torch.Tensor]:
        """The conditioning `predict` takes for a batch: the encoded (or cached) captions, plus what the family reads
        from the batch itself (`batch_conditioning`). Cached tensors come back on the CPU; `predict` places them."""
        if self.text_cache is not None:
            text = self.text_cache.lookup(captions, "cpu")
        else:
            text = self.encode_text(models, captions)
        return text | self.batch_conditioning(batch)

    def batch_conditioning(self, batch: dict) -> dict[str, torch.Tensor]:
        """Conditioning read from the batch rather than the captions (SDXL: image sizes and crops)."""
        return {}

    def text_encoding_settings(self) -> tuple:
        """Settings that change what `encode_text` returns for the same caption and weights (token lengths, masks,
        prompts added to captions): part of the text-encoder output cache's key."""
        return ()

    def before_training(self, models: LoadedModels, dataset) -> None:
        """Work after the models are loaded and placed, before the first step: caching text-encoder outputs."""
        if not self.text_cache_options.enabled:
            return
        weights = [param for encoder in models.text_encoders for param in encoder.parameters()]
        fingerprint = tensors_fingerprint(weights, self.id, *self.text_encoding_settings())
        self.text_cache, self.text_cache_counts = cache_text_outputs(
            self.text_cache_options, dataset, models.text_encoders, fingerprint,
            lambda captions: self.encode_text(models, captions),
        )  # fmt: skip

    def save_model(
        self, models: LoadedModels, path: str, save_as: str, dtype: torch.dtype | None, metadata: dict[str, str]
    ) -> None:
        """Write the full models to `path` atomically in format `save_as` (a file, or a folder for diffusers).

        `dtype` None keeps each tensor's precision; `metadata` goes into files that can hold it.
        """
        raise NotImplementedError(f"the {self.id} family cannot save full models")

    def sample_scheduler(self, sampler: str) -> Any:
        """A fresh diffusers scheduler for `--sample_sampler`, set up like the training noise schedule."""
        raise ConfigError(f"the {self.id} family cannot draw sample images yet; leave out the --sample_* options")

    def make_pipeline(self, models: LoadedModels, scheduler: Any) -> Any:
        """A diffusers pipeline drawing with `models` as they are now (adapters included) and `scheduler`."""
        raise ConfigError(f"the {self.id} family cannot draw sample images yet; leave out the --sample_* options")

    def sample_prompt_inputs(self, models: LoadedModels, prompt: str, negative_prompt: str) -> dict[str, Any]:
        """The pipeline's prompt arguments; families pass embeddings encoded the way training encodes captions."""
        return {"prompt": prompt, "negative_prompt": negative_prompt}

    @abstractmethod
    def base_model_version(self) -> str:
        """The `ss_base_model_version` value users' tools read (`sd_v1`, `sdxl_base_v1-0`, `flux1` ...)."""

    @abstractmethod
    def training_metadata(self) -> dict[str, str]:
        """`ss_*` keys describing the base model (version, v2, v-parameterization, clip skip ...)."""

    @abstractmethod
    def model_spec_architecture(self) -> str:
        """The `modelspec.architecture` base id, e.g. `stable-diffusion-v1` (the method appends `/lora`)."""

    def model_spec_extra(self) -> dict[str, str]:
        """Further `modelspec.*` keys (prediction type, encoder layer ...)."""
        return {}
