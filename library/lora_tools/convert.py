"""convert_lora: a LoRA between the kohya, diffusers / PEFT (ai-toolkit) and ComfyUI key formats, for every family;
the layer names come from the family's adapter-target table of the base model given."""

from __future__ import annotations

import argparse
import logging

import torch

from library.errors import ConfigError
from library.lora_tools.cli import parse_tool_args
from library.lora_tools.files import check_output_path, module_tensors, precision, read_lora, write_lora
from library.lora_tools.formats import (
    ADAPTER_METADATA_KEY,
    FORMATS,
    check_kohya,
    detect_format,
    from_comfy,
    from_diffusers,
    kohya_modules,
    to_comfy,
    to_diffusers,
)
from library.lora_tools.metadata import tool_metadata
from library.lora_tools.models import load_family, model_targets

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert a LoRA between key formats: kohya (sd-scripts), diffusers (PEFT, ai-toolkit) and "
        "comfy (ComfyUI's diffusion_model. names). The base model's options tell the layer names. Usage: python "
        "networks/convert_lora.py --family flux --pretrained_model_name_or_path flux1-dev.safetensors --ae ... "
        "--src_path ai_toolkit_lora.safetensors --dst kohya --dst_path kohya_lora.safetensors",
        allow_abbrev=False,
    )
    parser.add_argument("--src_path", type=str, default=None, help="the LoRA to convert")
    parser.add_argument("--dst_path", type=str, default=None, help="the file to write (.safetensors)")
    parser.add_argument("--src", type=str, default="auto", choices=["auto", *FORMATS],
                        help="format of --src_path (default: read from its keys)")  # fmt: skip
    parser.add_argument("--dst", type=str, default="kohya", choices=list(FORMATS),
                        help="format to write (default kohya, the trainer's --network_weights format)")  # fmt: skip
    parser.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                        help="precision of the written tensors (default: unchanged)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None, default_family: str | None = None) -> None:
    tool = parse_tool_args(build_parser, argv, default_family, lambda args: [args.src_path])
    args = tool.args
    if not args.src_path:
        raise ConfigError("--src_path is required: the LoRA file to convert")
    check_output_path(args.dst_path, "--dst_path")
    if tool.family is None:
        raise ConfigError("give --family and the base model's options: the layer names of each format come from it")
    lora = read_lora(args.src_path)
    source = detect_format(lora.tensors) if args.src == "auto" else FORMATS[args.src]
    target = FORMATS[args.dst]
    family, models = load_family(tool.family, args, torch.float32)
    targets = model_targets(family, models)
    modules = read_modules(lora, source, targets)
    tensors, extra = write_modules(modules, target, targets)
    carried = {key: value for key, value in lora.metadata.items() if key != ADAPTER_METADATA_KEY}
    metadata = tool_metadata(carried, "convert_lora", args, extra)
    write_lora(args.dst_path, tensors, metadata, precision(args.save_precision, "--save_precision"))
    logger.info("converted %d modules from %s to %s", len(modules), source, target)


def read_modules(lora, source: str, targets) -> dict:
    if source == "diffusers":
        return from_diffusers(lora.tensors, lora.metadata, targets)
    if source == "comfy":
        return from_comfy(lora.tensors, targets)
    modules = kohya_modules(lora.tensors)
    check_kohya(modules, targets)
    return modules


def write_modules(modules: dict, target: str, targets) -> tuple[dict, dict]:
    if target == "diffusers":
        return to_diffusers(modules, targets)
    if target == "comfy":
        return to_comfy(modules, targets), {}
    return module_tensors(modules), {}
