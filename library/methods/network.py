"""Method `network`: freeze the base model, inject an adapter network (`--network_module`) and train only it."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
from dataclasses import dataclass

import torch

from library.atomic import atomic_path
from library.checkpoints.files import check_weights_file
from library.errors import ConfigError, MissingPackageError
from library.families.base import LoadedModels, ModelFamily
from library.methods.base import MethodOptions, TrainingMethod
from library.training.optimizers import parse_key_values

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("safetensors", "ckpt", "pt")


@dataclass(frozen=True)
class NetworkMethodOptions(MethodOptions):
    """The typed options of the network method."""

    network_module: str
    network_dim: int | None
    network_alpha: float | None
    network_dropout: float | None
    network_args: list[str]
    network_weights: str | None
    network_train_unet_only: bool
    network_train_text_encoder_only: bool
    unet_lr: float | None
    text_encoder_lr: float | None
    learning_rate: float
    save_model_as: str
    save_precision: str | None
    gradient_checkpointing: bool


class NetworkMethod(TrainingMethod):
    """Train an adapter network through the public plugin interface (`create_network`, `apply_to` ...)."""

    name = "network"
    adapter = "lora"
    options_class = NetworkMethodOptions

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self._imply_unet_only(args)
        self.network_kwargs = parse_key_values(self.options.network_args or [], "--network_args")
        self.network = None
        self.module = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--network_module",
            type=str,
            default="networks.lora",
            help="Python module of the adapter network (networks.lora, or a plugin such as lycoris.kohya)",
        )
        parser.add_argument("--network_dim", type=int, default=None, help="network rank (LoRA dim); module default")
        parser.add_argument(
            "--network_alpha", type=float, default=None, help="LoRA alpha: updates are scaled by alpha/dim (default 1)"
        )
        parser.add_argument("--network_dropout", type=float, default=None, help="dropout on the network's inputs")
        parser.add_argument(
            "--network_args", type=str, nargs="*", default=[], help="extra network options as key=value"
        )
        parser.add_argument(
            "--network_weights", type=str, default=None, help="start from these saved network weights"
        )
        parser.add_argument(
            "--network_train_unet_only", action="store_true", help="train only the denoiser part of the network"
        )
        parser.add_argument(
            "--network_train_text_encoder_only",
            action="store_true",
            help="train only the text-encoder part of the network",
        )
        parser.add_argument("--unet_lr", type=float, default=None, help="learning rate of the denoiser part")
        parser.add_argument(
            "--text_encoder_lr", type=float, default=None, help="learning rate of the text-encoder part"
        )
        parser.add_argument(
            "--save_model_as", type=str, default="safetensors", choices=SAVE_FORMATS, help="file format of the network"
        )

    def validate(self) -> None:
        args = self.options
        if args.network_train_unet_only and args.network_train_text_encoder_only:
            raise ConfigError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
        if args.network_dim is not None and args.network_dim < 1:
            raise ConfigError(f"--network_dim must be 1 or more, got {args.network_dim}")
        if args.network_weights is not None and not os.path.isfile(args.network_weights):
            raise ConfigError(f"--network_weights: file not found: {args.network_weights}")
        if args.network_weights is not None:
            check_weights_file(args.network_weights, "--network_weights")
        self.module = self._import_module(args.network_module)

    def _imply_unet_only(self, args: argparse.Namespace) -> None:
        """Cached text-encoder outputs cannot train a text-encoder LoRA. The guides' SDXL command caches them without
        --network_train_unet_only (which their option list calls required), so it is implied, and said."""
        caching = getattr(args, "cache_text_encoder_outputs", False) or getattr(
            args, "cache_text_encoder_outputs_to_disk", False
        )
        options = self.options
        if not caching or options.network_train_unet_only or options.network_train_text_encoder_only:
            return
        self.options = dataclasses.replace(options, network_train_unet_only=True)
        logger.warning(
            "--cache_text_encoder_outputs fixes the text encoders' outputs, so only the denoiser's LoRA trains (as "
            "with --network_train_unet_only, implied here); the text-encoder learning rates are not used"
        )

    @staticmethod
    def _import_module(name: str):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as err:
            package = err.name.split(".")[0] if err.name else name
            hint = " (pip install lycoris-lora)" if package == "lycoris" else ""
            raise MissingPackageError(f"--network_module {name}: cannot import {package}{hint}") from err

    @property
    def train_unet(self) -> bool:
        return not self.options.network_train_text_encoder_only

    @property
    def trains_text_encoder(self) -> bool:
        return not self.options.network_train_unet_only

    def setup(self, family: ModelFamily, models: LoadedModels) -> list[dict]:
        args = self.options
        visible = family.network_text_encoders(models)
        text_encoders = visible[0] if len(visible) == 1 else visible
        denoiser = family.network_denoiser(models)
        kwargs = dict(self.network_kwargs)
        if args.network_dropout is not None:
            kwargs["neuron_dropout"] = args.network_dropout
        if accepts_adapter_targets(self.module.create_network):
            kwargs["adapter_targets"] = family.adapter_targets(models)
        network = self.module.create_network(
            1.0, args.network_dim, args.network_alpha, models.vae, text_encoders, denoiser, **kwargs
        )
        if network is None:
            raise ConfigError(f"{args.network_module}.create_network returned no network for these options")
        network.apply_to(text_encoders, denoiser, self.trains_text_encoder, self.train_unet)
        if args.network_weights:
            info = network.load_weights(args.network_weights)
            logger.info("loaded network weights from %s: %s", args.network_weights, info)
        if args.gradient_checkpointing:
            network.enable_gradient_checkpointing()
        self.network = network
        self.network_shape = network_shape(network, args.network_dim, args.network_alpha)
        return self._param_groups(network, family.text_encoder_learning_rates(args.text_encoder_lr))

    def _param_groups(self, network, text_encoder_lrs: list[float | None]) -> list[dict]:
        args = self.options
        # One rate for all encoders as a plain number: third-party plugins may not take a list.
        text_encoder_lr = text_encoder_lrs[0] if len(set(text_encoder_lrs)) == 1 else text_encoder_lrs
        if not self.trains_text_encoder:
            text_encoder_lr = 0.0
        unet_lr = args.unet_lr if self.train_unet else 0.0
        groups = network.prepare_optimizer_params(text_encoder_lr, unet_lr, args.learning_rate)
        if isinstance(groups, tuple):  # newer plugins return (groups, descriptions): the names label the logs
            groups, names = groups
            for group, name in zip(groups, names):
                group.setdefault("name", name.replace(" ", "_") or "network")
        groups = [group for group in groups if group.get("lr", args.learning_rate) != 0]
        if not groups:
            raise ConfigError("nothing to train: every part of the network has learning rate 0 or is disabled")
        network.prepare_grad_etc(None, None)
        return groups

    def trainable_modules(self) -> list[torch.nn.Module]:
        return [self.network]

    @property
    def uses_every_trained_parameter(self) -> bool:
        # our adapters skip a module only with module dropout; a plugin's network may skip modules in its own ways
        return "module_dropout" not in self.network_kwargs and self.options.network_module.startswith("networks.")

    def on_epoch_start(self, models: LoadedModels) -> None:
        self.network.on_epoch_start(models.text_encoders, models.denoiser)

    def on_step_start(self, models: LoadedModels, global_step: int) -> None:
        if hasattr(self.network, "on_step_start"):
            self.network.on_step_start(models.text_encoders, models.denoiser)

    def output_extension(self) -> str:
        return "." + self.options.save_model_as

    def save(self, path: str, metadata: dict[str, str], unwrap) -> None:
        dtype = SAVE_DTYPES.get(self.options.save_precision)
        network = unwrap(self.network)
        # The plugin picks the format from the extension, so the temporary file keeps it.
        with atomic_path(path) as temp:
            network.save_weights(temp, dtype, metadata if path.endswith(".safetensors") else None)

    def metadata(self) -> dict[str, str]:
        args = self.options
        return {
            "ss_network_module": args.network_module,
            "ss_network_dim": str(self.network_shape[0]),
            "ss_network_alpha": str(self.network_shape[1]),
            "ss_network_dropout": str(args.network_dropout),
            "ss_network_args": json.dumps(self.network_kwargs) if self.network_kwargs else None,
            "ss_unet_lr": str(args.unet_lr if args.unet_lr is not None else args.learning_rate),
            "ss_text_encoder_lr": str(args.text_encoder_lr if args.text_encoder_lr is not None else args.learning_rate),
            "ss_network_train_unet_only": str(args.network_train_unet_only),
            "ss_network_train_text_encoder_only": str(args.network_train_text_encoder_only),
            "ss_network_weights": os.path.basename(args.network_weights) if args.network_weights else None,
        }


def accepts_adapter_targets(create_network) -> bool:
    """Whether a plugin's `create_network` takes the family's target table (networks.lora does; others find their
    layers by module names)."""
    import inspect

    return "adapter_targets" in inspect.signature(create_network).parameters


def network_shape(network: torch.nn.Module, dim: int | None, alpha: float | None) -> tuple[int | None, float | None]:
    """The rank and alpha to record: the network's own most common ones when it reports them (networks.lora),
    else the options given."""
    summary = getattr(network, "rank_summary", None)  # optional in the plugin interface
    return summary() if callable(summary) else (dim, alpha)


SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}
