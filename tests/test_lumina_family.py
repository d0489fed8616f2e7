"""The `lumina` family: text conditioning against diffusers' Lumina2Pipeline (system prompt, negative prompt), the
time and sign conventions of its transformer, objective options, network args -> modules and ranks, the attention
kernels, block swap, the text-encoder cache keyed by the system prompt, saving, and every refusal before loading."""

from __future__ import annotations

import copy
import importlib.util
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from library.checkpoints import lumina_files, lumina_keys
from library.errors import CheckpointError, ConfigError, MissingPackageError
from library.families import lumina_attention
from library.families.lumina import LuminaFamily
from library.methods.finetune import FineTuneMethod
from library.methods.network import NetworkMethod
from library.training import flow_matching
from library.training.block_swap import OffloadOptions, ResidencyRecorder, make_runners
from library.training.entry import build_parser
from library.training.noise import NoiseOptions
from networks import lora, lora_lumina
from tests.training_helpers import train_in_process

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait

SYSTEM = "You are an assistant designed to generate high quality images based on user prompts."
CAPTIONS = ["a photo of a red circle", "a blue dog"]


@pytest.fixture(scope="module")
def tiny(tiny_family):
    return tiny_family("lumina")


def lumina_args(tiny, *extra: str, method=NetworkMethod, single_files: bool = True):
    model_args = tiny.model_args if single_files else tiny.diffusers_args
    argv = ["--output_dir", "unused", *model_args, *extra]
    return build_parser(LuminaFamily, method, "test").parse_args(argv)


def family_of(tiny, *extra: str, method=NetworkMethod, single_files: bool = True) -> LuminaFamily:
    args = lumina_args(tiny, *extra, method=method, single_files=single_files)
    family = LuminaFamily(args)
    family.validate(method(args) if method is FineTuneMethod else None)
    return family


@pytest.fixture(scope="module")
def loaded(tiny):
    family = family_of(tiny, "--gemma2_max_token_length", "32", "--system_prompt", SYSTEM)
    return family, family.load(torch.float32)


# ---- conditioning and prediction ---------------------------------------------------------------------------


def test_lumina_text_encoding_matches_lumina2_pipeline_with_system_prompt(loaded):
    family, models = loaded
    pipeline = family.make_pipeline(models, family.sample_scheduler("euler"))
    with torch.no_grad():
        embeds, mask, negative, negative_mask = pipeline.encode_prompt(
            CAPTIONS, negative_prompt="blurry", system_prompt=SYSTEM, max_sequence_length=32
        )
        ours = family.encode_text(models, CAPTIONS)
        sample = family.sample_prompt_inputs(models, CAPTIONS[0], "blurry")
    assert torch.equal(ours["encoder_hidden_states"], embeds) and torch.equal(ours["encoder_attention_mask"], mask)
    assert torch.equal(sample["prompt_embeds"], embeds[:1])
    # the negative prompt goes in without the system prompt, as the pipeline and the reference read it
    assert torch.equal(sample["negative_prompt_embeds"], negative[:1])
    assert torch.equal(sample["negative_prompt_attention_mask"], negative_mask[:1])


def test_lumina_system_prompt_changes_the_conditioning(loaded):
    family, models = loaded
    with torch.no_grad():
        with_prompt = family.encode_text(models, CAPTIONS[:1])
        family.options.system_prompt = ""
        try:
            without = family.encode_text(models, CAPTIONS[:1])
            plain = family.encode_prompts(models, CAPTIONS[:1])
        finally:
            family.options.system_prompt = SYSTEM
    assert with_prompt["encoder_attention_mask"].sum() > without["encoder_attention_mask"].sum()
    assert torch.equal(without["encoder_hidden_states"], plain["encoder_hidden_states"])  # no separator either
    assert family.text_encoding_settings() == (32, SYSTEM)


def test_lumina_prediction_follows_the_pipeline_time_and_sign(loaded):
    """One Euler step of Lumina2Pipeline from pure noise lands where our velocity says (x_0 = x_1 - v)."""
    family, models = loaded
    pipeline = family.make_pipeline(models, family.sample_scheduler("euler"))
    pipeline.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inputs = family.sample_prompt_inputs(models, CAPTIONS[0], "")
        stepped = pipeline(**inputs, height=32, width=32, num_inference_steps=1, guidance_scale=1.0,
                           latents=noise.clone(), output_type="latent").images  # fmt: skip
        conditioning = family.encode_text(models, CAPTIONS[:1])
        velocity = family.predict(models, noise, torch.tensor([1000.0]), conditioning)  # raw: the velocity itself
    assert torch.allclose(stepped, noise - velocity, atol=1e-6)


def test_lumina_single_files_and_diffusers_folder_give_the_same_prediction(loaded, tiny):
    family, models = loaded
    folder_family = family_of(tiny, "--gemma2_max_token_length", "32", "--system_prompt", SYSTEM, single_files=False)
    folder_models = folder_family.load(torch.float32)  # its tokenizer comes from the folder's tokenizer/
    inputs = family.training_inputs(torch.randn(1, 16, 4, 4), torch.Generator().manual_seed(0), NoiseOptions())
    with torch.no_grad():
        outputs = [fam.predict(mods, inputs.noisy_latents, inputs.timesteps, fam.encode_text(mods, CAPTIONS[:1]))
                   for fam, mods in ((family, models), (folder_family, folder_models))]  # fmt: skip
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


# ---- objective and metadata --------------------------------------------------------------------------------


def test_lumina_objective_defaults_are_the_reference_ones(tiny):
    family = family_of(tiny)
    flow = family.options.flow
    assert (flow.timestep_sampling, flow.discrete_flow_shift, flow.model_prediction_type) == ("shift", 6.0, "raw")
    assert family.max_tokens == 256 and family.options.system_prompt == ""


def test_lumina_nextdit_shift_gets_the_patch_count(tiny, monkeypatch):
    family = family_of(tiny, "--timestep_sampling", "nextdit_shift")
    seen = []
    original = flow_matching.sample_sigmas

    def spy(batch, options, generator, image_tokens=None, table=None):
        seen.append((options.timestep_sampling, image_tokens))
        return original(batch, options, generator, image_tokens, table)

    monkeypatch.setattr(flow_matching, "sample_sigmas", spy)
    inputs = family.training_inputs(torch.randn(3, 16, 8, 12), torch.Generator().manual_seed(0), NoiseOptions())
    assert seen == [("nextdit_shift", 4 * 6)]  # 2x2 patches of 8x12 latents
    assert inputs.timesteps.min() > 0 and inputs.timesteps.max() <= 1000
    assert family.training_metadata()["ss_timestep_sampling"] == "nextdit_shift"


def test_lumina_metadata_names_the_model_and_the_system_prompt(loaded):
    family, _ = loaded
    metadata = family.training_metadata()
    assert metadata["ss_base_model_version"] == family.base_model_version() == "lumina2"
    assert metadata["ss_system_prompt"] == SYSTEM and metadata["ss_gemma2_max_token_length"] == "32"
    assert metadata["ss_discrete_flow_shift"] == "6.0" and metadata["ss_model_prediction_type"] == "raw"
    assert family.model_spec_architecture() == "lumina-2"


# ---- adapter networks --------------------------------------------------------------------------------------


def network_ranks(family, models, **network_args) -> dict[str, int]:
    network = lora.create_network(1.0, 4, 1.0, models.vae, family.network_text_encoders(models),
                                  family.network_denoiser(models), adapter_targets=family.adapter_targets(models),
                                  **network_args)  # fmt: skip
    return {module.lora_name: module.lora_dim for module in network.text_encoder_loras + network.unet_loras}


def test_lumina_default_lora_targets_use_the_released_names(loaded):
    family, models = loaded
    ranks = network_ranks(family, models)
    assert {"lora_unet_layers_0_attention_qkv", "lora_unet_layers_3_feed_forward_w3",
            "lora_unet_noise_refiner_0_adaLN_modulation_1", "lora_unet_context_refiner_0_attention_out",
            "lora_unet_final_layer_linear", "lora_unet_final_layer_adaLN_modulation_1",
            "lora_te_layers_0_self_attn_q_proj", "lora_te_layers_1_mlp_down_proj"} <= set(ranks)  # fmt: skip
    assert not any("embedder" in name for name in ranks)  # embedders only with embedder_dims
    assert not any(name.startswith("lora_unet_context_refiner") and "adaLN" in name for name in ranks)
    assert set(ranks.values()) == {4}


def _is_refiner(name: str) -> bool:
    return name.startswith(("lora_unet_noise_refiner", "lora_unet_context_refiner"))


@pytest.mark.parametrize(
    "network_args, changed, rank",
    [
        ({"attn_dim": "8"}, lambda n: "_attention_" in n, 8),
        ({"mlp_dim": "8"}, lambda n: "_feed_forward_" in n, 8),
        ({"mod_dim": "8"}, lambda n: n.startswith("lora_unet") and "adaLN_modulation" in n, 8),
        ({"refiner_dim": "8"}, _is_refiner, 8),
        ({"refiner_dim": "8", "attn_dim": "4"}, lambda n: _is_refiner(n) and "_attention_" not in n, 8),
        ({"attn_dim": "0"}, lambda n: "_attention_" in n, None),
        ({"train_block_indices": "1,3"}, lambda n: n.startswith(("lora_unet_layers_0_", "lora_unet_layers_2_")), None),
        ({"network_reg_dims": "refiner=0"}, _is_refiner, None),  # the reference's train_blocks=transformer
        ({"verbose": "True"}, lambda n: False, None),
    ],
)  # fmt: skip
def test_lumina_network_args_change_exactly_the_modules_they_name(loaded, network_args, changed, rank):
    family, models = loaded
    default = network_ranks(family, models)
    ranks = network_ranks(family, models, **network_args)
    differ = {name for name in default.keys() | ranks.keys() if default.get(name) != ranks.get(name)}
    expected = {name for name in default if changed(name)}
    assert differ == expected and (expected or network_args == {"verbose": "True"})
    assert all(ranks.get(name) == rank for name in expected)


def test_lumina_embedder_dims_add_the_x_t_and_caption_embedders(loaded):
    family, models = loaded
    default = network_ranks(family, models)
    ranks = network_ranks(family, models, embedder_dims="[4,0,2]")
    added = {name: dim for name, dim in ranks.items() if name not in default}
    assert added == {"lora_unet_x_embedder": 4, "lora_unet_cap_embedder_1": 2}  # t_embedder: rank 0
    with pytest.raises(ConfigError, match="embedder_dims needs 3 dims"):
        network_ranks(family, models, embedder_dims="[4,4]")
    with pytest.raises(ConfigError, match="Did you mean 'attn_dim'"):
        network_ranks(family, models, atn_dim="4")


# ---- attention kernels -------------------------------------------------------------------------------------


def _forward(transformer: nn.Module, conditioning: dict) -> torch.Tensor:
    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    return transformer(latents, torch.tensor([0.3, 0.7]), conditioning["encoder_hidden_states"],
                       conditioning["encoder_attention_mask"], return_dict=False)[0]  # fmt: skip


def test_lumina_attention_processor_matches_diffusers_and_dispatches_kernels(loaded, monkeypatch):
    from diffusers.models import attention_dispatch

    family, models = loaded
    with torch.no_grad():
        conditioning = family.encode_text(models, CAPTIONS)  # two caption lengths: masks in every block list
        transformer = copy.deepcopy(models.denoiser)
        expected = _forward(transformer, conditioning)
        assert lumina_attention.set_processor(transformer, lumina_attention.LuminaAttnProcessor(None)) == 6
        assert torch.equal(_forward(transformer, conditioning), expected)
    backends = []

    def dispatch(query, key, value, attn_mask=None, scale=None, backend=None):  # stands in for the CUDA kernels
        backends.append(backend)
        return lumina_attention.attend(query, key, value, attn_mask, scale, None)

    monkeypatch.setattr(attention_dispatch, "dispatch_attention_fn", dispatch)
    lumina_attention.set_processor(transformer, lumina_attention.LuminaAttnProcessor("flash"))
    with torch.no_grad():
        assert torch.allclose(_forward(transformer, conditioning), expected, atol=1e-6)
    assert set(backends) == {"flash", "flash_varlen"}  # the noise refiner has no mask
    backends.clear()
    lumina_attention.set_processor(transformer, lumina_attention.LuminaAttnProcessor("sage"))
    _forward(transformer, conditioning)  # with gradients: SageAttention has no backward, PyTorch's kernel runs
    assert backends == []
    with torch.no_grad():
        _forward(transformer, conditioning)
    assert set(backends) == {"sage", "sage_varlen"}


def test_lumina_attention_kernels_refused_with_what_to_install(tiny, monkeypatch):
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(MissingPackageError, match="--use_flash_attn needs the flash_attn package.*pip install"):
            family_of(tiny, "--use_flash_attn", "--mixed_precision", "bf16")
    if importlib.util.find_spec("sageattention") is None:
        with pytest.raises(MissingPackageError, match="--use_sage_attn needs the sageattention package"):
            family_of(tiny, "--use_sage_attn", "--mixed_precision", "bf16")
    with pytest.raises(ConfigError, match="choose one"):
        family_of(tiny, "--use_flash_attn", "--use_sage_attn")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else
                        find_spec(name, *a))  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA GPUs only"):
        family_of(tiny, "--use_flash_attn", "--mixed_precision", "bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="add --mixed_precision bf16"):
        family_of(tiny, "--use_flash_attn")


# ---- block swap, caches, saving ----------------------------------------------------------------------------


def _lora_copy(transformer: nn.Module):
    model = copy.deepcopy(transformer)
    torch.manual_seed(5)  # the same adapters for every call
    network = lora_lumina.create_network(1.0, 4, 2, None, [], model)
    network.apply_to([], model, False, True)
    for module in network.all_loras():  # trained-looking adapters, so every gradient is non-zero
        nn.init.normal_(module.lora_up.weight, std=0.1)
    return model, network


@pytest.mark.parametrize(
    "memory", [{"blocks_to_swap": 2}, {"blocks_to_swap": 2, "gradient_checkpointing": True},
               {"cpu_offload_checkpointing": True, "gradient_checkpointing": True}],
)  # fmt: skip
def test_lumina_block_swap_outputs_and_gradients_equal_plain_run(loaded, memory):
    family, models = loaded
    with torch.no_grad():
        conditioning = family.encode_text(models, CAPTIONS)
    plain, plain_network = _lora_copy(models.denoiser)
    swapped, swapped_network = _lora_copy(models.denoiser)
    options = OffloadOptions(**memory)
    lists = [getattr(swapped, name) for name in LuminaFamily.block_list_names]
    runners = make_runners(lists, LuminaFamily.swap_counts(options.blocks_to_swap or 0), "cpu", options,
                           ResidencyRecorder())  # fmt: skip
    for runner in runners:
        runner.prepare()
    assert [runner.swap for runner in runners] == [2 if options.blocks_to_swap else 0]
    for _ in range(2):
        outputs = [_forward(model, conditioning) for model in (swapped, plain)]
        assert torch.equal(outputs[0], outputs[1])
        for output in outputs:
            output.square().mean().backward()
        for mine, reference in zip(swapped_network.parameters(), plain_network.parameters(), strict=True):
            assert mine.grad is not None and torch.allclose(mine.grad, reference.grad, atol=1e-7)
            mine.grad = reference.grad = None


def test_lumina_block_counts_come_from_file_and_folder(tiny):
    assert family_of(tiny).block_list_lengths() == [4]
    assert family_of(tiny, single_files=False).block_list_lengths() == [4]
    with pytest.raises(ConfigError, match="at most 2"):
        family_of(tiny, "--blocks_to_swap", "3")


def test_lumina_text_cache_is_keyed_by_the_system_prompt(loaded, tiny, tmp_path):
    from library.config.dataset_cli import DatasetSource
    from library.data.dataset import build_dataset_group
    from library.data.text_cache import fixed_captions
    from library.testing.toy_data import write_toy_dataset

    _, models = loaded
    group = build_dataset_group(DatasetSource(dataset_config=write_toy_dataset(str(tmp_path), count=2)), 0, 1.0)
    counts = []
    for prompt in (SYSTEM, SYSTEM, "You are an assistant"):
        family = family_of(tiny, "--gemma2_max_token_length", "32", "--system_prompt", prompt,
                           "--cache_text_encoder_outputs_to_disk")  # fmt: skip
        family.before_training(models, group)
        counts.append(family.text_cache_counts)
    assert counts == [(2, 0), (0, 2), (2, 0)]  # (encoded, read from disk): a new system prompt encodes again
    _, caption = fixed_captions(group)[0]
    cached = family.text_cache.lookup([caption], "cpu")
    with torch.no_grad():
        fresh = family.encode_text(models, [caption])
    assert torch.equal(cached["encoder_hidden_states"], fresh["encoder_hidden_states"])


def test_lumina_train_saves_the_released_layout_and_a_trained_gemma2(loaded, tiny, tmp_path):
    _, models = loaded
    family = family_of(tiny, "--train_text_encoder", method=FineTuneMethod)
    path = str(tmp_path / "out.safetensors")
    family.save_model(models, path, "safetensors", None, {"ss_test": "1"})
    assert load_file(path).keys() == load_file(tiny.files["transformer"]).keys()
    gemma2 = lumina_files.load_gemma2(str(tmp_path / "out_gemma2.safetensors"), torch.float32)
    expected = models.text_encoders[0].state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in gemma2.state_dict().items())


# ---- refusals before loading -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (["--v2"], ConfigError, "--v2 does not apply to Lumina Image 2.0"),
        (["--v_parameterization", "--clip_skip", "2"], ConfigError, "--clip_skip do not apply"),
        (["--xformers"], ConfigError, "--xformers does not apply"),
        (["--blocks_to_swap", "2", "--cpu_offload_checkpointing", "--gradient_checkpointing"], ConfigError,
         "cannot be combined"),
        (["--fp8_base"], ConfigError, "--mixed_precision bf16"),
        (["--gemma2_max_token_length", "0"], ConfigError, "must be 1 or more"),
        (["--gemma2", "missing.safetensors"], CheckpointError, "--gemma2: file not found"),
    ],
)  # fmt: skip
def test_lumina_options_refused_before_loading(tiny, extra, error, message):
    with pytest.raises(error, match=message):
        family_of(tiny, *extra)


def test_lumina_refusals_of_missing_files_full_training_and_sample_sizes(tiny, tmp_path):
    argv = ["--output_dir", "x", "--pretrained_model_name_or_path", tiny.files["transformer"]]
    with pytest.raises(ConfigError, match="add --gemma2, --ae"):
        LuminaFamily(build_parser(LuminaFamily, NetworkMethod, "t").parse_args(argv)).validate()
    with pytest.raises(ConfigError, match="lumina_train.py trains the transformer's weights"):
        family_of(tiny, "--fp8_base", "--mixed_precision", "bf16", method=FineTuneMethod)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w 72 --h 64\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="prompt 1 is drawn at 72x64.*multiples of 16"):
        family_of(tiny, "--sample_prompts", str(prompts))


def test_lumina_all_in_one_checkpoint_needs_no_other_files(tiny, tmp_path):
    prefixes = {"transformer": "model.diffusion_model.", "gemma2": "text_encoders.gemma2_2b.transformer.", "ae": "vae."}
    checkpoint = {}
    for component, prefix in prefixes.items():
        checkpoint.update({prefix + key: value for key, value in load_file(tiny.files[component]).items()})
    path = str(tmp_path / "lumina_2.safetensors")
    save_file(checkpoint, path)
    argv = ["--output_dir", "x", "--pretrained_model_name_or_path", path]
    family = LuminaFamily(build_parser(LuminaFamily, NetworkMethod, "t").parse_args(argv))
    family.validate()
    sources = family.options.sources()
    assert (sources.transformer, sources.gemma2, sources.ae) == (path, path, path)
    assert lumina_keys.component_of(checkpoint) == "checkpoint"


@pytest.mark.parametrize("family_name, keys, scripts", [
    ("flux", {"double_blocks.0.img_attn.qkv.weight"}, "flux_train_network.py / flux_train.py"),
    ("sd3", {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"}, "sd3_train_network.py / sd3_train.py"),
    ("flux-folder", None, "flux_train_network.py / flux_train.py"),
])  # fmt: skip
def test_lumina_scripts_name_the_right_script_for_other_models(tiny, toy_dataset, tmp_path, caplog, family_name, keys,
                                                              scripts):  # fmt: skip
    if keys is None:
        path = tmp_path / "flux-folder"
        path.mkdir()
        (path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}', encoding="utf-8")
    else:
        path = tmp_path / f"{family_name}.safetensors"
        save_file({key: torch.zeros(1) for key in keys}, str(path))
    argv = ["--pretrained_model_name_or_path", str(path), "--gemma2", tiny.files["gemma2"], "--ae", tiny.files["ae"],
            "--dataset_config", toy_dataset, "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
        train_in_process(argv, family="lumina")
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert stop.value.code == 1 and len(errors) == 1
    assert f"train it with {scripts}" in errors[0] and "not Lumina Image 2.0" in errors[0]
    assert not os.path.exists(tmp_path / "out" / "lora.safetensors")
