"""Stored modules to LoRA factors of another rank (resize, SVD-merge): the change's singular values from whatever the
adapter type stores, and the new module's tensors through the adapter interface."""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass

import torch

from library.errors import ConfigError
from library.lora_tools.files import StoredModule
from library.lora_tools.svd import Spectrum, factors, spectrum_of_factors, spectrum_of_matrix
from networks.adapters import Adapter, LoRAModule

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SVDOptions:
    """Where and how singular values are computed."""

    device: str
    lowrank: bool
    niter: int
    clamp_quantile: float | None

    @classmethod
    def from_args(cls, args: argparse.Namespace, clamp_default: float | None = None) -> SVDOptions:
        clamp = args.clamp_quantile if args.clamp_quantile is not None else clamp_default
        if clamp is not None and not 0 < clamp <= 1:
            raise ConfigError(f"--clamp_quantile must be in (0, 1], got {clamp}")
        return cls(args.device or "cpu", args.svd_lowrank, args.svd_lowrank_niter, clamp)


def add_svd_arguments(parser: argparse.ArgumentParser, clamp_default: float | None) -> None:
    parser.add_argument("--device", type=str, default=None, help="device to compute on, e.g. cuda (default cpu)")
    parser.add_argument(
        "--svd_lowrank",
        action="store_true",
        help="randomized low-rank SVD (torch.svd_lowrank) of changes stored in full (LoHa, LoKr, model differences): "
        "much faster on large layers, nearly as accurate. LoRA factors are always decomposed exactly and fast",
    )
    parser.add_argument("--svd_lowrank_niter", type=int, default=2, help="power iterations of --svd_lowrank")
    parser.add_argument(
        "--clamp_quantile",
        type=float,
        default=None,
        help="clamp the new factors' values to this quantile (the reference's outlier clamp); default "
        + ("off: the result is then the best approximation of its rank" if clamp_default is None
           else f"{clamp_default}"),  # fmt: skip
    )


def module_spectrum(
    module: StoredModule, options: SVDOptions, oversample: int, base: torch.Tensor | None = None
) -> tuple[Spectrum, float | None]:
    """The singular values of a stored module's change, and its LoRA scale when it stores LoRA factors (the scale is
    not part of the spectrum then; None: the spectrum is of the whole change)."""
    low_rank = module.adapter_type.low_rank_factors(module.tensors)
    if low_rank is not None:
        up, down, scale = low_rank
        return spectrum_of_factors(up.to(options.device), down.to(options.device)), scale
    change = module.adapter_type.delta_of(module.tensors, options.device, base)
    matrix = change.flatten(1)
    return spectrum_of_matrix(matrix, oversample if options.lowrank else None, options.niter), None


def module_kernel(module: StoredModule, layer_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """(kh, kw) for a convolution layer, () for a Linear: from the base model when given, else from the stored
    tensors (LoRA factors keep the kernel; LoHa and most LoKr modules store convolutions flattened)."""
    if layer_shape is not None:
        return tuple(layer_shape[2:])
    down = module.tensors.get("lora_down.weight", module.tensors.get("lokr_w2"))
    return tuple(down.shape[2:]) if down is not None else ()


def lora_tensors(
    spectrum: Spectrum, rank: int, alpha: float, kernel: tuple[int, ...], options: SVDOptions,
    carried: dict[str, torch.Tensor] | None = None,
) -> StoredModule:  # fmt: skip
    """A LoRA module of `rank` from a spectrum (DoRA when magnitudes are carried along)."""
    from networks.dora import DoRAModule

    up, down = factors(spectrum, rank, options.clamp_quantile)
    tensors = LoRAModule.file_tensors(up.cpu(), down.cpu(), alpha, kernel)
    adapter_type: type[Adapter] = DoRAModule if carried else LoRAModule
    return StoredModule(adapter_type, tensors | (carried or {}))


def is_spatial(kernel: tuple[int, ...]) -> bool:
    return bool(kernel) and math.prod(kernel) > 1


def warn_flattened(modules: dict[str, StoredModule], shapes_known: bool) -> None:
    """LoHa / LoKr store convolutions flattened: without the base model their LoRA keeps the flat (Linear) shape."""
    flat = [name for name, module in modules.items() if module.adapter_type.low_rank_factors(module.tensors) is None
            and not module.adapter_type.needs_base]  # fmt: skip
    if flat and not shapes_known:
        logger.warning(
            "%d LoHa / LoKr modules become LoRA factors shaped for Linear layers (%s ...): their files do not say "
            "which layers are convolutions. ComfyUI reads them either way; give the base model (--family and its "
            "options) to get convolution-shaped factors",
            len(flat), flat[0],
        )  # fmt: skip


def layer_shapes(tool) -> dict[str, tuple[int, ...]] | None:
    """Kohya name -> the layer's weight shape, from the base model when the tool was given one (else None)."""
    from library.lora_tools.models import layer_shape, load_family, model_targets

    if tool.family is None or getattr(tool.args, "pretrained_model_name_or_path", None) is None:
        return None
    family, models = load_family(tool.family, tool.args, torch.float32)
    return {name: layer_shape(target) for name, target in model_targets(family, models).by_name.items()}
