"""`--network_module networks.lokr`: LoKr (Kronecker product) for every family.

dW = kron(w1, w2) * scale with w1 (out_l, in_m) and w2 (out_k, in_n[, kh, kw]), out = out_l * out_k and in = in_m * in_n
split as LyCORIS's `factorization` does (`--network_args factor=N` picks the split nearest N; -1, the default, the most
balanced one). w2 is low-rank (`lokr_w2_a` (out_k, dim) @ `lokr_w2_b` (dim, in_n * kh * kw)) unless dim reaches half
its larger side or `full_matrix=True`; `decompose_both=True` makes w1 low-rank too. scale = alpha / dim, and 1 when both
factors are full (alpha is then ignored), as ComfyUI applies it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from library.adapters.targets import TargetTable
from library.errors import CheckpointError, ConfigError
from networks.adapters import DEFAULT_ALPHA, DEFAULT_DIM, Adapter, WeightChangeAdapter, warn_unsupported
from networks.lora import LoRANetwork, NetworkCall, build_network, network_from_weights
from networks.network_args import parse_flag, parse_number

__all__ = ["LoKrModule", "LoRANetwork", "create_network", "create_network_from_weights", "factorization"]

TYPE_KEYS = ("factor", "full_matrix", "decompose_both")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n: m = factor when it divides, else the most balanced split whose m
    does not exceed factor (LyCORIS's rule, so files match its shapes)."""
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate + dimension // candidate > m + n or candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return min(m, n), max(m, n)


@dataclass(frozen=True)
class KronLayout:
    """Sides of the two factors; a rank of None means the factor is stored in full."""

    out_l: int
    out_k: int
    in_m: int
    in_n: int
    w1_rank: int | None
    w2_rank: int | None

    @classmethod
    def fresh(cls, out_dim: int, in_dim: int, dim: int, factor: int, full: bool, both: bool) -> KronLayout:
        in_m, in_n = factorization(in_dim, factor)
        out_l, out_k = factorization(out_dim, factor)
        w1_rank = dim if both and not full and dim < max(out_l, in_m) / 2 else None
        w2_rank = dim if not full and dim < max(out_k, in_n) / 2 else None
        return cls(out_l, out_k, in_m, in_n, w1_rank, w2_rank)

    @classmethod
    def stored(cls, tensors: dict[str, torch.Tensor], kernel_size: int) -> KronLayout:
        """The layout of a module in a file (`kernel_size`: kh * kw of the layer, 1 for Linears)."""
        if "lokr_w1" in tensors:
            (out_l, in_m), w1_rank = tensors["lokr_w1"].shape, None
        else:
            out_l, w1_rank, in_m = *tensors["lokr_w1_a"].shape, tensors["lokr_w1_b"].shape[1]
        if "lokr_w2" in tensors:
            (out_k, in_n), w2_rank = tensors["lokr_w2"].shape[:2], None
        else:
            out_k, w2_rank = tensors["lokr_w2_a"].shape
            in_n = tensors["lokr_w2_b"].shape[1] // kernel_size
        return cls(out_l, out_k, in_m, in_n, w1_rank, w2_rank)


class LoKrModule(WeightChangeAdapter):
    """LoKr on one target; the zero-initialised side of w2 makes it start as a no-op (LyCORIS's initialisation)."""

    key_suffixes = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha")
    markers = ("lokr_w1", "lokr_w1_a")
    label = "LoKr"
    plugin = "networks.lokr"

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
        factor: int = -1,
        full_matrix: bool = False,
        decompose_both: bool = False,
        layout: KronLayout | None = None,
    ) -> None:
        layers = [org_module] if isinstance(org_module, nn.Module) else list(org_module)
        super().__init__(lora_name, layers, multiplier, None, None, module_dropout)
        for option, value in (("network_dropout", dropout), ("rank_dropout", rank_dropout)):
            if value:
                warn_unsupported("LoKr", option)
        in_dim = self.org_module.weight.shape[1]
        self.kernel = tuple(self.org_module.weight.shape[2:])
        self.layout = layout or KronLayout.fresh(sum(self.part_sizes), in_dim, lora_dim, factor, full_matrix,
                                                 decompose_both)  # fmt: skip
        self.lora_dim = self.layout.w2_rank or self.layout.w1_rank or lora_dim
        self._make_factors()
        full = self.layout.w1_rank is None and self.layout.w2_rank is None
        alpha = float(self.lora_dim) if full or not alpha else float(alpha)  # both full: scale 1 (LyCORIS)
        self.register_buffer("alpha", torch.tensor(alpha))

    def _make_factors(self) -> None:
        layout, kernel = self.layout, self.kernel
        if layout.w1_rank is None:
            self.lokr_w1 = _kaiming(layout.out_l, layout.in_m)
        else:
            self.lokr_w1_a = _kaiming(layout.out_l, layout.w1_rank)
            self.lokr_w1_b = _kaiming(layout.w1_rank, layout.in_m)
        if layout.w2_rank is None:
            self.lokr_w2 = nn.Parameter(torch.zeros(layout.out_k, layout.in_n, *kernel))
        else:
            self.lokr_w2_a = _kaiming(layout.out_k, layout.w2_rank)
            self.lokr_w2_b = nn.Parameter(torch.zeros(layout.w2_rank, layout.in_n * math.prod(kernel)))

    def _factors(self) -> dict[str, torch.Tensor]:
        return {name: param for name, param in self.named_parameters(recurse=False)}

    def weight_change(self) -> torch.Tensor:
        return self.compose(dict(self._factors(), alpha=self.alpha)).reshape(self.fused_shape)

    def rank_and_alpha(self) -> tuple[int, float]:
        return self.lora_dim, float(self.alpha)

    def plus_parameters(self) -> list[nn.Parameter]:
        return [self.lokr_w2 if self.layout.w2_rank is None else self.lokr_w2_b]

    def scale_delta(self, ratio: torch.Tensor) -> None:
        first = self.lokr_w1 if self.layout.w1_rank is None else self.lokr_w1_a
        first.mul_(ratio.to(first))  # dW is linear in w1

    @classmethod
    def shaped_like(
        cls, lora_name: str, layers: Sequence[nn.Module], multiplier: float, tensors: dict[str, torch.Tensor],
        dropouts: tuple = (),
    ) -> Adapter:  # fmt: skip
        layout = KronLayout.stored(tensors, math.prod(layers[0].weight.shape[2:]))
        dim, alpha = cls.rank_of(tensors)
        return cls(lora_name, layers, multiplier, dim, alpha, *dropouts, layout=layout)

    @classmethod
    def missing_suffixes(cls, suffixes: set[str]) -> list[str]:
        missing = []
        for full, low_rank in (("lokr_w1", ("lokr_w1_a", "lokr_w1_b")), ("lokr_w2", ("lokr_w2_a", "lokr_w2_b"))):
            if full not in suffixes:
                missing += [name for name in low_rank if name not in suffixes]
        return missing

    @classmethod
    def rank_of(cls, tensors: dict[str, torch.Tensor]) -> tuple[int, float]:
        """The rank of the low-rank factor (w2's before w1's, as ComfyUI reads it); both full: alpha as the rank."""
        alpha = tensors.get("alpha")
        for name in ("lokr_w2_b", "lokr_w1_b"):
            if name in tensors:
                dim = tensors[name].shape[0]
                return dim, float(alpha) if alpha is not None else float(dim)
        dim = max(1, round(float(alpha))) if alpha is not None else 1
        return dim, float(dim)

    @classmethod
    def compose(cls, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The change flattened to (out, in * kh * kw), scale included."""
        dim, alpha = cls.rank_of(tensors)
        full = "lokr_w1_b" not in tensors and "lokr_w2_b" not in tensors
        first = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
        second = tensors["lokr_w2"] if "lokr_w2" in tensors else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
        first = first.reshape(*first.shape, *[1] * (second.dim() - 2))
        change = torch.kron(first, second.contiguous()).flatten(1)
        return change if full else change * (alpha / dim)

    @classmethod
    def swap_output_halves(cls, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rows of kron(w1, w2) are (w1 row, w2 row) pairs: the halves swap with w1's halves when w1 has an even number
        of rows, or with w2's when w1 has one row."""
        first = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
        second = "lokr_w2" if "lokr_w2" in tensors else "lokr_w2_a"
        rows = tensors[first].shape[0]
        if rows % 2 and rows != 1:
            raise CheckpointError(f"a LoKr module with {rows} rows in w1 cannot be reordered between the original and "
                                  "diffusers layouts; train it with another factor")  # fmt: skip
        name = first if rows % 2 == 0 else second
        top, bottom = tensors[name].chunk(2, dim=0)
        return dict(tensors, **{name: torch.cat([bottom, top], dim=0)})


def _kaiming(*shape: int) -> nn.Parameter:
    weight = torch.empty(*shape)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return nn.Parameter(weight)


def type_options(network_args: dict) -> dict:
    """The LoKr keys of `--network_args`: factor, full_matrix, decompose_both."""
    factor = parse_number("factor", network_args.get("factor"), int)
    if factor is not None and (factor == 0 or factor < -1):
        raise ConfigError(f"--network_args factor must be -1 (balanced) or a positive integer, got {factor}")
    return {
        "factor": -1 if factor is None else factor,
        "full_matrix": parse_flag(network_args.get("full_matrix", False)),
        "decompose_both": parse_flag(network_args.get("decompose_both", False)),
    }


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
    """Create a fresh LoKr network (plugin entry point); `kwargs` are the `--network_args`."""
    call = NetworkCall(multiplier, network_dim, network_alpha, text_encoder, unet, neuron_dropout, adapter_targets,
                       kwargs, __name__, TYPE_KEYS)  # fmt: skip
    return build_network(LoKrModule, type_options(kwargs), call)


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
    """A LoKr network shaped like a saved one; load the weights with `load_weights` or merge them with `merge_to`."""
    call = NetworkCall(multiplier, None, None, text_encoder, unet, None, adapter_targets, kwargs, __name__, TYPE_KEYS)
    return network_from_weights((LoKrModule,), call, file, weights_sd, for_inference)
