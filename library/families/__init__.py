"""Model families. The registry maps a family id to its class; a family is imported only when chosen."""

from __future__ import annotations

import importlib

FAMILIES: dict[str, str] = {
    "sd": "library.families.sd:SDFamily",
    "sdxl": "library.families.sdxl:SDXLFamily",
    "flux": "library.families.flux:FluxFamily",
}


def get_family_class(family_id: str):
    """Import and return the family class registered under `family_id`."""
    module_name, class_name = FAMILIES[family_id].split(":")
    return getattr(importlib.import_module(module_name), class_name)
