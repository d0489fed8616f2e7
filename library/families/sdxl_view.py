"""A view of a diffusers SDXL UNet whose module names are the SGM names (`input_blocks.4.1.transformer_blocks...`).

LoRA files for SDXL name UNet layers by the original layout (`lora_unet_input_blocks_4_1_..._attn1_to_q`), and
network plugins derive names from `named_modules()` and pick blocks by class name. The view places the UNet's own
blocks under SGM paths; blocks whose inner names differ (ResnetBlock2D: in_layers.2 for conv1, ...; Downsample2D:
op for conv) are shown through stand-in modules of the same class name holding the real layers. Nothing is copied:
an adapter hooked into a layer of the view is hooked into the UNet.
"""

from __future__ import annotations

import functools

from torch import nn

SGM_BLOCK_LISTS = ("input_blocks", "middle_block", "output_blocks")


class BlockView(nn.Module):
    """A stand-in for one UNet block that shows its layers under their SGM names; it is never called."""


@functools.cache
def _view_class(block_class_name: str) -> type[BlockView]:
    # Plugins choose target blocks by class name (kohya: "ResnetBlock2D", "Downsample2D"), so the stand-in keeps it.
    return type(block_class_name, (BlockView,), {})


def _split_block(path: str, block_parts: int) -> tuple[str, str]:
    parts = path.split(".")
    return ".".join(parts[:block_parts]), ".".join(parts[block_parts:])


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register `module` at the dotted `path` under `root`, creating empty containers on the way."""
    *parents, name = path.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(name, module)


def sgm_unet_view(unet: nn.Module, module_names: dict[str, str]) -> nn.Module:
    """A module tree holding the blocks of `unet` under SGM names.

    `module_names` maps diffusers module paths to SGM paths (sdxl_keys.unet_module_names). Only the blocks of
    input_blocks 1.., middle_block and output_blocks are shown: the layers adapter networks target.
    """
    blocks: dict[str, tuple[str, dict[str, str]]] = {}  # SGM block -> (diffusers block, inner SGM -> inner diffusers)
    for model_path, sgm_path in module_names.items():
        kind = sgm_path.split(".")[0]
        if kind not in SGM_BLOCK_LISTS or sgm_path.startswith("input_blocks.0."):
            continue
        middle = kind == "middle_block"  # middle_block.1 <-> mid_block.attentions.0; else one level deeper
        sgm_block, sgm_inner = _split_block(sgm_path, 2 if middle else 3)
        model_block, model_inner = _split_block(model_path, 3 if middle else 4)
        blocks.setdefault(sgm_block, (model_block, {}))[1][sgm_inner] = model_inner
    view = nn.Module()
    for sgm_block, (model_block, inner) in blocks.items():
        block = unet.get_submodule(model_block)
        if all(sgm == model for sgm, model in inner.items()):
            _attach(view, sgm_block, block)  # same inner names (Transformer2DModel, Upsample2D): the block itself
            continue
        stand_in = _view_class(type(block).__name__)()
        for sgm_inner, model_inner in inner.items():
            _attach(stand_in, sgm_inner, block.get_submodule(model_inner))
        _attach(view, sgm_block, stand_in)
    return view
