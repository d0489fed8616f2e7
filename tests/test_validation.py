"""Validation: held-out images (validation_split, is_val), fixed-timestep loss, options, and the logged values."""

from __future__ import annotations

import contextlib
import os
import re

import pytest
import torch

from library.config.dataset_config import load_dataset_config
from library.errors import ConfigError, DatasetError
from library.training.noise import NoiseOptions
from library.training.validation import VALIDATION_TIMESTEPS, ValidationOptions, validation_losses
from tests.dataset_helpers import all_batches, group_of, one_dataset, subset_lines, write_config, write_images
from tests.test_sampling import training_runs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait


@pytest.fixture(scope="session")
def sampled_runs(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path_factory) -> dict:
    """The end-to-end runs of tests/test_sampling.py (made once per session, whichever file asks first)."""
    return training_runs(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path_factory.getbasetemp() / "sampling")


def folder_of(tmp_path, name: str, count: int):
    return write_images(tmp_path / name, [(64, 64)] * count, {index: f"{name} {index}" for index in range(count)})


def paths_of(group) -> set[str]:
    return {path for batch in all_batches(group) for path in batch["image_paths"]}


# ---- splitting the dataset -----------------------------------------------------------------------------------


def test_validation_split_holds_out_a_share_never_trained_on(tmp_path):
    images = folder_of(tmp_path, "train", 10)
    config = one_dataset(tmp_path, "resolution = 64\nbatch_size = 2\nvalidation_split = 0.3", subset_lines(images))

    group = group_of(config, seed=1)

    train, held_out = paths_of(group), paths_of(group.validation)
    assert (len(train), len(held_out)) == (7, 3)
    assert not train & held_out
    assert group.num_train_images == 7
    assert len(group.validation) == 2  # batches of 2: one full, one with the third image


def test_validation_split_is_fixed_by_seed_and_validation_seed(tmp_path):
    images = folder_of(tmp_path, "train", 10)
    split = "resolution = 64\nvalidation_split = 0.3"
    config = one_dataset(tmp_path, split, subset_lines(images))
    seeded = write_config(tmp_path, config.read_text().replace(split, split + "\nvalidation_seed = 9"), "seeded.toml")

    first, again, other = (paths_of(group_of(config, seed=seed).validation) for seed in (1, 1, 2))
    with_validation_seed = {frozenset(paths_of(group_of(seeded, seed=seed).validation)) for seed in (1, 2)}

    assert first == again and first != other
    assert len(with_validation_seed) == 1


def test_is_val_subset_is_validation_only_without_repeats_or_augmentation(tmp_path):
    train, val, reg = folder_of(tmp_path, "train", 4), folder_of(tmp_path, "val", 3), folder_of(tmp_path, "reg", 2)
    config = one_dataset(
        tmp_path,
        "resolution = 64\nbatch_size = 1\nvalidation_split = 0.25",
        subset_lines(train, "num_repeats = 2"),
        subset_lines(val, "is_val = true\nnum_repeats = 5\nflip_aug = true\nshuffle_caption = true"),
        subset_lines(reg, "is_reg = true"),
    )

    group = group_of(config, seed=3)

    held_out = paths_of(group.validation)
    assert {os.path.basename(os.path.dirname(path)) for path in held_out} == {"train", "val"}
    assert len(held_out) == 3 + 1  # the is_val subset and a quarter of the 4 training images (reg never)
    assert len(group.validation) == 4  # once each: num_repeats does not apply to validation
    val_subset = next(s for s in group.validation.datasets[0].subsets if s.is_val)
    assert (val_subset.num_repeats, val_subset.flip_aug, val_subset.shuffle_caption) == (1, False, False)
    assert not any("val" == os.path.basename(os.path.dirname(path)) for path in paths_of(group))
    assert group.num_reg_images == 2 and group.num_train_images == 3 * 2


def test_validation_batches_are_the_same_at_every_pass(tmp_path):
    images = folder_of(tmp_path, "train", 6)
    config = one_dataset(tmp_path, "resolution = 64\nvalidation_split = 0.5", subset_lines(images, "flip_aug = true"))
    group = group_of(config, seed=0)

    first, second = all_batches(group.validation), all_batches(group.validation)

    assert [batch["captions"] for batch in first] == [batch["captions"] for batch in second]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize(
    ("dataset", "subset", "error", "message"),
    [
        ("resolution = 64", "is_val = true\nis_reg = true", ConfigError, "sets both is_val and is_reg"),
        ("resolution = 64\nvalidation_split = 1.0", "", ConfigError, r"up to \(not including\) 1"),
        ("resolution = 64\nvalidation_split = 0.9", "", DatasetError, "leaving none to train on"),
        ("resolution = 64", "is_val = true", DatasetError, "every subset is a validation subset"),
    ],
)
def test_impossible_validation_settings_are_refused(tmp_path, dataset, subset, error, message):
    images = folder_of(tmp_path, "train", 3)
    config = one_dataset(tmp_path, dataset, subset_lines(images, subset))

    with pytest.raises(error, match=message):
        group_of(config)


def test_validation_options_need_validation_images_and_default_to_every_epoch(tmp_path):
    images = folder_of(tmp_path, "train", 4)
    plain = group_of(one_dataset(tmp_path, "resolution = 64", subset_lines(images)))
    split = group_of(write_config(tmp_path, load_config_text(images, 0.5), "split.toml"))

    with pytest.raises(ConfigError, match="need validation images: set validation_split"):
        ValidationOptions(every_n_steps=10).check_dataset(plain)
    default = ValidationOptions()
    default.check_dataset(split)
    assert default.due_after_epoch(1) and not default.due_after_step(1)
    steps = ValidationOptions(every_n_steps=3)
    steps.check_dataset(split)
    assert [steps.due_after_step(step) for step in (1, 3, 6)] == [False, True, True] and not steps.due_after_epoch(1)


def load_config_text(images, split: float) -> str:
    return f"[[datasets]]\nresolution = 64\nvalidation_split = {split}\n[[datasets.subsets]]\n{subset_lines(images)}\n"


def test_validation_options_are_read_from_the_dataset_table_path(tmp_path):
    images = folder_of(tmp_path, "train", 4)
    config = load_dataset_config(write_config(tmp_path, load_config_text(images, 0.25)))

    assert config.datasets[0].validation_split == 0.25 and config.datasets[0].validation_seed is None


# ---- the loss ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_models(tiny_models_dir, tokenizer_dir):
    from library.families.sd import SDFamily
    from tests.training_helpers import parsed_args

    args = parsed_args("sd", ["--pretrained_model_name_or_path", os.path.join(tiny_models_dir, "sd1.safetensors"),
                              "--tokenizer_cache_dir", tokenizer_dir])
    family = SDFamily(args)
    return family, family.load(torch.float32)


def test_training_inputs_use_given_timesteps_and_the_generators_noise(sd_models):
    family, _ = sd_models
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([100, 900])

    inputs = family.training_inputs(latents, torch.Generator().manual_seed(5), NoiseOptions(), timesteps=timesteps)

    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(inputs.timesteps, timesteps)
    torch.testing.assert_close(inputs.target, noise)
    torch.testing.assert_close(inputs.noisy_latents, family.noise_scheduler.add_noise(latents, noise, timesteps))


def test_validation_loss_is_the_same_for_the_same_weights_and_keeps_the_global_generator(sd_models, tmp_path):
    family, models = sd_models
    images = folder_of(tmp_path, "train", 4)
    group = group_of(write_config(tmp_path, load_config_text(images, 0.5)), seed=0)
    torch.manual_seed(77)
    expected_next = torch.rand(3)
    torch.manual_seed(77)

    first = validation_losses(family, models, group.validation, torch.device("cpu"), contextlib.nullcontext)
    second = validation_losses(family, models, group.validation, torch.device("cpu"), contextlib.nullcontext)

    assert torch.equal(torch.rand(3), expected_next)
    assert first == second
    assert list(first) == ["val/loss", *(f"val/loss_t{timestep}" for timestep in VALIDATION_TIMESTEPS)]
    per_timestep = [first[f"val/loss_t{timestep}"] for timestep in VALIDATION_TIMESTEPS]
    assert all(0 < value < 10 for value in per_timestep)
    assert first["val/loss"] == pytest.approx(sum(per_timestep) / len(per_timestep))
    with torch.no_grad():
        models.denoiser.conv_out.bias.add_(0.5)  # other weights, another loss
    try:
        changed = validation_losses(family, models, group.validation, torch.device("cpu"), contextlib.nullcontext)
    finally:
        with torch.no_grad():
            models.denoiser.conv_out.bias.sub_(0.5)
    assert changed["val/loss"] > first["val/loss"]


# ---- end to end ----------------------------------------------------------------------------------------------


def test_training_logs_validation_loss_to_the_log_and_tensorboard(sampled_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = sampled_runs["with"]  # --validate_every_n_steps 2, 8 steps, an is_val subset of 3 images

    assert "validation: 3 images in 2 batches" in run.output  # batch size 2: two 64x64 images, one 96x64
    logged = [
        (int(step), float(value)) for value, step in re.findall(r"validation loss (\S+) at step (\d+)", run.output)
    ]
    assert [step for step, _ in logged] == [2, 4, 6, 8]
    # the run's folder; accelerate keeps the hparams in a subfolder of their own
    run_folder = min(
        (path.parent for path in run.logs.rglob("events.out.tfevents.*")), key=lambda path: len(path.parts)
    )
    events = EventAccumulator(str(run_folder)).Reload()
    assert {"val/loss", "val/loss_t100", "val/loss_t900"} <= set(events.Tags()["scalars"])
    curve = [(event.step, event.value) for event in events.Scalars("val/loss")]
    assert [step for step, _ in curve] == [2, 4, 6, 8]
    assert [value for _, value in curve] == pytest.approx([value for _, value in logged], abs=1e-5)


def test_validation_images_stay_out_of_training_and_default_to_every_epoch(sampled_runs):
    from safetensors import safe_open

    run = sampled_runs["without"]  # the same dataset, no --validate_every_n_* option
    with safe_open(str(run.folder / "lora.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    steps_per_epoch = int(re.search(r"(\d+) steps per epoch", run.output).group(1))

    assert metadata["ss_num_train_images"] == "6"  # the toy images; the 3 is_val images are not among them
    assert "validation loss after every epoch" in run.output
    validated = [int(step) for _, step in re.findall(r"validation loss (\S+) at step (\d+)", run.output)]
    assert steps_per_epoch == 7 and validated == [7]  # the 8-step run ends inside epoch 2
