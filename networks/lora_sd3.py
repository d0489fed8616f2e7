"""`--network_module networks.lora_sd3` (the SD3 family's default): the name the reference trainer's SD3 / SD3.5 LoRA
module has, kept so users' commands work. It is networks.lora, plus the reference's `verbose=True`: a list of every
adapter's rank and alpha and of the layers left without one. The SD3 family's target table supplies the SAI module
names, the fused q|k|v split points and its --network_args (context_attn_dim ... x_mod_dim, emb_dims,
train_block_indices, train_t5xxl; split_qkv, save_format, network_reg_dims and network_reg_lrs are shared).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from library.adapters.targets import TargetTable
from networks import lora
from networks.adapters import leaf_adapters
from networks.lora import LoRANetwork, create_network_from_weights
from networks.network_args import parse_flag

__all__ = ["LoRANetwork", "create_network", "create_network_from_weights"]

logger = logging.getLogger(__name__)


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    adapter_targets: TargetTable | None = None,
    **kwargs: object,
) -> LoRANetwork:
    """networks.lora.create_network; with `verbose=True` the ranks are logged."""
    network = lora.create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout,
                                  adapter_targets, **kwargs)  # fmt: skip
    if parse_flag(kwargs.get("verbose", False)):
        log_ranks(network, adapter_targets)
    return network


def log_ranks(network: LoRANetwork, table: TargetTable | None) -> None:
    """One line per adapter (name, rank, alpha), then the table's layers that got none."""
    for module in network.text_encoder_loras + network.unet_loras:
        rank, alpha = leaf_adapters(module)[0].rank_and_alpha()
        logger.info("  %-70s rank %d, alpha %g", module.lora_name, rank, alpha)
    skipped = [target.name for target in table.targets if target.name not in network.targets] if table else []
    if skipped:
        logger.info("%d layers without an adapter (rank 0, unchosen blocks or off by default):", len(skipped))
        for name in skipped:
            logger.info("  %s", name)
