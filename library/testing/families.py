"""Tiny models of every family, written in the formats users bring, with the command-line options that load them.

One builder per family (`write_tiny(out_dir) -> TinyFamily` in the family's tiny-model module), one return shape, so
tests and the demo treat every family alike. A new family adds one line to `BUILDERS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

BUILDERS: dict[str, str] = {
    "sd": "library.testing.tiny_models:write_tiny",
    "sdxl": "library.testing.tiny_sdxl:write_tiny",
    "flux": "library.testing.tiny_flux:write_tiny",
    "sd3": "library.testing.tiny_sd3:write_tiny",
    "lumina": "library.testing.tiny_lumina:write_tiny",
}


@dataclass(frozen=True)
class TinyFamily:
    """A family's tiny models on disk and how to train them."""

    family: str
    model_args: tuple[str, ...]  # options loading the original single-file layout, tokenizers included
    diffusers_args: tuple[str, ...]  # the same for the diffusers folder
    scripts: dict[str, str]  # method -> entry script ("network", "finetune")
    fast_args: tuple[str, ...] = ()  # family options that keep a tiny run fast (e.g. short T5 sequences)
    files: dict[str, str] = field(default_factory=dict)  # every file or folder written, by name


def write_tiny(family: str, out_dir: str) -> TinyFamily:
    """Write the tiny models of `family` into `out_dir`."""
    module_name, function = BUILDERS[family].split(":")
    return getattr(importlib.import_module(module_name), function)(out_dir)
