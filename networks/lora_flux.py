"""LoRA network plugin for FLUX.1: adapters on the double and single blocks of a diffusers FluxTransformer2DModel
(optionally its input layers), on CLIP-L and, with `train_t5xxl=True`, on T5-XXL.

Modules are named by the BFL layout (`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`,
`lora_te1_...` for CLIP-L, `lora_te3_...` for T5), the files ComfyUI, Forge and diffusers load. A BFL Linear that
diffusers splits (fused q|k|v, and q|k|v|mlp of `linear1`) gets one adapter with a shared `lora_down` whose
`lora_up` rows feed each part; with `split_qkv=True` each part gets its own adapter and the file holds the exact
fused equivalent (downs concatenated, ups block-diagonal, alpha times the number of parts).
`save_format=diffusers` writes diffusers / PEFT names instead (`transformer.<module>.lora_A.weight`, scale folded in).
"""

from __future__ import annotations

import logging
import os
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from library.atomic import atomic_path
from library.checkpoints import flux_keys
from library.errors import CheckpointError, ConfigError
from networks.lora import (
    DEFAULT_ALPHA,
    DEFAULT_DIM,
    UNET_PREFIX,
    LoRAModule,
    LoRANetwork,
    LoRAOptions,
    _as_list,
    load_state_dict_file,
    ranks_from_weights,
    text_encoder_targets,
)

logger = logging.getLogger(__name__)

CLIP_PREFIX = "lora_te1"
T5_PREFIX = "lora_te3"
T5_TARGET_CLASSES = ("T5Attention", "T5DenseGatedActDense", "T5DenseActDense")
# --network_args dims by BFL module kind; in_dims lists the input layers in this order.
TYPE_DIMS = {
    "img_attn": "img_attn_dim", "txt_attn": "txt_attn_dim", "img_mlp": "img_mlp_dim", "txt_mlp": "txt_mlp_dim",
    "img_mod": "img_mod_dim", "txt_mod": "txt_mod_dim", "linear1": "single_dim", "linear2": "single_dim",
    "modulation": "single_mod_dim",
}  # fmt: skip
IN_LAYERS = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")
SAVE_FORMATS = ("kohya", "diffusers")
DIFFUSERS_PREFIXES = ("transformer", "text_encoder", "text_encoder_2")  # transformer, CLIP-L, T5


# ---- options --------------------------------------------------------------------------------------------------


def _text(value: object) -> str:
    """A network arg as text, whatever literal the command line parsed it into (tuple, list, number ...)."""
    if isinstance(value, (tuple, list)):
        return ",".join(str(item) for item in value)
    return str(value)


def parse_indices(name: str, value: object) -> frozenset[int] | None:
    """`0,1,8-12` -> {0, 1, 8, ..., 12}; `all` (or unset) -> None (every block); `none` -> empty."""
    text = _text(value).strip().lower()
    if text in ("all", "", "none_given"):
        return None
    if text == "none":
        return frozenset()
    indices: set[int] = set()
    for part in text.split(","):
        try:
            if "-" in part:
                first, last = (int(number) for number in part.split("-", 1))
                indices.update(range(first, last + 1))
            else:
                indices.add(int(part))
        except ValueError as err:
            message = f"--network_args {name}: expected indices like 0,1,8-12, all or none, got {text!r}"
            raise ConfigError(message) from err
    return frozenset(indices)


def parse_regex_values(name: str, value: object, kind: type) -> tuple[tuple[re.Pattern, float], ...]:
    """`regex=value,regex=value` -> compiled patterns with their values (the last matching one wins)."""
    rules = []
    for item in _text(value).split(","):
        if not item.strip():
            continue
        pattern, separator, number = item.rpartition("=")
        try:
            if not separator:
                raise ValueError(item)
            rules.append((re.compile(pattern.strip()), kind(number.strip())))
        except (ValueError, re.error) as err:
            raise ConfigError(f"--network_args {name}: expected regex=value items, got {item!r} ({err})") from err
    return tuple(rules)


def last_match(rules: Sequence[tuple[re.Pattern, float]], name: str) -> float | None:
    """The value of the last rule whose regex matches anywhere in `name`."""
    value = None
    for pattern, rule_value in rules:
        if pattern.search(name):
            value = rule_value
    return value


@dataclass(frozen=True)
class FluxLoRAOptions:
    """The FLUX-specific `--network_args`; the rest go to networks.lora's options."""

    type_dims: dict[str, int | None] = field(default_factory=dict)
    in_dims: tuple[int, ...] | None = None
    double_indices: frozenset[int] | None = None
    single_indices: frozenset[int] | None = None
    reg_dims: tuple = ()
    reg_lrs: tuple = ()
    split_qkv: bool = False
    train_t5xxl: bool = False
    save_format: str = "kohya"
    base: LoRAOptions = field(default_factory=LoRAOptions)

    @classmethod
    def from_network_args(cls, network_args: dict[str, object]) -> FluxLoRAOptions:
        args = dict(network_args)
        type_dims = {key: _optional_int(key, args.pop(key)) for key in set(TYPE_DIMS.values()) if key in args}
        in_dims = args.pop("in_dims", None)
        options = cls(
            type_dims=type_dims,
            in_dims=None if in_dims is None else tuple(int(v) for v in _text(in_dims).strip("[]() ").split(",")),
            double_indices=parse_indices("train_double_block_indices", args.pop("train_double_block_indices", "all")),
            single_indices=parse_indices("train_single_block_indices", args.pop("train_single_block_indices", "all")),
            reg_dims=parse_regex_values("network_reg_dims", args.pop("network_reg_dims", ""), int),
            reg_lrs=parse_regex_values("network_reg_lrs", args.pop("network_reg_lrs", ""), float),
            split_qkv=_flag(args.pop("split_qkv", False)),
            train_t5xxl=_flag(args.pop("train_t5xxl", False)),
            save_format=_text(args.pop("save_format", "kohya")).lower(),
            base=_base_options(args),
        )
        options.validate()
        return options

    def validate(self) -> None:
        if self.in_dims is not None and len(self.in_dims) != len(IN_LAYERS):
            raise ConfigError(f"--network_args in_dims needs {len(IN_LAYERS)} dims ({', '.join(IN_LAYERS)}), "
                              f"got {list(self.in_dims)}")  # fmt: skip
        if self.save_format not in SAVE_FORMATS:
            choices = ", ".join(SAVE_FORMATS)
            raise ConfigError(f"--network_args save_format must be one of {choices}, got {self.save_format!r}")
        for name, dim in list(self.type_dims.items()) + [("in_dims", d) for d in self.in_dims or ()]:
            if dim is not None and dim < 0:
                raise ConfigError(f"--network_args {name} must not be negative, got {dim}")

    def dim_for(self, module: str, network_dim: int) -> int:
        """The rank of BFL module `module` (0: no adapter): by kind and block index, then network_reg_dims."""
        parts = module.split(".")
        if parts[0] in ("double_blocks", "single_blocks"):
            chosen = self.double_indices if parts[0] == "double_blocks" else self.single_indices
            if chosen is not None and int(parts[1]) not in chosen:
                return 0
            kind_dim = self.type_dims.get(TYPE_DIMS[parts[2]])  # img_attn, ..., linear1, modulation
            dim = kind_dim if kind_dim is not None else network_dim
        elif parts[0] in IN_LAYERS and self.in_dims is not None:
            dim = self.in_dims[IN_LAYERS.index(parts[0])]
        else:
            dim = 0  # input layers without in_dims, and the final layer
        override = last_match(self.reg_dims, module)
        return int(override) if override is not None else dim


def _optional_int(name: str, value: object) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--network_args {name} must be an integer, got {value!r}") from err


def _flag(value: object) -> bool:
    return value is True or _text(value).strip().lower() in ("true", "1", "yes")


def _base_options(args: dict[str, object]) -> LoRAOptions:
    known = {field_.name for field_ in fields(LoRAOptions)}
    unknown = sorted(set(args) - known)
    if unknown:
        flux_keys_list = sorted(set(TYPE_DIMS.values()) | {"in_dims", "train_double_block_indices",
                                "train_single_block_indices", "network_reg_dims", "network_reg_lrs", "split_qkv",
                                "train_t5xxl", "save_format"} | known)  # fmt: skip
        raise ConfigError(f"unknown --network_args {', '.join(unknown)} for networks.lora_flux; known: "
                          f"{', '.join(flux_keys_list)}")  # fmt: skip
    return LoRAOptions.from_network_args(args)


# ---- adapter modules ------------------------------------------------------------------------------------------


class FusedLoRAModule(LoRAModule):
    """One adapter over several Linears that read the same input (a BFL fused Linear): a shared `lora_down`, and
    each part's output gets its rows of `lora_up`. Its weights are exactly the LoRA of the fused layer."""

    def __init__(self, lora_name: str, parts: Sequence[nn.Linear], *args, **kwargs) -> None:
        stand_in = types.SimpleNamespace(in_features=parts[0].in_features,
                                         out_features=sum(part.out_features for part in parts))  # fmt: skip
        super().__init__(lora_name, stand_in, *args, **kwargs)
        self._parts = tuple(parts)  # not registered: the base layers belong to the model
        self.part_sizes = [part.out_features for part in parts]
        self.part_forwards: list | None = None

    def apply_to(self) -> None:
        if self.part_forwards is not None:
            return
        self.part_forwards = [part.forward for part in self._parts]
        offsets = [sum(self.part_sizes[:index]) for index in range(len(self._parts))]
        for index, part in enumerate(self._parts):
            part.forward = self._part_forward(index, offsets[index], self.part_sizes[index])

    def _part_forward(self, index: int, start: int, size: int):
        def forward(x: torch.Tensor) -> torch.Tensor:
            base = self.part_forwards[index](x)
            if self.multiplier == 0:
                return base
            if self.training and self.module_dropout and torch.rand(()).item() < self.module_dropout:
                return base
            hidden = self.lora_down(x.to(self.lora_down.weight.dtype))  # (..., r)
            scale = self.scale
            if self.training:
                hidden, scale = self._drop(hidden, scale)
            delta = nn.functional.linear(hidden, self.lora_up.weight[start : start + size]) * (self.multiplier * scale)
            return base + delta.to(base.dtype)

        return forward

    @torch.no_grad()
    def merge(self, weights: dict[str, torch.Tensor], dtype: torch.dtype | None, device: torch.device | str) -> None:
        up = weights["lora_up.weight"].to(device, torch.float32)
        down = weights["lora_down.weight"].to(device, torch.float32)
        alpha = float(weights["alpha"]) if "alpha" in weights else float(down.shape[0])
        delta = (up.flatten(1) @ down) * (self.multiplier * alpha / down.shape[0])
        for part, part_delta in zip(self._parts, delta.split(self.part_sizes)):
            part.weight.copy_((part.weight.to(device, torch.float32) + part_delta).to(dtype or part.weight.dtype))


class SplitLoRAModule(nn.Module):
    """One adapter per part of a BFL fused Linear (`split_qkv`), written to files as the equivalent fused LoRA."""

    def __init__(self, lora_name: str, parts: Sequence[nn.Linear], multiplier: float, dim: int, alpha: float,
                 *args) -> None:  # fmt: skip
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = dim
        self.parts = nn.ModuleList(
            LoRAModule(f"{lora_name}_{index}", part, multiplier, dim, alpha, *args) for index, part in enumerate(parts)
        )

    def fused_state(self) -> dict[str, torch.Tensor]:
        """lora_down (k*r, in) = the downs stacked; lora_up (sum out, k*r) block-diagonal; alpha k * alpha."""
        downs = [part.lora_down.weight for part in self.parts]
        ups = [part.lora_up.weight for part in self.parts]
        return {
            "lora_down.weight": torch.cat(downs, dim=0),
            "lora_up.weight": torch.block_diag(*ups),
            "alpha": self.parts[0].alpha * len(self.parts),
        }

    def load_fused_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """The inverse of `fused_state`; a fused up that is not block-diagonal cannot be split exactly."""
        count, rank = len(self.parts), self.lora_dim
        up, down = state["lora_up.weight"], state["lora_down.weight"]
        sizes = [part.lora_up.weight.shape[0] for part in self.parts]
        blocks = []
        for index, rows in enumerate(up.split(sizes, dim=0)):
            kept = rows[:, index * rank : (index + 1) * rank]
            outside = torch.cat([rows[:, : index * rank], rows[:, (index + 1) * rank :]], dim=1)
            if outside.any():
                raise CheckpointError(f"{source}: {self.lora_name} has a shared (not block-diagonal) lora_up; load it "
                                      "without split_qkv=True")  # fmt: skip
            blocks.append(kept)
        alpha = state.get("alpha", torch.tensor(float(rank * count))) / count
        for part, part_down, part_up in zip(self.parts, down.split(rank, dim=0), blocks):
            part.lora_down.weight.data.copy_(part_down)
            part.lora_up.weight.data.copy_(part_up)
            part.alpha.copy_(alpha)
            part.refresh_scale()


def _lora_name(prefix: str, module: str) -> str:
    return f"{prefix}.{module}".replace(".", "_")


def _t5_targets(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    targets = []
    for block_name, block in encoder.named_modules():
        if type(block).__name__ in T5_TARGET_CLASSES:
            targets += [(_lora_name(T5_PREFIX, f"{block_name}.{name}"), layer) for name, layer in block.named_modules()
                        if isinstance(layer, nn.Linear)]  # fmt: skip
    return targets


def _real_encoder(encoder: nn.Module) -> tuple[nn.Module, str]:
    """The encoder whose module paths diffusers uses, and the view level to strip (TextModelLevel adds one)."""
    if type(encoder).__name__ == "TextModelLevel":
        return encoder.text_model, "text_model."
    return encoder, ""


# ---- the network ----------------------------------------------------------------------------------------------


class FluxLoRANetwork(LoRANetwork):
    """LoRA adapters of a FLUX.1 transformer and its text encoders; see the module docstring for names and files."""

    def __init__(
        self,
        text_encoders: Sequence[nn.Module],
        transformer: nn.Module | None,
        dims: dict[str, tuple[int, float]],
        options: FluxLoRAOptions,
        multiplier: float = 1.0,
        dropout: float | None = None,
        text_rank: tuple[int, float] | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.multiplier = multiplier
        self.options = options
        self.loraplus_lr_ratio = self.loraplus_unet_lr_ratio = self.loraplus_text_encoder_lr_ratio = None
        extra = (dropout, options.base.rank_dropout, options.base.module_dropout)
        self.text_encoder_lora_groups = self._text_encoder_loras(text_encoders, dims, text_rank, extra)
        self.unet_loras = self._transformer_loras(transformer, dims, extra) if transformer is not None else []
        for lora in self.text_encoder_loras + self.unet_loras:
            self.add_module(lora.lora_name, lora)
        self.diffusers_names = self._diffusers_names(text_encoders, transformer)
        self._trainable: list[nn.Parameter] | None = None
        logger.info("FLUX LoRA: %d transformer modules, %d text-encoder modules%s", len(self.unet_loras),
                    len(self.text_encoder_loras), " (q/k/v split)" if options.split_qkv else "")  # fmt: skip

    def _text_encoder_loras(self, encoders, dims, text_rank, extra) -> list[list[LoRAModule]]:
        groups = []
        for index, encoder in enumerate(encoders):
            if index == 1 and not self.options.train_t5xxl:
                groups.append([])
                continue
            targets = _t5_targets(encoder) if index == 1 else text_encoder_targets(encoder, CLIP_PREFIX)
            loras = []
            for name, layer in targets:
                rank = dims.get(name, text_rank)
                if rank is not None and rank[0] > 0:
                    loras.append(LoRAModule(name, layer, self.multiplier, rank[0], rank[1], *extra))
            groups.append(loras)
        return groups

    def _transformer_loras(self, transformer: nn.Module, dims, extra) -> list[nn.Module]:
        loras = []
        for module, parts in flux_keys.linear_modules(dict(transformer.config)):
            name = _lora_name(UNET_PREFIX, module)
            if name not in dims or dims[name][0] == 0:
                continue
            dim, alpha = dims[name]
            layers = [transformer.get_submodule(part) for part in parts]
            if len(layers) == 1:
                loras.append(LoRAModule(name, layers[0], self.multiplier, dim, alpha, *extra))
            elif self.options.split_qkv:
                loras.append(SplitLoRAModule(name, layers, self.multiplier, dim, alpha, *extra))
            else:
                loras.append(FusedLoRAModule(name, layers, self.multiplier, dim, alpha, *extra))
            loras[-1].bfl_module = module
            loras[-1].diffusers_parts = parts
        return loras

    @staticmethod
    def _diffusers_names(text_encoders, transformer) -> dict[int, str]:
        """id(layer) -> its diffusers / PEFT module name (`transformer.<path>`, `text_encoder.<path>` ...)."""
        names: dict[int, str] = {}
        for prefix, model in zip(DIFFUSERS_PREFIXES, [transformer, *text_encoders]):
            if model is None:
                continue
            real, _ = _real_encoder(model)
            for path, layer in real.named_modules():
                if isinstance(layer, nn.Linear):
                    names[id(layer)] = f"{prefix}.{path}"
        return names

    def all_loras(self) -> list[LoRAModule]:
        """Every LoRAModule (the parts of split adapters one by one), for hooks, multiplier and weight norms."""
        leaves = [part for lora in self.unet_loras for part in getattr(lora, "parts", [lora])]
        return self.text_encoder_loras + leaves

    # ---- files ---------------------------------------------------------------------------------------------

    def file_state_dict(self) -> dict[str, torch.Tensor]:
        """The kohya-format tensors: fused adapters as one module, split ones as their fused equivalent."""
        state: dict[str, torch.Tensor] = {}
        for lora in self.text_encoder_loras + self.unet_loras:
            tensors = lora.fused_state() if isinstance(lora, SplitLoRAModule) else lora.state_dict()
            state.update({f"{lora.lora_name}.{key}": value for key, value in tensors.items()})
        return state

    def diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """diffusers / PEFT names, one lora_A / lora_B per diffusers Linear, alpha / rank folded into lora_B."""
        state: dict[str, torch.Tensor] = {}
        for lora in self.all_loras():
            if isinstance(lora, FusedLoRAModule):
                ups = lora.lora_up.weight.split(lora.part_sizes)
                layers = lora._parts
            else:
                ups, layers = [lora.lora_up.weight], [lora.org_module]
            for layer, up in zip(layers, ups):
                name = self.diffusers_names[id(layer)]
                state[f"{name}.lora_A.weight"] = lora.lora_down.weight.detach().clone()
                state[f"{name}.lora_B.weight"] = up.detach() * lora.scale
        return state

    def save_weights(self, file: str | os.PathLike, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> None:
        state = self.diffusers_state_dict() if self.options.save_format == "diffusers" else self.file_state_dict()
        state = {key: value.detach().to("cpu", dtype or value.dtype).contiguous() for key, value in state.items()}
        with atomic_path(file) as temp:
            if os.fspath(file).endswith(".safetensors"):
                from safetensors.torch import save_file

                save_file(state, temp, metadata=metadata or None)
            else:
                torch.save(state, temp)

    def load_weights(self, file: str | os.PathLike) -> tuple[list[str], list[str]]:
        """Load a kohya-format FLUX LoRA; split adapters take the fused tensors apart (they must be block-diagonal)."""
        weights = load_state_dict_file(file)
        own = self.file_state_dict()
        unknown = sorted(set(weights) - set(own))
        if unknown:
            raise CheckpointError(f"{file}: {len(unknown)} keys match no module of this network: {unknown[:5]}")
        wrong = [key for key in weights if weights[key].shape != own[key].shape]
        if wrong:
            raise CheckpointError(f"{file}: tensors of another shape than this network's: {wrong[:5]}; use the file's "
                                  "network_dim or create the network from the weights")  # fmt: skip
        for lora in self.text_encoder_loras + self.unet_loras:
            prefix = lora.lora_name + "."
            state = {key[len(prefix) :]: value for key, value in weights.items() if key.startswith(prefix)}
            if not state:
                continue
            if isinstance(lora, SplitLoRAModule):
                lora.load_fused_state(state, os.fspath(file))
            else:
                lora.load_state_dict(state, strict=False)
                lora.refresh_scale()
        missing = sorted(set(own) - set(weights))
        logger.info("loaded FLUX LoRA weights from %s (%d keys not in the file)", file, len(missing))
        return missing, []

    def merge_to(self, text_encoder, unet, weights_sd, dtype, device) -> None:
        by_name: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in weights_sd.items():
            name, _, suffix = key.partition(".")
            by_name.setdefault(name, {})[suffix] = value
        loras = {lora.lora_name: lora for lora in self.text_encoder_loras + self.unet_loras}
        unknown = sorted(set(by_name) - set(loras))
        if unknown:
            raise CheckpointError(f"{len(unknown)} LoRA modules match no layer of the model: {unknown[:5]}")
        for name, weights in by_name.items():
            loras[name].merge(weights, dtype, device)

    # ---- optimizer -----------------------------------------------------------------------------------------

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        """As networks.lora, with the transformer modules grouped by network_reg_lrs (last matching regex wins)."""
        if not self.options.reg_lrs:
            return super().prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)
        kept, self.unet_loras = self.unet_loras, []
        groups, descriptions = super().prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)
        self.unet_loras = kept
        trainable = list(self._trainable or [])
        by_rate: dict[float | None, list] = {}
        base_rate = unet_lr if unet_lr is not None else default_lr
        for lora in kept:
            rate = last_match(self.options.reg_lrs, lora.bfl_module)
            by_rate.setdefault(base_rate if rate is None else rate, []).append(lora)
        ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
        for rate, loras in by_rate.items():
            name = "unet" if rate == base_rate else f"unet lr {rate:g}"
            self._add_param_groups(loras, rate, ratio, name, groups, descriptions, trainable)
        self._trainable = trainable
        self._set_requires_grad()
        return groups, descriptions


# ---- plugin entry points --------------------------------------------------------------------------------------


def _encoders(text_encoder) -> list[nn.Module]:
    return _as_list(text_encoder)


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: object,
) -> FluxLoRANetwork:
    """A fresh FLUX LoRA network (plugin entry point); `unet` is the FluxTransformer2DModel."""
    options = FluxLoRAOptions.from_network_args(kwargs)
    dim = int(network_dim) if network_dim is not None else DEFAULT_DIM
    alpha = float(network_alpha) if network_alpha is not None else DEFAULT_ALPHA
    if dim < 1:
        raise ConfigError(f"--network_dim must be a positive integer, got {dim}.")
    dims: dict[str, tuple[int, float]] = {}
    if unet is not None:
        config = dict(unet.config)
        _check_indices(options, config)
        for module, _ in flux_keys.linear_modules(config):
            dims[_lora_name(UNET_PREFIX, module)] = (options.dim_for(module, dim), alpha)
    network = FluxLoRANetwork(_encoders(text_encoder), unet, dims, options, multiplier, neuron_dropout, (dim, alpha))
    base = options.base
    network.set_loraplus_lr_ratio(
        base.loraplus_lr_ratio, base.loraplus_unet_lr_ratio, base.loraplus_text_encoder_lr_ratio
    )
    return network


def _check_indices(options: FluxLoRAOptions, config: dict) -> None:
    for name, chosen, count in (("train_double_block_indices", options.double_indices, config["num_layers"]),
                                ("train_single_block_indices", options.single_indices, config["num_single_layers"])):
        if chosen and max(chosen) >= count:
            raise ConfigError(f"--network_args {name}: this model has blocks 0-{count - 1}, got {sorted(chosen)}")


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: dict[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: object,
) -> tuple[FluxLoRANetwork, dict[str, torch.Tensor]]:
    """A network shaped like a saved kohya-format FLUX LoRA (ranks per module; fused modules stay fused)."""
    if weights_sd is None:
        weights_sd = load_state_dict_file(file)
    if any(".lora_A." in key for key in weights_sd):
        raise CheckpointError(f"{file or 'LoRA weights'}: diffusers / PEFT names; load them with diffusers, or save "
                              "with save_format=kohya to continue training")  # fmt: skip
    ranks = ranks_from_weights(weights_sd)
    options = FluxLoRAOptions(train_t5xxl=any(name.startswith(T5_PREFIX) for name in ranks))
    encoders = _encoders(text_encoder)
    network = FluxLoRANetwork(encoders, unet, ranks, options, multiplier, None, None)
    unmatched = sorted(set(ranks) - {lora.lora_name for lora in network.text_encoder_loras + network.unet_loras})
    if unmatched:
        raise CheckpointError(f"{file or 'LoRA weights'}: {len(unmatched)} modules match no layer of the given "
                              f"models: {unmatched[:5]}")  # fmt: skip
    return network, weights_sd
