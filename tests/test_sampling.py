"""Sample images: prompt files, sampler names, schedule, the drawing pass, and the CLI run that must not change."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from library.errors import ConfigError, MissingPackageError
from library.families.sd import make_noise_scheduler
from library.training.sampling import (
    SAMPLER_NAMES,
    SAMPLERS,
    SampleOptions,
    SamplePrompt,
    canonical_sampler,
    draw_samples,
    make_scheduler,
    parse_prompt_line,
    read_prompt_file,
    sample_size,
)
from tests.conftest import run_cli
from tests.dataset_helpers import write_images
from tests.test_train_network_e2e import train_args

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait


PROMPTS_TXT = """# prompt 1: every option
a red circle, toy picture --n blurry, dark --w 64 --h 64 --d 3 --l 5.5 --s 2

# prompt 2: size not a multiple of 8, seed from the run
a blue square --w 100 --h 64 --s 2 --l 1
"""
SAMPLE_NAME = re.compile(r"^lora_(e\d{6}|\d{6})_(\d{2})_(\d{14})_(\d+)\.png$")


# ---- prompt files --------------------------------------------------------------------------------------------


def test_prompt_line_reads_every_option():
    prompt = parse_prompt_line("a cat, sitting --n blurry, low quality --w 96 --h 64 --d 3 --l 5.5 --s 2", "line 1")

    assert prompt == SamplePrompt("a cat, sitting", "blurry, low quality", 96, 64, 3, 5.5, 2)


def test_text_prompt_file_skips_comments_and_blank_lines_and_keeps_defaults(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\n\na dog\n  # indented comment\na cat --s 4\n", encoding="utf-8")

    prompts = read_prompt_file(str(path))

    assert prompts == [SamplePrompt("a dog"), SamplePrompt("a cat", sample_steps=4)]
    # no scale given: the family's default applies when drawing (7.5 for SD, 3.5 for FLUX)
    assert (prompts[0].width, prompts[0].seed, prompts[0].scale, prompts[0].sample_steps) == (None, None, None, 30)


def test_toml_prompt_file_applies_shared_defaults_to_each_entry(tmp_path):
    path = tmp_path / "prompts.toml"
    path.write_text(
        "[prompt]\nwidth = 96\nheight = 64\nscale = 4.0\nsample_steps = 3\n\n"
        "[[prompt.subset]]\nprompt = 'a dog'\nnegative_prompt = 'blurry'\nseed = 5\n\n"
        "[[prompt.subset]]\nprompt = 'a cat'\nwidth = 64\nsample_steps = 2\n",
        encoding="utf-8",
    )

    prompts = read_prompt_file(str(path))

    assert prompts == [
        SamplePrompt("a dog", "blurry", 96, 64, 5, 4.0, 3),
        SamplePrompt("a cat", "", 64, 64, None, 4.0, 2),
    ]


def test_json_prompt_file_reads_every_key(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(
        '[{"prompt": "a dog", "negative_prompt": "dark", "width": 64, "height": 96, "seed": 1, "scale": 6, '
        '"sample_steps": 2}, {"prompt": "a cat"}]',
        encoding="utf-8",
    )

    prompts = read_prompt_file(str(path))

    assert prompts == [SamplePrompt("a dog", "dark", 64, 96, 1, 6.0, 2), SamplePrompt("a cat")]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.txt", "a cat --x 3\n", r"p.txt line 1: unknown option --x"),
        ("p.txt", "# c\na cat --w wide\n", r"line 2: --w must be an integer, got 'wide'"),
        ("p.txt", "a cat --d 1 --d 2\n", r"--d is given twice"),
        ("p.txt", "a cat --s 0\n", r"sample_steps must be 1 or more"),
        ("p.txt", "# only a comment\n", r"holds no prompt"),
        ("p.toml", "[prompt]\n[[prompt.subset]]\nprompt = 'a'\nsamples_steps = 2\n", r"did you mean 'sample_steps'"),
        ("p.toml", "[[prompts]]\nprompt = 'a'\n", r"expected a \[prompt\] table"),
        ("p.json", '{"prompt": "a"}', r"expected a list of prompt objects"),
        ("p.json", '[{"prompt": "a", "width": 5.5}]', r"p.json\[0\]: width must be an integer"),
        ("p.json", '[{"negative_prompt": "a"}]', r"needs a text 'prompt'"),
    ],
)
def test_prompt_file_mistakes_name_file_entry_and_fix(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError, match=message):
        read_prompt_file(str(path))


# ---- options, samplers, sizes --------------------------------------------------------------------------------


def sample_options(*argv: str) -> SampleOptions:
    from library.training.sampling import add_sampling_arguments

    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    return SampleOptions.from_args(parser.parse_args(list(argv)))


def test_epoch_schedule_wins_over_step_schedule(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n", encoding="utf-8")

    both = sample_options("--sample_prompts", str(path), "--sample_every_n_steps", "2", "--sample_every_n_epochs", "3")
    steps = sample_options("--sample_prompts", str(path), "--sample_every_n_steps", "2")

    assert [both.due_after_step(step) for step in (2, 4)] == [False, False]
    assert [both.due_after_epoch(epoch) for epoch in (1, 3, 6)] == [False, True, True]
    assert [steps.due_after_step(step) for step in (1, 2, 3, 4)] == [False, True, False, True]
    assert not steps.due_after_epoch(1)


def test_sample_schedule_without_prompt_file_is_refused():
    with pytest.raises(ConfigError, match="add --sample_prompts"):
        sample_options("--sample_every_n_steps", "10")
    with pytest.raises(ConfigError, match="--sample_every_n_epochs must be 1 or more"):
        sample_options("--sample_every_n_epochs", "0")


def test_family_without_sampling_is_refused_before_loading(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n", encoding="utf-8")
    options = sample_options("--sample_prompts", str(path), "--sample_at_first")

    with pytest.raises(ConfigError, match="the flux family cannot draw sample images yet"):
        options.check_family(SimpleNamespace(id="flux", default_sample_size=None))


EXPECTED_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "k_lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "k_euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "k_euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "k_dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
}


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_every_sampler_name_maps_to_its_diffusers_scheduler_on_the_training_schedule():
    import importlib.util

    training = make_noise_scheduler(v_parameterization=True).config
    has_scipy = importlib.util.find_spec("scipy") is not None
    assert sorted(SAMPLER_NAMES) == sorted(EXPECTED_SCHEDULERS)
    assert {name: SAMPLERS[canonical_sampler(name)][0] for name in SAMPLER_NAMES} == EXPECTED_SCHEDULERS
    for name in SAMPLERS:  # the k_ aliases share these entries
        if name == "lms" and not has_scipy:
            with pytest.raises(MissingPackageError, match="needs scipy: pip install scipy"):
                make_scheduler(name, training)
            continue
        scheduler = make_scheduler(name, training)
        assert type(scheduler).__name__ == EXPECTED_SCHEDULERS[name], name
        assert scheduler.config.prediction_type == "v_prediction", name
        assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_end == 0.012, name
    assert make_scheduler("dpmsolver", training).config.algorithm_type == "dpmsolver"
    assert make_scheduler("dpmsolver++", training).config.algorithm_type == "dpmsolver++"
    assert make_scheduler("ddim", training).config.steps_offset == 1


def test_sample_size_is_rounded_down_to_a_multiple_of_8_and_defaults_to_the_family_size():
    assert sample_size(SamplePrompt("a", width=100, height=64), 512) == (96, 64)
    assert sample_size(SamplePrompt("a", width=8, height=70), 512) == (64, 64)
    assert sample_size(SamplePrompt("a"), 1024) == (1024, 1024)


def test_sample_size_follows_the_family_image_size_multiple():
    assert sample_size(SamplePrompt("a", width=104, height=72), 512, 16) == (96, 64)  # FLUX, SD3, Lumina: 16 px


# ---- the drawing pass ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_family(tiny_models_dir, tokenizer_dir):
    from library.families.sd import SDFamily
    from tests.training_helpers import parsed_args

    args = parsed_args("sd", ["--pretrained_model_name_or_path", os.path.join(tiny_models_dir, "sd1.safetensors"),
                              "--tokenizer_cache_dir", tokenizer_dir, "--clip_skip", "2"])
    family = SDFamily(args)
    return family, family.load(torch.float32)


def fake_run(family, models, tmp_path, prompts: list[SamplePrompt], trainable: list[torch.nn.Module]):
    accelerator = SimpleNamespace(
        device=torch.device("cpu"),
        is_main_process=True,
        wait_for_everyone=lambda: None,
        autocast=contextlib.nullcontext,
    )
    options = SimpleNamespace(
        sampling=SampleOptions(at_first=True, prompts=prompts, sampler="euler_a"),
        loop=SimpleNamespace(output_dir=str(tmp_path), output_name="run", seed=100),
    )
    return SimpleNamespace(
        family=family,
        models=models,
        method=SimpleNamespace(trainable_modules=lambda: trainable),
        optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1),
        accelerator=accelerator,
        options=options,
        state=SimpleNamespace(global_step=12),
        ema=None,
    )


def test_drawing_uses_eval_mode_and_restores_modes_and_random_state(sd_family, tmp_path):
    family, models = sd_family
    adapter = torch.nn.Dropout(0.5)  # stands in for a trainable network in training mode
    adapter.train()
    models.denoiser.train()
    seen_modes = []
    hook = models.denoiser.register_forward_pre_hook(lambda module, args: seen_modes.append(module.training))
    run = fake_run(
        family, models, tmp_path, [SamplePrompt("a red circle", width=64, height=64, sample_steps=2)], [adapter]
    )
    torch.manual_seed(1234)
    expected_next = torch.rand(4)
    torch.manual_seed(1234)

    try:
        paths = draw_samples(run)
    finally:
        hook.remove()
        models.denoiser.eval()

    assert torch.equal(torch.rand(4), expected_next)  # the global generator is where it was
    assert seen_modes and not any(seen_modes)
    assert adapter.training
    assert [os.path.basename(path) for path in paths] == [f"run_000012_00_{paths[0].split('_')[-2]}_100.png"]
    assert Image.open(paths[0]).size == (64, 64)


def test_same_seed_draws_the_same_image_and_clip_skip_reaches_the_embeddings(sd_family, tmp_path):
    family, models = sd_family
    prompts = [SamplePrompt("a red circle", width=64, height=64, seed=5, sample_steps=2)] * 2
    run = fake_run(family, models, tmp_path, prompts, [])

    first, second = draw_samples(run)
    with torch.no_grad():
        inputs = family.sample_prompt_inputs(models, "a red circle", "")
        encoder = models.text_encoders[0]
        ids = models.tokenizers[0](["a red circle"], padding="max_length", max_length=77, return_tensors="pt")
        hidden = encoder(ids.input_ids, output_hidden_states=True).hidden_states[-2]
        penultimate = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)

    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    torch.testing.assert_close(inputs["prompt_embeds"], penultimate)


def test_sdxl_draws_at_the_asked_size_with_zeros_for_an_empty_negative_prompt(tokenizer_dir, tmp_path):
    from library.families.base import LoadedModels
    from library.families.sdxl import SDXLFamily
    from library.methods.network import NetworkMethod
    from library.testing.tiny_sdxl import build_models
    from library.training.entry import build_parser

    argv = [
        "--pretrained_model_name_or_path",
        "unused",
        "--output_dir",
        "unused",
        "--tokenizer_cache_dir",
        tokenizer_dir,
    ]
    family = SDXLFamily(build_parser(SDXLFamily, NetworkMethod, "test").parse_args(argv))
    tiny = build_models()
    models = LoadedModels(tiny.unet, tiny.vae, [tiny.text_encoder1, tiny.text_encoder2], family._tokenizers(None))
    run = fake_run(family, models, tmp_path, [SamplePrompt("a red circle", width=64, height=96, sample_steps=1)], [])

    with torch.no_grad():
        empty = family.sample_prompt_inputs(models, "a red circle", "")
        negative = family.sample_prompt_inputs(models, "a red circle", "blurry")
    (path,) = draw_samples(run)

    assert not empty["negative_prompt_embeds"].any() and not empty["negative_pooled_prompt_embeds"].any()
    assert negative["negative_prompt_embeds"].any() and negative["negative_pooled_prompt_embeds"].any()
    assert torch.equal(empty["prompt_embeds"], negative["prompt_embeds"])
    assert empty["pooled_prompt_embeds"].shape == (1, tiny.text_encoder2.config.projection_dim)
    assert Image.open(path).size == (64, 96)
    assert family.default_sample_size == 1024


# ---- end to end ----------------------------------------------------------------------------------------------


def dataset_with_validation(toy_dataset: str, folder: Path) -> str:
    """The toy dataset plus an `is_val` subset of three images (two buckets)."""
    val_dir = write_images(folder / "val", [(64, 64), (96, 64), (64, 64)], {0: "a red circle", 1: "a", 2: "b"})
    config = folder / "data.toml"
    val_subset = f"\n  [[datasets.subsets]]\n  image_dir = '{val_dir.as_posix()}'\n  is_val = true\n"
    config.write_text(Path(toy_dataset).read_text(encoding="utf-8") + val_subset, encoding="utf-8")
    return str(config)


@functools.cache
def training_runs(models_dir: str, toy_dataset: str, tokenizer_dir: str, root: Path) -> dict[str, SimpleNamespace]:
    """The same training run with and without sample images and step validations in between (the second run
    validates after each epoch only, the default with validation images).

    Cached: tests/test_validation.py reads the same runs, and each end-to-end run costs seconds.
    """
    root.mkdir(parents=True, exist_ok=True)
    prompts = root / "prompts.txt"
    prompts.write_text(PROMPTS_TXT, encoding="utf-8")
    model = os.path.join(models_dir, "sd1.safetensors")
    dataset = dataset_with_validation(toy_dataset, root)
    common = ("--network_dropout", "0.2")  # dropout draws random numbers: sampling must not shift them
    sampling = ("--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--sample_at_first")
    validation = ("--validate_every_n_steps", "2", "--logging_dir", str(root / "logs"))
    results = {}
    for name, extra in (("with", (*common, *sampling, *validation)), ("without", common)):
        args = train_args(model, dataset, str(root / name), tokenizer_dir, *extra)
        args[args.index("--max_train_steps") + 1] = "8"  # one epoch (7 steps) and one step of the next
        result = run_cli(args, root)
        assert result.returncode == 0, result.stdout + result.stderr
        results[name] = SimpleNamespace(folder=root / name, output=result.stderr + result.stdout, logs=root / "logs")
    return results


@pytest.fixture(scope="session")
def sampled_runs(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path_factory) -> dict[str, SimpleNamespace]:
    return training_runs(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path_factory.getbasetemp() / "sampling")


def test_samples_are_written_with_names_sizes_and_settings(sampled_runs):
    folder = sampled_runs["with"].folder / "sample"
    names = sorted(os.listdir(folder))
    parsed = [SAMPLE_NAME.match(name).groups() for name in names]

    assert [(when, index, seed) for when, index, _, seed in parsed] == [
        ("000000", "00", "3"), ("000000", "01", "8"),
        ("000002", "00", "3"), ("000002", "01", "8"),
        ("000004", "00", "3"), ("000004", "01", "8"),
        ("000006", "00", "3"), ("000006", "01", "8"),
        ("000008", "00", "3"), ("000008", "01", "8"),
    ]  # fmt: skip
    sizes = {Image.open(folder / name).size for name in names if "_00_" in name}
    assert sizes == {(64, 64)}
    assert {Image.open(folder / name).size for name in names if "_01_" in name} == {(96, 64)}
    settings = Image.open(folder / names[0]).text["parameters"]
    assert settings == (
        "a red circle, toy picture\nNegative prompt: blurry, dark\n"
        "Steps: 2, Sampler: ddim, CFG scale: 5.5, Seed: 3, Size: 64x64"
    )
    assert not (sampled_runs["without"].folder / "sample").exists()


def test_sampling_during_training_does_not_change_the_trained_weights(sampled_runs):
    with_samples = load_file(str(sampled_runs["with"].folder / "lora.safetensors"))
    without = load_file(str(sampled_runs["without"].folder / "lora.safetensors"))

    assert with_samples.keys() == without.keys()
    assert all(torch.equal(with_samples[key], without[key]) for key in without)


def test_last_sample_matches_diffusers_inference_with_the_saved_lora(sampled_runs, tiny_models_dir):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(os.path.join(tiny_models_dir, "sd1-diffusers"))
    pipeline.scheduler = make_scheduler("ddim", make_noise_scheduler(v_parameterization=False).config)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(str(sampled_runs["with"].folder / "lora.safetensors"))
    image = pipeline(
        "a red circle, toy picture", negative_prompt="blurry, dark", width=64, height=64, num_inference_steps=2,
        guidance_scale=5.5, generator=torch.Generator().manual_seed(3),
    ).images[0]  # fmt: skip
    folder = sampled_runs["with"].folder / "sample"
    last = min(name for name in os.listdir(folder) if name.startswith("lora_000008_00_"))

    ours = np.asarray(Image.open(folder / last), dtype=np.int16)
    assert np.abs(ours - np.asarray(image, dtype=np.int16)).max() <= 1


def test_families_default_sample_scale_suits_their_guidance():
    from library.families import get_family_class

    assert get_family_class("sd").default_sample_scale == 7.5
    assert get_family_class("sdxl").default_sample_scale == 7.5
    assert get_family_class("flux").default_sample_scale == 3.5
