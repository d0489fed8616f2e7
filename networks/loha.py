"""`--network_module networks.loha`: LoHa (Hadamard product of two low-rank matrices, FedPara) for every family.

dW = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / dim, with a_ (out, dim) and b_ (dim, in * kh * kw), as
LyCORIS writes it and ComfyUI / AUTOMATIC1111 read it. The family's target table chooses the layers, and the shared
`--network_args` (conv_dim, network_reg_dims, train_*_block_indices ...) apply as for networks.lora.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import nn

from library.adapters.targets import TargetTable
from networks.adapters import DEFAULT_ALPHA, DEFAULT_DIM, WeightChangeAdapter, warn_unsupported
from networks.lora import LoRANetwork, NetworkCall, build_network, network_from_weights

__all__ = ["LoHaModule", "LoRANetwork", "create_network", "create_network_from_weights"]

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LoHaModule(WeightChangeAdapter):
    """LoHa on one target; initialised as LyCORIS does (w2_a zero, so the adapter starts as a no-op)."""

    key_suffixes = (*FACTORS, "alpha")
    label = "LoHa"
    plugin = "networks.loha"

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module | Sequence[nn.Module],
        multiplier: float = 1.0,
        lora_dim: int = DEFAULT_DIM,
        alpha: float | None = DEFAULT_ALPHA,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        layers = [org_module] if isinstance(org_module, nn.Module) else list(org_module)
        super().__init__(lora_name, layers, multiplier, None, None, module_dropout)
        for option, value in (("network_dropout", dropout), ("rank_dropout", rank_dropout)):
            if value:
                warn_unsupported("LoHa", option)
        self.lora_dim = lora_dim
        rows, columns = sum(self.part_sizes), math.prod(self.org_module.weight.shape[1:])
        self.hada_w1_a = nn.Parameter(torch.randn(rows, lora_dim) * 0.1)
        self.hada_w1_b = nn.Parameter(torch.randn(lora_dim, columns))
        self.hada_w2_a = nn.Parameter(torch.zeros(rows, lora_dim))
        self.hada_w2_b = nn.Parameter(torch.randn(lora_dim, columns))
        alpha = float(alpha) if alpha else float(lora_dim)  # alpha 0 or None: no scaling, as for LoRA
        self.register_buffer("alpha", torch.tensor(alpha))

    def weight_change(self) -> torch.Tensor:
        tensors = {name: getattr(self, name) for name in FACTORS}
        return self.compose(dict(tensors, alpha=self.alpha)).reshape(self.fused_shape)

    def rank_and_alpha(self) -> tuple[int, float]:
        return self.lora_dim, float(self.alpha)

    def plus_parameters(self) -> list[nn.Parameter]:
        return [self.hada_w1_a, self.hada_w2_a]

    def scale_delta(self, ratio: torch.Tensor) -> None:
        # dW is linear in each of w1_a and w2_a, so scaling both by sqrt(ratio) scales dW by ratio
        for factor in (self.hada_w1_a, self.hada_w2_a):
            factor.mul_(ratio.sqrt().to(factor))

    @classmethod
    def rank_of(cls, tensors: dict[str, torch.Tensor]) -> tuple[int, float]:
        dim = tensors["hada_w1_b"].shape[0]
        alpha = tensors.get("alpha")
        return dim, float(alpha) if alpha is not None else float(dim)

    @classmethod
    def compose(cls, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """(out, in * kh * kw) change; the caller reshapes it to the layer's weight (ComfyUI does the same)."""
        dim, alpha = cls.rank_of(tensors)
        first = tensors["hada_w1_a"] @ tensors["hada_w1_b"]
        second = tensors["hada_w2_a"] @ tensors["hada_w2_b"]
        return first * second * (alpha / dim)

    @classmethod
    def swap_output_halves(cls, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        swapped = dict(tensors)
        for name in ("hada_w1_a", "hada_w2_a"):
            first, second = tensors[name].chunk(2, dim=0)
            swapped[name] = torch.cat([second, first], dim=0)
        return swapped


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
    """Create a fresh LoHa network (plugin entry point); `kwargs` are the `--network_args`."""
    call = NetworkCall(multiplier, network_dim, network_alpha, text_encoder, unet, neuron_dropout, adapter_targets,
                       kwargs, __name__)  # fmt: skip
    return build_network(LoHaModule, {}, call)


def create_network_from_weights(
    multiplier: float,
    file: str | os.PathLike | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | Sequence[nn.Module] | None,
    unet: nn.Module | None,
    weights_sd: dict[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    adapter_targets: TargetTable | None = None,
    **kwargs: object,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A LoHa network shaped like a saved one; load the weights with `load_weights` or merge them with `merge_to`."""
    call = NetworkCall(multiplier, None, None, text_encoder, unet, None, adapter_targets, kwargs, __name__)
    return network_from_weights((LoHaModule,), call, file, weights_sd, for_inference)
