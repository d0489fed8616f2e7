"""Adapter targets: the layers of a model that adapter networks attach to, under the names their files use.

A family builds one table of targets from its models (`ModelFamily.adapter_targets`). The LoRA network, the LoRA
tools and the loaders all read that table, so nothing in `networks/` knows a family: the family says which layers
exist, what they are called in kohya-format files (`lora_unet_...`, `lora_te1_...`) and in diffusers / PEFT files,
which original layers diffusers splits into several (FLUX's fused q|k|v), and which `--network_args` choose ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

UNET_PREFIX = "lora_unet"  # kohya's prefix of denoiser modules, whatever the architecture
TEXT_ENCODER_PREFIX = "lora_te"


@dataclass(frozen=True, eq=False)
class AdapterTarget:
    """One adaptable layer of the original model.

    `layers` holds the model's layer, or the parts of one original layer that the model splits (their outputs
    concatenated give the original output; they all read the same input). `encoder` is None for the denoiser and
    the 0-based text-encoder index otherwise (one learning rate per encoder).
    """

    name: str  # the module name in kohya-format files: the key prefix before `.lora_down.weight`
    layers: tuple[nn.Module, ...]
    encoder: int | None
    path: str  # the module's path in the original layout; network_reg_dims / network_reg_lrs regexes match it
    kind: str = ""  # what family --network_args select it by (e.g. "img_attn" for img_attn_dim)
    block: tuple[str, int] | None = None  # (block list, index) for block-selection network args
    diffusers_names: tuple[str, ...] = ()  # diffusers / PEFT module name of each of `layers`
    # The original layout holds this layer's output rows with their two halves exchanged (diffusers' final norms
    # keep scale|shift where the original has shift|scale): adapter files get the rows in the original order.
    swapped_halves: bool = False

    @property
    def part_sizes(self) -> list[int]:
        """Output rows of each part (the split points of a fused layer)."""
        return [_out_features(layer) for layer in self.layers]

    @property
    def is_conv(self) -> bool:
        return isinstance(self.layers[0], nn.Conv2d)

    @property
    def is_spatial_conv(self) -> bool:
        """A convolution with a kernel larger than 1x1 (ranked by conv_dim / conv_alpha)."""
        return self.is_conv and self.layers[0].kernel_size != (1, 1)


@dataclass(frozen=True)
class TargetArgs:
    """The family's own `--network_args` that choose targets and ranks (shared ones live in networks/).

    - `kind_dims`: arg -> kinds whose rank it sets (FLUX `img_attn_dim` -> img_attn);
    - `list_dims`: arg -> kinds, one rank per kind in this order (FLUX `in_dims`); a kind listed here has no
      adapter unless the arg is given;
    - `block_indices`: arg -> block list whose blocks it selects (FLUX `train_double_block_indices`);
    - `enables`: arg -> kinds that get adapters only when the arg is given or true (SD `conv_dim` -> the ResNet
      blocks, FLUX `train_t5xxl` -> T5);
    - `off_kinds`: kinds with no adapter unless a `network_reg_dims` regex gives one (FLUX's final layer).
    """

    kind_dims: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    list_dims: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    block_indices: Mapping[str, str] = field(default_factory=dict)
    enables: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    off_kinds: tuple[str, ...] = ()

    def names(self) -> list[str]:
        return [*self.kind_dims, *self.list_dims, *self.block_indices, *self.enables]


@dataclass
class TargetTable:
    """Every adaptable layer of a family's models, in a fixed order (adapters are created in this order)."""

    targets: list[AdapterTarget]
    text_encoder_count: int
    args: TargetArgs = field(default_factory=TargetArgs)

    def by_name(self) -> dict[str, AdapterTarget]:
        return {target.name: target for target in self.targets}

    def block_counts(self) -> dict[str, int]:
        """Blocks per block list, as the targets show them."""
        counts: dict[str, int] = {}
        for target in self.targets:
            if target.block is not None:
                name, index = target.block
                counts[name] = max(counts.get(name, 0), index + 1)
        return counts


def lora_name(prefix: str, module_path: str) -> str:
    """kohya's module name: the prefix and the module path with dots as underscores."""
    return f"{prefix}.{module_path}".replace(".", "_")


def text_encoder_prefix(index: int, count: int) -> str:
    """`lora_te` for a single text encoder, `lora_te1`, `lora_te2` ... for several (kohya's numbering)."""
    return TEXT_ENCODER_PREFIX if count == 1 else f"{TEXT_ENCODER_PREFIX}{index + 1}"


def adaptable_layers(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear and plain (ungrouped, undilated) Conv2d layers inside `block`, with their paths below it."""
    return [
        (name, layer)
        for name, layer in block.named_modules()
        if isinstance(layer, nn.Linear)
        or (isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.dilation == (1, 1))
    ]


def deduplicated(targets: Iterable[AdapterTarget]) -> list[AdapterTarget]:
    """The first target of each name (a target block nested in another one lists its layers twice)."""
    seen: set[str] = set()
    unique = []
    for target in targets:
        if target.name not in seen:
            seen.add(target.name)
            unique.append(target)
    return unique


def encoder_linear_targets(
    encoder: nn.Module,
    prefix: str,
    index: int,
    block_class: Sequence[str] | None = None,
    kind: str = "",
    path_prefix: str = "",
    diffusers_prefix: str | None = None,
    diffusers_root: nn.Module | None = None,
) -> list[AdapterTarget]:
    """Targets for every Linear inside the blocks of a text encoder whose class matches `block_class` (all blocks
    when None).

    `path_prefix` goes in front of module paths (the `text_model.` level of CLIP files); `diffusers_root` is the
    module whose paths diffusers / PEFT names use (the encoder itself unless given).
    """
    root_names = {id(layer): path for path, layer in (diffusers_root or encoder).named_modules()}
    targets = []
    for block_name, block in encoder.named_modules():
        if block_class is not None and not _class_matches(type(block).__name__, block_class):
            continue
        for name, layer in block.named_modules():
            if not isinstance(layer, nn.Linear):
                continue
            path = f"{path_prefix}{block_name}.{name}"
            names = () if diffusers_prefix is None else (f"{diffusers_prefix}.{root_names[id(layer)]}",)
            targets.append(AdapterTarget(lora_name(prefix, path), (layer,), index, path, kind, None, names))
    return deduplicated(targets)


def _class_matches(class_name: str, patterns: Sequence[str]) -> bool:
    """`patterns` are exact class names, or `Prefix*Suffix` forms (`CLIP*Attention` matches CLIPSdpaAttention)."""
    for pattern in patterns:
        start, star, end = pattern.partition("*")
        if (star and class_name.startswith(start) and class_name.endswith(end)) or class_name == pattern:
            return True
    return False


# Blocks whose Linears kohya adapts in each text-encoder architecture. Class names are matched by pattern so that the
# attention variants of every transformers version are found.
CLIP_BLOCKS = ("CLIP*Attention", "CLIP*MLP")
T5_BLOCKS = ("T5Attention", "T5DenseGatedActDense", "T5DenseActDense")


class TextModelLevel(nn.Module):
    """Shows a CLIP text model under a `text_model.` level, as transformers < 5.6 named its modules.

    LoRA files name text-encoder layers `lora_te_text_model_encoder_layers_...`; network plugins derive the names
    from `named_modules()`, so they get the same names whatever the installed transformers version.
    """

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model


def with_text_model_level(encoder: nn.Module) -> nn.Module:
    """`encoder` itself when its modules already sit under `text_model.` (or it is no CLIP model), else a view."""
    if hasattr(encoder, "text_model") or not type(encoder).__name__.startswith("CLIP"):
        return encoder
    return TextModelLevel(encoder)


def clip_targets(
    encoder: nn.Module, prefix: str, index: int, diffusers_prefix: str | None = None
) -> list[AdapterTarget]:
    """The attention and MLP Linears of a CLIP text encoder, named with the `text_model` level of original files.

    Their diffusers / PEFT names keep the level too (`text_encoder.text_model.encoder.layers...`): ComfyUI reads
    only those, and diffusers removes the level itself when its transformers lacks it.
    """
    real = encoder.text_model if isinstance(encoder, TextModelLevel) else encoder
    level = "" if hasattr(real, "text_model") else "text_model."  # transformers >= 5.6 dropped the level
    if diffusers_prefix is not None and level:
        diffusers_prefix = f"{diffusers_prefix}.{level.rstrip('.')}"
    return encoder_linear_targets(real, prefix, index, CLIP_BLOCKS, "clip", level, diffusers_prefix, real)


def t5_targets(encoder: nn.Module, prefix: str, index: int) -> list[AdapterTarget]:
    """The attention and feed-forward Linears of a T5 encoder (kind `t5`). They get no diffusers names: neither
    diffusers' FLUX / SD3 LoRA loaders nor ComfyUI read T5 adapters under them (ComfyUI reads `lora_te3_...`)."""
    return encoder_linear_targets(encoder, prefix, index, T5_BLOCKS, "t5", "")


def _out_features(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
