"""Table-driven state-dict key maps, read in both directions, with a strict every-key-consumed check.

A `KeyMap` is one table of `Entry` rows, each naming a tensor in the original single-file layout and the
model tensor(s) it becomes. The same rows convert original -> model and model -> original.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from library.errors import CheckpointError

# "same": the tensor is passed through unchanged.
# "conv1x1": original is a 1x1 convolution (C_out, C_in, 1, 1), the model holds a Linear (C_out, C_in).
# "fused": original is the concatenation along dim 0 of the model tensors, in table order (e.g. q|k|v); equal
#   parts unless the entry gives `sizes` (FLUX single blocks: q|k|v|mlp).
# "transposed": original is the model matrix transposed (OpenCLIP's text_projection is used as x @ P, while a
#   Linear layer computes x @ W.T).
# "swap_halves": original and model tensor hold the same two halves along dim 0 in the other order (BFL's final
#   adaLN modulation is shift|scale, diffusers' norm_out is scale|shift); the swap is its own inverse.
Layout = Literal["same", "conv1x1", "fused", "transposed", "swap_halves"]

_LISTED_KEYS = 10


@dataclass(frozen=True)
class Entry:
    """One original tensor and the model tensor(s) it maps to."""

    original: str
    model: tuple[str, ...]
    layout: Layout = "same"
    sizes: tuple[int, ...] | None = None  # "fused" with unequal parts: the dim-0 size of each model tensor

    def __post_init__(self) -> None:
        assert (len(self.model) > 1) == (self.layout == "fused"), self
        assert self.sizes is None or len(self.sizes) == len(self.model), self


class KeyMap:
    """A bidirectional original <-> model name table."""

    def __init__(self, entries: Iterable[Entry]) -> None:
        self.entries: tuple[Entry, ...] = tuple(entries)
        self.original_names: frozenset[str] = frozenset(e.original for e in self.entries)
        self.model_names: frozenset[str] = frozenset(name for e in self.entries for name in e.model)
        assert len(self.original_names) == len(self.entries), "duplicate original name in key table"
        assert len(self.model_names) == sum(len(e.model) for e in self.entries), "duplicate model name in key table"

    def to_model(self, source: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Original names -> model names. Every original name of the table must be in `source`."""
        converted: dict[str, Tensor] = {}
        for entry in self.entries:
            converted.update(zip(entry.model, _to_model_tensors(entry, source[entry.original])))
        return converted

    def to_original(self, source: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Model names -> original names. Every model name of the table must be in `source`."""
        return {e.original: _to_original_tensor(e, [source[name] for name in e.model]) for e in self.entries}


def _to_model_tensors(entry: Entry, tensor: Tensor) -> tuple[Tensor, ...]:
    if entry.layout == "conv1x1":
        # flatten(1) also accepts files that already store the Linear shape; join writes the 1x1 conv shape.
        return (tensor.flatten(1),)  # (C_out, C_in, 1, 1) -> (C_out, C_in)
    if entry.layout == "fused" and entry.sizes is not None:
        if tensor.shape[0] != sum(entry.sizes):
            raise CheckpointError(
                f"Checkpoint tensor {entry.original!r} has shape {tuple(tensor.shape)}; expected its first "
                f"dimension to be {sum(entry.sizes)} ({' + '.join(map(str, entry.sizes))} for "
                f"{', '.join(entry.model)})."
            )
        return tuple(part.clone() for part in tensor.split(entry.sizes, dim=0))
    if entry.layout == "fused":
        parts = len(entry.model)
        if tensor.shape[0] % parts:
            raise CheckpointError(
                f"Checkpoint tensor {entry.original!r} has shape {tuple(tensor.shape)}; expected its first "
                f"dimension to hold {parts} equal parts ({', '.join(entry.model)})."
            )
        # Clones, so the parts don't share storage (safetensors refuses to save shared tensors).
        return tuple(part.clone() for part in tensor.chunk(parts, dim=0))
    if entry.layout == "transposed":
        return (tensor.T.contiguous(),)
    if entry.layout == "swap_halves":
        return (_swap_halves(tensor),)
    return (tensor,)


def _to_original_tensor(entry: Entry, tensors: list[Tensor]) -> Tensor:
    if entry.layout == "conv1x1":
        return tensors[0].reshape(*tensors[0].shape, 1, 1)  # (C_out, C_in) -> (C_out, C_in, 1, 1)
    if entry.layout == "fused":
        return torch.cat(tensors, dim=0)
    if entry.layout == "transposed":
        return tensors[0].T.contiguous()
    if entry.layout == "swap_halves":
        return _swap_halves(tensors[0])
    return tensors[0]


def _swap_halves(tensor: Tensor) -> Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def check_keys(found: Iterable[str], expected: AbstractSet[str], context: str, hint: str) -> None:
    """Raise CheckpointError naming missing and unexpected keys unless `found` equals `expected`."""
    found = set(found)
    missing = expected - found
    unexpected = found - expected
    if not missing and not unexpected:
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {format_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {format_keys(unexpected)}")
    raise CheckpointError(f"{context}: {'; '.join(problems)}. {hint}")


def format_keys(keys: Iterable[str]) -> str:
    """The first few keys in sorted order, and how many more there are."""
    ordered = sorted(keys)
    listed = ", ".join(ordered[:_LISTED_KEYS])
    if len(ordered) > _LISTED_KEYS:
        listed += f" ... and {len(ordered) - _LISTED_KEYS} more"
    return listed
