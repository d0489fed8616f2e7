"""extract_lora_from_models: a LoRA approximating the difference between a tuned model and its original, for every
family: each layer the family's LoRA would adapt gets the truncated SVD of its weight difference (fused layers as one
original layer), with the reference's outlier clamp. The relative error of every module is reported."""

from __future__ import annotations

import argparse
import logging
import math

import torch

from library.errors import CheckpointError, ConfigError
from library.lora_tools.cli import parse_tool_args
from library.lora_tools.files import check_output_path, module_tensors, precision, write_lora
from library.lora_tools.metadata import tool_metadata
from library.lora_tools.models import load_family, model_targets
from library.lora_tools.refactor import SVDOptions, add_svd_arguments, lora_tensors
from library.lora_tools.svd import RankRule, choose_rank, relative_error, spectrum_of_matrix
from library.training.metadata import model_spec
from networks.adapters import delta_weight, fused_weight
from networks.network_args import NetworkOptions

logger = logging.getLogger(__name__)

CLAMP_QUANTILE = 0.99  # the reference's default
OVERSAMPLE = 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Extract a LoRA from the difference of two models of one family. Usage: python "
        "networks/extract_lora_from_models.py --model_org base.safetensors --model_tuned tuned.safetensors --dim 16 "
        "--save_to extracted.safetensors (FLUX.1 and others: add --family and the other model files)",
        allow_abbrev=False,
    )
    parser.add_argument("--model_org", type=str, default=None, help="the original model (its single file)")
    parser.add_argument("--model_tuned", type=str, default=None, help="the tuned model: the LoRA is tuned - original")
    parser.add_argument("--save_to", type=str, default=None, help="the LoRA file to write")
    parser.add_argument("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    parser.add_argument("--conv_dim", type=int, default=None,
                        help="rank of 3x3 convolutions; they get no module without it (the trainer's conv_dim)")
    parser.add_argument("--min_diff", type=float, default=0.01,
                        help="text encoders differing by less than this (max |difference|) are left out")
    parser.add_argument("--load_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                        help="precision to load the models in (default float)")  # fmt: skip
    parser.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                        help="precision of the written tensors (default float)")  # fmt: skip
    parser.add_argument("--no_metadata", action="store_true", help="accepted for the reference's commands")
    add_svd_arguments(parser, clamp_default=CLAMP_QUANTILE)
    return parser


def main(argv: list[str] | None = None, default_family: str | None = "sd") -> None:
    tool = parse_tool_args(build_parser, argv, default_family)
    args = tool.args
    if not args.model_org or not args.model_tuned:
        raise ConfigError("--model_org and --model_tuned are required: the original and the tuned model")
    check_output_path(args.save_to)
    options = SVDOptions.from_args(args, CLAMP_QUANTILE)
    dtype = precision(args.load_precision, "--load_precision") or torch.float32
    family, original = load_family(tool.family, args, dtype, {"pretrained_model_name_or_path": args.model_org})
    _, tuned = load_family(tool.family, args, dtype, {"pretrained_model_name_or_path": args.model_tuned})
    modules, errors = extract(model_targets(family, original), model_targets(family, tuned), args, options)
    report(errors)
    updates = extract_metadata(family, args)
    metadata = tool_metadata(family.training_metadata(), "extract_lora_from_models", args, updates)
    write_lora(args.save_to, module_tensors(modules), metadata, precision(args.save_precision, "--save_precision"))


def extract(original, tuned, args: argparse.Namespace, options: SVDOptions) -> tuple[dict, dict]:
    """LoRA modules of the layers whose weights differ, and each one's relative error ||LoRA - diff|| / ||diff||."""
    missing = sorted(set(original.by_name) ^ set(tuned.by_name))
    if missing:
        raise CheckpointError(f"the two models have different layers ({', '.join(missing[:3])} ...): they are not "
                              "an original and its tuned version of one architecture")  # fmt: skip
    network_args = {"conv_dim": args.conv_dim} if args.conv_dim else {}
    choice = NetworkOptions.parse(network_args, original.table.args)
    differences = {}
    for target in original.table.targets:
        rank = choice.rank_for(target, original.table, args.dim, args.dim)
        if rank is None:
            continue
        difference = fused_weight(tuned.by_name[target.name].layers, options.device) - fused_weight(target.layers,
                                                                                                   options.device)
        if difference.any():
            differences[target.name] = (target, rank[0], difference)
    if not any(target.encoder is not None and float(diff.abs().max()) > args.min_diff
               for target, _, diff in differences.values()):  # fmt: skip
        logger.info("the text encoders differ by at most --min_diff %g: only the denoiser is extracted", args.min_diff)
        differences = {name: item for name, item in differences.items() if item[0].encoder is None}
    modules, errors = {}, {}
    for name, (target, rank, difference) in differences.items():
        matrix = difference.flatten(1)
        spectrum = spectrum_of_matrix(matrix, rank + OVERSAMPLE if options.lowrank else None, options.niter)
        kept_rank = choose_rank(spectrum, RankRule(rank))
        modules[name] = lora_tensors(spectrum, kept_rank, float(kept_rank), tuple(difference.shape[2:]), options)
        tensors = modules[name].tensors
        approximation = delta_weight(tensors["lora_up.weight"], tensors["lora_down.weight"])
        errors[name] = relative_error(approximation.flatten(1), matrix)
    return modules, errors


def report(errors: dict[str, float]) -> None:
    if not errors:
        raise ConfigError("the two models have the same weights in every layer a LoRA adapts: nothing to extract")
    worst = max(errors, key=errors.get)
    mean = math.fsum(errors.values()) / len(errors)
    logger.info("extracted %d modules: relative error ||LoRA - difference|| / ||difference|| %.4f on average, "
                "%.4f at most (%s)", len(errors), mean, errors[worst], worst)  # fmt: skip
    print(f"modules: {len(errors)}  mean relative error: {mean:.6f}  max: {errors[worst]:.6f} ({worst})")


def extract_metadata(family, args: argparse.Namespace) -> dict[str, object]:
    network_args = {"conv_dim": str(args.conv_dim), "conv_alpha": str(float(args.conv_dim))} if args.conv_dim else {}
    spec = model_spec(family.model_spec_architecture(), "lora", args.save_to.rsplit("/", 1)[-1].rsplit(".", 1)[0],
                      (0, 0), family.model_spec_extra())  # fmt: skip
    spec.pop("modelspec.resolution")
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(args.dim),
            "ss_network_alpha": str(float(args.dim)), "ss_network_args": network_args or None, **spec}  # fmt: skip
