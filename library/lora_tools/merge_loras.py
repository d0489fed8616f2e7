"""Several LoRAs into one: the reference's plain merge (factors added, ranks kept), an exact concatenation (ranks
added) and an SVD merge (the weighted sum of the changes, re-factorised to a new rank: its best approximation of that
rank)."""

from __future__ import annotations

import logging
import math

import torch

from library.errors import ConfigError
from library.lora_tools.files import LoRAFile, StoredModule
from library.lora_tools.refactor import SVDOptions, lora_tensors, module_kernel
from library.lora_tools.svd import RankRule, Spectrum, choose_rank, spectrum_of_factors, spectrum_of_matrix
from networks.adapters import LoRAModule

logger = logging.getLogger(__name__)

OVERSAMPLE = 8  # extra vectors of a randomized SVD beyond the rank asked for


def contributions(files: list[LoRAFile], ratios: list[float]) -> dict[str, list[tuple[StoredModule, float]]]:
    """Each module name with its stored modules and ratios, in file order; warns when the files were trained for
    different base models."""
    versions = {file.metadata.get("ss_base_model_version") for file in files} - {None}
    if len(versions) > 1:
        logger.warning("the LoRAs were trained for different base models (%s)", ", ".join(sorted(versions)))
    merged: dict[str, list[tuple[StoredModule, float]]] = {}
    for file, ratio in zip(files, ratios, strict=True):
        for name, module in file.modules().items():
            merged.setdefault(name, []).append((module, ratio))
    return merged


def _lora_only(name: str, parts: list[tuple[StoredModule, float]], how: str) -> None:
    for module, _ in parts:
        if module.adapter_type is not LoRAModule:
            raise ConfigError(f"{how} adds LoRA factors, but {name} is a {module.adapter_type.label} module; merge "
                              "it into the base model with merge_lora.py --sd_model / --pretrained_model_name_or_path, "
                              "or use svd_merge_lora.py (LoHa / LoKr)")  # fmt: skip


def plain_merge(files: list[LoRAFile], ratios: list[float]) -> dict[str, StoredModule]:
    """The reference's merge: each LoRA's down scaled by sign(ratio) * c and up by c, c = sqrt(|ratio| * alpha /
    first alpha), then added; alpha and rank are the first file's. A single file comes out as ratio times its change;
    for several the product of the sums keeps cross terms (up_i @ down_j), so it is not the sum of the changes."""
    merged = {}
    for name, parts in contributions(files, ratios).items():
        _lora_only(name, parts, "the plain merge")
        first_dim, first_alpha = LoRAModule.rank_of(parts[0][0].tensors)
        up = down = None
        for module, ratio in parts:
            dim, alpha = LoRAModule.rank_of(module.tensors)
            if dim != first_dim:
                raise ConfigError(f"{name}: the plain merge needs equal ranks ({first_dim} and {dim}); use --concat "
                                  "(exact, ranks add up) or svd_merge_lora.py (a new rank)")  # fmt: skip
            factor = math.sqrt(abs(ratio) * alpha / first_alpha)
            scaled_up = module.tensors["lora_up.weight"].float() * factor
            scaled_down = module.tensors["lora_down.weight"].float() * factor * math.copysign(1.0, ratio)
            up = scaled_up if up is None else up + scaled_up
            down = scaled_down if down is None else down + scaled_down
        tensors = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(first_alpha)}
        merged[name] = StoredModule(LoRAModule, tensors)
    return merged


def concat_merge(files: list[LoRAFile], ratios: list[float]) -> dict[str, StoredModule]:
    """The exact sum of the changes: downs stacked, ups side by side with ratio * alpha / rank folded in, alpha =
    the summed rank (scale 1)."""
    merged = {}
    for name, parts in contributions(files, ratios).items():
        _lora_only(name, parts, "--concat")
        ups, downs = [], []
        for module, ratio in parts:
            dim, alpha = LoRAModule.rank_of(module.tensors)
            ups.append(module.tensors["lora_up.weight"].float() * (ratio * alpha / dim))
            downs.append(module.tensors["lora_down.weight"].float())
        try:
            tensors = {"lora_down.weight": torch.cat(downs, dim=0), "lora_up.weight": torch.cat(ups, dim=1),
                       "alpha": torch.tensor(float(sum(down.shape[0] for down in downs)))}  # fmt: skip
        except RuntimeError as err:
            raise ConfigError(f"{name}: the LoRAs have different layer shapes ({err}); were they trained for "
                              "different base models?") from err  # fmt: skip
        merged[name] = StoredModule(LoRAModule, tensors)
    return merged


def svd_merge(
    files: list[LoRAFile], ratios: list[float], rules: tuple[RankRule, RankRule], options: SVDOptions,
    shapes: dict[str, tuple[int, ...]] | None,
) -> dict[str, StoredModule]:  # fmt: skip
    """Per module: the weighted sum of the changes at the rank of `rules` (linear and 1x1, spatial convolutions),
    alpha = rank (scale 1)."""
    merged = {}
    for name, parts in contributions(files, ratios).items():
        shape = None if shapes is None else shapes.get(name)
        kernel = next((module_kernel(module, shape) for module, _ in parts if module_kernel(module, shape)), ())
        rule = rules[1] if math.prod(kernel or (1,)) > 1 else rules[0]
        spectrum = summed_spectrum(name, parts, options, rule.max_rank + OVERSAMPLE)
        rank = choose_rank(spectrum, rule)
        merged[name] = lora_tensors(spectrum, rank, float(rank), kernel, options)
    return merged


def summed_spectrum(name: str, parts: list[tuple[StoredModule, float]], options: SVDOptions, lowrank: int) -> Spectrum:
    """Singular values of sum(ratio * change): exactly through the stacked factors when every part is a LoRA, else of
    the summed full matrices."""
    for module, _ in parts:
        if module.adapter_type.needs_base:
            raise ConfigError(f"{name} is a {module.adapter_type.label} module: its change depends on the base "
                              "weight, so it cannot be added to others without the model; merge it into the model")
    factored = [module.adapter_type.low_rank_factors(module.tensors) for module, _ in parts]
    if all(item is not None for item in factored):
        ups = [up * (ratio * scale) for (up, _, scale), (_, ratio) in zip(factored, parts, strict=True)]
        downs = [down for _, down, _ in factored]
        return spectrum_of_factors(torch.cat(ups, dim=1).to(options.device), torch.cat(downs).to(options.device))
    total = None
    for module, ratio in parts:
        change = module.adapter_type.delta_of(module.tensors, options.device).flatten(1) * ratio
        total = change if total is None else total + change
    return spectrum_of_matrix(total, lowrank if options.lowrank else None, options.niter)
