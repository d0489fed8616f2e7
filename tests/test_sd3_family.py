"""The `sd3` family on tiny models: conditioning equal to diffusers' pipeline, one prediction from every source format,
the objective's timesteps and weights, network args -> exact modules and ranks, block swapping, position-embedding
options, saving with the encoders, samples equal to the pipeline's, and the refusals made before any model loads."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.checkpoints import sd3_files, sd3_keys
from library.errors import CheckpointError, ConfigError
from library.families.flux import FluxFamily
from library.families.sd3 import SD3Family, joint_context
from library.families.sd3_positions import PositionCrop, scaled_grid
from library.methods.finetune import FineTuneMethod
from library.methods.network import NetworkMethod
from library.testing.sd_scripts_tokenizers import CLIP_G, CLIP_L, T5XXL
from library.training import flow_matching
from library.training.block_swap import OffloadOptions, make_runners
from library.training.entry import build_parser
from library.training.noise import NoiseOptions
from networks import lora
from tests.tokenizer_helpers import assert_sd_scripts_folder_untouched, assert_tokenizer_from

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait

T5_TOKENS = 16


@pytest.fixture(scope="module")
def files(tiny_family) -> dict[str, str]:
    return tiny_family("sd3").files


def sd3_args(files, *extra: str, model: str = "sd3.5m", method=NetworkMethod):
    argv = ["--output_dir", "unused", "--tokenizer_cache_dir", files["tokenizers"], "--pretrained_model_name_or_path",
            files.get(model, model), "--t5xxl_max_token_length", str(T5_TOKENS), *extra]  # fmt: skip
    return build_parser(SD3Family, method, "test").parse_args(argv)


def loaded_family(files, *extra: str, model: str = "sd3.5m", method=NetworkMethod):
    args = sd3_args(files, *extra, model=model, method=method)
    family = SD3Family(args)
    family.validate(method(args))
    return family, family.load(torch.float32)


@pytest.fixture(scope="module")
def loaded(files):
    return loaded_family(files)


def test_sd3_tokenizers_are_read_from_sd_scripts_layout_without_writing_there(sd_scripts_tokenizer_dir):
    clip_l, clip_g, t5 = sd3_files.load_tokenizers(cache_dir=sd_scripts_tokenizer_dir)
    for tokenizer, subfolder in ((clip_l, CLIP_L), (clip_g, CLIP_G), (t5, T5XXL)):
        assert_tokenizer_from(tokenizer, os.path.join(sd_scripts_tokenizer_dir, subfolder), "a red circle, toy picture")
    assert (clip_l.pad_token, clip_g.pad_token) == ("<|endoftext|>", "!")
    assert_sd_scripts_folder_untouched(sd_scripts_tokenizer_dir)


def prediction(family, models, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 8, 8, generator=generator)
    with torch.no_grad():
        conditioning = family.encode_text(models, ["a red circle, toy picture"])
        inputs = family.training_inputs(latents, generator, NoiseOptions(), torch.tensor([700.0]))
        return family.predict(models, inputs.noisy_latents, inputs.timesteps, conditioning)


def test_sd3_conditioning_equals_diffusers_pipeline_encode(loaded):
    family, models = loaded
    pipeline = sd3_files.build_pipeline(family.sd3_models(models), models.tokenizers)
    prompts = ["a red circle", "a blue square on a green toy picture"]
    with torch.no_grad():
        encoded = family.encode_text(models, prompts)
        context, pooled = joint_context(encoded, 40, "cpu", torch.float32)
        theirs, _, theirs_pooled, _ = pipeline.encode_prompt(prompts, None, None, device="cpu",
                                                             do_classifier_free_guidance=False,
                                                             max_sequence_length=T5_TOKENS)  # fmt: skip
    assert encoded["clip_l_hidden"].shape == (2, 77, 16) and encoded["clip_g_hidden"].shape == (2, 77, 24)
    assert encoded["t5_hidden"].shape == (2, T5_TOKENS, 40) and encoded["clip_g_pooled"].shape == (2, 20)
    assert context.shape == (2, 77 + T5_TOKENS, 40) and pooled.shape == (2, 16 + 20)
    assert torch.equal(context, theirs) and torch.equal(pooled, theirs_pooled)


def test_sd3_single_file_separate_files_and_diffusers_folder_predict_the_same(loaded, files):
    family, models = loaded
    assert family.variant == "sd3.5-medium" and family.model_spec_architecture() == "stable-diffusion-v3.5-medium"
    separate = ("--clip_l", files["clip_l"], "--clip_g", files["clip_g"], "--t5xxl", files["t5xxl"])
    expected = prediction(family, models)
    for model, extra in (("sd3.5m-no-te", separate), ("sd3.5m-diffusers", ())):
        other, other_models = loaded_family(files, *extra, model=model)
        assert torch.allclose(prediction(other, other_models), expected, atol=1e-5)


def test_sd3_timesteps_follow_density_shift_and_range(loaded):
    family, _ = loaded
    latents = torch.randn(4096, 1, 1, 1)
    generator = torch.Generator().manual_seed(0)
    inputs = family.training_inputs(latents, generator, NoiseOptions(min_timestep=100, max_timestep=500))
    u = torch.rand(4096, generator=torch.Generator().manual_seed(0))  # uniform density, shift 1: the draws as they are
    assert torch.allclose(inputs.timesteps, (u * 400 + 100).floor(), atol=1e-4)  # whole steps, via sigma = t/1000
    assert torch.equal(inputs.target, latents) and torch.equal(inputs.weights, torch.ones(4096))
    options = flow_matching.FlowMatchingOptions(weighting_scheme="logit_normal")
    shifted = flow_matching.sample_shifted_timesteps(4096, options, torch.Generator(), 3.0, NoiseOptions())
    plain = flow_matching.sample_shifted_timesteps(4096, options, torch.Generator(), 1.0, NoiseOptions())
    assert shifted.mean() > plain.mean() + 150 and plain.min() >= 1 and shifted.max() <= 1000


def test_sd3_weighting_schemes_weight_the_loss_like_the_reference(files):
    family = SD3Family(sd3_args(files, "--weighting_scheme", "sigma_sqrt"))
    inputs = family.training_inputs(torch.randn(3, 16, 2, 2), None, NoiseOptions(), torch.tensor([250.0, 500, 1000]))
    assert torch.allclose(inputs.weights, torch.tensor([16.0, 4.0, 1.0]))
    latents, velocity = torch.randn(1, 16, 2, 2), torch.randn(1, 16, 2, 2)
    noisy = family.training_inputs(latents, None, NoiseOptions(), torch.tensor([250.0])).noisy_latents
    clean = flow_matching.prediction_for_loss(velocity, noisy, torch.tensor([250.0]), family.options.flow)
    assert torch.allclose(clean, noisy - 0.25 * velocity)  # model_pred * (-sigma) + noisy_model_input
    uniform = flow_matching.FlowMatchingOptions(weighting_scheme="uniform")  # the reference's name of none
    assert torch.equal(flow_matching.loss_weights(torch.tensor([0.1, 0.9]), uniform), torch.ones(2))
    assert build_parser(FluxFamily, NetworkMethod, "test").get_default("weighting_scheme") == "none"  # unchanged


def network_ranks(family, models, *args: str) -> dict[str, int]:
    kwargs = dict(arg.split("=", 1) for arg in args)
    network = lora.create_network(1.0, 4, 1, models.vae, family.network_text_encoders(models), models.denoiser,
                                  adapter_targets=family.adapter_targets(models), **kwargs)  # fmt: skip
    return {module.lora_name: module.rank_and_alpha()[0] for module in network.text_encoder_loras + network.unet_loras}


def changed(base: dict[str, int], other: dict[str, int]) -> set[str]:
    return {name for name in base.keys() | other.keys() if base.get(name) != other.get(name)}


def test_sd3_network_args_change_exactly_the_modules_they_name(loaded):
    family, models = loaded
    base = network_ranks(family, models)
    assert not any(name.startswith("lora_te3") for name in base)  # T5 only with train_t5xxl
    assert not any("embedder" in name or "final_layer" in name for name in base)  # only with emb_dims
    blocks = [name for name in base if name.startswith("lora_unet_joint_blocks_")]
    assert len(blocks) == len([name for name in base if name.startswith("lora_unet")])
    for side in ("context", "x"):
        for part, words in (("attn", ("_attn_", "_attn2_")), ("mlp", ("_mlp_",)), ("mod", ("_adaLN_modulation_",))):
            ranks = network_ranks(family, models, f"{side}_{part}_dim=2")
            expected = {name for name in blocks if f"_{side}_block_" in name and any(word in name for word in words)}
            assert expected and changed(base, ranks) == expected and {ranks[name] for name in expected} == {2}
    ranks = network_ranks(family, models, "emb_dims=[1,2,0,3,5,6]")
    assert changed(base, ranks) == {
        "lora_unet_context_embedder", "lora_unet_t_embedder_mlp_0", "lora_unet_t_embedder_mlp_2",
        "lora_unet_y_embedder_mlp_0", "lora_unet_y_embedder_mlp_2", "lora_unet_final_layer_adaLN_modulation_1",
        "lora_unet_final_layer_linear",
    }  # fmt: skip
    assert ranks["lora_unet_t_embedder_mlp_0"] == 2 and ranks["lora_unet_final_layer_linear"] == 6
    ranks = network_ranks(family, models, "emb_dims=[0,0,4,0,0,0]")  # the patch embedding, a convolution
    assert changed(base, ranks) == {"lora_unet_x_embedder_proj"} and ranks["lora_unet_x_embedder_proj"] == 4
    ranks = network_ranks(family, models, "train_block_indices=0,2")
    assert changed(base, ranks) == {name for name in blocks if name.startswith("lora_unet_joint_blocks_1_")}
    assert network_ranks(family, models, "train_block_indices=none").keys() == {n for n in base if "_te" in n[:8]}
    assert network_ranks(family, models, "train_block_indices=all") == base
    t5 = changed(base, network_ranks(family, models, "train_t5xxl=True"))
    assert t5 and all(name.startswith("lora_te3_encoder_block_") for name in t5)
    assert changed(base, network_ranks(family, models, "verbose=True")) == set()


def test_sd3_lora_names_are_the_single_files_module_names(loaded, files):
    family, models = loaded
    table = family.adapter_targets(models)
    keys = load_file(files["sd3.5m"]).keys()
    prefixes = {"lora_unet_": "model.diffusion_model.", "lora_te1_": "text_encoders.clip_l.transformer.",
                "lora_te2_": "text_encoders.clip_g.transformer.", "lora_te3_": "text_encoders.t5xxl.transformer."}
    known = {kohya + key[len(prefix) : -len(".weight")].replace(".", "_") for kohya, prefix in prefixes.items()
             for key in keys if key.startswith(prefix) and key.endswith(".weight")}  # fmt: skip
    names = {target.name for target in table.targets}
    assert names <= known  # ComfyUI maps every lora_unet_ / lora_te*_ name to the file's module of that name
    assert {"lora_unet_joint_blocks_0_x_block_attn2_qkv", "lora_te3_encoder_block_0_layer_0_SelfAttention_q"} <= names
    swapped = {target.name for target in table.targets if target.swapped_halves}
    assert swapped == {"lora_unet_final_layer_adaLN_modulation_1",
                       "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1"}  # fmt: skip
    qkv = table.by_name()["lora_unet_joint_blocks_1_context_block_attn_qkv"]
    assert [layer is getattr(models.denoiser.transformer_blocks[1].attn, name) for layer, name in
            zip(qkv.layers, ("add_q_proj", "add_k_proj", "add_v_proj"))] == [True] * 3  # fmt: skip


def test_sd3_block_swap_outputs_and_gradients_equal_no_swap(files):
    family, models = loaded_family(files, model="sd3")
    models.denoiser.requires_grad_(True)
    swapped = copy.deepcopy(models)
    options = OffloadOptions(blocks_to_swap=2, gradient_checkpointing=True)
    runners = make_runners([swapped.denoiser.transformer_blocks], SD3Family.swap_counts(2), "cpu", options)
    for runner in runners:
        runner.prepare()
    assert [runner.swap for runner in runners] == [2]
    for _ in range(2):
        outputs = []
        for current in (models, swapped):
            output = trained_prediction(family, current)
            output.square().mean().backward()
            outputs.append(output.detach())
        assert torch.allclose(outputs[0], outputs[1], atol=1e-6)  # a plain copy differs as much (kernel paths)
        for mine, reference in zip(swapped.denoiser.parameters(), models.denoiser.parameters()):
            assert torch.allclose(mine.grad, reference.grad, atol=1e-6)
            mine.grad = reference.grad = None


def trained_prediction(family, models) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 8, 8, generator=generator)
    with torch.no_grad():
        conditioning = family.encode_text(models, ["a red circle, toy picture"])
    inputs = family.training_inputs(latents, generator, NoiseOptions(), torch.tensor([700.0]))
    return family.predict(models, inputs.noisy_latents, inputs.timesteps, conditioning)


def test_sd3_text_encoder_dropout_zeroes_each_encoder_on_its_own(files):
    family, models = loaded_family(files, "--clip_g_dropout_rate", "1.0")
    with torch.no_grad():
        dropped = family.encode_conditioning(models, ["a red circle", "a blue square"], {})
        kept = family.encode_text(models, ["a red circle", "a blue square"])
    assert not dropped["clip_g_hidden"].any() and not dropped["clip_g_pooled"].any()
    for key in ("clip_l_hidden", "clip_l_pooled", "t5_hidden"):
        assert torch.equal(dropped[key], kept[key])


def test_sd3_position_crop_is_diffusers_centre_unless_asked(loaded):
    _, models = loaded
    patch = models.denoiser.pos_embed
    centre = patch.cropped_pos_embed(8, 6)
    crop = PositionCrop(patch, random_rate=1.0)
    assert torch.equal(crop.crop(8, 6), centre)  # outside training(): the centre, as sampling needs
    with crop.training():
        moved = [crop.crop(8, 6) for _ in range(4)]
    assert moved[0].shape == centre.shape and any(not torch.equal(item, centre) for item in moved)
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    assert torch.allclose(scaled_grid(32, 16, 16), get_2d_sincos_pos_embed(32, 16, base_size=16), atol=1e-6)
    scaled = PositionCrop(patch, sizes=[8, 16])  # latent sides 8 and 16: token sides 4 and 8, grids of 6 and 12
    assert scaled.crop(8, 8).shape == (1, 16, 32) and scaled.crop(16, 12).shape == (1, 48, 32)
    assert sorted(scaled.scaled.grids) == [4, 8]


def test_sd3_finetune_freezes_last_blocks_and_saves_the_encoders(files, tmp_path):
    args = ("--num_last_block_to_freeze", "2", "--train_text_encoder", "--save_t5xxl", "--learning_rate_te2", "0.5")
    family, models = loaded_family(files, *args, method=FineTuneMethod)
    assert family.saved_text_encoders() == ("clip_l", "clip_g", "t5xxl") and len(models.text_encoders) == 2
    assert family.text_encoder_learning_rates(1e-4) == [1e-4, 0.5, 1e-4]
    models.denoiser.requires_grad_(True)
    groups = family.denoiser_param_groups(models.denoiser, 1e-5)
    frozen = {id(param) for block in models.denoiser.transformer_blocks[1:] for param in block.parameters()}
    assert not any(id(param) in frozen for param in groups[0]["params"]) and groups[0]["lr"] == 1e-5
    assert not any(id(param) in frozen and param.requires_grad for param in models.denoiser.parameters())
    path = str(tmp_path / "saved.safetensors")
    family.save_model(models, path, "safetensors", None, {"ss_steps": "0"})
    original = load_file(files["sd3.5m"])
    saved = load_file(path)
    assert saved.keys() == original.keys()  # MMDiT, VAE, CLIP-L, CLIP-G, T5 and the file's extras
    assert all(torch.equal(saved[key], original[key]) for key in original)


def test_sd3_sample_inputs_draw_what_the_pipeline_draws_from_text(loaded):
    family, models = loaded
    ours = family.make_pipeline(models, family.sample_scheduler("euler"))
    theirs = sd3_files.build_pipeline(family.sd3_models(models), models.tokenizers)
    settings = {"height": 64, "width": 48, "num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "pt"}
    with torch.no_grad():
        inputs = family.sample_prompt_inputs(models, "a red circle", "blurry")
        mine = ours(**inputs, generator=torch.Generator().manual_seed(3), **settings).images
        reference = theirs(prompt="a red circle", negative_prompt="blurry", max_sequence_length=T5_TOKENS,
                           generator=torch.Generator().manual_seed(3), **settings).images  # fmt: skip
    assert mine.shape == (1, 3, 64, 48) and torch.allclose(mine, reference, atol=1e-5)


def test_sd3_t5xxl_dtype_and_device_options(files):
    family, models = loaded_family(files, "--t5xxl_dtype", "bf16", "--t5xxl_device", "cpu")
    t5 = family.t5(models)
    assert t5.dtype == torch.bfloat16 and models.text_encoders[0].dtype == torch.float32
    family.place_models(models, torch.device("cpu"))
    assert family.encode_text(models, ["a red circle"])["t5_hidden"].dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="cuda:99: this machine has no such CUDA device"):
        SD3Family(sd3_args(files, "--t5xxl_device", "cuda:99")).validate()


@pytest.mark.parametrize(
    ("extra", "method", "error", "message"),
    [
        (("--v2", "--clip_skip", "2"), NetworkMethod, ConfigError, "--v2, --clip_skip: SD 1.x / 2.x options"),
        (("--v_parameterization",), NetworkMethod, ConfigError, "do not apply to SD3"),
        (("--blocks_to_swap", "2"), NetworkMethod, ConfigError, "at most 1"),
        (("--blocks_to_swap", "1", "--cpu_offload_checkpointing", "--gradient_checkpointing"), NetworkMethod,
         ConfigError, "cannot be combined"),
        (("--train_t5xxl",), FineTuneMethod, ConfigError, "add --train_text_encoder"),
        (("--num_last_block_to_freeze", "4"), FineTuneMethod, ConfigError, "has 3 joint blocks"),
        (("--fp8_base", "--mixed_precision", "bf16"), FineTuneMethod, ConfigError, "remove the option"),
        (("--clip_l_dropout_rate", "1.5"), NetworkMethod, ConfigError, "between 0 and 1"),
        (("--training_shift", "0"), NetworkMethod, ConfigError, "above 0"),
    ],
)  # fmt: skip
def test_sd3_refuses_options_before_loading(files, extra, method, error, message):
    args = sd3_args(files, *extra, method=method)
    with pytest.raises(error, match=message):
        SD3Family(args).validate(method(args))


def test_sd3_refuses_missing_encoders_and_other_families_files(files, tmp_path):
    with pytest.raises(ConfigError, match="add --clip_l --clip_g --t5xxl"):
        SD3Family(sd3_args(files, model="sd3.5m-no-te")).validate()
    flux = str(tmp_path / "flux1-dev.safetensors")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, flux)
    sdxl = str(tmp_path / "sdxl.safetensors")
    save_file({"conditioner.embedders.0.transformer.x.weight": torch.zeros(1)}, sdxl)
    refusals = ((flux, NetworkMethod, "flux_train_network.py"), (flux, FineTuneMethod, "flux_train.py"),
                (sdxl, NetworkMethod, "sdxl_train_network.py"))  # fmt: skip
    for path, method, script in refusals:
        args = sd3_args(files, model=path, method=method)
        with pytest.raises(CheckpointError, match=f"which this script does not train: train it with {script}$"):
            SD3Family(args).validate(method(args))


def test_sd3_metadata_names_the_variant_and_objective(files):
    family, models = loaded_family(files, "--weighting_scheme", "mode", "--training_shift", "3", model="sd3")
    metadata = family.training_metadata()
    assert family.model_spec_architecture() == "stable-diffusion-v3-medium"
    assert metadata["ss_base_model_version"] == "sd3-medium"
    assert metadata["ss_weighting_scheme"] == "mode" and metadata["ss_training_shift"] == "3.0"
    assert sd3_keys.variant(dict(family.sd3_models(models).transformer.config)) == "sd3-medium"
    from library.lora_tools.models import detect_family

    assert detect_family(metadata) == "sd3"  # the LoRA tools find the family from the file


def test_sd3_lora_saved_for_diffusers_loads_in_the_pipeline_with_the_same_effect(loaded, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    family, models = loaded
    ours, theirs = copy.deepcopy(models.denoiser), copy.deepcopy(models.denoiser)
    torch.manual_seed(0)
    network = lora.create_network(1.0, 4, 2, None, [], ours, adapter_targets=family.adapter_targets_for([], ours),
                                  save_format="diffusers", emb_dims="[2,2,0,2,2,2]")  # fmt: skip
    network.apply_to([], ours, False, True)
    for adapter in network.all_loras():  # trained-looking adapters: every module changes the output
        torch.nn.init.normal_(adapter.lora_up.weight, std=0.1)
    path = str(tmp_path / "lora.safetensors")
    network.save_weights(path, None, None)
    pipeline = StableDiffusion3Pipeline(transformer=theirs, scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipeline.load_lora_weights(path)  # fused q|k|v split into diffusers' three, final modulation in diffusers' order
    generator = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 16, 8, 8, generator=generator),
              "encoder_hidden_states": torch.randn(1, 20, 40, generator=generator),
              "pooled_projections": torch.randn(1, 36, generator=generator), "timestep": torch.tensor([500.0])}
    with torch.no_grad():
        mine, reference, base = (model(**inputs).sample for model in (ours, theirs, models.denoiser))
    assert torch.allclose(mine, reference, atol=1e-5) and not torch.allclose(mine, base, atol=1e-3)


def test_sd3_fp8_base_stores_mmdit_and_encoders_in_float8(files):
    args = sd3_args(files, "--fp8_base", "--mixed_precision", "bf16")
    family = SD3Family(args)
    family.validate(NetworkMethod(args))
    models = family.load(torch.bfloat16)
    for model in (models.denoiser, *models.text_encoders, family.t5(models)):
        assert any(layer.weight.dtype == torch.float8_e4m3fn for layer in model.modules()
                   if isinstance(layer, torch.nn.Linear))  # fmt: skip
    assert models.denoiser.pos_embed.proj.weight.dtype == torch.bfloat16  # kept in the compute dtype
    assert torch.isfinite(prediction(family, models)).all()
