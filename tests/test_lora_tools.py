"""The LoRA tools in networks/ on tiny models of every family: merge into a model, merge LoRAs (plain, concat, SVD),
resize, extract, check and convert, through their command lines (a subprocess where the script itself is the
point, the same `main(argv)` in this process elsewhere, to keep the suite fast)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.lora_tools import check, convert, extract, merge, resize
from library.lora_tools.files import read_lora
from library.lora_tools.models import model_targets
from library.testing.toy_data import write_toy_dataset
from networks.adapter_types import stored_type
from networks.network_args import NetworkOptions
from tests.conftest import run_cli
from tests.lora_tool_helpers import FAMILIES, TYPES, load, network, output, train, with_model

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPTS = ["merge_lora", "sdxl_merge_lora", "flux_merge_lora", "svd_merge_lora", "resize_lora",
           "extract_lora_from_models", "flux_extract_lora", "check_lora_weights", "convert_lora",
           "convert_flux_lora"]


def changes(path: str) -> dict[str, torch.Tensor]:
    """Every module's weight change (float32, flattened to (out, in * kh * kw)) in a kohya-format file."""
    return {name: module.adapter_type.delta_of(module.tensors, "cpu").flatten(1)
            for name, module in read_lora(path).modules().items()}  # fmt: skip


def best_approximation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def saved(net, path, metadata: dict[str, str] | None = None) -> str:
    net.save_weights(path, None, metadata or {})
    return str(path)
# diffusers' single-file converters of FLUX.1 and Lumina assume the released widths (3072 ...), so they cannot read
# tiny models; the reload through our loader above checks the layout for every family.
READ_BY_DIFFUSERS_SINGLE_FILE = ("sd", "sdxl", "sd3")


def test_every_tool_script_prints_its_help(tmp_path):
    code = ("import runpy, sys\nfor script in sys.argv[1:]:\n    sys.argv = [script, '--help']\n    try:\n"
            "        runpy.run_path(script, run_name='__main__')\n    except SystemExit as end:\n"
            "        assert end.code == 0, script\n")  # fmt: skip
    result = run_cli(["-c", code, *[f"networks/{name}.py" for name in SCRIPTS]], tmp_path, launcher=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("usage:") == len(SCRIPTS)
    assert "--new_rank" in result.stdout and "--dynamic_method" in result.stdout and "--src_path" in result.stdout


# ---- merge into a model -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family_id", FAMILIES)
def test_merge_into_model_equals_the_applied_networks_of_every_type(family_id, tiny_family, tmp_path):
    """One file holding LoRA, DoRA, LoHa and LoKr modules (each layer one type), merged at 0.7: the merged single
    file gives the denoiser output of the four networks applied at 0.7."""
    tiny = tiny_family(family_id)
    family, models = load(family_id, tiny.model_args)
    networks = [network(kind, family, models, 0.7, seed=index) for index, kind in enumerate(TYPES)]
    names = sorted(networks[0].targets)
    weights = {}
    for index, net in enumerate(networks):
        net.apply_to(None, None, False, True)  # the denoiser: every family's single file holds it
        state = net.file_state_dict()
        for adapter in net.all_loras():
            chosen = names.index(adapter.lora_name) % len(networks) == index
            adapter.multiplier = 0.7 if chosen else 0.0
            if chosen:
                weights.update({key: value for key, value in state.items() if key.startswith(adapter.lora_name + ".")})
    expected = output(family, models)
    lora_file = str(tmp_path / "mixed.safetensors")
    save_file(weights, lora_file, {"ss_base_model_version": family.base_model_version()})
    merged = str(tmp_path / "merged.safetensors")

    command = [*tiny.model_args, "--models", lora_file, "--ratios", "0.7", "--save_to", merged]
    if family_id == "sd":  # the script itself, as users type it (the reference's --sd_model spelling)
        result = run_cli(["networks/merge_lora.py", "--sd_model", *command[1:]], tmp_path, launcher=False)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        merge.main(command, None)

    types = {stored_type(name, tensors).label for name, tensors in group(weights).items()}
    assert types == {"LoRA", "DoRA", "LoHa", "LoKr"}
    merged_family, merged_models = load(family_id, with_model(tiny.model_args, merged))
    torch.testing.assert_close(output(merged_family, merged_models), expected, atol=1e-4, rtol=1e-5)
    if family_id in READ_BY_DIFFUSERS_SINGLE_FILE:
        assert_loads_with_from_single_file(merged, tiny, merged_models.denoiser)


def group(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    from networks.lora import group_modules

    return group_modules(weights)


def assert_loads_with_from_single_file(path: str, tiny, denoiser) -> None:
    folder = tiny.diffusers_args[tiny.diffusers_args.index("--pretrained_model_name_or_path") + 1]
    subfolder = "unet" if os.path.isdir(os.path.join(folder, "unet")) else "transformer"
    loaded = type(denoiser).from_single_file(path, config=folder, subfolder=subfolder, local_files_only=True)
    for key, value in denoiser.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_merge_lora_merges_text_encoder_and_unet_into_an_sd_file(tiny_family, tmp_path):
    tiny = tiny_family("sd")
    family, models = load("sd", tiny.model_args)
    net = network("lora", family, models, -0.5)
    lora_file = saved(net, tmp_path / "lora.safetensors", {"ss_base_model_version": "sd_v1", "ss_network_dim": "4"})
    net.apply_to(None, None, True, True)
    expected = output(family, models)
    merged = str(tmp_path / "merged.safetensors")
    merge.main(["--sd_model", *tiny.model_args[1:], "--models", lora_file, "--ratios", "-0.5", "--save_to", merged,
                "--save_precision", "float"])

    merged_family, merged_models = load("sd", with_model(tiny.model_args, merged))
    torch.testing.assert_close(output(merged_family, merged_models), expected, atol=1e-4, rtol=1e-5)
    with safe_open(merged, "pt") as handle:
        history = json.loads(handle.metadata()["ss_lora_tools"])
    assert history[-1]["tool"] == "merge_lora" and history[-1]["args"]["ratios"] == [-0.5]


# ---- resize ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_lora(tiny_family, tmp_path_factory) -> str:
    """A trained-looking SD LoRA (rank 4, conv rank 2 in the ResNet blocks) with a secret in its metadata."""
    family, models = load("sd", tiny_family("sd").model_args)
    net = network("lora", family, models, conv_dim="2", conv_alpha="1")
    metadata = {"ss_base_model_version": "sd_v1", "ss_network_dim": "4", "ss_note": "token hf_SECRETSECRET123",
                "sshs_model_hash": "stale"}  # fmt: skip
    return saved(net, tmp_path_factory.mktemp("lora") / "lora.safetensors", metadata)


def test_resize_to_full_rank_is_lossless_and_a_lower_rank_keeps_the_asked_energy(sd_lora, tmp_path):
    full, smaller = str(tmp_path / "full.safetensors"), str(tmp_path / "small.safetensors")
    env = {"HF_TOKEN": "hf_SECRETSECRET123"}
    result = run_cli(["networks/resize_lora.py", "--model", sd_lora, "--save_to", full, "--new_rank", "4",
                      "--new_conv_rank", "2"], tmp_path, launcher=False, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    resize.main(["--model", sd_lora, "--save_to", smaller, "--new_rank", "4", "--dynamic_method", "sv_fro",
                 "--dynamic_param", "0.9", "--verbose"])  # fmt: skip

    original, lossless = changes(sd_lora), changes(full)
    errors = [float((lossless[name] - change).abs().max() / change.abs().max()) for name, change in original.items()]
    assert max(errors) < 1e-5, max(errors)
    kept_ranks = []
    for name, module in read_lora(smaller).modules().items():
        rank = module.adapter_type.rank_of(module.tensors)[0]
        singular = torch.linalg.svdvals(original[name].double())
        share = (singular.square().cumsum(0) / singular.square().sum()).sqrt()
        assert share[rank - 1] >= 0.9 - 1e-9 and (rank == 1 or share[rank - 2] < 0.9), (name, rank, share)
        kept_ranks.append(rank)
    assert min(kept_ranks) < 4  # the rule did drop ranks
    metadata = read_lora(full).metadata
    assert metadata["ss_base_model_version"] == "sd_v1" and "sshs_model_hash" not in metadata
    assert metadata["ss_note"] == "token ***"  # the secret of the environment never reaches the file
    assert json.loads(metadata["ss_lora_tools"])[0]["args"]["new_rank"] == 4


def test_resize_verbose_reports_the_kept_energy_of_each_module(sd_lora, tmp_path, capsys):
    resize.main(["--model", sd_lora, "--save_to", str(tmp_path / "r.safetensors"), "--new_rank", "2", "--verbose"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "fro retained" in line]
    assert len(lines) == len(read_lora(sd_lora).modules())
    assert all(re.search(r"rank +2 \| fro retained +\d+\.\d\d%", line) for line in lines)


@pytest.mark.parametrize("adapter_type", ["loha", "lokr"])
def test_resize_loha_and_lokr_through_their_weight_change(adapter_type, tiny_family, tmp_path):
    """LoHa / LoKr become LoRA modules: at rank k each is the best rank-k approximation of the module's change;
    the randomized low-rank SVD keeps nearly as much."""
    family, models = load("flux", tiny_family("flux").model_args)
    source = saved(network(adapter_type, family, models), tmp_path / "in.safetensors")
    exact, fast = str(tmp_path / "exact.safetensors"), str(tmp_path / "fast.safetensors")
    resize.main(["--model", source, "--save_to", exact, "--new_rank", "6"])
    resize.main(["--model", source, "--save_to", fast, "--new_rank", "6", "--svd_lowrank", "--svd_lowrank_niter", "4"])

    original, resized, randomized = changes(source), changes(exact), changes(fast)
    assert {module.adapter_type.label for module in read_lora(exact).modules().values()} == {"LoRA"}
    for name, change in original.items():
        best = best_approximation(change, 6)
        assert float((resized[name].double() - best).norm() / best.norm()) < 1e-4, name  # float32 factors
        optimal, approximate = (change.double() - best).norm(), (change.double() - randomized[name].double()).norm()
        assert approximate <= optimal * 1.05 + 1e-6 * change.norm(), name


# ---- merging LoRAs ---------------------------------------------------------------------------------------------------


def test_svd_merge_of_two_loras_is_the_best_rank_r_approximation_of_their_sum(tiny_family, sd_lora, tmp_path):
    family, models = load("sd", tiny_family("sd").model_args)
    second = saved(network("lora", family, models, seed=7, conv_dim="2"), tmp_path / "second.safetensors")
    out = str(tmp_path / "svd.safetensors")
    result = run_cli(["networks/svd_merge_lora.py", "--models", sd_lora, second, "--ratios", "1", "-0.5",
                      "--new_rank", "3", "--new_conv_rank", "2", "--save_to", out], tmp_path, launcher=False)
    assert result.returncode == 0, result.stderr[-3000:]

    first_changes, second_changes, merged = changes(sd_lora), changes(second), changes(out)
    for name, module in read_lora(out).modules().items():
        down = module.tensors["lora_down.weight"]
        spatial = down.dim() == 4 and down.shape[2] > 1
        assert down.shape[0] == (2 if spatial else 3), name
        best = best_approximation(first_changes[name] - 0.5 * second_changes[name], down.shape[0])
        assert float((merged[name].double() - best).norm() / best.norm()) < 1e-5, name
    assert read_lora(out).metadata["ss_network_dim"] == "3"


def test_concat_merge_is_exact_and_plain_merge_keeps_the_rank(tiny_family, sd_lora, tmp_path):
    family, models = load("sd", tiny_family("sd").model_args)
    second = saved(network("lora", family, models, seed=7, conv_dim="2"), tmp_path / "second.safetensors")
    concat, plain = str(tmp_path / "concat.safetensors"), str(tmp_path / "plain.safetensors")
    merge.main(["--models", sd_lora, second, "--ratios", "0.7", "-0.3", "--save_to", concat, "--concat"])
    merge.main(["--models", sd_lora, "--ratios", "0.5", "--save_to", plain])

    first_changes, second_changes = changes(sd_lora), changes(second)
    for name, change in changes(concat).items():
        torch.testing.assert_close(change, 0.7 * first_changes[name] - 0.3 * second_changes[name], atol=1e-6, rtol=0)
    for name, change in changes(plain).items():
        torch.testing.assert_close(change, 0.5 * first_changes[name], atol=1e-7, rtol=1e-5)
    modules = read_lora(plain).modules()
    assert {name: module.tensors["lora_down.weight"].shape for name, module in modules.items()} == {
        name: module.tensors["lora_down.weight"].shape for name, module in read_lora(sd_lora).modules().items()}


# ---- extract ---------------------------------------------------------------------------------------------------------


def test_extract_from_a_fine_tuned_model_approximates_the_difference_and_loads_in_the_trainer(tiny_family, tmp_path,
                                                                                               capsys):
    from tests.training_helpers import train_in_process

    tiny = tiny_family("sd")
    dataset = write_toy_dataset(str(tmp_path / "data"), count=2, reg_count=0, batch_size=2)
    train_in_process([*tiny.model_args, "--dataset_config", dataset, "--output_dir", str(tmp_path / "ft"),
                      "--output_name", "tuned", "--learning_rate", "1e-3", "--max_train_steps", "2", "--seed", "3",
                      "--max_data_loader_n_workers", "0", "--cpu_threads", "1"], "sd", method="finetune")  # fmt: skip
    tuned, extracted = str(tmp_path / "ft" / "tuned.safetensors"), str(tmp_path / "extracted.safetensors")
    extract.main([*tiny.model_args[2:], "--model_org", tiny.model_args[1], "--model_tuned", tuned, "--dim", "8",
                  "--save_to", extracted])
    mean_error = float(re.search(r"mean relative error: ([\d.]+)", capsys.readouterr().out).group(1))

    family, original = load("sd", tiny.model_args)
    _, tuned_models = load("sd", with_model(tiny.model_args, tuned))
    targets, tuned_targets = model_targets(family, original), model_targets(family, tuned_models)
    extracted_changes = changes(extracted)
    errors = []
    for name, change in extracted_changes.items():
        difference = (torch.cat([layer.weight for layer in tuned_targets.by_name[name].layers])
                      - torch.cat([layer.weight for layer in targets.by_name[name].layers])).flatten(1)  # fmt: skip
        errors.append(float((change - difference).norm() / difference.norm()))
        assert errors[-1] < 0.9, name  # the rank-8 part of a full-rank difference
    assert abs(sum(errors) / len(errors) - mean_error) < 0.05  # the clamp makes the report's LoRA slightly different
    assert any(name.startswith("lora_unet") for name in extracted_changes)
    metadata = read_lora(extracted).metadata
    assert metadata["ss_network_dim"] == "8" and metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"

    train_in_process([*tiny.model_args, "--dataset_config", dataset, "--output_dir", str(tmp_path / "net"),
                      "--output_name", "continued", "--network_module", "networks.lora", "--network_dim", "8",
                      "--network_weights", extracted,
                      "--learning_rate", "1e-4", "--max_train_steps", "1", "--max_data_loader_n_workers", "0",
                      "--cpu_threads", "1"], "sd")  # fmt: skip
    assert os.path.isfile(tmp_path / "net" / "continued.safetensors")


# ---- check -----------------------------------------------------------------------------------------------------------


def test_check_lists_parts_ranks_norms_and_metadata_and_maps_every_module(tiny_family, sd_lora, capsys):
    tiny = tiny_family("sd")
    check.main([sd_lora, "--family", "sd", *tiny.model_args])
    out = capsys.readouterr().out
    modules = read_lora(sd_lora).modules()
    parts = Counter(name.split("_")[1] for name in modules)
    ranks = Counter(module.adapter_type.rank_of(module.tensors) for module in modules.values())
    assert f"modules: {len(modules)} (lora_te {parts['te']}, lora_unet {parts['unet']})" in out
    assert f"adapter types: LoRA {len(modules)}" in out and "ss_base_model_version = sd_v1" in out
    assert "rank, alpha: " + ", ".join(f"{r}, {a:g} ({n})" for (r, a), n in sorted(ranks.items())) in out
    assert f"base model (sd): {len(modules)} of {len(modules)} modules load" in out
    assert re.search(r"lora_te_text_model_encoder_layers_0_self_attn_q_proj,LoRA,rank 4,alpha 2,norm \d", out)

    sdxl = tiny_family("sdxl")
    with pytest.raises(Exception, match="do not load onto this sdxl model"):
        check.main([sd_lora, "--family", "sdxl", *sdxl.model_args])
    assert "no layer: lora_te_text_model" in capsys.readouterr().out


# ---- convert ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family_id", FAMILIES)
def test_convert_kohya_diffusers_kohya_round_trip_is_bit_identical(family_id, tiny_family, tmp_path):
    tiny = tiny_family(family_id)
    family, models = load(family_id, tiny.model_args)
    net = network("lora", family, models, split_qkv="True") if family_id == "flux" else network("dora", family, models)
    source = saved(net, tmp_path / "kohya.safetensors", {"ss_base_model_version": family.base_model_version()})
    diffusers_file, back = str(tmp_path / "diffusers.safetensors"), str(tmp_path / "back.safetensors")
    model = ["--family", family_id, *tiny.model_args]
    convert.main([*model, "--src_path", source, "--dst", "diffusers", "--dst_path", diffusers_file])
    convert.main([*model, "--src_path", diffusers_file, "--dst", "kohya", "--dst_path", back])

    original, returned = load_file(source), load_file(back)
    assert set(original) == set(returned)
    assert all(torch.equal(original[key], returned[key]) and original[key].dtype == returned[key].dtype
               for key in original)  # fmt: skip
    assert any(".lora_A.weight" in key for key in load_file(diffusers_file))
    assert not any(key.startswith("lora_") for key in load_file(diffusers_file))


def test_diffusers_flux_lora_converts_and_loads_as_network_weights(tiny_family, tmp_path):
    """An ai-toolkit / diffusers FLUX LoRA (separate q, k, v factors, no alphas): diffusers' loader and ours, after
    convert_flux_lora.py, give the same output, and the trainer continues from it with split_qkv."""
    from diffusers import FluxPipeline

    tiny = tiny_family("flux")
    family, models = load("flux", tiny.model_args)
    targets = model_targets(family, models)
    generator = torch.Generator().manual_seed(5)
    weights = {}
    trained = NetworkOptions.parse({}, targets.table.args)
    for name, target in targets.by_name.items():
        if target.encoder is None and trained.rank_for(target, targets.table, 4, 4) is not None:
            for diffusers_name, layer in zip(targets.diffusers_names[name], target.layers, strict=True):
                out_features, in_features = layer.weight.shape
                weights[f"{diffusers_name}.lora_A.weight"] = torch.randn(4, in_features, generator=generator) * 0.1
                weights[f"{diffusers_name}.lora_B.weight"] = torch.randn(out_features, 4, generator=generator) * 0.1
    source, converted = str(tmp_path / "ai_toolkit.safetensors"), str(tmp_path / "kohya.safetensors")
    save_file(weights, source)
    convert.main([*tiny.model_args, "--src", "ai-toolkit", "--dst", "sd-scripts", "--src_path", source, "--dst_path",
                  converted], default_family="flux")  # what networks/convert_flux_lora.py runs

    state, alphas = FluxPipeline.lora_state_dict(source, return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state, alphas, models.denoiser)
    expected = output(family, models)
    family, models = load("flux", tiny.model_args)
    ours, _ = __import__("networks.lora", fromlist=["x"]).create_network_from_weights(
        1.0, converted, None, family.network_text_encoders(models), models.denoiser)
    ours.apply_to(None, None, True, True)
    ours.load_weights(converted)
    torch.testing.assert_close(output(family, models), expected, atol=1e-5, rtol=1e-5)

    dataset = write_toy_dataset(str(tmp_path / "data"), count=2, reg_count=0, batch_size=2)
    train(tiny, dataset, str(tmp_path / "net"), "lora", "--network_weights", converted, "--network_train_unet_only",
          "--network_args", "split_qkv=True")
    continued = load_file(str(tmp_path / "net" / "lora.safetensors"))
    assert set(continued) == set(load_file(converted))


def test_comfy_format_round_trip_renames_only(tiny_family, tmp_path):
    tiny = tiny_family("sdxl")
    family, models = load("sdxl", tiny.model_args)
    source = saved(network("loha", family, models), tmp_path / "kohya.safetensors")
    comfy, back = str(tmp_path / "comfy.safetensors"), str(tmp_path / "back.safetensors")
    model = ["--family", "sdxl", *tiny.model_args]
    convert.main([*model, "--src_path", source, "--dst", "comfy", "--dst_path", comfy])
    convert.main([*model, "--src_path", comfy, "--dst_path", back])

    keys = set(load_file(comfy))
    assert any(re.fullmatch(r"diffusion_model\.input_blocks\.\d+\.1\.proj_in\.hada_w1_a", key) for key in keys)
    assert any(key.startswith("lora_te1_text_model") for key in keys)  # ComfyUI reads text encoders by kohya names
    original, returned = load_file(source), load_file(back)
    assert set(original) == set(returned) and all(torch.equal(original[k], returned[k]) for k in original)


def test_tools_refuse_bad_options_with_one_clear_message(sd_lora, tmp_path):
    from library.errors import ConfigError

    with pytest.raises(ConfigError, match="--model is required"):
        resize.main(["--save_to", str(tmp_path / "x.safetensors")])
    with pytest.raises(ConfigError, match="--ratios gives 1 values for 2 --models"):
        merge.main(["--models", sd_lora, sd_lora, "--ratios", "1", "--save_to", str(tmp_path / "x.safetensors")])
    with pytest.raises(ConfigError, match="needs a positive --dynamic_param"):
        resize.main(["--model", sd_lora, "--save_to", str(tmp_path / "x.pt"), "--dynamic_method", "sv_ratio"])
    with pytest.raises(ConfigError, match=r"file name must end in \.safetensors"):
        resize.main(["--model", sd_lora, "--save_to", str(tmp_path / "x.bin")])


def test_extract_refuses_identical_models(tiny_family, tmp_path):
    tiny = tiny_family("sd")
    with pytest.raises(Exception, match="nothing to extract"):
        extract.main([*tiny.model_args[2:], "--model_org", tiny.model_args[1], "--model_tuned", tiny.model_args[1],
                      "--save_to", str(tmp_path / "x.safetensors")])  # fmt: skip

