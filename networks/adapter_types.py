"""Every adapter type the LoRA tools read and write, and how a stored module's type is found from its tensor names."""

from __future__ import annotations

import torch

from library.errors import CheckpointError
from networks.adapters import Adapter, LoRAModule, adapter_type_of
from networks.dora import DoRAModule


def all_adapter_types() -> tuple[type[Adapter], ...]:
    """LoRA, DoRA, LoHa and LoKr (the last two live in their plugin modules)."""
    from networks.loha import LoHaModule
    from networks.lokr import LoKrModule

    return (LoRAModule, DoRAModule, LoHaModule, LoKrModule)


def stored_type(name: str, tensors: dict[str, torch.Tensor], source: str = "") -> type[Adapter]:
    """The adapter type of one stored module; unknown or incomplete tensor sets raise CheckpointError."""
    adapter_type = adapter_type_of(set(tensors), all_adapter_types())
    where = f"{source}: " if source else ""
    if adapter_type is None:
        known = ", ".join(adapter_type.label for adapter_type in all_adapter_types())
        raise CheckpointError(f"{where}module {name} has tensors {', '.join(sorted(tensors))}, which are none of "
                              f"the adapter types these tools read ({known}; not LyCORIS Tucker or other types)")
    missing = adapter_type.missing_suffixes(set(tensors))
    if missing:
        raise CheckpointError(f"{where}{adapter_type.label} module {name} lacks {', '.join(missing)}; the file is "
                              "incomplete")  # fmt: skip
    return adapter_type
