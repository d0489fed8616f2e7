"""Methods `finetune` and `dreambooth`: train the denoiser (and the text encoders) in full, save whole models.

Both train the same way; they differ in what trains by default, as their guides describe: fine-tuning trains the
denoiser only unless --train_text_encoder, DreamBooth trains the text encoders too, optionally only for the first
--stop_text_encoder_training steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass

import torch

from library.errors import ConfigError
from library.families.base import LoadedModels, ModelFamily
from library.methods.base import MethodOptions, TrainingMethod

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("safetensors", "ckpt", "diffusers", "diffusers_safetensors")
SAVE_EXTENSIONS = {"safetensors": ".safetensors", "ckpt": ".ckpt", "diffusers": "", "diffusers_safetensors": ""}
SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}


def add_full_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the full-model methods."""
    parser.add_argument(
        "--save_model_as",
        type=str,
        default="safetensors",
        choices=SAVE_FORMATS,
        help="format of the saved model: one original-layout file (safetensors, ckpt) or a diffusers folder "
        "(diffusers: .bin weights, diffusers_safetensors: .safetensors weights); default safetensors",
    )
    parser.add_argument(
        "--learning_rate_te",
        type=float,
        default=None,
        help="learning rate of the text encoders when they train (default: --learning_rate)",
    )


@dataclass(frozen=True)
class FullTrainingOptions(MethodOptions):
    """The typed options of fine-tuning and DreamBooth (each parser defaults the other's switches)."""

    train_text_encoder: bool
    stop_text_encoder_training: int | None
    learning_rate: float
    learning_rate_te: float | None
    diffusers_xformers: bool
    save_model_as: str
    save_precision: str | None


class FineTuneMethod(TrainingMethod):
    """Full training of the denoiser; the text encoders train with --train_text_encoder."""

    name = "finetune"
    trains_base_weights = True
    options_class = FullTrainingOptions

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.family: ModelFamily | None = None
        self.models: LoadedModels | None = None
        self.text_encoder_active = self.text_encoder_steps() != 0  # False once --stop_text_encoder_training hits

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_full_model_arguments(parser)
        parser.add_argument(
            "--train_text_encoder", action="store_true", help="train the text encoders too (default: denoiser only)"
        )
        parser.add_argument(
            "--diffusers_xformers",
            action="store_true",
            help="accepted for compatibility; attention already uses PyTorch's memory-efficient kernels",
        )
        parser.set_defaults(stop_text_encoder_training=None)

    def text_encoder_steps(self) -> int | None:
        """For how many steps the text encoders train: None for all, 0 for none."""
        return None if self.options.train_text_encoder else 0

    def validate(self) -> None:
        if self.options.learning_rate_te is not None and self.options.learning_rate_te < 0:
            raise ConfigError(f"--learning_rate_te must not be negative, got {self.options.learning_rate_te}")
        if self.options.diffusers_xformers:
            logger.info("--diffusers_xformers: nothing to switch; attention runs on PyTorch's efficient kernels")

    def check_dataset(self, family: ModelFamily, dataset) -> None:
        """fine_tune.py is documented for metadata datasets and train_db.py for DreamBooth folders; the other kind
        works, but say so, and say what will train."""
        if family.id != "sd":  # the SDXL / SD3 / FLUX / Lumina trainers document both kinds of dataset
            return
        subsets = [subset for group in dataset.datasets for subset in group.subsets]
        other = [subset for subset in subsets if subset.is_finetune != (self.name == "finetune")]
        if not other:
            return
        script, kind = ("fine_tune.py", "DreamBooth folders") if self.name == "finetune" else (
            "train_db.py", "fine-tuning metadata (--in_json / metadata_file)")
        documented = "fine-tuning metadata" if self.name == "finetune" else "DreamBooth folders"
        logger.warning(
            "%s is documented for %s, and %d subset(s) here are %s; they train all the same, with their captions: "
            "%s",
            script, documented, len(other), kind, self._what_trains(),
        )  # fmt: skip

    def _what_trains(self) -> str:
        steps = self.text_encoder_steps()
        if steps == 0:
            return "the U-Net in full, the text encoder frozen (--train_text_encoder trains it too)"
        if steps is None:
            return "the U-Net and the text encoder in full"
        return f"the U-Net in full, the text encoder for the first {steps} steps (--stop_text_encoder_training)"

    @property
    def trains_text_encoder(self) -> bool:
        return self.text_encoder_active

    def setup(self, family: ModelFamily, models: LoadedModels) -> list[dict]:
        self.family, self.models = family, models
        trained = self.trainable_modules()
        for model in trained:
            # Trained weights stay in fp32 whatever --mixed_precision loaded them in; autocast does the rest.
            if any(param.dtype != torch.float32 for param in model.parameters()):
                model.to(torch.float32)
            model.requires_grad_(True)
            model.train()
        groups = family.denoiser_param_groups(models.denoiser, self.options.learning_rate)
        if self.text_encoder_active:
            options = self.options
            lr_te = options.learning_rate if options.learning_rate_te is None else options.learning_rate_te
            rates = family.text_encoder_learning_rates(lr_te)  # one per encoder where the family has options
            for index, encoder in enumerate(models.text_encoders):
                groups.append({"params": list(encoder.parameters()), "lr": rates[min(index, len(rates) - 1)]})
        logger.info("training the denoiser%s in full", " and the text encoders" if self.text_encoder_active else "")
        return groups

    def trainable_modules(self) -> list[torch.nn.Module]:
        encoders = self.models.text_encoders if self.text_encoder_active else []
        return [self.models.denoiser, *encoders]

    @property
    def uses_every_trained_parameter(self) -> bool:
        return self.text_encoder_steps() in (None, 0)  # else the text encoders stop training mid-run

    def on_step_start(self, models: LoadedModels, global_step: int) -> None:
        limit = self.text_encoder_steps()
        if self.text_encoder_active and limit is not None and global_step >= limit:
            # Without gradients the optimizer skips the text encoders' parameters (no update, no weight decay).
            for encoder in models.text_encoders:
                encoder.requires_grad_(False)
                encoder.eval()
            self.text_encoder_active = False
            logger.info("text encoder training stopped after step %d (--stop_text_encoder_training)", global_step)

    def output_extension(self) -> str:
        return SAVE_EXTENSIONS[self.options.save_model_as]

    def save(self, path: str, metadata: dict[str, str], unwrap) -> None:
        models = dataclasses.replace(
            self.models,
            denoiser=unwrap(self.models.denoiser),
            text_encoders=[unwrap(encoder) for encoder in self.models.text_encoders],
        )
        dtype = SAVE_DTYPES[self.options.save_precision]
        self.family.save_model(models, path, self.options.save_model_as, dtype, metadata)

    def metadata(self) -> dict[str, str]:
        args = self.options
        return {
            "ss_train_text_encoder": str(self.text_encoder_steps() != 0),
            "ss_stop_text_encoder_training": args.stop_text_encoder_training,
            "ss_learning_rate_te": str(args.learning_rate if args.learning_rate_te is None else args.learning_rate_te),
        }


class DreamBoothMethod(FineTuneMethod):
    """DreamBooth: the denoiser and the text encoders train; the latter only for the first N steps if asked."""

    name = "dreambooth"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_full_model_arguments(parser)
        parser.add_argument(
            "--stop_text_encoder_training",
            type=int,
            default=None,
            help="train the text encoders for the first N steps only, then the denoiser alone (0: never)",
        )
        parser.set_defaults(train_text_encoder=True, diffusers_xformers=False)

    def text_encoder_steps(self) -> int | None:
        return self.options.stop_text_encoder_training

    def validate(self) -> None:
        super().validate()
        steps = self.options.stop_text_encoder_training
        if steps is not None and steps < 0:
            raise ConfigError(f"--stop_text_encoder_training must be 0 or more, got {steps}")
