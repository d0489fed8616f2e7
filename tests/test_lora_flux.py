"""networks.lora_flux: BFL module names, per-layer dims and block choice, exact fused export of split q/k/v, and
files that diffusers' FluxPipeline loads with the same effect as our forward."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from library.errors import CheckpointError, ConfigError
from library.families.flux import image_position_ids, pack_latents
from library.testing import tiny_configs
from networks import lora_flux

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait


@pytest.fixture(scope="module")
def transformer():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(**tiny_configs.tiny_flux_transformer_config()).eval().requires_grad_(False)


def run(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 4, 4, generator=generator)
    text = torch.randn(1, 5, 40, generator=generator)
    pooled = torch.randn(1, 32, generator=generator)
    return model(hidden_states=pack_latents(latents), encoder_hidden_states=text, pooled_projections=pooled,
                 timestep=torch.tensor([0.5]), img_ids=image_position_ids(2, 2, "cpu"), txt_ids=torch.zeros(5, 3),
                 guidance=torch.tensor([3.5])).sample  # fmt: skip


def trained_network(model, seed: int = 3, **network_args):
    """A network on `model` with random (non-zero) ups, as after some training."""
    network = lora_flux.create_network(1.0, 4, 2, None, [], model, **network_args)
    network.apply_to([], model, False, True)
    generator = torch.Generator().manual_seed(seed)
    for lora in network.all_loras():
        lora.lora_up.weight.data = torch.randn(lora.lora_up.weight.shape, generator=generator) * 0.1
    return network


def test_lora_flux_names_modules_by_bfl_layout(transformer):
    network = lora_flux.create_network(1.0, 4, 2, None, [], copy.deepcopy(transformer))
    keys = set(network.file_state_dict())
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_3_linear1.lora_up.weight" in keys
    assert "lora_unet_double_blocks_2_txt_mod_lin.alpha" in keys
    assert network.file_state_dict()["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * 64, 4)
    assert not any(key.startswith(("lora_unet_img_in", "lora_unet_final_layer")) for key in keys)


def test_lora_flux_per_layer_dims_block_indices_and_regex_dims(transformer):
    network = lora_flux.create_network(
        1.0, 4, 2, None, [], copy.deepcopy(transformer), img_attn_dim=8, txt_mod_dim=0, single_mod_dim=2,
        in_dims="[3,0,0,0,5]", train_double_block_indices="0,2", train_single_block_indices="1-2",
        network_reg_dims=r"double_blocks\.2\..*=6,double_blocks\.2\.img_mlp=1",
    )  # fmt: skip
    ranks = {key.split(".")[0]: value.shape[0] for key, value in network.file_state_dict().items()
             if key.endswith("lora_down.weight")}  # fmt: skip
    assert ranks["lora_unet_double_blocks_0_img_attn_qkv"] == 8
    assert ranks["lora_unet_double_blocks_0_txt_attn_qkv"] == 4
    assert "lora_unet_double_blocks_0_txt_mod_lin" not in ranks
    assert "lora_unet_double_blocks_1_img_attn_qkv" not in ranks  # block 1 not chosen
    assert ranks["lora_unet_double_blocks_2_img_attn_qkv"] == 6  # regex overrides the kind
    assert ranks["lora_unet_double_blocks_2_img_mlp_0"] == 1  # the last matching regex wins
    assert ranks["lora_unet_single_blocks_1_modulation_lin"] == 2
    assert {name for name in ranks if "single_blocks_0" in name or "single_blocks_3" in name} == set()
    assert ranks["lora_unet_img_in"] == 3 and ranks["lora_unet_txt_in"] == 5
    assert "lora_unet_time_in_in_layer" not in ranks


def test_lora_flux_regex_learning_rates_make_groups(transformer):
    network = lora_flux.create_network(1.0, 4, 2, None, [], copy.deepcopy(transformer),
                                       network_reg_lrs=r"single_blocks=1e-5,single_blocks\.3=2e-5")  # fmt: skip
    groups, names = network.prepare_optimizer_params(None, 1e-4, 1e-4)
    rates = {name: group["lr"] for group, name in zip(groups, names)}
    assert rates == {"unet": 1e-4, "unet lr 1e-05": 1e-5, "unet lr 2e-05": 2e-5}
    assert len(groups[2]["params"]) == 3 * 2  # single block 3: linear1, linear2, modulation; down and up each


def test_lora_flux_split_qkv_file_is_the_exact_fused_equivalent(transformer, tmp_path):
    model = copy.deepcopy(transformer)
    split = trained_network(model, split_qkv=True)
    split_output = run(model)
    path = str(tmp_path / "split.safetensors")
    split.save_weights(path, None, {})
    weights = load_file(path)
    up = weights["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert up.shape == (3 * 64, 3 * 4) and torch.count_nonzero(up[:64, 4:]) == 0  # block-diagonal
    assert float(weights["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 6.0  # alpha * 3 for rank * 3
    fused_model = copy.deepcopy(transformer)
    fused, _ = lora_flux.create_network_from_weights(1.0, path, None, [], fused_model)
    fused.apply_to([], fused_model, False, True)
    fused.load_weights(path)
    assert torch.allclose(run(fused_model), split_output, atol=1e-6)
    reloaded_model = copy.deepcopy(transformer)
    reloaded = lora_flux.create_network(1.0, 4, 2, None, [], reloaded_model, split_qkv=True)
    reloaded.apply_to([], reloaded_model, False, True)
    reloaded.load_weights(path)  # fused file -> split modules
    assert torch.allclose(run(reloaded_model), split_output, atol=1e-6)


def test_lora_flux_split_refuses_shared_up_weights(transformer, tmp_path):
    shared_model = copy.deepcopy(transformer)
    path = str(tmp_path / "fused.safetensors")
    trained_network(shared_model).save_weights(path, None, {})
    split_model = copy.deepcopy(transformer)
    split = lora_flux.create_network(1.0, 4, 2, None, [], split_model, split_qkv=True)
    with pytest.raises(CheckpointError):  # rank 4 shared vs 3 x 4 split: another shape
        split.load_weights(path)


@pytest.mark.parametrize(
    "network_args",
    [
        {"train_single_block_indices": "none"},  # kohya names (diffusers' kohya reader assumes 3072-wide single blocks)
        {"train_single_block_indices": "none", "split_qkv": True},
        {"save_format": "diffusers"},
        {"save_format": "diffusers", "split_qkv": True, "in_dims": "[2,2,2,2,2]"},
    ],
)
def test_lora_flux_file_loads_in_diffusers_with_our_effect(transformer, tmp_path, network_args):
    from diffusers import FluxPipeline

    model = copy.deepcopy(transformer)
    base = run(model)
    network = trained_network(model, **network_args)
    ours = run(model)
    path = str(tmp_path / "lora.safetensors")
    network.save_weights(path, None, {"ss_network_module": "networks.lora_flux"})
    theirs_model = copy.deepcopy(transformer)
    pipeline = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=theirs_model)  # fmt: skip
    pipeline.load_lora_weights(path)
    assert (ours - base).abs().max() > 1e-3
    assert torch.allclose(run(theirs_model), ours, atol=1e-5)


def test_lora_flux_rejects_unknown_args_and_bad_indices(transformer):
    with pytest.raises(ConfigError, match="unknown --network_args img_dim"):
        lora_flux.create_network(1.0, 4, 2, None, [], transformer, img_dim=4)
    with pytest.raises(ConfigError, match="train_double_block_indices: this model has blocks 0-2"):
        lora_flux.create_network(1.0, 4, 2, None, [], transformer, train_double_block_indices="1,5")
    with pytest.raises(ConfigError, match="in_dims needs 5 dims"):
        lora_flux.create_network(1.0, 4, 2, None, [], transformer, in_dims="[4,4]")


def test_lora_on_the_final_modulation_keeps_bfl_row_order_in_files(transformer, tmp_path):
    """diffusers holds the final modulation as scale|shift, the BFL file as shift|scale; LoRA files follow the BFL
    file (what ComfyUI adds them to), and reloading or merging them gives the trained effect."""
    model = copy.deepcopy(transformer)
    network = trained_network(model, network_reg_dims=r"final_layer\.adaLN_modulation=2")
    ours = run(model)
    name = "lora_unet_final_layer_adaLN_modulation_1"
    model_delta = network.get_submodule(name).delta_weight()
    path = str(tmp_path / "lora.safetensors")
    network.save_weights(path, None, {})
    saved = load_file(path)
    file_delta = saved[f"{name}.lora_up.weight"] @ saved[f"{name}.lora_down.weight"]  # alpha 2 / rank 2
    first, second = model_delta.chunk(2)
    torch.testing.assert_close(file_delta, torch.cat([second, first]))

    reloaded_model = copy.deepcopy(transformer)
    reloaded, _ = lora_flux.create_network_from_weights(1.0, path, None, [], reloaded_model)
    reloaded.apply_to([], reloaded_model, False, True)
    reloaded.load_weights(path)
    torch.testing.assert_close(run(reloaded_model), ours, atol=1e-6, rtol=0)
    merged_model = copy.deepcopy(transformer)
    merger, weights = lora_flux.create_network_from_weights(1.0, path, None, [], merged_model)
    merger.merge_to(None, merged_model, weights, torch.float32, "cpu")
    torch.testing.assert_close(run(merged_model), ours, atol=1e-5, rtol=0)
