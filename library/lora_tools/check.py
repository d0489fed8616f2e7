"""check_lora_weights: what a LoRA file holds (modules per part, adapter types, ranks, alphas, the norm of every
module's change, its `ss_*` / `modelspec.*` metadata) and, given a base model, whether every module loads onto a
layer of it with the right shape: the check the trainer's loader makes."""

from __future__ import annotations

import argparse
import importlib
import logging
import math
from collections import Counter

import torch

from library.errors import CheckpointError, ConfigError
from library.lora_tools.cli import parse_tool_args
from library.lora_tools.files import StoredModule, read_lora
from library.lora_tools.formats import detect_format
from library.lora_tools.models import load_family, model_targets
from networks.lora import group_modules

logger = logging.getLogger(__name__)

SHOWN_METADATA = ("ss_", "modelspec.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Show what a LoRA file holds; with a base model (--family and its options), check that every "
        "module loads onto one of its layers. Usage: python networks/check_lora_weights.py my_lora.safetensors",
        allow_abbrev=False,
    )
    parser.add_argument("file", type=str, nargs="?", default=None, help="the LoRA file")
    parser.add_argument("-s", "--show_all_keys", action="store_true", help="list every tensor with its shape, "
                        "dtype, mean and min of |value|")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    tool = parse_tool_args(build_parser, argv, None, lambda args: [args.file])
    args = tool.args
    if not args.file:
        raise ConfigError("give the LoRA file to check")
    lora = read_lora(args.file)
    print(f"file: {args.file}")
    print_metadata(lora.metadata)
    key_format = detect_format(lora.tensors)
    if key_format != "kohya":
        print(f"key format: {key_format}; convert it to the kohya format (networks/convert_lora.py) for the checks")
        return
    modules = lora.modules()
    print_summary(modules)
    print_modules(modules, lora.tensors if args.show_all_keys else None)
    if getattr(args, "pretrained_model_name_or_path", None) is not None:
        check_against_model(tool, modules)


def print_metadata(metadata: dict[str, str]) -> None:
    shown = {key: value for key, value in sorted(metadata.items()) if key.startswith(SHOWN_METADATA)}
    print(f"metadata: {len(metadata)} keys" + (", of them:" if shown else ""))
    for key, value in shown.items():
        text = value if len(value) <= 200 else value[:200] + " ..."
        print(f"  {key} = {text}")


def part_of(name: str) -> str:
    """`lora_unet`, `lora_te`, `lora_te1` ...: the part of the model a kohya module name belongs to."""
    return "_".join(name.split("_")[:2])


def print_summary(modules: dict[str, StoredModule]) -> None:
    parts = Counter(part_of(name) for name in modules)
    print(f"modules: {len(modules)} ({', '.join(f'{part} {count}' for part, count in sorted(parts.items()))})")
    types = Counter(module.adapter_type.label for module in modules.values())
    print(f"adapter types: {', '.join(f'{label} {count}' for label, count in sorted(types.items()))}")
    ranks = Counter(module.adapter_type.rank_of(module.tensors) for module in modules.values())
    print("rank, alpha: " + ", ".join(f"{rank}, {alpha:g} ({count})" for (rank, alpha), count in sorted(ranks.items())))


def print_modules(modules: dict[str, StoredModule], tensors: dict[str, torch.Tensor] | None) -> None:
    """One line per module: type, rank, alpha and the Frobenius norm of its change (DoRA: of its LoRA part); with
    `tensors`, its tensors below it."""
    for name, module in modules.items():
        rank, alpha = module.adapter_type.rank_of(module.tensors)
        norm = change_norm(module)
        print(f"{name},{module.adapter_type.label},rank {rank},alpha {alpha:g},norm {norm:.6g}")
        for suffix, value in (sorted(module.tensors.items()) if tensors is not None else []):
            absolute = value.float().abs()
            shape = "-".join(str(size) for size in value.shape) or "scalar"
            print(f"  {name}.{suffix},{shape},{str(value.dtype).replace('torch.', '')},"
                  f"{float(absolute.mean()):.6g},{float(absolute.min()):.6g}")  # fmt: skip


def change_norm(module: StoredModule) -> float:
    low_rank = module.adapter_type.low_rank_factors(module.tensors)
    if low_rank is not None:
        up, down, scale = low_rank
        return float((up @ down).norm()) * scale
    return float(module.adapter_type.delta_of(module.tensors, "cpu").norm())


def check_against_model(tool, modules: dict[str, StoredModule]) -> None:
    """Every module matches a layer, and the network the trainer's loader builds for the file takes its tensors."""
    family, models = load_family(tool.family, tool.args, torch.float32)
    targets = model_targets(family, models)
    unknown = sorted(set(modules) - set(targets.by_name))
    wrong = []
    by_plugin: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in modules.items():
        if name not in unknown:
            by_plugin.setdefault(module.adapter_type.plugin, {}).update(
                {f"{name}.{suffix}": value for suffix, value in module.tensors.items()})  # fmt: skip
    for plugin, weights in by_plugin.items():
        wrong += loader_mismatches(plugin, weights, family, models, targets)
    wrong += [change_mismatch(name, module, targets) for name, module in modules.items() if name not in unknown]
    wrong = [problem for problem in wrong if problem]
    failed = set(unknown) | {name for name, _ in wrong}
    print(f"base model ({tool.family.id}): {len(modules) - len(failed)} of {len(modules)} modules load")
    for problem in [f"no layer: {name}" for name in unknown] + [text for _, text in wrong]:
        print(f"  {problem}")
    if failed:
        raise CheckpointError(f"{len(failed)} modules do not load onto this {tool.family.id} model (listed above)")


def change_mismatch(name: str, module: StoredModule, targets) -> tuple[str, str] | None:
    """The module's weight change must have the layer's shape (LoHa / LoKr may store convolutions flattened)."""
    from library.lora_tools.models import layer_shape
    from networks.adapters import fused_weight

    target = targets.by_name[name]
    expected = layer_shape(target)
    base = fused_weight(target.layers) if module.adapter_type.needs_base else None
    try:
        shape = tuple(module.adapter_type.delta_of(module.tensors, "cpu", base).shape)
    except (RuntimeError, CheckpointError) as err:
        return name, f"shape: {name}: {err}"
    if shape in (expected, (expected[0], math.prod(expected[1:]))):
        return None
    return name, f"shape: {name} changes a {shape} weight, the layer has {expected}"


def loader_mismatches(plugin: str, weights: dict, family, models, targets) -> list[tuple[str, str]]:
    """Tensors whose shapes differ from the network the plugin's create_network_from_weights builds for them."""
    module = importlib.import_module(plugin)
    network, _ = module.create_network_from_weights(
        1.0, None, models.vae, family.network_text_encoders(models), family.network_denoiser(models),
        weights_sd=weights, for_inference=True, adapter_targets=targets.table,
    )  # fmt: skip
    own = network.file_state_dict()
    wrong = []
    for name, tensors in group_modules(weights).items():
        for suffix, value in tensors.items():
            expected = own.get(f"{name}.{suffix}")
            if expected is None or expected.shape != value.shape:
                shape = None if expected is None else tuple(expected.shape)
                wrong.append((name, f"shape: {name}.{suffix} {tuple(value.shape)}, the layer needs {shape}"))
    return wrong
