"""Model families. The registry maps a family id to its class; a family is imported only when chosen."""

from __future__ import annotations

import importlib

FAMILIES: dict[str, str] = {
    "sd": "library.families.sd:SDFamily",
    "sdxl": "library.families.sdxl:SDXLFamily",
    "flux": "library.families.flux:FluxFamily",
    "sd3": "library.families.sd3:SD3Family",
    "lumina": "library.families.lumina:LuminaFamily",
}


def get_family_class(family_id: str):
    """Import and return the family class registered under `family_id`."""
    module_name, class_name = FAMILIES[family_id].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def adapter_targets_for_models(text_encoders, denoiser):
    """The adapter-target table of whichever family recognises these models (for network plugins called without
    one, e.g. by scripts that load models themselves). Raises ConfigError when no family does."""
    from library.errors import ConfigError

    for family_id in FAMILIES:
        table = get_family_class(family_id).adapter_targets_for(text_encoders, denoiser)
        if table is not None:
            return table
    kinds = ", ".join(type(model).__name__ for model in [*text_encoders, denoiser] if model is not None)
    raise ConfigError(f"no model family knows the layers of these models ({kinds}); adapter networks cannot attach")
