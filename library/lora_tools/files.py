"""LoRA files as the tools see them: tensors grouped into modules of a known adapter type, plus the file's metadata;
read from .safetensors or pickled files, written atomically."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from library.atomic import atomic_path
from library.checkpoints.files import load_state_dict, read_safetensors_metadata
from library.errors import CheckpointError, ConfigError
from networks.adapter_types import stored_type
from networks.adapters import Adapter
from networks.lora import group_modules

logger = logging.getLogger(__name__)

PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth")


@dataclass
class StoredModule:
    """One module of a kohya-format file: its adapter type and tensors keyed by suffix (`lora_down.weight` ...)."""

    adapter_type: type[Adapter]
    tensors: dict[str, torch.Tensor]


@dataclass
class LoRAFile:
    """A LoRA file's tensors and string metadata (`ss_*`, `modelspec.*` ...)."""

    path: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def modules(self) -> dict[str, StoredModule]:
        """Modules by kohya name; an unknown or incomplete tensor set raises CheckpointError naming the file."""
        return {name: StoredModule(stored_type(name, tensors, self.path), tensors)
                for name, tensors in group_modules(self.tensors).items()}  # fmt: skip


def read_lora(path: str) -> LoRAFile:
    """A LoRA file from disk (pickled files through torch's safe loader)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"LoRA file not found: {path}")
    tensors = load_state_dict(path)
    metadata = read_safetensors_metadata(path) if path.lower().endswith(".safetensors") else {}
    return LoRAFile(path, tensors, metadata)


def module_tensors(modules: dict[str, StoredModule]) -> dict[str, torch.Tensor]:
    """Modules back to a flat state dict (`<name>.<suffix>` keys)."""
    return {f"{name}.{suffix}": value for name, module in modules.items() for suffix, value in module.tensors.items()}


def write_lora(
    path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], dtype: torch.dtype | None
) -> None:
    """Write a LoRA file atomically: .safetensors with metadata, other extensions as a torch state dict (no metadata,
    as the trainer writes them). Floating-point tensors are cast to `dtype` when given."""
    check_output_path(path)
    state = {
        key: (value.to(dtype) if dtype is not None and value.is_floating_point() else value).detach().cpu().contiguous()
        for key, value in tensors.items()
    }
    with atomic_path(path) as temp:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(state, temp, metadata=metadata or None)
        else:
            torch.save(state, temp)
    logger.info("wrote %s (%d tensors)", path, len(state))


def check_output_path(path: str | None, option: str = "--save_to") -> str:
    """A LoRA output file name must be given and end in a known extension (checked before any work)."""
    if not path:
        raise ConfigError(f"{option} is required: the file to write (.safetensors, .ckpt, .pt or .pth)")
    if not path.lower().endswith(LORA_EXTENSIONS):
        raise ConfigError(f"{option} {path}: the file name must end in {', '.join(LORA_EXTENSIONS)}")
    return path


def precision(name: str | None, option: str) -> torch.dtype | None:
    """`float` / `fp16` / `bf16` -> dtype (None stays None)."""
    if name is None:
        return None
    if name not in PRECISIONS:
        raise ConfigError(f"{option} must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]
