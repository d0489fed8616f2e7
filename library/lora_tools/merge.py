"""merge_lora and svd_merge_lora: the command lines of merging LoRAs into a model or into one LoRA."""

from __future__ import annotations

import argparse
import logging

from library.errors import ConfigError
from library.lora_tools.cli import ToolArgs, parse_tool_args
from library.lora_tools.files import check_output_path, module_tensors, precision, read_lora, write_lora
from library.lora_tools.merge_loras import concat_merge, plain_merge, svd_merge
from library.lora_tools.merge_model import merge_into_model
from library.lora_tools.metadata import common_value, tool_metadata
from library.lora_tools.refactor import SVDOptions, add_svd_arguments, layer_shapes, warn_flattened
from library.lora_tools.svd import RankRule

logger = logging.getLogger(__name__)

MODEL_SAVE_FORMATS = ("safetensors", "ckpt", "diffusers", "diffusers_safetensors")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", type=str, nargs="*", default=[], help="LoRA files to merge")
    parser.add_argument("--ratios", type=float, nargs="*", default=None,
                        help="strength of each LoRA, one per --models (default 1 each)")  # fmt: skip
    parser.add_argument("--save_to", type=str, default=None, help="the file (or diffusers folder) to write")
    parser.add_argument("--precision", type=str, default="float", choices=["float", "fp16", "bf16"],
                        help="precision of the merge (float recommended)")  # fmt: skip
    parser.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                        help="precision of the written tensors (default: the merge precision)")  # fmt: skip
    parser.add_argument("--no_metadata", action="store_true",
                        help="accepted for the reference's commands; the tool history is always recorded")  # fmt: skip


def build_merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Merge LoRAs (LoRA, DoRA, LoHa, LoKr) into a base model, or LoRAs into one LoRA. Usage: python "
        "networks/merge_lora.py --sd_model base.safetensors --models a.safetensors b.safetensors --ratios 0.8 0.5 "
        "--save_to merged.safetensors (leave out the model to merge the LoRAs into one)",
        allow_abbrev=False,
    )
    add_common_arguments(parser)
    parser.add_argument("--concat", action="store_true", help="merging LoRAs: stack their factors (the exact sum; "
                        "the rank is the sum of the ranks)")  # fmt: skip
    parser.add_argument("--shuffle", action="store_true", help="not supported: it changes nothing a loader sees")
    parser.add_argument("--save_model_as", type=str, default=None, choices=MODEL_SAVE_FORMATS,
                        help="merging into a model: the output format (default: from --save_to's extension; a name "
                        "without one is a diffusers folder)")  # fmt: skip
    parser.add_argument("--device", type=str, default=None, help="device to merge on, e.g. cuda (default cpu)")
    return parser


def build_svd_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Merge LoRAs into one LoRA of a new rank: the weighted sum of their changes, re-factorised by "
        "SVD. Usage: python networks/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 1 0.5 "
        "--new_rank 16 --save_to merged.safetensors",
        allow_abbrev=False,
    )
    add_common_arguments(parser)
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the merged LoRA (default 4)")
    parser.add_argument("--new_conv_rank", type=int, default=None, help="rank of 3x3 convolutions (default "
                        "--new_rank)")  # fmt: skip
    add_svd_arguments(parser, clamp_default=None)
    return parser


def loras_and_ratios(args: argparse.Namespace) -> tuple[list, list[float]]:
    if not args.models:
        raise ConfigError("--models is required: the LoRA files to merge")
    ratios = args.ratios if args.ratios else [1.0] * len(args.models)
    if len(ratios) != len(args.models):
        raise ConfigError(f"--ratios gives {len(ratios)} values for {len(args.models)} --models; give one per LoRA")
    if not args.save_to:
        raise ConfigError("--save_to is required: the file to write")
    return [read_lora(path) for path in args.models], ratios


def main(argv: list[str] | None = None, default_family: str | None = "sd") -> None:
    """merge_lora.py: into the model given (--sd_model / --flux_model / --pretrained_model_name_or_path), else the
    LoRAs into one."""
    tool = parse_tool_args(build_merge_parser, argv, default_family, lambda args: args.models[:1])
    args = tool.args
    if getattr(args, "pretrained_model_name_or_path", None) is None:
        check_output_path(args.save_to)
    files, ratios = loras_and_ratios(args)
    if args.shuffle:
        logger.warning("--shuffle is ignored: permuting a LoRA's ranks changes nothing a loader computes")
    if getattr(args, "pretrained_model_name_or_path", None) is not None:
        merge_into_model(tool.family, args, files, ratios, "merge_lora")
        return
    merged = concat_merge(files, ratios) if args.concat else plain_merge(files, ratios)
    write_merged(tool, files, merged, "merge_lora")


def svd_main(argv: list[str] | None = None) -> None:
    """svd_merge_lora.py."""
    tool = parse_tool_args(build_svd_parser, argv, None, lambda args: args.models[:1])
    args = tool.args
    check_output_path(args.save_to)
    files, ratios = loras_and_ratios(args)
    rules = (RankRule(args.new_rank), RankRule(args.new_conv_rank or args.new_rank))
    shapes = layer_shapes(tool)
    for file in files:
        warn_flattened(file.modules(), shapes is not None)
    merged = svd_merge(files, ratios, rules, SVDOptions.from_args(args), shapes)
    write_merged(tool, files, merged, "svd_merge_lora")


def write_merged(tool: ToolArgs, files: list, merged: dict, name: str) -> None:
    args = tool.args
    ranks = [module.adapter_type.rank_of(module.tensors) for module in merged.values()]
    updates = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": common_value([rank for rank, _ in ranks]),
        "ss_network_alpha": common_value([alpha for _, alpha in ranks]),
        "ss_network_args": None,
        "ss_merged_from": [{"file": file.path.replace("\\", "/").rsplit("/", 1)[-1], "ratio": ratio}
                           for file, ratio in zip(files, args.ratios or [1.0] * len(files))],  # fmt: skip
    }
    if getattr(args, "new_conv_rank", None):
        updates["ss_network_args"] = {"conv_dim": str(args.new_conv_rank), "conv_alpha": str(args.new_conv_rank)}
    metadata = tool_metadata(files[0].metadata, name, args, updates)
    dtype = precision(args.save_precision or args.precision, "--save_precision")
    write_lora(args.save_to, module_tensors(merged), metadata, dtype)
