"""A family's base model for a LoRA tool: its options on the tool's command line, loading it exactly as training does,
and the adapter-target table the tools read layer names and shapes from."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

import torch

from library.adapters.targets import AdapterTarget, TargetTable
from library.errors import ConfigError
from library.families import FAMILIES, get_family_class
from library.models import LoadedModels

logger = logging.getLogger(__name__)


@dataclass
class FamilySpec:
    """The family a tool was pointed at and the options its base model takes on the tool's command line."""

    id: str
    dests: list[str] = field(default_factory=list)  # destinations of the family's options
    required: list[tuple[str, str]] = field(default_factory=list)  # (option, dest) a model load needs


class OptionalFamilyOptions:
    """Stands in for a parser group while a family adds its options: they become optional (a tool needs them only
    when it loads a base model) and their destinations are recorded."""

    def __init__(self, group, spec: FamilySpec) -> None:
        self._group = group
        self._spec = spec

    def add_argument(self, *names: str, **kwargs):
        required = kwargs.pop("required", False)
        action = self._group.add_argument(*names, **kwargs)
        self._spec.dests.append(action.dest)
        if required:
            self._spec.required.append((names[0], action.dest))
        return action

    def __getattr__(self, name: str):
        return getattr(self._group, name)


def family_ids() -> list[str]:
    return list(FAMILIES)


def add_family_options(parser: argparse.ArgumentParser, family_id: str) -> FamilySpec:
    """The family's own options (`--pretrained_model_name_or_path`, `--v2`, `--ae` ...) in their own group."""
    family_class = get_family_class(family_id)
    spec = FamilySpec(family_id)
    group = parser.add_argument_group(f"base model ({family_id}): the options its training scripts take")
    family_class.add_arguments(OptionalFamilyOptions(group, spec))
    return spec


def load_family(spec: FamilySpec, args: argparse.Namespace, dtype: torch.dtype, overrides: dict | None = None):
    """Load the family's models from the options in `args` (`overrides`: dest -> value, e.g. another model file),
    checked as training checks them. Returns (family, models)."""
    values = {dest: getattr(args, dest) for dest in spec.dests} | (overrides or {})
    missing = [option for option, dest in spec.required if values.get(dest) is None]
    if missing:
        raise ConfigError(f"loading the {spec.id} base model needs {', '.join(missing)}")
    family = get_family_class(spec.id)(family_namespace(spec, values))
    family.validate()
    return family, family.load(dtype)


def family_namespace(spec: FamilySpec, values: dict) -> argparse.Namespace:
    """The namespace a training script would parse for these family options: every loop option at its default (the
    family reads some, e.g. precision), the family's from `values`."""
    from library.methods import get_method_class
    from library.training.entry import build_parser

    family_class = get_family_class(spec.id)
    argv = ["--output_dir", "unused"]
    for option, dest in spec.required:
        argv += [option, str(values[dest])]
    namespace = build_parser(family_class, get_method_class("network"), "").parse_args(argv)
    for dest, value in values.items():
        setattr(namespace, dest, value)
    return namespace


@dataclass
class ModelTargets:
    """The adapter targets of loaded models by kohya name, with the diffusers / PEFT name of each layer."""

    table: TargetTable
    by_name: dict[str, AdapterTarget]
    diffusers_names: dict[str, tuple[str, ...]]
    original_known: bool  # whether target paths are original-layout paths (not diffusers ones)


def model_targets(family, models: LoadedModels) -> ModelTargets:
    """The family's table for `models`; layers the table names no diffusers module for get the path of the layer in
    the diffusers model under the pipeline's component name (`unet.`, `transformer.`, `text_encoder_2.` ...)."""
    table = family.adapter_targets(models)
    paths = _layer_paths(models)
    names, same_path = {}, []
    for target in table.targets:
        derived = tuple(paths.get(id(layer), "") for layer in target.layers)
        names[target.name] = target.diffusers_names if len(target.diffusers_names) == len(target.layers) else derived
        if target.encoder is None:
            same_path.append(derived[0].partition(".")[2] == target.path)
    original_known = bool(same_path) and not all(same_path)
    return ModelTargets(table, table.by_name(), names, original_known)


def _layer_paths(models: LoadedModels) -> dict[int, str]:
    """id(layer) -> the layer's diffusers / PEFT name: component name, then its path in that model."""
    from diffusers import UNet2DConditionModel

    component = "unet" if isinstance(models.denoiser, UNet2DConditionModel) else "transformer"
    roots = [(component, models.denoiser)]
    roots += [("text_encoder" if index == 0 else f"text_encoder_{index + 1}", encoder)
              for index, encoder in enumerate(models.text_encoders)]  # fmt: skip
    return {id(module): f"{prefix}.{path}" for prefix, root in roots for path, module in root.named_modules()}


def layer_shape(target: AdapterTarget) -> tuple[int, ...]:
    """The shape of the target's original (fused) weight."""
    weight = target.layers[0].weight
    return (sum(layer.weight.shape[0] for layer in target.layers), *weight.shape[1:])


def detect_family(metadata: dict[str, str]) -> str | None:
    """The registered family whose id begins `ss_base_model_version` (sd_v1 -> sd, sdxl_base_v1-0 -> sdxl, flux1 ->
    flux); None when it names none."""
    version = metadata.get("ss_base_model_version", "")
    matches = [family_id for family_id in FAMILIES if version.startswith(family_id)]
    return max(matches, key=len) if matches else None
