"""fp8 base weights: frozen Linear (and Embedding) weights stored in float8 e4m3fn, cast up layer by layer to the
compute dtype for each forward (diffusers' layerwise casting hooks), halving the memory of bf16 weights."""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from library.errors import ConfigError

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
# Precision-critical layers stay in the compute dtype: rotary position tables and the per-head q/k RMSNorms of the
# transformer; the embeddings and norms of the text encoders, and T5's feed-forward output layer (transformers casts
# that layer's input to its weight dtype, which would hand it float8 activations).
DENOISER_SKIP = ("pos_embed", r"norm_(q|k|added_q|added_k)$")
TEXT_ENCODER_SKIP = ("embed", "shared", "norm", r"DenseReluDense\.wo$")


def check_compute_dtype(compute_dtype: torch.dtype) -> None:
    """fp8 storage needs a half-precision compute dtype (float32 compute would keep no memory advantage)."""
    if compute_dtype not in (torch.bfloat16, torch.float16):
        raise ConfigError(
            "--fp8_base / --fp8_base_unet compute in half precision: add --mixed_precision bf16 (or fp16)"
        )


def store_in_fp8(module: nn.Module, compute_dtype: torch.dtype, skip: tuple[str, ...]) -> int:
    """Store `module`'s Linear / Embedding weights in fp8, computed in `compute_dtype`; returns the layers converted."""
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(module, FP8_DTYPE, compute_dtype, skip_modules_pattern=skip, non_blocking=True)
    converted = sum(1 for layer in module.modules() if getattr(layer, "weight", None) is not None
                    and layer.weight.dtype == FP8_DTYPE)  # fmt: skip
    name = type(module).__name__
    logger.info("%s: %d layers stored in float8 e4m3fn, computed in %s", name, converted, compute_dtype)
    return converted


def store_in_fp8_per_layer(module: nn.Module, compute_dtype: torch.dtype, skip: tuple[str, ...]) -> int:
    """Like `store_in_fp8` for models whose layers run under gradient checkpointing with saved weights (the UNets):
    each frozen Linear / Conv2d weight (not matching `skip`, not the model's first parameter, which keeps the dtype
    the model reports) is stored in fp8 and cast to `compute_dtype` by an autograd function as its layer runs, in
    forward and backward (`half_storage.cast_as_it_runs`). diffusers' layerwise casting swaps the stored tensors
    instead, which a recomputing checkpoint sees as changed weights. Returns the layers converted."""
    from library.training import half_storage

    first = next(iter(module.parameters()), None)
    converted = 0
    for path, layer in module.named_modules():
        if not half_storage.supported(layer) or layer.weight is first or layer.weight.requires_grad:
            continue
        if any(re.search(pattern, path) for pattern in skip):
            continue
        layer.weight = nn.Parameter(layer.weight.detach().to(FP8_DTYPE), requires_grad=False)
        half_storage.cast_as_it_runs(layer, compute_dtype)
        converted += 1
    logger.info("%s: %d layers stored in float8 e4m3fn, computed in %s", type(module).__name__, converted,
                compute_dtype)  # fmt: skip
    return converted
