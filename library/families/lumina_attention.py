"""Attention kernels of the Lumina 2 transformer: PyTorch's scaled-dot-product attention (diffusers' default), or
FlashAttention (--use_flash_attn) / SageAttention (--use_sage_attn) through diffusers' attention dispatcher.

Lumina's masks are prefix masks (a caption's real tokens first, then padding; in the joint blocks caption and image
tokens first), which is what the dispatcher's variable-length kernels expect. SageAttention has no backward pass, so
it runs only where no gradient is needed (sample images, validation); training steps keep PyTorch's kernel.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F

from library.errors import ConfigError, MissingPackageError

logger = logging.getLogger(__name__)

Kernel = Literal["flash", "sage"]
# kernel -> (option, import name, what to install)
KERNELS: dict[str, tuple[str, str, str]] = {
    "flash": ("--use_flash_attn", "flash_attn", "pip install flash-attn --no-build-isolation"),
    "sage": ("--use_sage_attn", "sageattention", "pip install sageattention"),
}


def chosen_kernel(use_flash_attn: bool, use_sage_attn: bool) -> Kernel | None:
    """The kernel the options ask for; both at once are refused."""
    if use_flash_attn and use_sage_attn:
        raise ConfigError("--use_flash_attn and --use_sage_attn are two attention kernels; choose one")
    return "flash" if use_flash_attn else "sage" if use_sage_attn else None


def check_kernel(kernel: Kernel | None, mixed_precision: str) -> None:
    """Refuse, before anything loads, a kernel whose package is missing or that this machine cannot run."""
    if kernel is None:
        return
    option, module, install = KERNELS[kernel]
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(f"{option} needs the {module} package, which is not installed: {install}")
    if not torch.cuda.is_available():
        raise ConfigError(f"{option}: its kernels run on CUDA GPUs only, and none is available; leave the option out")
    if mixed_precision not in ("bf16", "fp16"):
        raise ConfigError(f"{option}: its kernels compute in half precision; add --mixed_precision bf16 (or fp16)")
    if kernel == "sage":
        logger.info("--use_sage_attn: SageAttention has no backward pass; training steps use PyTorch's attention, "
                    "sample images and validation use SageAttention")  # fmt: skip


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float,
    kernel: Kernel | None,
) -> torch.Tensor:  # fmt: skip
    """Attention of (B, S, H, D) queries, keys and values; `mask` (B, S_kv) marks the keys to attend to."""
    if kernel is None or (kernel == "sage" and torch.is_grad_enabled()):
        attn_mask = None if mask is None else mask.bool().view(mask.shape[0], 1, 1, -1)
        output = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask, scale=scale
        )  # (B, H, S, D)
        return output.transpose(1, 2)
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    backend = kernel if mask is None else f"{kernel}_varlen"
    attn_mask = None if mask is None else mask.bool()
    return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, scale=scale, backend=backend)


class LuminaAttnProcessor:
    """What diffusers' Lumina2AttnProcessor2_0 computes (q/k norms, rotary positions, grouped-query attention,
    proportional scale), with the attention itself done by `attend` and the chosen kernel."""

    def __init__(self, kernel: Kernel | None = None):
        self.kernel = kernel

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        base_sequence_length: int | None = None,
    ) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        batch, length, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        dtype = query.dtype
        head_dim = query.shape[-1] // attn.heads
        kv_heads = key.shape[-1] // head_dim
        query = query.view(batch, -1, attn.heads, head_dim)  # (B, S, H, D)
        key = key.view(batch, -1, kv_heads, head_dim)
        value = value.view(batch, -1, kv_heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=False)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)
        scale = attn.scale
        if base_sequence_length is not None:  # proportional attention
            scale = math.sqrt(math.log(length, base_sequence_length)) * attn.scale
        repeats = attn.heads // kv_heads  # grouped-query attention: every key/value head serves `repeats` queries
        key = key.unsqueeze(3).repeat(1, 1, 1, repeats, 1).flatten(2, 3)
        value = value.unsqueeze(3).repeat(1, 1, 1, repeats, 1).flatten(2, 3)
        output = attend(query, key, value, attention_mask, scale, self.kernel)
        output = output.reshape(batch, -1, attn.heads * head_dim).type_as(query)
        return attn.to_out[1](attn.to_out[0](output))


def set_processor(transformer: torch.nn.Module, processor) -> int:
    """Give every attention layer of `transformer` this processor; returns how many layers took it."""
    layers = [module for module in transformer.modules() if hasattr(module, "set_processor")]
    for layer in layers:
        layer.set_processor(processor)
    return len(layers)


def install(transformer: torch.nn.Module, kernel: Kernel | None) -> None:
    """Give every attention layer of a Lumina2Transformer2DModel the chosen kernel (None: diffusers' own)."""
    if kernel is None:
        return
    set_processor(transformer, LuminaAttnProcessor(kernel))
    logger.info("Lumina 2 attention: %s", {"flash": "FlashAttention", "sage": "SageAttention"}[kernel])
