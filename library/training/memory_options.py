"""Precision and memory options of the loop: trainable weights in half precision (--full_fp16 / --full_bf16), the
attention implementation (--sdpa, --xformers, --mem_eff_attn), and the low-memory switches (--lowram, --lowvram).

All conflicts are found by `MemoryOptions.from_args`, before any model loads.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch

from library.errors import ConfigError

logger = logging.getLogger(__name__)

ATTENTIONS = ("sdpa", "xformers", "mem_eff_attn")
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """The precision, attention and memory options."""
    parser.add_argument(
        "--full_fp16",
        action="store_true",
        help="keep the trained weights and their gradients in float16 too (not only the computation); saves "
        "memory, less accurate. Needs --mixed_precision fp16",
    )
    parser.add_argument(
        "--full_bf16",
        action="store_true",
        help="keep the trained weights and their gradients in bfloat16; needs --mixed_precision bf16",
    )
    parser.add_argument(
        "--sdpa", action="store_true", help="use PyTorch scaled-dot-product attention (the default attention)"
    )
    parser.add_argument(
        "--xformers", action="store_true", help="use xformers' memory-efficient attention (needs the xformers package)"
    )
    parser.add_argument(
        "--mem_eff_attn",
        action="store_true",
        help="compute the denoiser's attention in slices (diffusers' sliced attention): less memory, slower",
    )
    from library.training.compile import add_compile_arguments
    from library.training.quantized_base import add_quantization_arguments

    add_quantization_arguments(parser)
    add_compile_arguments(parser)
    parser.add_argument(
        "--upcast_frozen_weights",
        action="store_true",
        help="in a float32 run, load frozen fp16/bf16 weights as float32 copies; by default the frozen Linear and "
        "Conv2d weights stay in the checkpoint's precision and are cast layer by layer (same results, half the "
        "memory for them)",
    )
    parser.add_argument(
        "--lowram",
        action="store_true",
        help="accepted for compatibility: models are always built without a second copy in RAM",
    )
    parser.add_argument(
        "--lowvram",
        action="store_true",
        help="not supported; see docs/memory_options.md for the options that save device memory",
    )


@dataclass(frozen=True)
class MemoryOptions:
    """Typed precision and memory options."""

    full_precision: Literal["fp16", "bf16"] | None = None  # trained weights in this dtype; None: float32
    attention: Literal["sdpa", "xformers", "mem_eff_attn"] = "sdpa"
    upcast_frozen_weights: bool = False  # float32 copies of frozen half-precision weights (the old behaviour)

    @classmethod
    def from_args(cls, args: argparse.Namespace, mixed_precision: str) -> MemoryOptions:
        """Validate the options against each other and --mixed_precision; raises ConfigError."""
        full_precision = _full_precision(args, mixed_precision)
        attention = _attention(args)
        if getattr(args, "lowvram", False):
            raise ConfigError(
                "--lowvram is not supported by this trainer. To save device memory use --gradient_checkpointing, "
                "--cache_latents, --mem_eff_attn or --xformers, --full_bf16 / --full_fp16, or a smaller batch_size "
                "with --gradient_accumulation_steps."
            )
        if getattr(args, "lowram", False):
            logger.info(
                "--lowram: models are always built on the meta device and take the checkpoint's tensors, "
                "so RAM never holds a second copy of a model; nothing else changes"
            )
        return cls(full_precision, attention, bool(getattr(args, "upcast_frozen_weights", False)))

    @property
    def trained_dtype(self) -> torch.dtype | None:
        """The dtype the trained weights are cast to, or None to keep the method's choice (float32)."""
        return HALF_DTYPES.get(self.full_precision)


def _full_precision(args: argparse.Namespace, mixed_precision: str) -> str | None:
    full_fp16, full_bf16 = getattr(args, "full_fp16", False), getattr(args, "full_bf16", False)
    if full_fp16 and full_bf16:
        raise ConfigError("--full_fp16 and --full_bf16 exclude each other; choose one")
    wanted = "fp16" if full_fp16 else "bf16" if full_bf16 else None
    if wanted is not None and mixed_precision != wanted:
        raise ConfigError(
            f"--full_{wanted} keeps the trained weights in {'float16' if wanted == 'fp16' else 'bfloat16'} and needs "
            f"--mixed_precision {wanted} (got --mixed_precision {mixed_precision})"
        )
    return wanted


def _attention(args: argparse.Namespace) -> str:
    chosen = [name for name in ATTENTIONS if getattr(args, name, False)]
    if len(chosen) > 1:
        raise ConfigError(
            f"{' and '.join('--' + name for name in chosen)} are different attention implementations; choose one"
        )
    if chosen == ["xformers"] and importlib.util.find_spec("xformers") is None:
        # xformers is an optional extra (its wheels pin one torch build); the guides' commands carry --xformers, and
        # PyTorch's scaled-dot-product attention gives the same memory savings, so the run goes on with it.
        logger.warning(
            "--xformers: the xformers package is not installed (pip install xformers, built for your torch and "
            "CUDA); using PyTorch's scaled-dot-product attention (--sdpa), which saves memory the same way"
        )
        return "sdpa"
    return chosen[0] if chosen else "sdpa"


def apply_attention(models, attention: str) -> None:
    """Switch the denoiser (and the VAE where it can) to the chosen attention; SDPA is diffusers' default."""
    if attention == "xformers":
        for model in (models.denoiser, models.vae):
            if hasattr(model, "enable_xformers_memory_efficient_attention"):
                model.enable_xformers_memory_efficient_attention()
        logger.info("attention: xformers")
    elif attention == "mem_eff_attn":
        denoiser = models.denoiser
        if hasattr(denoiser, "set_attention_slice"):
            denoiser.set_attention_slice("auto")
            logger.info("attention: computed in slices (--mem_eff_attn)")
        else:
            logger.info(
                "--mem_eff_attn: %s has no sliced attention; using PyTorch's scaled-dot-product attention, "
                "whose kernels already save memory",
                type(denoiser).__name__,
            )


def cast_trained_modules(modules: list[torch.nn.Module], options: MemoryOptions) -> None:
    """--full_fp16 / --full_bf16: the trained weights themselves in half precision (parameters keep their
    identity, so optimizer groups built before still hold them)."""
    dtype = options.trained_dtype
    if dtype is None:
        return
    for module in modules:
        module.to(dtype)
    logger.info("trained weights kept in %s (--full_%s)", str(dtype).removeprefix("torch."), options.full_precision)


def allow_half_gradients(accelerator, options: MemoryOptions) -> None:
    """With --full_fp16, let the fp16 gradient scaler unscale float16 gradients.

    torch's GradScaler refuses float16 gradients by default (unscaling in place can lose small values); training
    float16 weights has no float32 gradients to unscale instead, so the refusal is lifted, as the reference
    trainer does for --full_fp16.
    """
    scaler = getattr(accelerator, "scaler", None)
    if options.full_precision != "fp16" or scaler is None:
        return
    unscale = scaler._unscale_grads_

    def unscale_half_too(optimizer, inv_scale, found_inf, allow_fp16):
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_half_too


def keep_freed_buffers() -> None:
    """On glibc, keep freed memory for reuse instead of returning it to the system at every step.

    By default every large activation buffer of a CPU step is mapped fresh and unmapped again: hundreds of thousands
    of page faults per full-size SD 1.5 step (about 14 % of its time, benchmarks/README.md). Set once the models are
    loaded, so the loading peak is unchanged; the step's buffers are the same sizes every step, so reuse does not
    fragment. Left alone when the user set glibc's MALLOC_* variables or the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    if any(name.startswith("MALLOC_") for name in os.environ):
        return
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)
