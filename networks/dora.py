"""DoRA (weight-decomposed LoRA, arXiv:2402.09353): `--network_module networks.lora --network_args use_dora=True`.

W' = m * (W + dW) / ||W + dW||, the norm taken per output row, dW a LoRA. Files hold the LoRA tensors and `dora_scale`
= m, shaped (out, 1) for Linears and (out, 1, 1, 1) for convolutions, as LyCORIS writes it (`wd_on_out`) and ComfyUI
reads it. At strength s the layer's weight is W + s * (W' - W), the strength ComfyUI applies.
"""

from __future__ import annotations

import torch
from torch import nn

from library.errors import CheckpointError
from networks.adapters import (
    DEFAULT_ALPHA,
    DEFAULT_DIM,
    LoRAModule,
    Parts,
    apply_weight,
    check_shape,
    delta_weight,
    fused_weight,
    warn_unsupported,
)

MAGNITUDE = "dora_scale"
PEFT_MAGNITUDE = "lora_magnitude_vector"  # diffusers / PEFT name: (out,) for Linears, (1, out, 1, 1) for convs


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each output row of a weight, shaped (out, 1[, 1, 1]) like `dora_scale`."""
    return weight.flatten(1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1))


def decomposed_change(base: torch.Tensor, change: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W' - W for W' = m * (W + dW) / ||W + dW|| (LyCORIS adds the dtype's eps to the norm; so do we)."""
    merged = base + change
    norm = row_norms(merged) + torch.finfo(merged.dtype).eps
    return merged * (magnitude.to(merged.dtype) / norm) - base


class DoRAModule(LoRAModule):
    """LoRA with a trainable magnitude per output row; dropouts on the rank activations do not apply (the change is
    formed as a weight, as LyCORIS does)."""

    key_suffixes = (*LoRAModule.key_suffixes, MAGNITUDE)
    label = "DoRA"
    needs_base = True

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module | list[nn.Module],
        multiplier: float = 1.0,
        lora_dim: int = DEFAULT_DIM,
        alpha: float | None = DEFAULT_ALPHA,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__(lora_name, org_module, multiplier, lora_dim, alpha, None, None, module_dropout)
        for option, value in (("network_dropout", dropout), ("rank_dropout", rank_dropout)):
            if value:
                warn_unsupported("DoRA", option)
        self.dora_scale = nn.Parameter(row_norms(fused_weight(self._layers)))

    def _change(self, rows: slice | None) -> torch.Tensor:
        """W' - W of one part (`rows`) or of the whole layer, in float32 with gradients."""
        layers = self._layers if rows is None else [self._layers[self.part_index(rows)]]
        base = fused_weight(layers, self.dora_scale.device)
        up = self.lora_up.weight if rows is None else self.lora_up.weight[rows]
        change = delta_weight(up.float(), self.lora_down.weight.float()) * self.scale
        magnitude = self.dora_scale if rows is None else self.dora_scale[rows]
        return decomposed_change(base, change, magnitude.float())

    def delta_output(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        dtype = self.lora_down.weight.dtype
        change = self._change(rows).to(dtype)
        return apply_weight(self._layers[self.part_index(rows)], x.to(dtype), change) * self.multiplier

    def delta_weight(self, device: torch.device | str | None = None) -> torch.Tensor:
        return self._change(None).detach().to(device)

    def peft_tensors(self, rows: slice | None = None) -> dict[str, torch.Tensor]:
        tensors = super().peft_tensors(rows)
        magnitude = self.dora_scale if rows is None else self.dora_scale[rows]
        return dict(tensors, **{PEFT_MAGNITUDE: peft_magnitude(magnitude.detach())})

    @classmethod
    def missing_suffixes(cls, suffixes: set[str]) -> list[str]:
        return [suffix for suffix in cls.key_suffixes if suffix not in suffixes and suffix != "alpha"]

    @classmethod
    def delta_of(
        cls, tensors: dict[str, torch.Tensor], device: torch.device | str, base: torch.Tensor | None = None
    ) -> torch.Tensor:
        if base is None:
            raise CheckpointError("a DoRA module's weight change depends on the base weight; none was given")
        change = super().delta_of(tensors, device)
        check_shape("DoRA module", change.shape, base.shape)
        return decomposed_change(base.to(device, torch.float32), change, tensors[MAGNITUDE].to(device).float())

    @classmethod
    def carried_tensors(cls, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {MAGNITUDE: tensors[MAGNITUDE]}

    @classmethod
    def swap_output_halves(cls, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        swapped = super().swap_output_halves(tensors)
        first, second = tensors[MAGNITUDE].chunk(2, dim=0)
        return dict(swapped, **{MAGNITUDE: torch.cat([second, first], dim=0)})

    @classmethod
    def fuse_parts(cls, states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        fused = super().fuse_parts(states)
        return dict(fused, **{MAGNITUDE: torch.cat([state[MAGNITUDE] for state in states], dim=0)})

    @classmethod
    def split_fused(cls, state: dict[str, torch.Tensor], sizes: list[int], dim: int, source: str) -> list[dict]:
        parts = super().split_fused(state, sizes, dim, source)
        magnitudes = state[MAGNITUDE].split(sizes, dim=0)
        return [dict(part, **{MAGNITUDE: magnitude}) for part, magnitude in zip(parts, magnitudes, strict=True)]

    @classmethod
    def peft_parts(cls, tensors: dict[str, torch.Tensor], sizes: list[int]) -> Parts:
        parts = super().peft_parts(tensors, sizes)
        magnitudes = tensors[MAGNITUDE].split(sizes, dim=0)
        return [(dict(part, **{PEFT_MAGNITUDE: peft_magnitude(magnitude)}), alpha)
                for (part, alpha), magnitude in zip(parts, magnitudes, strict=True)]  # fmt: skip

    @classmethod
    def from_peft_parts(cls, parts: Parts) -> dict[str, torch.Tensor]:
        lora_parts = [({key: value for key, value in part.items() if key != PEFT_MAGNITUDE}, alpha)
                      for part, alpha in parts]  # fmt: skip
        tensors = super().from_peft_parts(lora_parts)
        kernel_dims = tensors["lora_down.weight"].dim() - 1
        magnitude = torch.cat([part[PEFT_MAGNITUDE].flatten() for part, _ in parts])
        return dict(tensors, **{MAGNITUDE: magnitude.reshape(-1, *[1] * kernel_dims)})


def peft_magnitude(magnitude: torch.Tensor) -> torch.Tensor:
    """`dora_scale` (out, 1[, 1, 1]) -> PEFT's magnitude vector: (out,) for Linears, (1, out, 1, 1) for convs."""
    if magnitude.dim() == 2:
        return magnitude.flatten().contiguous()
    return magnitude.reshape(1, -1, 1, 1).contiguous()
