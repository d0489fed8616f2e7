"""LoRA network plugin: low-rank adapters on the Linear / Conv2d layers of a diffusers UNet and CLIP text encoders.

Files use the kohya key format (`lora_unet_...`, `lora_te_...`, `.lora_down.weight` / `.lora_up.weight` / `.alpha`)
that ComfyUI, AUTOMATIC1111/Forge and diffusers load. `create_network` / `create_network_from_weights` and the
network's methods follow the plugin interface that third-party modules (`lycoris.kohya`) implement too.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from library.atomic import atomic_path
from library.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
# kohya's targets: every Linear / 1x1 conv in the attention blocks; with conv_dim (LoCon) also the ResNet / resampler
# blocks, including their 3x3 convs.
UNET_ATTENTION_CLASSES = ("Transformer2DModel",)
UNET_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
DEFAULT_DIM = 4
DEFAULT_ALPHA = 1.0

# Given a LoRA name and the layer it would wrap: its (dim, alpha), or None to leave the layer alone.
RankFn = Callable[[str, nn.Module], "tuple[int, float] | None"]


@dataclass(frozen=True)
class LoRAOptions:
    """The `--network_args` this module understands, parsed from their string values."""

    conv_dim: int | None = None
    conv_alpha: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None

    @classmethod
    def from_network_args(cls, network_args: dict[str, object]) -> LoRAOptions:
        """Parse `key=value` network args; unknown keys and bad values raise ConfigError."""
        known = {field.name: field.type for field in fields(cls)}
        values = {}
        for key, raw in network_args.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(
                    f"Unknown --network_args key '{key}' for networks.lora.{hint} Known keys: {', '.join(known)}."
                )
            values[key] = _parse_number(key, raw, int if known[key].startswith("int") else float)
        options = cls(**values)
        options.validate()
        return options

    def validate(self) -> None:
        """Check value ranges; raise ConfigError naming the key."""
        if self.conv_dim is not None and self.conv_dim < 1:
            raise ConfigError(f"--network_args conv_dim must be a positive integer, got {self.conv_dim}.")
        for key in ("rank_dropout", "module_dropout"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"--network_args {key} must be in [0, 1), got {value}.")
        for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"--network_args {key} must be positive, got {value}.")


def _parse_number(key: str, raw: object, kind: type) -> int | float | None:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() == "none"):
        return None
    try:
        return kind(raw)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"--network_args {key} must be {'an integer' if kind is int else 'a number'}, got '{raw}'."
        ) from err


def delta_weight(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The weight change `up @ down` in the layout of the wrapped layer's weight.

    down: (r, in) or (r, in, kh, kw); up: (out, r) or (out, r, 1, 1) -> (out, in) or (out, in, kh, kw).
    For a 3x3 down conv followed by a 1x1 up conv this is the composed 3x3 kernel.
    """
    return torch.einsum("or,r...->o...", up.flatten(1), down)


class LoRAModule(nn.Module):
    """One adapter: replaces the wrapped layer's forward with `layer(x) + up(down(x)) * multiplier * alpha / dim`."""

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = DEFAULT_DIM,
        alpha: float | None = DEFAULT_ALPHA,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        if isinstance(org_module, nn.Conv2d):
            conv = org_module
            self.lora_down = nn.Conv2d(
                conv.in_channels, lora_dim, conv.kernel_size, conv.stride, conv.padding, bias=False
            )
            self.lora_up = nn.Conv2d(lora_dim, conv.out_channels, (1, 1), bias=False)
        else:
            self.lora_down = nn.Linear(org_module.in_features, lora_dim, bias=False)
            self.lora_up = nn.Linear(lora_dim, org_module.out_features, bias=False)
        # Same initialisation as Microsoft's loralib: the adapter starts as an exact no-op.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        alpha = float(alpha) if alpha else float(lora_dim)  # kohya: alpha 0 or None means no scaling
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / lora_dim
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self._org_module = (org_module,)  # a tuple, so the base layer is not registered as our submodule
        self.org_forward: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def org_module(self) -> nn.Module:
        return self._org_module[0]

    def apply_to(self) -> None:
        """Route the wrapped layer's forward through this module; its own weights stay untouched."""
        if self.org_forward is not None:
            return
        self.org_forward = self.org_module.forward
        self.org_module.forward = self.forward

    def refresh_scale(self) -> None:
        """Recompute `scale` after `alpha` was loaded from a file."""
        self.scale = float(self.alpha) / self.lora_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.org_forward(x)
        if self.multiplier == 0:  # skip the adapter entirely so the output is bit-identical to the base
            return base
        # torch's CPU RNG (not `random`): gradient checkpointing restores it, so a recomputed block drops the same.
        if self.training and self.module_dropout and torch.rand(()).item() < self.module_dropout:
            return base
        hidden = self.lora_down(x.to(self.lora_down.weight.dtype))  # (..., r) or (B, r, H, W)
        scale = self.scale
        if self.training:
            hidden, scale = self._drop(hidden, scale)
        delta = self.lora_up(hidden) * (self.multiplier * scale)
        return base + delta.to(base.dtype)

    def _drop(self, hidden: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
        """Neuron dropout on the rank activations, then rank dropout (whole ranks per sample, rescaled)."""
        if self.dropout:
            hidden = nn.functional.dropout(hidden, p=self.dropout)
        if self.rank_dropout:
            if isinstance(self.lora_down, nn.Conv2d):
                shape = (hidden.shape[0], self.lora_dim, 1, 1)
            else:
                shape = (hidden.shape[0],) + (1,) * (hidden.dim() - 2) + (self.lora_dim,)
            keep = torch.rand(shape, device=hidden.device) > self.rank_dropout
            hidden = hidden * keep.to(hidden.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return hidden, scale

    def delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The current weight change of this adapter in float32 (without multiplier)."""
        up = self.lora_up.weight.to(device, torch.float32)
        down = self.lora_down.weight.to(device, torch.float32)
        return delta_weight(up, down) * self.scale

    @torch.no_grad()
    def merge(self, weights: dict[str, torch.Tensor], dtype: torch.dtype | None, device: torch.device | str) -> None:
        """Add `multiplier * scale * up @ down` from `weights` (keys without the LoRA name) into the base layer."""
        up = weights["lora_up.weight"].to(device, torch.float32)
        down = weights["lora_down.weight"].to(device, torch.float32)
        alpha = float(weights["alpha"]) if "alpha" in weights else float(down.shape[0])
        delta = delta_weight(up, down) * (self.multiplier * alpha / down.shape[0])
        weight = self.org_module.weight
        if delta.shape != weight.shape:
            raise CheckpointError(
                f"LoRA '{self.lora_name}' has shape {tuple(delta.shape)} but the model layer has "
                f"{tuple(weight.shape)}; the file was trained for another model architecture."
            )
        merged = weight.to(device, torch.float32) + delta
        weight.copy_(merged.to(dtype or weight.dtype))


class LoRANetwork(nn.Module):
    """All adapters of one model; its state_dict keys are exactly the keys of the saved file."""

    def __init__(
        self,
        text_encoders: Sequence[nn.Module],
        unet: nn.Module | None,
        rank_for: RankFn,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        include_conv_blocks: bool = False,
    ) -> None:
        super().__init__()
        self.multiplier = multiplier
        self.loraplus_lr_ratio: float | None = None
        self.loraplus_unet_lr_ratio: float | None = None
        self.loraplus_text_encoder_lr_ratio: float | None = None

        def make(name: str, layer: nn.Module) -> LoRAModule | None:
            rank = rank_for(name, layer)
            if rank is None or rank[0] == 0:
                return None
            return LoRAModule(name, layer, multiplier, rank[0], rank[1], dropout, rank_dropout, module_dropout)

        # One list per text encoder, so each can get its own learning rate.
        self.text_encoder_lora_groups: list[list[LoRAModule]] = []
        for index, encoder in enumerate(text_encoders):
            prefix = TEXT_ENCODER_PREFIX if len(text_encoders) == 1 else f"{TEXT_ENCODER_PREFIX}{index + 1}"
            self.text_encoder_lora_groups.append(_create_loras(text_encoder_targets(encoder, prefix), make))
        unet_classes = UNET_ATTENTION_CLASSES + (UNET_CONV_CLASSES if include_conv_blocks else ())
        targets = unet_targets(unet, unet_classes) if unet is not None else []
        self.unet_loras: list[LoRAModule] = _create_loras(targets, make)
        for lora in self.all_loras():
            self.add_module(lora.lora_name, lora)
        logger.info(
            f"LoRA network: {len(self.unet_loras)} U-Net modules, {len(self.text_encoder_loras)} text encoder modules."
        )
        self._trainable: list[nn.Parameter] | None = None

    @property
    def text_encoder_loras(self) -> list[LoRAModule]:
        return [lora for group in self.text_encoder_lora_groups for lora in group]

    def all_loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    def apply_to(
        self, text_encoder: object, unet: object, apply_text_encoder: bool = True, apply_unet: bool = True
    ) -> None:
        """Hook the adapters into their layers; adapters of a part not applied are dropped from the network."""
        if not apply_text_encoder:
            self._drop_loras(self.text_encoder_loras)
            self.text_encoder_lora_groups = [[] for _ in self.text_encoder_lora_groups]
        if not apply_unet:
            self._drop_loras(self.unet_loras)
            self.unet_loras = []
        for lora in self.all_loras():
            lora.apply_to()
        logger.info(
            f"LoRA applied: text encoder {len(self.text_encoder_loras)} modules, U-Net {len(self.unet_loras)} modules."
        )

    def _drop_loras(self, loras: Iterable[LoRAModule]) -> None:
        for lora in loras:
            delattr(self, lora.lora_name)

    def set_multiplier(self, multiplier: float) -> None:
        """Set the strength of every adapter (0 turns the network off exactly)."""
        self.multiplier = multiplier
        for lora in self.all_loras():
            lora.multiplier = multiplier

    def set_loraplus_lr_ratio(
        self, loraplus_lr_ratio: float | None, unet_ratio: float | None, text_encoder_ratio: float | None
    ) -> None:
        """LoRA+ (arXiv:2402.12354): train `lora_up` at `ratio` times the learning rate."""
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = unet_ratio
        self.loraplus_text_encoder_lr_ratio = text_encoder_ratio

    def load_weights(self, file: str | os.PathLike) -> tuple[list[str], list[str]]:
        """Load a saved LoRA into this network; unknown or mis-shaped keys raise CheckpointError.

        Returns torch's (missing_keys, unexpected_keys); missing keys (modules the file lacks) keep their initial,
        no-op values and are logged as a warning.
        """
        weights = load_state_dict_file(file)
        own = self.state_dict()
        unknown = sorted(set(weights) - set(own))
        if unknown:
            raise CheckpointError(
                f"{file}: {len(unknown)} keys match no module of this network: {_first(unknown)}. "
                "Was it trained for another model, or with the text encoder while this run trains the U-Net only?"
            )
        wrong = [
            f"{key} {tuple(weights[key].shape)} != {tuple(own[key].shape)}"
            for key in sorted(weights)
            if weights[key].shape != own[key].shape
        ]
        if wrong:
            raise CheckpointError(
                f"{file}: {len(wrong)} tensors have another shape than this network (file != network): "
                f"{_first(wrong)}. Use the file's network_dim / conv_dim, or create the network from the weights."
            )
        missing = sorted(set(own) - set(weights))
        if missing:
            logger.warning(
                "%s has no weights for %d keys; they keep their initial values: %s", file, len(missing), _first(missing)
            )
        info = self.load_state_dict(weights, strict=False)
        for lora in self.all_loras():
            lora.refresh_scale()
        logger.info("Loaded LoRA weights from %s", file)
        return info

    def prepare_optimizer_params(
        self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None, default_lr: float | None
    ) -> tuple[list[dict], list[str]]:
        """Optimizer param groups and their names ("textencoder", "unet", "unet plus" ...).

        A learning rate of None falls back to `default_lr`; a group whose learning rate is 0 is left out and its
        parameters frozen. `text_encoder_lr` may be a list with one value per text encoder.
        """
        groups: list[dict] = []
        descriptions: list[str] = []
        trainable: list[nn.Parameter] = []
        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        count = len(self.text_encoder_lora_groups)
        for index, loras in enumerate(self.text_encoder_lora_groups):
            lr = _encoder_lr(text_encoder_lr, index, default_lr)
            name = "textencoder" if count == 1 else f"textencoder{index + 1}"
            self._add_param_groups(loras, lr, te_ratio, name, groups, descriptions, trainable)
        unet_ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
        unet_lr = unet_lr if unet_lr is not None else default_lr
        self._add_param_groups(self.unet_loras, unet_lr, unet_ratio, "unet", groups, descriptions, trainable)
        self._trainable = trainable
        self._set_requires_grad()
        return groups, descriptions

    @staticmethod
    def _add_param_groups(
        loras: list[LoRAModule],
        lr: float | None,
        ratio: float | None,
        name: str,
        groups: list[dict],
        descriptions: list[str],
        trainable: list[nn.Parameter],
    ) -> None:
        """Append the groups of `loras`: one at `lr`, and with a LoRA+ ratio their `lora_up` at `lr * ratio`."""
        if ratio is None:
            split = [(name, lr, [param for lora in loras for param in lora.parameters()])]
        else:
            split = [
                (name, lr, [lora.lora_down.weight for lora in loras]),
                (f"{name} plus", None if lr is None else lr * ratio, [lora.lora_up.weight for lora in loras]),
            ]
        for description, group_lr, params in split:
            if not params:
                continue
            if group_lr == 0:
                logger.info("LoRA %s: learning rate 0, its %d tensors stay frozen.", description, len(params))
                continue
            groups.append({"params": params} if group_lr is None else {"params": params, "lr": group_lr})
            descriptions.append(description)
            trainable.extend(params)

    def _set_requires_grad(self) -> None:
        if self._trainable is None:
            self.requires_grad_(True)
            return
        keep = {id(param) for param in self._trainable}
        for param in self.parameters():
            param.requires_grad_(id(param) in keep)

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the adapters run inside the base model's (checkpointed) blocks."""

    def prepare_grad_etc(self, text_encoder: object, unet: object) -> None:
        """Enable gradients for the trainable adapters (those given an optimizer group, or all before that)."""
        self._set_requires_grad()

    def on_epoch_start(self, text_encoder: object, unet: object) -> None:
        """Put the adapters in training mode, so dropout applies."""
        self.train()

    def on_step_start(self, *args: object, **kwargs: object) -> None:
        """No per-step work for plain LoRA."""

    def get_trainable_params(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates."""
        return list(self.parameters()) if self._trainable is None else list(self._trainable)

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        """Write the state dict atomically: .safetensors with `metadata`, any other extension with torch.save."""
        state = {
            key: value.detach().to("cpu", dtype or value.dtype).contiguous() for key, value in self.state_dict().items()
        }
        for key, value in (metadata or {}).items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"safetensors metadata must map str to str, got {key!r}: {value!r}")
        with atomic_path(file) as temp:
            if os.fspath(file).endswith(".safetensors"):
                from safetensors.torch import save_file

                save_file(state, temp, metadata=metadata or None)
            else:
                torch.save(state, temp)
        logger.debug("saved LoRA weights to %s", file)

    def is_mergeable(self) -> bool:
        return True

    def merge_to(
        self,
        text_encoder: object,
        unet: object,
        weights_sd: dict[str, torch.Tensor],
        dtype: torch.dtype | None,
        device: torch.device | str,
    ) -> None:
        """Add the LoRA in `weights_sd` (at this network's multiplier) into the base weights; no hooks are installed."""
        by_name: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in weights_sd.items():
            name, _, suffix = key.partition(".")
            by_name.setdefault(name, {})[suffix] = value
        loras = {lora.lora_name: lora for lora in self.all_loras()}
        unknown = sorted(set(by_name) - set(loras))
        if unknown:
            raise CheckpointError(f"{len(unknown)} LoRA modules match no layer of the model: {_first(unknown)}.")
        for name, weights in by_name.items():
            loras[name].merge(weights, dtype, device)
        logger.info("Merged %d LoRA modules into the model.", len(by_name))

    @torch.no_grad()
    def apply_max_norm_regularization(
        self, max_norm_value: float, device: torch.device | str
    ) -> tuple[int, float, float]:
        """Scale down adapters whose weight change `up @ down * scale` has a norm above `max_norm_value`.

        kohya's --scale_weight_norms: up and down are both scaled by sqrt(ratio). Returns the number of modules
        scaled and the mean and max norm after scaling. One host sync per call, for the returned numbers.
        """
        loras = self.all_loras()
        if not loras:
            return 0, 0.0, 0.0
        norms = []
        for lora in loras:
            norm = lora.delta(device).norm()
            clamped = norm.clamp(min=max_norm_value / 2)
            ratio = clamped.clamp(max=max_norm_value) / clamped
            lora.lora_up.weight.mul_(ratio.sqrt().to(lora.lora_up.weight))
            lora.lora_down.weight.mul_(ratio.sqrt().to(lora.lora_down.weight))
            norms.append(torch.stack([norm * ratio, (ratio < 1).float()]))
        scaled_norms, was_scaled = torch.stack(norms).cpu().unbind(1)
        return int(was_scaled.sum()), float(scaled_norms.mean()), float(scaled_norms.max())


def unet_targets(unet: nn.Module, block_classes: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """(LoRA name, layer) for every Linear / Conv2d inside the UNet blocks of the given class names."""
    targets = []
    for block_name, block in unet.named_modules():
        if type(block).__name__ in block_classes:
            targets += [(_lora_name(UNET_PREFIX, f"{block_name}.{name}"), layer) for name, layer in _layers(block)]
    return targets


def text_encoder_targets(encoder: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """(LoRA name, layer) for the Linear layers of the attention and MLP blocks of a CLIP text encoder.

    Class names are matched by pattern (CLIPAttention, CLIPSdpaAttention, ..., CLIPMLP) so attention variants of any
    transformers version are found. Names always carry the `text_model` level of the original checkpoints, which
    transformers >= 5.6 dropped from CLIPTextModel.
    """
    root = text_model_prefix(encoder)
    targets = []
    for block_name, block in encoder.named_modules():
        kind = type(block).__name__
        if kind.startswith("CLIP") and kind.endswith(("Attention", "MLP")):
            targets += [
                (_lora_name(prefix, f"{root}{block_name}.{name}"), layer)
                for name, layer in _layers(block)
                if isinstance(layer, nn.Linear)
            ]
    return targets


def text_model_prefix(encoder: nn.Module) -> str:
    """The `text_model.` level to add to module paths: needed when a CLIP model lacks it (transformers >= 5.6)."""
    has_level = hasattr(encoder, "text_model")
    return "" if has_level or not type(encoder).__name__.startswith("CLIP") else "text_model."


def _layers(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The adaptable layers inside a block: Linear and plain (ungrouped, undilated) Conv2d."""
    return [
        (name, layer)
        for name, layer in block.named_modules()
        if isinstance(layer, nn.Linear)
        or (isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.dilation == (1, 1))
    ]


def _lora_name(prefix: str, module_path: str) -> str:
    return f"{prefix}.{module_path}".replace(".", "_")


def _create_loras(
    targets: list[tuple[str, nn.Module]], make: Callable[[str, nn.Module], LoRAModule | None]
) -> list[LoRAModule]:
    loras, seen = [], set()
    for name, layer in targets:
        if name in seen:  # a block class nested in another target block
            continue
        seen.add(name)
        lora = make(name, layer)
        if lora is not None:
            loras.append(lora)
    return loras


def _encoder_lr(text_encoder_lr: float | Sequence[float] | None, index: int, default_lr: float | None) -> float | None:
    if isinstance(text_encoder_lr, Sequence) and not isinstance(text_encoder_lr, str):
        if not text_encoder_lr:
            return default_lr
        text_encoder_lr = text_encoder_lr[min(index, len(text_encoder_lr) - 1)]
    return text_encoder_lr if text_encoder_lr is not None else default_lr


def _first(items: Sequence[str], count: int = 5) -> str:
    shown = ", ".join(items[:count])
    return shown + (f" (and {len(items) - count} more)" if len(items) > count else "")


def _as_list(text_encoder: nn.Module | Sequence[nn.Module] | None) -> list[nn.Module]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, nn.Module):
        return [text_encoder]
    return [encoder for encoder in text_encoder if encoder is not None]


def load_state_dict_file(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors or torch state dict on the CPU; unreadable files raise CheckpointError."""
    try:
        if os.fspath(file).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"Cannot read LoRA weights from {file}: {err}") from err


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: object,
) -> LoRANetwork:
    """Create a fresh LoRA network (plugin entry point); `kwargs` are the `--network_args`."""
    options = LoRAOptions.from_network_args(kwargs)
    dim = int(network_dim) if network_dim is not None else DEFAULT_DIM
    alpha = float(network_alpha) if network_alpha is not None else DEFAULT_ALPHA
    if dim < 1:
        raise ConfigError(f"--network_dim must be a positive integer, got {dim}.")
    if neuron_dropout is not None and not 0.0 <= neuron_dropout < 1.0:
        raise ConfigError(f"--network_dropout must be in [0, 1), got {neuron_dropout}.")
    conv_alpha = options.conv_alpha if options.conv_alpha is not None else DEFAULT_ALPHA
    if options.conv_alpha is not None and options.conv_dim is None:
        logger.warning("--network_args conv_alpha is ignored without conv_dim: 3x3 convolutions get no LoRA.")

    def rank_for(name: str, layer: nn.Module) -> tuple[int, float] | None:
        if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1):
            return (options.conv_dim, conv_alpha) if options.conv_dim else None
        return dim, alpha

    logger.info(
        f"LoRA dim {dim}, alpha {alpha:g}, conv dim {options.conv_dim}, conv alpha {conv_alpha:g}; dropout "
        f"{neuron_dropout}, rank dropout {options.rank_dropout}, module dropout {options.module_dropout}"
    )
    network = LoRANetwork(
        _as_list(text_encoder),
        unet,
        rank_for,
        multiplier,
        neuron_dropout,
        options.rank_dropout,
        options.module_dropout,
        include_conv_blocks=options.conv_dim is not None,
    )
    network.set_loraplus_lr_ratio(
        options.loraplus_lr_ratio, options.loraplus_unet_lr_ratio, options.loraplus_text_encoder_lr_ratio
    )
    return network


def ranks_from_weights(weights_sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, float]]:
    """(dim, alpha) per LoRA name of a kohya-format state dict; files without `.alpha` get alpha = dim."""
    other = sorted(key for key in weights_sd if not key.endswith(LORA_SUFFIXES))
    if other:
        raise CheckpointError(
            f"Not a plain LoRA file: keys {_first(other)} are not lora_down / lora_up / alpha. "
            "LyCORIS files (LoHa, LoKr, DoRA ...) need --network_module lycoris.kohya."
        )
    ranks = {}
    for key, value in weights_sd.items():
        if key.endswith(".lora_down.weight"):
            name = key.split(".")[0]
            alpha = weights_sd.get(f"{name}.alpha")
            ranks[name] = (value.shape[0], float(alpha) if alpha is not None else float(value.shape[0]))
    return ranks


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: dict[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: object,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """Create a network shaped like a saved LoRA (dims and alphas per module); weights are not loaded here.

    Returns the network and the state dict read (load it with `load_weights` or `load_state_dict`, or merge it with
    `merge_to`). `for_inference` is accepted for interface compatibility; the modules are the same.
    """
    options = LoRAOptions.from_network_args(kwargs)
    if options.conv_dim is not None or options.conv_alpha is not None:
        logger.warning("--network_args conv_dim / conv_alpha are ignored: dims and alphas are read from the weights.")
    if weights_sd is None:
        weights_sd = load_state_dict_file(file)
    ranks = ranks_from_weights(weights_sd)
    network = LoRANetwork(
        _as_list(text_encoder),
        unet,
        lambda name, layer: ranks.get(name),
        multiplier,
        rank_dropout=None if for_inference else options.rank_dropout,
        module_dropout=None if for_inference else options.module_dropout,
        include_conv_blocks=True,
    )
    unmatched = sorted(set(ranks) - {lora.lora_name for lora in network.all_loras()})
    if unmatched:
        raise CheckpointError(
            f"{file or 'LoRA weights'}: {len(unmatched)} modules match no layer of the given models: "
            f"{_first(unmatched)}. Was it trained for another model family, or are text encoders missing?"
        )
    network.set_loraplus_lr_ratio(
        options.loraplus_lr_ratio, options.loraplus_unet_lr_ratio, options.loraplus_text_encoder_lr_ratio
    )
    return network, weights_sd
