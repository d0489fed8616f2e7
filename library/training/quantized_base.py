"""A quantized frozen base (--quantize_base int8 | nf4): the frozen Linear layers of the denoiser and of the frozen
text encoders hold bitsandbytes weights (8-bit rows with a scale each, or 4-bit NormalFloat blocks), dequantized
for each forward in the compute dtype. Adapters (LoRA, LoHa, LoKr) train on top in full precision; their files
carry no trace of the quantization and load on the unquantized model.

Layers whose precision matters most stay as they are (the same ones --fp8_base keeps: position tables, q/k norms,
embeddings and norms of the text encoders, T5's last feed-forward layer); convolutions are never quantized.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from library.errors import ConfigError, MissingPackageError
from library.training.fp8 import DENOISER_SKIP, TEXT_ENCODER_SKIP

logger = logging.getLogger(__name__)

KINDS = ("int8", "nf4")


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize_base",
        choices=KINDS,
        default=None,
        help="store the frozen base model's Linear weights quantized with bitsandbytes: int8 (a quarter of float32) "
        "or nf4 (4-bit NormalFloat, an eighth); LoRA-type adapters train on top in full precision",
    )


@dataclass(frozen=True)
class QuantizationOptions:
    kind: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> QuantizationOptions:
        return cls(getattr(args, "quantize_base", None))

    def check(self, method, fp8: bool, block_swap: bool) -> None:
        """One line for what a quantized base cannot be combined with (before any model loads)."""
        if self.kind is None:
            return
        if method.trains_base_weights:
            raise ConfigError(
                f"--quantize_base {self.kind} freezes the base model in {self.kind}; the {method.name} method trains "
                "those weights. Use it with LoRA-type training"
            )
        if fp8:
            raise ConfigError(
                "--quantize_base and --fp8_base / --fp8_base_unet are two ways to store the base; choose one"
            )
        if block_swap:
            raise ConfigError(
                "--quantize_base cannot be combined with --blocks_to_swap (quantized weights do not swap)"
            )
        _bitsandbytes()


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as err:
        raise MissingPackageError(
            "--quantize_base needs the bitsandbytes package (part of the default install: pip install bitsandbytes)"
        ) from err
    return bitsandbytes


def _skipped(path: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(pattern, path) for pattern in patterns)


def quantize_module(module: nn.Module, kind: str, compute_dtype: torch.dtype, skip: tuple[str, ...]) -> int:
    """Replace the Linear layers of `module` (not matching `skip`) by bitsandbytes layers holding `kind` weights,
    quantized where the weights are now; returns how many were replaced."""
    bnb = _bitsandbytes()
    replaced = 0
    for path, layer in list(module.named_modules()):
        if type(layer) is not nn.Linear or _skipped(path, skip):
            continue
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, name, _quantized(bnb, layer, kind, compute_dtype))
        replaced += 1
    return replaced


def _quantized(bnb, layer: nn.Linear, kind: str, compute_dtype: torch.dtype) -> nn.Linear:
    device = layer.weight.device
    weight = layer.weight.detach()
    bias = layer.bias
    if kind == "nf4":
        quantized = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")  # fmt: skip
        quantized.weight = bnb.nn.Params4bit(weight.float(), requires_grad=False, quant_type="nf4")
    else:
        quantized = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias is not None,
                                        has_fp16_weights=False, threshold=0.0, device="meta")  # fmt: skip
        quantized.weight = bnb.nn.Int8Params(weight.to(compute_dtype), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        quantized.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
    return quantized.to(device)  # bitsandbytes quantizes the weight on this move


def quantize_frozen_base(options: QuantizationOptions, models, trains_text_encoder: bool, compute_dtype) -> None:
    """The trainer's hook, after loading: the denoiser and (when they do not train) the text encoders."""
    if options.kind is None:
        return
    count = quantize_module(models.denoiser, options.kind, compute_dtype, DENOISER_SKIP)
    encoders = 0
    if not trains_text_encoder:
        encoders = sum(quantize_module(encoder, options.kind, compute_dtype, TEXT_ENCODER_SKIP)
                       for encoder in models.text_encoders)  # fmt: skip
    logger.info("--quantize_base %s: %d denoiser and %d text-encoder Linear layers quantized (compute in %s)",
                options.kind, count, encoders, compute_dtype)  # fmt: skip


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """A layer's weight as an ordinary tensor: bitsandbytes' quantized weights are dequantized (float32)."""
    weight = layer.weight
    kind = type(weight).__name__
    if kind == "Params4bit" and getattr(weight, "quant_state", None) is not None:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, weight.quant_state).float()
    if kind == "Int8Params" and getattr(weight, "SCB", None) is not None:
        return weight.data.float() * weight.SCB.float()[:, None] / 127
    return weight
