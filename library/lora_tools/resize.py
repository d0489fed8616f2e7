"""resize_lora: re-factorise every module of a LoRA to a new rank, fixed or chosen per module by how much of the
change's energy it keeps (sv_ratio, sv_fro, sv_cumulative), with a report of what each module keeps.

LoRA and DoRA modules keep their type (DoRA its magnitudes) and their scale alpha / rank; LoHa and LoKr modules become
LoRA modules of their weight change (alpha = rank). At the full rank the result is the same change (up to float
rounding).
"""

from __future__ import annotations

import argparse
import logging
import statistics

import torch

from library.errors import ConfigError
from library.lora_tools.cli import parse_tool_args
from library.lora_tools.files import StoredModule, check_output_path, module_tensors, precision, read_lora, write_lora
from library.lora_tools.metadata import common_value, tool_metadata
from library.lora_tools.refactor import (
    SVDOptions,
    add_svd_arguments,
    is_spatial,
    layer_shapes,
    lora_tensors,
    module_kernel,
    module_spectrum,
    warn_flattened,
)
from library.lora_tools.svd import DYNAMIC_METHODS, Kept, RankRule, choose_rank, kept

logger = logging.getLogger(__name__)

TOOL = "resize_lora"
OVERSAMPLE = 8  # extra vectors of a randomized SVD beyond the largest rank asked for


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Resize a LoRA (LoRA, DoRA, LoHa or LoKr modules) to a new rank. Usage: python "
        "networks/resize_lora.py --model in.safetensors --save_to out.safetensors --new_rank 8",
        allow_abbrev=False,
    )
    parser.add_argument("--model", type=str, default=None, help="the LoRA file to resize (.safetensors, .ckpt, .pt)")
    parser.add_argument("--save_to", type=str, default=None, help="the file to write (.safetensors, .ckpt, .pt)")
    parser.add_argument("--new_rank", type=int, default=4, help="rank of the new LoRA (the upper limit with "
                        "--dynamic_method); default 4")  # fmt: skip
    parser.add_argument("--new_conv_rank", type=int, default=None,
                        help="rank of 3x3 convolution modules (default --new_rank)")  # fmt: skip
    parser.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                        help="precision of the written tensors (default: the input's)")  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="print what each module keeps: its rank, its "
                        "share of the Frobenius norm and of the sum of singular values, max/min kept singular value")
    parser.add_argument(
        "--dynamic_method", type=str, default=None, choices=DYNAMIC_METHODS,
        help="choose each module's rank (at most --new_rank): sv_ratio keeps singular values >= the largest / "
        "--dynamic_param; sv_fro the smallest rank keeping --dynamic_param of the Frobenius norm; sv_cumulative the "
        "smallest rank keeping --dynamic_param of the sum of singular values",
    )  # fmt: skip
    parser.add_argument("--dynamic_param", type=float, default=None, help="the target of --dynamic_method")
    add_svd_arguments(parser, clamp_default=None)
    return parser


def main(argv: list[str] | None = None) -> None:
    tool = parse_tool_args(build_parser, argv, lora_paths=lambda args: [args.model])
    args = tool.args
    if not args.model:
        raise ConfigError("--model is required: the LoRA file to resize")
    check_output_path(args.save_to)
    rule = RankRule(args.new_rank, args.dynamic_method, args.dynamic_param)
    conv_rule = RankRule(args.new_conv_rank or args.new_rank, args.dynamic_method, args.dynamic_param)
    options = SVDOptions.from_args(args)
    lora = read_lora(args.model)
    modules = lora.modules()
    shapes = layer_shapes(tool)
    warn_flattened(modules, shapes is not None)
    resized, report = {}, {}
    for name, module in modules.items():
        spatial = is_spatial(module_kernel(module, None if shapes is None else shapes.get(name)))
        resized[name], report[name] = resize_module(module, conv_rule if spatial else rule, options,
                                                    None if shapes is None else shapes.get(name))  # fmt: skip
    log_report(report, args.verbose)
    dtype = precision(args.save_precision, "--save_precision") or input_dtype(lora.tensors)
    write_lora(args.save_to, module_tensors(resized), resize_metadata(lora.metadata, args, resized), dtype)


def resize_module(
    module: StoredModule, rule: RankRule, options: SVDOptions, shape: tuple[int, ...] | None
) -> tuple[StoredModule, Kept]:
    """The module at the rank `rule` picks; LoRA factors keep their scale (alpha = scale * new rank)."""
    spectrum, scale = module_spectrum(module, options, rule.max_rank + OVERSAMPLE)
    rank = choose_rank(spectrum, rule)
    alpha = (scale if scale is not None else 1.0) * rank
    carried = module.adapter_type.carried_tensors(module.tensors)
    return lora_tensors(spectrum, rank, alpha, module_kernel(module, shape), options, carried), kept(spectrum, rank)


def log_report(report: dict[str, Kept], verbose: bool) -> None:
    """Per module (with --verbose, on stdout) and in summary (logged): the kept rank and energy."""
    if verbose:
        for name, item in report.items():
            print(f"{name:80} rank {item.rank:4d} | fro retained {item.fro:7.2%} | sum(S) retained {item.sum:7.2%} "
                  f"| max(S)/min(S) {item.max_ratio:8.1f}")  # fmt: skip
    shares = [item.fro for item in report.values()]
    if shares:
        deviation = statistics.pstdev(shares)
        logger.info("resized %d modules: Frobenius norm retained %.2f%% on average (min %.2f%%, std %.4f)",
                    len(shares), 100 * statistics.fmean(shares), 100 * min(shares), deviation)  # fmt: skip


def resize_metadata(carried: dict[str, str], args: argparse.Namespace, modules: dict[str, StoredModule]) -> dict:
    ranks = [module.adapter_type.rank_of(module.tensors) for module in modules.values()]
    before = carried.get("ss_network_dim", "?")
    how = f"dynamic resize with {args.dynamic_method} {args.dynamic_param:g}" if args.dynamic_method else "resized"
    comment = carried.get("ss_training_comment", "")
    return tool_metadata(carried, TOOL, args, {
        "ss_network_dim": common_value([rank for rank, _ in ranks], bool(args.dynamic_method)),
        "ss_network_alpha": common_value([alpha for _, alpha in ranks], bool(args.dynamic_method)),
        "ss_training_comment": f"{how} from rank {before} to {args.new_rank}; {comment}".rstrip("; "),
        "ss_network_module": "networks.lora",
    })  # fmt: skip


def input_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the input's weights (the output keeps it unless --save_precision says otherwise)."""
    return next((value.dtype for value in tensors.values() if value.is_floating_point() and value.dim() > 0),
                torch.float32)  # fmt: skip
