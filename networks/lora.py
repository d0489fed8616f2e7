"""LoRA network plugin for every model family: adapters on the layers the family's target table lists.

Files use the kohya key format (`lora_unet_...`, `lora_te_...`, `.lora_down.weight` / `.lora_up.weight` / `.alpha`)
that ComfyUI, AUTOMATIC1111/Forge and diffusers load; `save_format=diffusers` writes diffusers / PEFT names instead
where the family knows them. A fused original layer that diffusers splits (FLUX's q|k|v) gets one adapter whose
output rows feed each part; with `split_qkv=True` each part gets its own adapter and the file holds the exact fused
equivalent. `create_network` / `create_network_from_weights` and the network's methods follow the plugin interface
that third-party modules (`lycoris.kohya`) implement too; the trainer passes the family's table as
`adapter_targets`, other callers get the table of whichever family recognises the models.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from library.adapters.targets import TEXT_ENCODER_PREFIX, UNET_PREFIX, AdapterTarget, TargetTable
from library.atomic import atomic_path
from library.errors import CheckpointError, ConfigError
from networks.adapters import (
    DEFAULT_ALPHA,
    DEFAULT_DIM,
    Adapter,
    LoRAModule,
    SplitAdapter,
    adapter_type_of,
    delta_weight,
    leaf_adapters,
)
from networks.dora import DoRAModule
from networks.network_args import NetworkOptions, last_match, parse_flag

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ALPHA", "DEFAULT_DIM", "LORA_SUFFIXES", "TEXT_ENCODER_PREFIX", "UNET_PREFIX", "LoRAModule", "LoRANetwork",
    "create_network", "create_network_from_weights", "delta_weight", "load_state_dict_file", "ranks_from_weights",
    "build_network", "network_from_weights", "group_modules", "modules_in_file", "NetworkCall", "LORA_TYPES",
]  # fmt: skip
LORA_SUFFIXES = tuple(f".{suffix}" for suffix in LoRAModule.key_suffixes)
LORA_TYPES: tuple[type[Adapter], ...] = (LoRAModule, DoRAModule)  # what networks.lora creates and loads

# Given a target: its (dim, alpha), or None to leave the layer alone.
RankFn = Callable[[AdapterTarget], "tuple[int, float] | None"]


class LoRANetwork(nn.Module):
    """All adapters of one model. Its state_dict keys are the file's keys, except that split adapters hold their
    parts (`file_state_dict` gives the file's tensors)."""

    def __init__(
        self,
        table: TargetTable,
        rank_for: RankFn,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        split_fused: bool = False,
        save_format: str = "kohya",
        reg_lrs: tuple = (),
        adapter_type: type[Adapter] = LoRAModule,
        adapter_options: dict | None = None,
        file_modules: dict[str, tuple[type[Adapter], dict[str, torch.Tensor]]] | None = None,
    ) -> None:
        """`rank_for` gives each target's (dim, alpha) for fresh `adapter_type` adapters (`adapter_options` are
        the type's own constructor options); with `file_modules` (name -> stored type and tensors) the adapters are
        shaped like the stored ones instead."""
        super().__init__()
        self.multiplier = multiplier
        self.save_format = save_format
        self.reg_lrs = reg_lrs
        self.loraplus_lr_ratio: float | None = None
        self.loraplus_unet_lr_ratio: float | None = None
        self.loraplus_text_encoder_lr_ratio: float | None = None
        self.targets: dict[str, AdapterTarget] = {}
        # One list per text encoder, so each can get its own learning rate.
        self.text_encoder_lora_groups: list[list[nn.Module]] = [[] for _ in range(table.text_encoder_count)]
        self.unet_loras: list[nn.Module] = []
        extra = (dropout, rank_dropout, module_dropout)
        for target in table.targets:
            if file_modules is not None:
                if target.name not in file_modules:
                    continue
                stored_type, tensors = file_modules[target.name]
                module = stored_type.shaped_like(target.name, target.layers, multiplier, tensors, extra)
            else:
                rank = rank_for(target)
                if rank is None or rank[0] == 0:
                    continue
                module = _make_adapter(adapter_type, target, rank, multiplier, extra, split_fused, adapter_options)
            group = self.unet_loras if target.encoder is None else self.text_encoder_lora_groups[target.encoder]
            group.append(module)
            self.targets[target.name] = target
        for module in self.text_encoder_loras + self.unet_loras:
            self.add_module(module.lora_name, module)
        if save_format == "diffusers":
            self._check_diffusers_names(adapter_type)
        logger.info(
            f"LoRA network: {len(self.unet_loras)} U-Net modules, {len(self.text_encoder_loras)} text encoder modules."
        )
        self._trainable: list[nn.Parameter] | None = None

    @property
    def text_encoder_loras(self) -> list[nn.Module]:
        return [module for group in self.text_encoder_lora_groups for module in group]

    def all_loras(self) -> list[Adapter]:
        """Every adapter (the parts of split adapters one by one), for multipliers, norms and inspection."""
        return [leaf for module in self.text_encoder_loras + self.unet_loras for leaf in leaf_adapters(module)]

    def apply_to(
        self, text_encoder: object, unet: object, apply_text_encoder: bool = True, apply_unet: bool = True
    ) -> None:
        """Hook the adapters into their layers; adapters of a part not applied are dropped from the network."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_lora_groups = [[] for _ in self.text_encoder_lora_groups]
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for module in self.text_encoder_loras + self.unet_loras:
            module.apply_to()
        logger.info(
            f"LoRA applied: text encoder {len(self.text_encoder_loras)} modules, U-Net {len(self.unet_loras)} modules."
        )

    def _drop(self, modules: Iterable[nn.Module]) -> None:
        for module in modules:
            delattr(self, module.lora_name)
            del self.targets[module.lora_name]

    def set_multiplier(self, multiplier: float) -> None:
        """Set the strength of every adapter (0 turns the network off exactly)."""
        self.multiplier = multiplier
        for adapter in self.all_loras():
            adapter.multiplier = multiplier

    def set_loraplus_lr_ratio(
        self, loraplus_lr_ratio: float | None, unet_ratio: float | None, text_encoder_ratio: float | None
    ) -> None:
        """LoRA+ (arXiv:2402.12354): train the up weights at `ratio` times the learning rate."""
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = unet_ratio
        self.loraplus_text_encoder_lr_ratio = text_encoder_ratio

    def rank_summary(self) -> tuple[int | None, float | None]:
        """The most common rank and alpha of the adapters (the `ss_network_dim` / `ss_network_alpha` values)."""
        leaves = self.all_loras()
        if not leaves:
            return None, None
        ranks = Counter(leaf.rank_and_alpha()[0] for leaf in leaves)
        alphas = Counter(leaf.rank_and_alpha()[1] for leaf in leaves)
        return ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]

    # ---- files ---------------------------------------------------------------------------------------------

    def file_state_dict(self) -> dict[str, torch.Tensor]:
        """The kohya-format tensors: split adapters as their fused equivalent."""
        state: dict[str, torch.Tensor] = {}
        for module in self.text_encoder_loras + self.unet_loras:
            tensors = module.file_state() if isinstance(module, SplitAdapter) else module.state_dict()
            tensors = self._original_order(module, tensors)
            state.update({f"{module.lora_name}.{key}": value for key, value in tensors.items()})
        return state

    def _original_order(self, module: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors between the model's row order and the file's (they differ for `swapped_halves` targets)."""
        if not self.targets[module.lora_name].swapped_halves:
            return tensors
        return type(leaf_adapters(module)[0]).swap_output_halves(tensors)

    def diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """diffusers / PEFT names: one lora_A / lora_B pair per diffusers layer, alpha / rank folded into lora_B."""
        state: dict[str, torch.Tensor] = {}
        for module in self.text_encoder_loras + self.unet_loras:
            names = iter(self.targets[module.lora_name].diffusers_names)
            for leaf in leaf_adapters(module):
                start = 0
                for size in leaf.part_sizes:
                    rows = slice(start, start + size) if len(leaf.part_sizes) > 1 else None
                    name = next(names)
                    state.update({f"{name}.{key}": value for key, value in leaf.peft_tensors(rows).items()})
                    start += size
        return state

    def _check_diffusers_names(self, adapter_type: type[Adapter]) -> None:
        if not adapter_type.has_peft_form:
            raise ConfigError(f"--network_args save_format=diffusers: diffusers has no form of {adapter_type.label} "
                              "adapters; save in the kohya format (the default), which ComfyUI reads")  # fmt: skip
        unnamed = [name for name, target in self.targets.items() if len(target.diffusers_names) != len(target.layers)]
        if any(self.targets[name].kind == "t5" for name in unnamed):
            raise ConfigError(
                "--network_args save_format=diffusers with train_t5xxl: neither diffusers nor ComfyUI read T5-XXL "
                "adapters under diffusers names; save in the kohya format (the default), whose lora_te3_ keys "
                "ComfyUI loads"
            )
        if unnamed:
            raise ConfigError(
                f"--network_args save_format=diffusers: no diffusers names are known for {_first(unnamed)}; save in "
                "the kohya format (the default), which diffusers loads too"
            )

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        """Write the file atomically: .safetensors with `metadata`, any other extension with torch.save."""
        state = self.diffusers_state_dict() if self.save_format == "diffusers" else self.file_state_dict()
        state = {key: value.detach().to("cpu", dtype or value.dtype).contiguous() for key, value in state.items()}
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

    def load_weights(self, file: str | os.PathLike) -> tuple[list[str], list[str]]:
        """Load a kohya-format file into this network; unknown or mis-shaped keys raise CheckpointError.

        Returns (missing keys, unexpected keys); missing keys (modules the file lacks) keep their initial, no-op
        values and are logged as a warning. Split adapters take fused tensors apart (they must be block-diagonal).
        """
        weights = load_state_dict_file(file)
        own = self.file_state_dict()
        unknown = sorted(set(weights) - set(own))
        if unknown:
            raise CheckpointError(
                f"{file}: {len(unknown)} keys match no module of this network: {_first(unknown)}. "
                "Was it trained for another model, or with the text encoder while this run trains the U-Net only?"
            )
        wrong = [f"{key} {tuple(weights[key].shape)} != {tuple(own[key].shape)}" for key in sorted(weights)
                 if weights[key].shape != own[key].shape]  # fmt: skip
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
        for module in self.text_encoder_loras + self.unet_loras:
            tensors = _module_tensors(weights, module.lora_name)
            if not tensors:
                continue
            tensors = self._original_order(module, tensors)
            if isinstance(module, SplitAdapter):
                module.load_file_state(tensors, os.fspath(file))
            else:
                module.load_state_dict(tensors, strict=False)
                module.refresh_scale()
        logger.info("Loaded LoRA weights from %s", file)
        return missing, []

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
        by_name = group_modules(weights_sd)
        modules = {module.lora_name: module for module in self.text_encoder_loras + self.unet_loras}
        unknown = sorted(set(by_name) - set(modules))
        if unknown:
            raise CheckpointError(f"{len(unknown)} LoRA modules match no layer of the model: {_first(unknown)}.")
        for name, tensors in by_name.items():
            modules[name].merge(self._original_order(modules[name], tensors), dtype, device)
        logger.info("Merged %d LoRA modules into the model.", len(by_name))

    # ---- optimizer -----------------------------------------------------------------------------------------

    def prepare_optimizer_params(
        self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None, default_lr: float | None
    ) -> tuple[list[dict], list[str]]:
        """Optimizer param groups and their names ("textencoder", "unet", "unet plus" ...).

        A learning rate of None falls back to `default_lr`; a group whose learning rate is 0 is left out and its
        parameters frozen. `text_encoder_lr` may be a list with one value per text encoder. With network_reg_lrs the
        denoiser's adapters are grouped by the last regex matching their original module path.
        """
        groups: list[dict] = []
        descriptions: list[str] = []
        trainable: list[nn.Parameter] = []
        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        count = len(self.text_encoder_lora_groups)
        for index, modules in enumerate(self.text_encoder_lora_groups):
            lr = _encoder_lr(text_encoder_lr, index, default_lr)
            name = "textencoder" if count == 1 else f"textencoder{index + 1}"
            _add_param_groups(modules, lr, te_ratio, name, groups, descriptions, trainable)
        unet_ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
        base_rate = unet_lr if unet_lr is not None else default_lr
        by_rate: dict[float | None, list[nn.Module]] = {}
        for module in self.unet_loras:
            rate = last_match(self.reg_lrs, self.targets[module.lora_name].path)
            by_rate.setdefault(base_rate if rate is None else rate, []).append(module)
        for rate, modules in by_rate.items():
            name = "unet" if rate == base_rate else f"unet lr {rate:g}"
            _add_param_groups(modules, rate, unet_ratio, name, groups, descriptions, trainable)
        self._trainable = trainable
        self._set_requires_grad()
        return groups, descriptions

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
        """No per-step work for LoRA."""

    def get_trainable_params(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates."""
        return list(self.parameters()) if self._trainable is None else list(self._trainable)

    @torch.no_grad()
    def apply_max_norm_regularization(
        self, max_norm_value: float, device: torch.device | str
    ) -> tuple[int, float, float]:
        """Scale down adapters whose weight change has a norm above `max_norm_value` (kohya's --scale_weight_norms).

        Returns the number of adapters scaled and the mean and max norm after scaling. One host sync per call.
        """
        adapters = self.all_loras()
        if not adapters:
            return 0, 0.0, 0.0
        norms = []
        for adapter in adapters:
            norm = adapter.delta_weight(device).norm()
            clamped = norm.clamp(min=max_norm_value / 2)
            ratio = clamped.clamp(max=max_norm_value) / clamped
            adapter.scale_delta(ratio)
            norms.append(torch.stack([norm * ratio, (ratio < 1).float()]))
        scaled_norms, was_scaled = torch.stack(norms).cpu().unbind(1)
        return int(was_scaled.sum()), float(scaled_norms.mean()), float(scaled_norms.max())


def _make_adapter(adapter_type: type[Adapter], target: AdapterTarget, rank: tuple[int, float], multiplier: float,
                  extra: tuple, split_fused: bool, options: dict | None) -> nn.Module:  # fmt: skip
    dim, alpha = rank
    options = options or {}
    if split_fused and len(target.layers) > 1:
        parts = [adapter_type(f"{target.name}_{index}", [layer], multiplier, dim, alpha, *extra, **options)
                 for index, layer in enumerate(target.layers)]  # fmt: skip
        adapter_type.fuse_parts([part.state_dict() for part in parts])  # refuses types without a fused form
        return SplitAdapter(target.name, parts)
    return adapter_type(target.name, target.layers, multiplier, dim, alpha, *extra, **options)


def _add_param_groups(
    modules: list[nn.Module],
    lr: float | None,
    ratio: float | None,
    name: str,
    groups: list[dict],
    descriptions: list[str],
    trainable: list[nn.Parameter],
) -> None:
    """Append the groups of `modules`: one at `lr`, and with a LoRA+ ratio their up weights at `lr * ratio`."""
    if ratio is None:
        split = [(name, lr, [param for module in modules for param in module.parameters()])]
    else:
        plus = [param for module in modules for leaf in leaf_adapters(module) for param in leaf.plus_parameters()]
        plus_ids = {id(param) for param in plus}
        rest = [param for module in modules for param in module.parameters() if id(param) not in plus_ids]
        split = [(name, lr, rest), (f"{name} plus", None if lr is None else lr * ratio, plus)]
    for description, group_lr, params in split:
        if not params:
            continue
        if group_lr == 0:
            logger.info("LoRA %s: learning rate 0, its %d tensors stay frozen.", description, len(params))
            continue
        groups.append({"params": params} if group_lr is None else {"params": params, "lr": group_lr})
        descriptions.append(description)
        trainable.extend(params)


def _module_tensors(weights: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix = name + "."
    return {key[len(prefix) :]: value for key, value in weights.items() if key.startswith(prefix)}


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


def _table(text_encoder, unet, adapter_targets: TargetTable | None) -> TargetTable:
    if adapter_targets is not None:
        return adapter_targets
    from library.families import adapter_targets_for_models

    return adapter_targets_for_models(_as_list(text_encoder), unet)


def load_state_dict_file(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors or torch state dict on the CPU; unreadable files raise CheckpointError."""
    import pickle

    if os.fspath(file).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(file)
        except Exception as err:  # safetensors raises its own error types for a damaged or cut-short file
            raise CheckpointError(f"Cannot read LoRA weights from {file}: damaged or incomplete ({err})") from None
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{file} holds Python objects besides tensors, which safe loading refuses (a file from elsewhere could "
            "run code when loaded); save or convert it as .safetensors"
        ) from None
    except (OSError, RuntimeError, ValueError, EOFError) as err:
        raise CheckpointError(f"Cannot read LoRA weights from {file}: damaged or incomplete ({err})") from None
    if not isinstance(loaded, dict) or not all(torch.is_tensor(value) for value in loaded.values()):
        raise CheckpointError(f"{file} is not a LoRA file (a mapping of tensor names to tensors)")
    return loaded


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    adapter_targets: TargetTable | None = None,
    **kwargs: object,
) -> LoRANetwork:
    """Create a fresh LoRA network (plugin entry point); `kwargs` are the `--network_args` (`use_dora=True`: DoRA)."""
    adapter_type = DoRAModule if parse_flag(kwargs.get("use_dora", False)) else LoRAModule
    return build_network(adapter_type, {}, NetworkCall(multiplier, network_dim, network_alpha, text_encoder, unet,
                                                        neuron_dropout, adapter_targets, kwargs, "networks.lora",
                                                        ("use_dora",)))  # fmt: skip


@dataclass(frozen=True)
class NetworkCall:
    """The arguments of a plugin's `create_network`, and which module and type options it serves."""

    multiplier: float
    network_dim: int | None
    network_alpha: float | None
    text_encoder: nn.Module | Sequence[nn.Module] | None
    unet: nn.Module | None
    neuron_dropout: float | None
    adapter_targets: TargetTable | None
    network_args: dict
    module: str
    type_keys: tuple[str, ...] = ()


def build_network(adapter_type: type[Adapter], options: dict, call: NetworkCall) -> LoRANetwork:
    """A fresh network of `adapter_type` adapters (`options`: the type's own constructor options) for every family:
    what networks.lora, networks.loha and networks.lokr create."""
    table = _table(call.text_encoder, call.unet, call.adapter_targets)
    shared = {key: value for key, value in call.network_args.items() if key not in call.type_keys}
    network_options = NetworkOptions.parse(shared, table.args, call.module, call.type_keys)
    dim = int(call.network_dim) if call.network_dim is not None else DEFAULT_DIM
    alpha = float(call.network_alpha) if call.network_alpha is not None else DEFAULT_ALPHA
    if dim < 1:
        raise ConfigError(f"--network_dim must be a positive integer, got {dim}.")
    if call.neuron_dropout is not None and not 0.0 <= call.neuron_dropout < 1.0:
        raise ConfigError(f"--network_dropout must be in [0, 1), got {call.neuron_dropout}.")
    network_options.check_table(table)
    conv_alpha = network_options.conv_alpha if network_options.conv_alpha is not None else DEFAULT_ALPHA
    if network_options.conv_alpha is not None and network_options.conv_dim is None:
        logger.warning("--network_args conv_alpha is ignored without conv_dim: 3x3 convolutions get no adapter.")
    logger.info(
        f"{adapter_type.label} dim {dim}, alpha {alpha:g}, conv dim {network_options.conv_dim}, conv alpha "
        f"{conv_alpha:g}; dropout {call.neuron_dropout}, rank dropout {network_options.rank_dropout}, module dropout "
        f"{network_options.module_dropout}" + ("; q/k/v split" if network_options.split_qkv else "")
    )
    network = LoRANetwork(
        table,
        lambda target: network_options.rank_for(target, table, dim, alpha),
        call.multiplier,
        call.neuron_dropout,
        network_options.rank_dropout,
        network_options.module_dropout,
        split_fused=network_options.split_qkv,
        save_format=network_options.save_format,
        reg_lrs=network_options.network_reg_lrs,
        adapter_type=adapter_type,
        adapter_options=options,
    )
    network.set_loraplus_lr_ratio(network_options.loraplus_lr_ratio, network_options.loraplus_unet_lr_ratio,
                                  network_options.loraplus_text_encoder_lr_ratio)  # fmt: skip
    if network_options.verbose:
        log_ranks(network, table)
    return network


def log_ranks(network: LoRANetwork, table: TargetTable) -> None:
    """`verbose=True`: one line per adapter (name, rank, alpha), then the table's layers that got none."""
    for module in network.text_encoder_loras + network.unet_loras:
        rank, alpha = leaf_adapters(module)[0].rank_and_alpha()
        logger.info("  %-70s rank %d, alpha %g", module.lora_name, rank, alpha)
    skipped = [target.name for target in table.targets if target.name not in network.targets]
    if skipped:
        logger.info("%d layers without an adapter (rank 0, blocks not chosen, or off by default):", len(skipped))
        for name in skipped:
            logger.info("  %s", name)


def modules_in_file(
    weights_sd: dict[str, torch.Tensor], types: Sequence[type[Adapter]] = LORA_TYPES
) -> dict[str, tuple[type[Adapter], int, float]]:
    """(adapter type, dim, alpha) per module name of a kohya-format state dict; modules of another type than
    `types` raise CheckpointError naming the network module that loads them."""
    modules = {}
    for name, tensors in group_modules(weights_sd).items():
        adapter_type = adapter_type_of(set(tensors), types)
        if adapter_type is None:
            raise CheckpointError(_wrong_type_message(name, tensors, types))
        missing = adapter_type.missing_suffixes(set(tensors))
        if missing:
            raise CheckpointError(f"{adapter_type.label} module {name} lacks {', '.join(missing)}; the file is "
                                  "incomplete")  # fmt: skip
        modules[name] = (adapter_type, *adapter_type.rank_of(tensors))
    return modules


def group_modules(weights_sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors of a kohya-format state dict grouped by module name (the key up to its first dot), keyed by suffix."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights_sd.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = value
    return modules


def _wrong_type_message(name: str, tensors: dict[str, torch.Tensor], types: Sequence[type[Adapter]]) -> str:
    from networks.adapter_types import all_adapter_types

    known = {suffix for adapter_type in types for suffix in adapter_type.key_suffixes}
    other = sorted(f"{name}.{suffix}" for suffix in tensors if suffix not in known)
    actual = adapter_type_of(set(tensors), all_adapter_types())
    where = f"they are {actual.label} modules: load them with --network_module {actual.plugin}; other LyCORIS " \
        "types need" if actual else "LyCORIS files of other types need"  # fmt: skip
    label = " / ".join(adapter_type.label for adapter_type in types)
    return (f"Not a plain {types[0].label} file: keys {_first(other)} are not {label} tensors "
            f"({', '.join(sorted(known))}); {where} --network_module lycoris.kohya.")  # fmt: skip


def ranks_from_weights(weights_sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, float]]:
    """(dim, alpha) per LoRA name of a kohya-format state dict; files without `.alpha` get alpha = dim."""
    return {name: (dim, alpha) for name, (_, dim, alpha) in modules_in_file(weights_sd).items()}


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: dict[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    adapter_targets: TargetTable | None = None,
    **kwargs: object,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """Create a network shaped like a saved LoRA / DoRA (dims and alphas per module); weights are not loaded here.

    Returns the network and the state dict read (load it with `load_weights` or `load_state_dict`, or merge it with
    `merge_to`). Fused modules stay fused. `for_inference` leaves out the training-only dropouts.
    """
    call = NetworkCall(multiplier, None, None, text_encoder, unet, None, adapter_targets, kwargs, "networks.lora",
                       ("use_dora",))  # fmt: skip
    return network_from_weights(LORA_TYPES, call, file, weights_sd, for_inference)


def network_from_weights(
    types: Sequence[type[Adapter]], call: NetworkCall, file: str | os.PathLike | None,
    weights_sd: dict[str, torch.Tensor] | None, for_inference: bool,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:  # fmt: skip
    """A network shaped like the stored modules of `types` (the body of every plugin's create_network_from_weights)."""
    table = _table(call.text_encoder, call.unet, call.adapter_targets)
    shared = {key: value for key, value in call.network_args.items() if key not in call.type_keys}
    options = NetworkOptions.parse(shared, table.args, call.module, call.type_keys)
    if options.conv_dim is not None or options.conv_alpha is not None:
        logger.warning("--network_args conv_dim / conv_alpha are ignored: dims and alphas are read from the weights.")
    if weights_sd is None:
        weights_sd = load_state_dict_file(file)
    if any(".lora_A." in key for key in weights_sd):
        raise CheckpointError(f"{file or 'LoRA weights'}: diffusers / PEFT names; convert them to the kohya format "
                              "with networks/convert_lora.py, or load them with diffusers")  # fmt: skip
    stored = modules_in_file(weights_sd, types)
    groups = group_modules(weights_sd)
    network = LoRANetwork(
        table,
        lambda target: None,
        call.multiplier,
        rank_dropout=None if for_inference else options.rank_dropout,
        module_dropout=None if for_inference else options.module_dropout,
        reg_lrs=options.network_reg_lrs,
        file_modules={name: (adapter_type, groups[name]) for name, (adapter_type, _, _) in stored.items()},
    )
    unmatched = sorted(set(stored) - set(network.targets))
    if unmatched:
        raise CheckpointError(
            f"{file or 'LoRA weights'}: {len(unmatched)} modules match no layer of the given models: "
            f"{_first(unmatched)}. Was it trained for another model family, or are text encoders missing?"
        )
    network.set_loraplus_lr_ratio(options.loraplus_lr_ratio, options.loraplus_unet_lr_ratio,
                                  options.loraplus_text_encoder_lr_ratio)  # fmt: skip
    return network, weights_sd
