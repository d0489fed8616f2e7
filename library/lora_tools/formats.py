"""LoRA key formats and the conversions between them, for every family through its adapter-target table.

- kohya: `lora_unet_<path>` / `lora_te<N>_<path>` modules with `.lora_down.weight` / `.lora_up.weight` / `.alpha`
  (and the LyCORIS tensors of DoRA, LoHa, LoKr): what the trainer writes and ComfyUI, A1111/Forge and diffusers read.
- diffusers: PEFT names per diffusers layer (`unet.` / `transformer.` / `text_encoder.` + the layer's path) with
  `.lora_A.weight` / `.lora_B.weight` (DoRA: `.lora_magnitude_vector`); what diffusers and ai-toolkit write. A fused
  original layer is one module per diffusers part. Alphas travel unscaled in diffusers' `lora_adapter_metadata` (the
  LoraConfig it writes and reads), or as `.alpha` keys; without either a module's scale is 1.
- comfy: `diffusion_model.<original path>` with kohya suffixes for the denoiser (ComfyUI's own saved LoRAs); text
  encoder modules keep their kohya names, which ComfyUI reads.
"""

from __future__ import annotations

import json
from collections import Counter

import torch

from library.errors import CheckpointError, ConfigError
from library.lora_tools.files import StoredModule
from library.lora_tools.models import ModelTargets
from networks.adapter_types import stored_type
from networks.adapters import Adapter, LoRAModule
from networks.dora import PEFT_MAGNITUDE, DoRAModule
from networks.lora import group_modules

FORMATS = {"kohya": "kohya", "sd-scripts": "kohya", "diffusers": "diffusers", "peft": "diffusers",
           "ai-toolkit": "diffusers", "comfy": "comfy", "comfyui": "comfy"}  # fmt: skip
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata key for its LoraConfig
COMFY_PREFIX = "diffusion_model."
PEFT_SUFFIXES = ("lora_A.weight", "lora_B.weight", PEFT_MAGNITUDE, "alpha")
COMFY_RENAMES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def detect_format(tensors: dict[str, torch.Tensor]) -> str:
    """kohya, diffusers or comfy, from the key names."""
    keys = list(tensors)
    if any(".lora_A." in key or key.endswith(PEFT_MAGNITUDE) for key in keys) and not any(
        key.startswith(COMFY_PREFIX) for key in keys
    ):
        return "diffusers"
    if any(key.startswith(COMFY_PREFIX) for key in keys):
        return "comfy"
    if all(key.startswith("lora_") for key in keys):
        return "kohya"
    raise CheckpointError(f"unknown LoRA key format (e.g. {keys[0]}); name it with --src kohya, diffusers or comfy")


# ---- diffusers / PEFT -------------------------------------------------------------------------------------------


def peft_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT tensors grouped by module (`unet.down_blocks...to_q`), keyed by suffix (`lora_A.weight` ...)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        suffix = next((suffix for suffix in PEFT_SUFFIXES if key.endswith("." + suffix)), None)
        if suffix is None:
            raise CheckpointError(f"{key} is no diffusers / PEFT LoRA tensor (lora_A, lora_B, magnitude, alpha)")
        modules.setdefault(key[: -len(suffix) - 1], {})[suffix] = value
    return modules


def diffusers_alphas(metadata: dict[str, str], modules: dict[str, dict]) -> dict[str, float]:
    """Each module's alpha: an `.alpha` key, else diffusers' LoraConfig (lora_alpha, alpha_pattern) of its component,
    else its rank (scale 1, PEFT's convention for files without alphas)."""
    config = json.loads(metadata.get(ADAPTER_METADATA_KEY) or "{}")
    alphas = {}
    for name, tensors in modules.items():
        rank = tensors["lora_A.weight"].shape[0]
        if "alpha" in tensors:
            alphas[name] = float(tensors["alpha"])
            continue
        component, _, rest = name.partition(".")
        pattern = config.get(f"{component}.alpha_pattern") or {}
        alpha = next((value for key, value in pattern.items() if key.lstrip("^") == rest), None)
        alphas[name] = float(alpha if alpha is not None else config.get(f"{component}.lora_alpha", rank))
    return alphas


def from_diffusers(tensors: dict, metadata: dict[str, str], targets: ModelTargets) -> dict[str, StoredModule]:
    """Kohya modules from a diffusers / PEFT state dict: the parts of a fused layer become one module (missing parts
    are zero), rows put in the original layout's order."""
    modules = peft_modules(tensors)
    alphas = diffusers_alphas(metadata, modules)
    index = _diffusers_index(targets)
    found: dict[str, list] = {}
    unknown = []
    for name, module in modules.items():
        where = _lookup(index, name)
        if where is None:
            unknown.append(name)
            continue
        target_name, part = where
        parts = found.setdefault(target_name, [None] * len(targets.diffusers_names[target_name]))
        parts[part] = ({key: value for key, value in module.items() if key != "alpha"}, alphas[name])
    if unknown:
        raise CheckpointError(f"{len(unknown)} diffusers modules match no layer of the model: {', '.join(unknown[:5])}")
    return {name: _fused_module(parts, targets, name) for name, parts in found.items()}


def _diffusers_index(targets: ModelTargets) -> dict[str, tuple[str, int]]:
    index = {}
    for name, diffusers_names in targets.diffusers_names.items():
        for part, diffusers_name in enumerate(diffusers_names):
            if diffusers_name:
                index[diffusers_name] = (name, part)
    return index


def _lookup(index: dict[str, tuple[str, int]], name: str) -> tuple[str, int] | None:
    """A PEFT module name in the index, allowing PEFT's `base_model.model.` level and CLIP's `text_model.` level
    (written by transformers < 5.6, absent after)."""
    name = name.replace("base_model.model.", "")
    component, _, rest = name.partition(".")
    candidates = [name, f"{component}.{rest.removeprefix('text_model.')}", f"{component}.text_model.{rest}"]
    return next((index[candidate] for candidate in candidates if candidate in index), None)


def _fused_module(parts: list, targets: ModelTargets, name: str) -> StoredModule:
    present = [part for part in parts if part is not None]
    adapter_type: type[Adapter] = DoRAModule if PEFT_MAGNITUDE in present[0][0] else LoRAModule
    sizes = [layer.weight.shape[0] for layer in targets.by_name[name].layers]
    filled = [part if part is not None else _zero_part(present[0], size) for part, size in zip(parts, sizes)]
    tensors = adapter_type.from_peft_parts(filled)
    if targets.by_name[name].swapped_halves:
        tensors = adapter_type.swap_output_halves(tensors)
    return StoredModule(adapter_type, tensors)


def _zero_part(like: tuple[dict, float], rows: int) -> tuple[dict, float]:
    """A part a diffusers file leaves out: no change (zero lora_B), magnitudes of ones would be wrong, so refused."""
    tensors, alpha = like
    if PEFT_MAGNITUDE in tensors:
        raise CheckpointError("a DoRA module of a fused layer lacks some of its parts; its magnitudes are unknown")
    down = torch.zeros_like(tensors["lora_A.weight"])
    up = torch.zeros(rows, *tensors["lora_B.weight"].shape[1:], dtype=down.dtype)
    return {"lora_A.weight": down, "lora_B.weight": up}, alpha


def to_diffusers(modules: dict[str, StoredModule], targets: ModelTargets) -> tuple[dict, dict[str, str]]:
    """PEFT tensors of every module and diffusers' `lora_adapter_metadata` holding the alphas (lora_B unscaled)."""
    tensors, ranks, alphas, dora = {}, {}, {}, set()
    for name, module in modules.items():
        target = _target(targets, name)
        if not module.adapter_type.has_peft_form:
            raise ConfigError(f"{name} is a {module.adapter_type.label} module, which diffusers cannot load; keep the "
                              "kohya format (ComfyUI and A1111 / Forge read it)")  # fmt: skip
        names = targets.diffusers_names[name]
        if not all(names):
            raise ConfigError(f"no diffusers name is known for {name}; keep the kohya format")
        stored = module.tensors
        if target.swapped_halves:
            stored = module.adapter_type.swap_output_halves(stored)
        parts = module.adapter_type.peft_parts(stored, [layer.weight.shape[0] for layer in target.layers])
        for diffusers_name, (part, alpha) in zip(names, parts, strict=True):
            # parts of a fused layer may share their lora_A: each name gets its own copy
            tensors.update({f"{diffusers_name}.{suffix}": value.clone() for suffix, value in part.items()})
            ranks[diffusers_name], alphas[diffusers_name] = part["lora_A.weight"].shape[0], alpha
            if module.adapter_type is DoRAModule:
                dora.add(diffusers_name.partition(".")[0])
    return tensors, {ADAPTER_METADATA_KEY: json.dumps(_lora_configs(ranks, alphas, dora), sort_keys=True)}


def _lora_configs(ranks: dict[str, int], alphas: dict[str, float], dora: set[str]) -> dict[str, object]:
    """diffusers' packed LoraConfig per component (`unet.r`, `unet.lora_alpha`, `unet.alpha_pattern` ...)."""
    config: dict[str, object] = {}
    for component in sorted({name.partition(".")[0] for name in ranks}):
        names = [name for name in ranks if name.partition(".")[0] == component]
        rank = Counter(ranks[name] for name in names).most_common(1)[0][0]
        alpha = Counter(alphas[name] for name in names).most_common(1)[0][0]
        rest = {name: name.partition(".")[2] for name in names}
        config.update({
            f"{component}.r": rank,
            f"{component}.lora_alpha": alpha,
            f"{component}.rank_pattern": {f"^{rest[name]}": ranks[name] for name in names if ranks[name] != rank},
            f"{component}.alpha_pattern": {f"^{rest[name]}": alphas[name] for name in names if alphas[name] != alpha},
            f"{component}.target_modules": sorted(rest.values()),
            f"{component}.use_dora": component in dora,
        })  # fmt: skip
    return config


# ---- comfy --------------------------------------------------------------------------------------------------------


def from_comfy(tensors: dict[str, torch.Tensor], targets: ModelTargets) -> dict[str, StoredModule]:
    """Kohya modules from `diffusion_model.<original path>` names (text-encoder modules already have kohya names)."""
    _require_original_paths(targets)
    by_path = {target.path: target.name for target in targets.table.targets if target.encoder is None}
    renamed, unknown = {}, []
    for key, value in tensors.items():
        if not key.startswith(COMFY_PREFIX):
            renamed[key] = value
            continue
        path, suffix = _split_suffix(key[len(COMFY_PREFIX) :])
        if path not in by_path:
            unknown.append(path)
            continue
        renamed[f"{by_path[path]}.{COMFY_RENAMES.get(suffix, suffix)}"] = value
    if unknown:
        raise CheckpointError(f"{len(unknown)} ComfyUI modules match no layer of the model: {', '.join(unknown[:5])}")
    return kohya_modules(renamed)


def _split_suffix(key: str) -> tuple[str, str]:
    from networks.adapter_types import all_adapter_types

    suffixes = {suffix for adapter_type in all_adapter_types() for suffix in adapter_type.key_suffixes}
    for suffix in sorted(suffixes | set(COMFY_RENAMES), key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise CheckpointError(f"diffusion_model.{key} is no LoRA tensor these tools read")


def to_comfy(modules: dict[str, StoredModule], targets: ModelTargets) -> dict[str, torch.Tensor]:
    _require_original_paths(targets)
    tensors = {}
    for name, module in modules.items():
        target = _target(targets, name)
        prefix = name if target.encoder is not None else COMFY_PREFIX + target.path
        tensors.update({f"{prefix}.{suffix}": value for suffix, value in module.tensors.items()})
    return tensors


def _require_original_paths(targets: ModelTargets) -> None:
    if not targets.original_known:
        raise ConfigError("this family's adapter table names layers by their diffusers paths, so their original "
                          "checkpoint paths (ComfyUI's diffusion_model. names) are unknown; keep the kohya format, "
                          "which ComfyUI reads")  # fmt: skip


# ---- kohya --------------------------------------------------------------------------------------------------------


def kohya_modules(tensors: dict[str, torch.Tensor]) -> dict[str, StoredModule]:
    return {name: StoredModule(stored_type(name, module), module) for name, module in group_modules(tensors).items()}


def check_kohya(modules: dict[str, StoredModule], targets: ModelTargets) -> None:
    for name in modules:
        _target(targets, name)


def _target(targets: ModelTargets, name: str):
    if name not in targets.by_name:
        raise CheckpointError(f"{name} matches no layer of the model; was the LoRA trained for another model?")
    return targets.by_name[name]
