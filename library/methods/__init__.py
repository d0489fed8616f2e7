"""Training methods: what is trained and how it is saved. The registry imports a method only when chosen."""

from __future__ import annotations

import importlib

METHODS: dict[str, str] = {
    "network": "library.methods.network:NetworkMethod",
    "dreambooth": "library.methods.finetune:DreamBoothMethod",
    "finetune": "library.methods.finetune:FineTuneMethod",
    "textual_inversion": "library.methods.textual_inversion:TextualInversionMethod",
    "textual_inversion_xti": "library.methods.textual_inversion_xti:XTIMethod",
}


def get_method_class(method_id: str):
    """Import and return the method class registered under `method_id`."""
    module_name, class_name = METHODS[method_id].split(":")
    return getattr(importlib.import_module(module_name), class_name)
