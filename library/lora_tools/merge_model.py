"""LoRAs (any adapter type) merged into a base model, saved in the family's original single-file layout or as a
diffusers folder. Each module is added to the layers its name targets in the family's table, through its adapter
type's weight change: a fused original layer (FLUX's q|k|v) takes its rows in each part."""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch

from library.errors import CheckpointError, ConfigError
from library.lora_tools.files import LoRAFile, precision
from library.lora_tools.metadata import tool_metadata
from library.lora_tools.models import FamilySpec, load_family, model_targets
from networks.adapters import merge_module

logger = logging.getLogger(__name__)

MODEL_FORMATS = {".safetensors": "safetensors", ".ckpt": "ckpt"}  # extension -> save format; no extension: a folder


def model_format(path: str, save_model_as: str | None) -> str:
    """--save_model_as, else the format the output name's extension says (a name without one is a diffusers folder)."""
    if save_model_as:
        return save_model_as
    extension = os.path.splitext(path)[1].lower()
    if extension and extension not in MODEL_FORMATS:
        raise ConfigError(f"--save_to {path}: write a .safetensors or .ckpt file, or a folder name for diffusers")
    return MODEL_FORMATS.get(extension, "diffusers_safetensors")


def merge_into_model(
    spec: FamilySpec, args: argparse.Namespace, files: list[LoRAFile], ratios: list[float], tool: str
) -> None:
    """Load the base model, add every LoRA at its ratio, save to --save_to."""
    merge_dtype = precision(args.precision, "--precision")
    save_as = model_format(args.save_to, args.save_model_as)
    family, models = load_family(spec, args, merge_dtype)
    targets = model_targets(family, models)
    device = args.device or "cpu"
    for file, ratio in zip(files, ratios, strict=True):
        modules = file.modules()
        unknown = sorted(set(modules) - set(targets.by_name))
        if unknown:
            raise CheckpointError(f"{file.path}: {len(unknown)} modules match no layer of the {spec.id} model "
                                  f"({', '.join(unknown[:5])}); was it trained for another model?")  # fmt: skip
        if any(targets.by_name[name].encoder is not None for name in modules):
            logger.info("%s changes text encoders: they are saved where the %s format holds them (a diffusers folder "
                        "holds every model)", file.path, save_as)  # fmt: skip
        with torch.no_grad():
            for name, module in modules.items():
                target = targets.by_name[name]
                tensors = module.tensors
                if target.swapped_halves:
                    tensors = module.adapter_type.swap_output_halves(tensors)
                merge_module(module.adapter_type, tensors, target.layers, ratio, None, device, name)
        logger.info("merged %s at ratio %g: %d modules", file.path, ratio, len(modules))
    merged_from = [{"file": os.path.basename(file.path), "ratio": ratio} for file, ratio in zip(files, ratios)]
    metadata = tool_metadata({}, tool, args, {"ss_base_model_version": family.base_model_version(),
                                              "ss_merged_from": json.dumps(merged_from)})  # fmt: skip
    save_dtype = precision(args.save_precision, "--save_precision")
    family.save_model(models, args.save_to, save_as, save_dtype, metadata)
    logger.info("wrote %s (%s)", args.save_to, save_as)
