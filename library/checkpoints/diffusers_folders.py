"""Diffusers folders we write stay readable by every transformers version: CLIP text encoders keep the
`text_model.` level in their weight names, as transformers < 5.6 (and the original releases) wrote them. Without it,
a tool on transformers < 5.6 finds none of its keys and silently starts from random text-encoder weights; newer
transformers read both spellings."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from library.atomic import atomic_path

TEXT_MODEL_LEVEL = "text_model."
# Weights of a CLIP text model that sit beside the text model, not inside it.
OUTSIDE_TEXT_MODEL = ("text_projection.",)
CLIP_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")


def _with_level(name: str) -> str:
    if name.startswith((TEXT_MODEL_LEVEL, *OUTSIDE_TEXT_MODEL)):
        return name
    return TEXT_MODEL_LEVEL + name


def _is_clip_folder(folder: str) -> bool:
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as handle:
        architectures = json.load(handle).get("architectures") or []
    return any(name in CLIP_ARCHITECTURES for name in architectures)


def _rewrite_weights(path: str) -> None:
    if path.endswith(".safetensors"):
        tensors = load_file(path)
        renamed = {_with_level(name): tensor for name, tensor in tensors.items()}
        if renamed.keys() != tensors.keys():
            with atomic_path(path) as temp:
                save_file(renamed, temp, metadata={"format": "pt"})
        return
    tensors = torch.load(path, map_location="cpu", weights_only=True)
    renamed = {_with_level(name): tensor for name, tensor in tensors.items()}
    if renamed.keys() != tensors.keys():
        with atomic_path(path) as temp:
            torch.save(renamed, temp)


def _rewrite_index(path: str) -> None:
    with open(path, encoding="utf-8") as handle:
        index = json.load(handle)
    index["weight_map"] = {_with_level(name): file for name, file in index.get("weight_map", {}).items()}
    with atomic_path(path) as temp:
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2)


def keep_text_model_level(pipeline_folder: str) -> None:
    """Give the weight names of every CLIP text-encoder component of a saved pipeline folder the `text_model.`
    level (a no-op where they have it)."""
    for component in sorted(os.listdir(pipeline_folder)):
        folder = os.path.join(pipeline_folder, component)
        if not os.path.isdir(folder) or not _is_clip_folder(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.endswith(".index.json"):
                _rewrite_index(path)
            elif name.endswith((".safetensors", ".bin")):
                _rewrite_weights(path)
