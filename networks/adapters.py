"""Adapter types behind one interface, and how an adapter is hooked into the layers of its target.

An adapter is a trainable weight change dW of one original layer: a Linear, a Conv2d, or a fused Linear that the
model holds as several parts reading the same input (FLUX's q|k|v). The network, the fused / split wrappers and the
LoRA tools only use the interface of `Adapter` (output change, weight change, file tensors, construction from them),
so another adapter type is one more subclass: DoRA here (LoRA with `use_dora=True`), LoHa in networks/loha.py and LoKr
in networks/lokr.py. Key names and tensor layouts are the ones LyCORIS writes and ComfyUI reads.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from library.errors import CheckpointError
from library.training.quantized_base import dense_weight

logger = logging.getLogger(__name__)

DEFAULT_DIM = 4
DEFAULT_ALPHA = 1.0
Parts = list[tuple[dict[str, torch.Tensor], float]]  # diffusers / PEFT tensors of each part with its alpha


def weight_input_shape(layer: nn.Module) -> tuple[int, ...]:
    """The weight's shape after its output rows: (in,) for a Linear (also one whose weight is stored quantized),
    (in, kh, kw) for a Conv2d."""
    return tuple(layer.weight.shape[1:]) if isinstance(layer, nn.Conv2d) else (layer.in_features,)


def out_features(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def fused_weight(layers: Sequence[nn.Module], device: torch.device | str | None = None) -> torch.Tensor:
    """The float32 weight of the original layer: the parts' weights stacked by rows."""
    return torch.cat([dense_weight(layer).detach().to(device, torch.float32) for layer in layers], dim=0)


@functools.cache
def warn_unsupported(type_name: str, option: str) -> None:
    logger.warning("%s adapters have no %s; the option is ignored", type_name, option)


class Adapter(nn.Module):
    """One trainable weight change of a target's layers; `lora_name` is its module name in files.

    With several layers (a fused original layer) the change has the rows of all of them, and each layer adds its own
    rows of the output change. The base layers are referenced, never registered: they belong to the model.
    """

    key_suffixes: ClassVar[tuple[str, ...]]  # tensor names of one module in files, after `<lora_name>.`
    label: ClassVar[str] = "adapter"  # the type's name in messages and metadata
    plugin: ClassVar[str] = "networks.lora"  # the --network_module that creates and loads it
    markers: ClassVar[tuple[str, ...]] = ()  # a file module is of this type when it has one of these (default: first)
    needs_base: ClassVar[bool] = False  # the weight change depends on the base weight (DoRA)
    has_peft_form: ClassVar[bool] = False  # diffusers / PEFT can hold it

    def __init__(
        self,
        lora_name: str,
        layers: Sequence[nn.Module],
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.lora_name = lora_name
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self._layers = tuple(layers)
        self.part_sizes = [out_features(layer) for layer in layers]
        self.original_forwards: list | None = None

    @property
    def org_module(self) -> nn.Module:
        """The layer this adapter changes (the first part of a fused layer)."""
        return self._layers[0]

    @property
    def fused_shape(self) -> tuple[int, ...]:
        """The shape of the original layer's weight (rows of every part)."""
        return (sum(self.part_sizes), *weight_input_shape(self.org_module))

    def part_index(self, rows: slice | None) -> int:
        """Which layer of a fused target `rows` (as `apply_to` hands them out) belong to."""
        if rows is None:
            return 0
        starts = [sum(self.part_sizes[:index]) for index in range(len(self.part_sizes))]
        return starts.index(rows.start)

    # ---- the interface of an adapter type ------------------------------------------------------------------

    def delta_output(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """The change of the layer's output for input `x`, times the multiplier (only `rows` of a fused layer's
        output when given), in the adapter's dtype; dropouts apply in training mode."""
        raise NotImplementedError

    def delta_weight(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The current weight change in float32 (scale included, multiplier not), shaped like the fused weight."""
        raise NotImplementedError

    def plus_parameters(self) -> list[nn.Parameter]:
        """The parameters LoRA+ trains at the higher learning rate."""
        raise NotImplementedError

    def scale_delta(self, ratio: torch.Tensor) -> None:
        """Multiply the weight change by `ratio` (max-norm regularization)."""
        raise NotImplementedError

    def refresh_scale(self) -> None:
        """Recompute derived values after tensors were loaded from a file."""

    def rank_and_alpha(self) -> tuple[int, float]:
        """The adapter's rank and alpha as files record them (`ss_network_dim` / `ss_network_alpha`)."""
        raise NotImplementedError

    def peft_tensors(self, rows: slice | None = None) -> dict[str, torch.Tensor]:
        """The diffusers / PEFT tensors of one layer (`rows` of a fused layer), keyed by suffix."""
        raise CheckpointError(f"{type(self).__name__} adapters have no diffusers / PEFT form; save in kohya format")

    @classmethod
    def matches(cls, suffixes: set[str]) -> bool:
        """Whether a stored module with these tensor names is of this type."""
        markers = cls.markers or cls.key_suffixes[:1]
        return suffixes <= set(cls.key_suffixes) and any(marker in suffixes for marker in markers)

    @classmethod
    def missing_suffixes(cls, suffixes: set[str]) -> list[str]:
        """Tensor names a stored module of this type lacks (empty when complete)."""
        return [suffix for suffix in cls.key_suffixes if suffix != "alpha" and suffix not in suffixes]

    @classmethod
    def rank_of(cls, tensors: dict[str, torch.Tensor]) -> tuple[int, float]:
        """(dim, alpha) of a module stored in a file (`tensors` keyed by suffix)."""
        raise NotImplementedError

    @classmethod
    def delta_of(
        cls, tensors: dict[str, torch.Tensor], device: torch.device | str, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The float32 weight change a module stored in a file makes (scale included); `base` is the float32 fused
        weight of the layer, needed by types whose change depends on it (`needs_base`)."""
        raise NotImplementedError

    @classmethod
    def shaped_like(
        cls, lora_name: str, layers: Sequence[nn.Module], multiplier: float, tensors: dict[str, torch.Tensor],
        dropouts: tuple = (),
    ) -> Adapter:  # fmt: skip
        """A fresh adapter whose tensors have the shapes of the stored module `tensors` (load them afterwards)."""
        dim, alpha = cls.rank_of(tensors)
        return cls(lora_name, layers, multiplier, dim, alpha, *dropouts)

    @classmethod
    def low_rank_factors(cls, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(up (out, r), down (r, in*kh*kw), scale) whose product times scale is the stored change, for types that
        store one; None when the change must be formed in full."""
        return None

    @classmethod
    def carried_tensors(cls, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors a re-factorised module keeps unchanged (DoRA's magnitudes)."""
        return {}

    @classmethod
    def swap_output_halves(cls, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The same module with the two halves of its output rows exchanged (between diffusers' and the original
        layout's order); an involution."""
        raise NotImplementedError

    @classmethod
    def fuse_parts(cls, states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One module's tensors equivalent to adapters on each part of a fused layer (for `split_qkv`)."""
        raise CheckpointError(f"{cls.__name__} adapters cannot be written as one fused module; leave out split_qkv")

    @classmethod
    def split_fused(cls, state: dict[str, torch.Tensor], sizes: list[int], dim: int, source: str) -> list[dict]:
        """The inverse of `fuse_parts`: per-part tensors, when the fused module allows it exactly."""
        raise CheckpointError(f"{source}: {cls.__name__} modules cannot be split into parts; leave out split_qkv")

    @classmethod
    def peft_parts(cls, tensors: dict[str, torch.Tensor], sizes: list[int]) -> Parts:
        """A stored module as diffusers / PEFT tensors of each part of its layer (`lora_B` unscaled), with alphas."""
        raise CheckpointError(f"{cls.__name__} modules have no diffusers / PEFT form; keep the kohya format")

    @classmethod
    def from_peft_parts(cls, parts: Parts) -> dict[str, torch.Tensor]:
        """The inverse of `peft_parts`: one stored module from the diffusers / PEFT tensors of each part."""
        raise CheckpointError(f"{cls.__name__} modules have no diffusers / PEFT form")

    # ---- hooking into the model ----------------------------------------------------------------------------

    def apply_to(self) -> None:
        """Route each layer's forward through this adapter; the layers' own weights stay untouched."""
        if self.original_forwards is not None:
            return
        self.original_forwards = [layer.forward for layer in self._layers]
        if len(self._layers) == 1:
            self._layers[0].forward = self.forward
            return
        start = 0
        for index, (layer, size) in enumerate(zip(self._layers, self.part_sizes, strict=True)):
            layer.forward = self._part_forward(index, slice(start, start + size))
            start += size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._patched(self.original_forwards[0], x, None)

    def _part_forward(self, index: int, rows: slice):
        def forward(x: torch.Tensor) -> torch.Tensor:
            return self._patched(self.original_forwards[index], x, rows)

        return forward

    def _patched(self, original, x: torch.Tensor, rows: slice | None) -> torch.Tensor:
        base = original(x)
        if self.multiplier == 0:  # skip the adapter entirely so the output is bit-identical to the base
            return base
        # torch's CPU RNG (not `random`): gradient checkpointing restores it, so a recomputed block drops the same.
        if self.training and self.module_dropout and torch.rand(()).item() < self.module_dropout:
            return base
        return base + self.delta_output(x, rows).to(base.dtype)

    @torch.no_grad()
    def merge(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, device: torch.device | str) -> None:
        """Add the change of a stored module (`tensors` keyed by suffix), times the multiplier, into the layers."""
        merge_module(type(self), tensors, self._layers, self.multiplier, dtype, device, self.lora_name)


def merge_module(
    adapter_type: type[Adapter], tensors: dict[str, torch.Tensor], layers: Sequence[nn.Module], ratio: float,
    dtype: torch.dtype | None, device: torch.device | str, name: str,
) -> None:  # fmt: skip
    """Add `ratio` times the change of a stored module into the layers of its target."""
    base = fused_weight(layers, device) if adapter_type.needs_base else None
    merge_into_layers(layers, adapter_type.delta_of(tensors, device, base) * ratio, dtype, device, name)


def merge_into_layers(
    layers: Sequence[nn.Module], delta: torch.Tensor, dtype: torch.dtype | None, device, name: str
) -> None:
    """Add a fused weight change to the layers (each takes its rows); another shape raises CheckpointError."""
    sizes = [out_features(layer) for layer in layers]
    expected = (sum(sizes), *layers[0].weight.shape[1:])
    if delta.dim() == 2 and len(expected) > 2 and delta.shape == (expected[0], math.prod(expected[1:])):
        delta = delta.reshape(expected)  # LoHa / LoKr store convolutions flattened to (out, in * kh * kw)
    check_shape(name, delta.shape, expected)
    for layer, part in zip(layers, delta.split(sizes), strict=True):
        weight = layer.weight
        weight.copy_((weight.to(device, torch.float32) + part).to(dtype or weight.dtype))


def check_shape(name: str, shape: Sequence[int], expected: Sequence[int]) -> None:
    if tuple(shape) != tuple(expected):
        raise CheckpointError(
            f"LoRA '{name}' has shape {tuple(shape)} but the model layer has {tuple(expected)}; the file was trained "
            "for another model architecture."
        )


def delta_weight(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The weight change `up @ down` in the layout of the wrapped layer's weight.

    down: (r, in) or (r, in, kh, kw); up: (out, r) or (out, r, 1, 1) -> (out, in) or (out, in, kh, kw).
    For a 3x3 down conv followed by a 1x1 up conv this is the composed 3x3 kernel.
    """
    return torch.einsum("or,r...->o...", up.flatten(1), down)


class LoRAModule(Adapter):
    """LoRA: dW = up @ down * alpha / dim, with `down` a Linear (or a conv of the layer's kernel) and `up` 1x1."""

    key_suffixes = ("lora_down.weight", "lora_up.weight", "alpha")
    label = "LoRA"
    has_peft_form = True

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
        super().__init__(lora_name, layers, multiplier, dropout, rank_dropout, module_dropout)
        self.lora_dim = lora_dim
        first = layers[0]
        if isinstance(first, nn.Conv2d):
            self.lora_down = nn.Conv2d(
                first.in_channels, lora_dim, first.kernel_size, first.stride, first.padding, bias=False
            )
            self.lora_up = nn.Conv2d(lora_dim, sum(self.part_sizes), (1, 1), bias=False)
        else:
            self.lora_down = nn.Linear(first.in_features, lora_dim, bias=False)
            self.lora_up = nn.Linear(lora_dim, sum(self.part_sizes), bias=False)
        # Same initialisation as Microsoft's loralib: the adapter starts as an exact no-op.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        alpha = float(alpha) if alpha else float(lora_dim)  # kohya: alpha 0 or None means no scaling
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / lora_dim

    def refresh_scale(self) -> None:
        self.scale = float(self.alpha) / self.lora_dim

    def delta_output(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        hidden = self.lora_down(x.to(self.lora_down.weight.dtype))  # (..., r) or (B, r, H, W)
        scale = self.scale
        if self.training:
            hidden, scale = self._drop(hidden, scale)
        if rows is None:
            return self.lora_up(hidden) * (self.multiplier * scale)
        return nn.functional.linear(hidden, self.lora_up.weight[rows]) * (self.multiplier * scale)

    def _drop(self, hidden: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
        """Neuron dropout on the rank activations, then rank dropout (whole ranks per sample, rescaled)."""
        if self.dropout:
            hidden = nn.functional.dropout(hidden, p=self.dropout)
        if self.rank_dropout:
            if isinstance(self.lora_down, nn.Conv2d):
                shape = (hidden.shape[0], self.lora_dim, 1, 1)
            else:
                shape = (hidden.shape[0],) + (1,) * (hidden.dim() - 2) + (self.lora_dim,)
            keep = torch.rand(shape, device=hidden.device) > self.rank_dropout
            hidden = hidden * keep.to(hidden.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        return hidden, scale

    def delta_weight(self, device: torch.device | str | None = None) -> torch.Tensor:
        up = self.lora_up.weight.to(device, torch.float32)
        down = self.lora_down.weight.to(device, torch.float32)
        return delta_weight(up, down) * self.scale

    def rank_and_alpha(self) -> tuple[int, float]:
        return self.lora_dim, float(self.alpha)

    def peft_tensors(self, rows: slice | None = None) -> dict[str, torch.Tensor]:
        """lora_A = down, lora_B = the up rows with alpha / rank folded in (PEFT files carry no alpha)."""
        up = self.lora_up.weight if rows is None else self.lora_up.weight[rows]
        return {"lora_A.weight": self.lora_down.weight.detach().clone(), "lora_B.weight": up.detach() * self.scale}

    def delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The current weight change in float32 (without multiplier); `delta_weight` under its older name."""
        return self.delta_weight(device)

    def plus_parameters(self) -> list[nn.Parameter]:
        return [self.lora_up.weight]

    def scale_delta(self, ratio: torch.Tensor) -> None:
        # kohya's --scale_weight_norms: up and down are both scaled by sqrt(ratio).
        self.lora_up.weight.mul_(ratio.sqrt().to(self.lora_up.weight))
        self.lora_down.weight.mul_(ratio.sqrt().to(self.lora_down.weight))

    @classmethod
    def missing_suffixes(cls, suffixes: set[str]) -> list[str]:
        return [suffix for suffix in cls.key_suffixes if suffix not in suffixes and suffix != "alpha"]

    @classmethod
    def rank_of(cls, tensors: dict[str, torch.Tensor]) -> tuple[int, float]:
        dim = tensors["lora_down.weight"].shape[0]
        alpha = tensors.get("alpha")
        return dim, float(alpha) if alpha is not None else float(dim)  # files without alpha: alpha = dim

    @classmethod
    def delta_of(
        cls, tensors: dict[str, torch.Tensor], device: torch.device | str, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        up = tensors["lora_up.weight"].to(device, torch.float32)
        down = tensors["lora_down.weight"].to(device, torch.float32)
        dim, alpha = cls.rank_of(tensors)
        return delta_weight(up, down) * (alpha / dim)

    @classmethod
    def low_rank_factors(cls, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
        dim, alpha = cls.rank_of(tensors)
        up, down = tensors["lora_up.weight"].float(), tensors["lora_down.weight"].float()
        return up.flatten(1), down.flatten(1), alpha / dim

    @classmethod
    def file_tensors(
        cls, up: torch.Tensor, down: torch.Tensor, alpha: float, kernel: tuple[int, ...] = ()
    ) -> dict[str, torch.Tensor]:
        """A stored module from factors up (out, r) and down (r, in*kh*kw); `kernel` (kh, kw) for convolutions."""
        if kernel:
            up, down = up.reshape(*up.shape, 1, 1), down.reshape(down.shape[0], -1, *kernel)
        return {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
                "alpha": torch.tensor(float(alpha))}  # fmt: skip

    @classmethod
    def swap_output_halves(cls, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        first, second = tensors["lora_up.weight"].chunk(2, dim=0)
        return dict(tensors, **{"lora_up.weight": torch.cat([second, first], dim=0)})

    @classmethod
    def fuse_parts(cls, states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """lora_down (k*r, in) = the downs stacked; lora_up (sum out, k*r) block-diagonal; alpha k * alpha."""
        return {
            "lora_down.weight": torch.cat([state["lora_down.weight"] for state in states], dim=0),
            "lora_up.weight": block_diagonal([state["lora_up.weight"] for state in states]),
            "alpha": states[0]["alpha"] * len(states),
        }

    @classmethod
    def split_fused(cls, state: dict[str, torch.Tensor], sizes: list[int], dim: int, source: str) -> list[dict]:
        """The inverse of `fuse_parts`; a fused up that is not block-diagonal cannot be split exactly."""
        count, down = len(sizes), state["lora_down.weight"]
        blocks = diagonal_blocks(state["lora_up.weight"], sizes, dim)
        if blocks is None:
            raise CheckpointError(f"{source} has a shared (not block-diagonal) lora_up; load it without split_qkv=True")
        alpha = state.get("alpha", torch.tensor(float(dim * count))) / count
        return [
            {"lora_down.weight": part_down, "lora_up.weight": part_up, "alpha": alpha}
            for part_down, part_up in zip(down.split(dim, dim=0), blocks, strict=True)
        ]

    @classmethod
    def peft_parts(cls, tensors: dict[str, torch.Tensor], sizes: list[int]) -> Parts:
        """One part: lora_A = down, lora_B = up. Several: a block-diagonal up (trained with split_qkv, or converted
        from diffusers) gives each part its own factors; otherwise every part shares the down."""
        dim, alpha = cls.rank_of(tensors)
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        if len(sizes) == 1:
            return [({"lora_A.weight": down, "lora_B.weight": up}, alpha)]
        count = len(sizes)
        blocks = diagonal_blocks(up, sizes, dim // count) if dim % count == 0 and up.any() else None
        if blocks is not None:
            downs = down.split(dim // count, dim=0)
            return [({"lora_A.weight": d, "lora_B.weight": u}, alpha / count) for d, u in zip(downs, blocks)]
        return [({"lora_A.weight": down, "lora_B.weight": rows}, alpha) for rows in up.split(sizes, dim=0)]

    @classmethod
    def from_peft_parts(cls, parts: Parts) -> dict[str, torch.Tensor]:
        """Parts sharing one lora_A and alpha become one down; parts of equal rank and alpha become a block-diagonal
        module; others get their scales folded into their ups (alpha = rank)."""
        downs = [part["lora_A.weight"] for part, _ in parts]
        ups = [part["lora_B.weight"] for part, _ in parts]
        alphas = [alpha for _, alpha in parts]
        dtype = downs[0].dtype
        if len(parts) == 1 or (all(torch.equal(d, downs[0]) for d in downs) and len(set(alphas)) == 1):
            up = torch.cat(ups, dim=0)
            return {"lora_down.weight": downs[0], "lora_up.weight": up, "alpha": torch.tensor(alphas[0], dtype=dtype)}
        ranks = [down.shape[0] for down in downs]
        if len(set(ranks)) == 1 and len(set(alphas)) == 1:
            states = [{"lora_down.weight": d, "lora_up.weight": u, "alpha": torch.tensor(a, dtype=torch.float64)}
                      for d, u, a in zip(downs, ups, alphas)]  # fmt: skip
            fused = LoRAModule.fuse_parts(states)  # the LoRA tensors only (DoRA adds its magnitudes itself)
            return dict(fused, alpha=fused["alpha"].to(dtype))
        ups = [up * (alpha / rank) for up, alpha, rank in zip(ups, alphas, ranks)]
        return {"lora_down.weight": torch.cat(downs, dim=0), "lora_up.weight": block_diagonal(ups),
                "alpha": torch.tensor(float(sum(ranks)), dtype=dtype)}  # fmt: skip


def block_diagonal(ups: list[torch.Tensor]) -> torch.Tensor:
    """Up weights (out_i, r_i[, 1, 1]) -> (sum out_i, sum r_i[, 1, 1]) with the parts on the diagonal."""
    flat = torch.block_diag(*[up.flatten(1) for up in ups])
    return flat.reshape(*flat.shape, *ups[0].shape[2:])


def diagonal_blocks(up: torch.Tensor, sizes: list[int], dim: int) -> list[torch.Tensor] | None:
    """The diagonal blocks (size_i rows, `dim` columns each) of a block-diagonal up; None when it is not one."""
    if up.shape[1] != dim * len(sizes):
        return None
    blocks = []
    for index, rows in enumerate(up.split(sizes, dim=0)):
        outside = torch.cat([rows[:, : index * dim], rows[:, (index + 1) * dim :]], dim=1)
        if outside.any():
            return None
        blocks.append(rows[:, index * dim : (index + 1) * dim])
    return blocks


class SplitAdapter(nn.Module):
    """One adapter per part of a fused layer (`split_qkv`), written to files as the equivalent fused module."""

    def __init__(self, lora_name: str, parts: Sequence[Adapter]) -> None:
        super().__init__()
        self.lora_name = lora_name
        self.parts = nn.ModuleList(parts)
        self.lora_dim = getattr(parts[0], "lora_dim", None)

    def apply_to(self) -> None:
        for part in self.parts:
            part.apply_to()

    def file_state(self) -> dict[str, torch.Tensor]:
        return type(self.parts[0]).fuse_parts([part.state_dict() for part in self.parts])

    def load_file_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        sizes = [part.part_sizes[0] for part in self.parts]
        parts = type(self.parts[0]).split_fused(state, sizes, self.lora_dim, f"{source}: {self.lora_name}")
        for part, part_state in zip(self.parts, parts, strict=True):
            part.load_state_dict(part_state)
            part.refresh_scale()

    @torch.no_grad()
    def merge(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, device: torch.device | str) -> None:
        first = self.parts[0]
        layers = [part.org_module for part in self.parts]
        merge_module(type(first), tensors, layers, first.multiplier, dtype, device, self.lora_name)


def leaf_adapters(module: nn.Module) -> list[Adapter]:
    """The adapters of a network module: itself, or the parts of a split adapter."""
    return list(module.parts) if isinstance(module, SplitAdapter) else [module]


class WeightChangeAdapter(Adapter):
    """Types whose output change is their weight change applied as the layer's own op (LoHa, LoKr): dW is formed
    from the factors at every call, as LyCORIS does."""

    def weight_change(self) -> torch.Tensor:
        """The fused weight change (scale included) in the adapter's dtype, with gradients."""
        raise NotImplementedError

    def delta_output(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        change = self.weight_change()
        if rows is not None:
            change = change[rows]
        return apply_weight(self.org_module, x.to(change.dtype), change) * self.multiplier

    def delta_weight(self, device: torch.device | str | None = None) -> torch.Tensor:
        return self.weight_change().detach().to(device, torch.float32)

    @classmethod
    def delta_of(
        cls, tensors: dict[str, torch.Tensor], device: torch.device | str, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        return cls.compose({key: value.to(device, torch.float32) for key, value in tensors.items()})

    @classmethod
    def compose(cls, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weight change of stored tensors (scale included), in their dtype."""
        raise NotImplementedError


def apply_weight(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`layer`'s operation (linear, or its convolution settings) with another weight and no bias."""
    if isinstance(layer, nn.Conv2d):
        return nn.functional.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation)
    return nn.functional.linear(x, weight)


def adapter_type_of(suffixes: set[str], types: Sequence[type[Adapter]]) -> type[Adapter] | None:
    """The adapter type among `types` whose file tensors these are (the first that matches)."""
    for adapter_type in types:
        if adapter_type.matches(suffixes):
            return adapter_type
    return None
