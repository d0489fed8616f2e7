"""LoRA files keep exactly the key names and tensor shapes they had before the shared adapter layer.

The lists in tests/data/lora_keys/ were written by the code of commit 4339716 (networks/lora.py and the separate
networks/lora_flux.py); each case here builds the same network through today's code path (the family's target
table handed to networks.lora) and saves it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from library.adapters.targets import with_text_model_level
from library.checkpoints import sdxl_keys
from library.families.flux import FluxFamily
from library.families.sd import SDFamily
from library.families.sdxl import SDXLFamily
from library.families.sdxl_view import sgm_unet_view
from library.testing import tiny_flux, tiny_models, tiny_sdxl
from networks import lora, lora_flux

KEY_LISTS = os.path.join(os.path.dirname(__file__), "data", "lora_keys")
CONV = {"conv_dim": "2", "conv_alpha": "1"}
FLUX_CASES = {
    "default": {},
    "t5-indims-split": {"train_t5xxl": "True", "in_dims": "[2,2,2,2,2]", "img_attn_dim": "8",
                        "train_single_block_indices": "0-1", "split_qkv": "True"},
    # issue 16: CLIP names keep `text_model.` (ComfyUI reads only those); T5 has no diffusers names (refused)
    "diffusers": {"save_format": "diffusers"},
}  # fmt: skip


def saved_keys(network, tmp_path) -> dict[str, list[int]]:
    path = str(tmp_path / "lora.safetensors")
    network.save_weights(path, None, {})
    with safe_open(path, "pt") as handle:
        return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}


def expected_keys(case: str) -> dict[str, list[int]]:
    with open(os.path.join(KEY_LISTS, f"{case}.json")) as file:
        return json.load(file)


def sd_network(variant: str, network_args: dict):
    models = tiny_models.build_models(variant)
    encoders = [with_text_model_level(models.text_encoder)]
    table = SDFamily.adapter_targets_for(encoders, models.unet)
    return lora.create_network(1.0, 4, 2, models.vae, encoders[0], models.unet, adapter_targets=table, **network_args)


def sdxl_network(network_args: dict):
    models = tiny_sdxl.build_models()
    view = sgm_unet_view(models.unet, sdxl_keys.unet_module_names(dict(models.unet.config)))
    encoders = [with_text_model_level(models.text_encoder1), with_text_model_level(models.text_encoder2)]
    table = SDXLFamily.adapter_targets_for(encoders, view)
    return lora.create_network(1.0, 4, 2, models.vae, encoders, view, adapter_targets=table, **network_args)


def flux_network(module, network_args: dict):
    models = tiny_flux.build_models()
    encoders = [with_text_model_level(models.clip_l), models.t5xxl]
    table = FluxFamily.adapter_targets_for(encoders, models.transformer)
    return module.create_network(1.0, 4, 2, models.ae, encoders, models.transformer, adapter_targets=table,
                                 **network_args)  # fmt: skip


@pytest.mark.parametrize("variant", ["sd1", "sd2-v"])
@pytest.mark.parametrize("name", ["default", "conv"])
def test_sd_lora_keys_and_shapes_are_unchanged(variant, name, tmp_path):
    network = sd_network(variant, CONV if name == "conv" else {})
    assert saved_keys(network, tmp_path) == expected_keys(f"{variant}-{name}")


@pytest.mark.parametrize("name", ["default", "conv"])
def test_sdxl_lora_keys_and_shapes_are_unchanged(name, tmp_path):
    network = sdxl_network(CONV if name == "conv" else {})
    assert saved_keys(network, tmp_path) == expected_keys(f"sdxl-{name}")


@pytest.mark.parametrize("name", list(FLUX_CASES))
def test_flux_lora_keys_and_shapes_are_unchanged_with_either_module_name(name, tmp_path):
    for module in (lora_flux, lora):
        network = flux_network(module, FLUX_CASES[name])
        assert saved_keys(network, tmp_path) == expected_keys(f"flux-{name}"), module.__name__


def test_networks_given_raw_models_find_the_family_table_themselves(tmp_path):
    """Scripts that call the plugin without a table (loading models themselves) get the same files."""
    models = tiny_flux.build_models()
    network = lora.create_network(1.0, 4, 2, None, [with_text_model_level(models.clip_l), models.t5xxl],
                                  models.transformer, **FLUX_CASES["t5-indims-split"])  # fmt: skip
    assert saved_keys(network, tmp_path) == expected_keys("flux-t5-indims-split")
    sd = tiny_models.build_models("sd1")
    network = lora.create_network(1.0, 4, 2, None, sd.text_encoder, sd.unet, **CONV)
    assert saved_keys(network, tmp_path) == expected_keys("sd1-conv")
    assert torch.is_tensor(network.state_dict()["lora_unet_down_blocks_0_resnets_0_conv1.alpha"])
