"""The models of one family as the trainer holds them (shared by families, methods and checkpoint writers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LoadedModels:
    """The models of one family, ready for training."""

    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    extras: dict[str, Any] = field(default_factory=dict)
