"""--gradient_accumulation_steps: N batches of size 1 update like one batch of size N; groups, schedule, resume."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.families.base import TrainingInputs
from library.families.sd import SDFamily
from library.testing.toy_data import write_toy_dataset
from library.training.loop_options import LoopOptions
from library.training.trainer import _accumulation_group, _make_schedule
from tests.test_train_network_e2e import train_args
from tests.training_helpers import train_in_process


def per_sample_inputs(self, latents, generator, noise, timesteps=None) -> TrainingInputs:
    """Noise and timestep drawn from each sample's own latents, so a sample gets the same in any batch."""
    noises, steps = [], []
    for sample in latents:  # (C, h, w)
        own = torch.Generator().manual_seed(int(sample.double().abs().sum().item() * 1e4) % 2**31)
        noises.append(torch.randn(sample.shape, generator=own, dtype=sample.dtype))
        steps.append(torch.randint(100, 900, (1,), generator=own))
    noise_tensor, timestep_tensor = torch.stack(noises), torch.cat(steps)  # (B, C, h, w), (B,)
    noisy = self.noise_scheduler.add_noise(latents, noise_tensor, timestep_tensor)
    return TrainingInputs(noisy, timestep_tensor, noise_tensor, torch.ones(latents.shape[0]))


def lora_run(models_dir, tokenizer_dir, tmp_path, name: str, batch_size: int, *extra: str) -> dict:
    data = write_toy_dataset(str(tmp_path / f"data_{name}"), count=4, batch_size=batch_size, enable_bucket=False)
    args = train_args(
        os.path.join(models_dir, "sd1.safetensors"),
        data,
        str(tmp_path / name),
        tokenizer_dir,
        "--optimizer_type",
        "SGD",
        "--cache_latents",
        *extra,
    )[1:]
    args[args.index("--max_train_steps") + 1] = "1"
    args[args.index("--learning_rate") + 1] = "0.5"  # plain SGD: the update is the gradient, scaled
    train_in_process(args)
    return load_file(str(tmp_path / name / "lora.safetensors"))


def test_accumulating_four_batches_of_one_equals_one_batch_of_four(
    tiny_models_dir, tokenizer_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(SDFamily, "training_inputs", per_sample_inputs)
    whole = lora_run(tiny_models_dir, tokenizer_dir, tmp_path, "whole", 4)
    accumulated = lora_run(
        tiny_models_dir, tokenizer_dir, tmp_path, "accumulated", 1, "--gradient_accumulation_steps", "4"
    )
    single = lora_run(tiny_models_dir, tokenizer_dir, tmp_path, "single", 1)

    ups = [key for key in whole if key.endswith("lora_up.weight")]
    assert all(float(whole[key].abs().max()) > 0 for key in ups)  # the step moved every zero-initialised up
    for key, value in whole.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-4, atol=1e-7, msg=key)
    assert any(not torch.allclose(single[key], whole[key], rtol=1e-2) for key in ups)  # one batch alone differs
    with safe_open(str(tmp_path / "accumulated" / "lora.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_steps"] == "1" and metadata["ss_gradient_accumulation_steps"] == "4"
    assert metadata["ss_num_batches_per_epoch"] == "4"


def schedule_of(batches: int, accumulation: int, max_train_steps: int = 100, epochs: int | None = None):
    loop = LoopOptions("out", "last", max_train_steps, epochs, 0, "no", False, None, accumulation)
    return _make_schedule(loop, batches)


@pytest.mark.parametrize(("batches", "accumulation", "sizes"), [(10, 4, [4] * 8 + [2] * 2), (3, 1, [1, 1, 1])])
def test_groups_cover_the_epoch_and_the_last_one_is_shorter(batches, accumulation, sizes):
    schedule = schedule_of(batches, accumulation, epochs=2)
    groups = [
        _accumulation_group(SimpleNamespace(schedule=schedule, state=SimpleNamespace(step_in_epoch=done)))
        for done in range(batches)
    ]
    assert [size for size, _, _ in groups] == sizes
    steps = sum(ends for _, _, ends in groups)
    assert steps == sum(starts for _, starts, _ in groups) == schedule.steps_per_epoch
    assert schedule.total_steps == 2 * steps and schedule.batches_per_epoch == batches


def test_step_limit_counts_optimizer_steps():
    schedule = schedule_of(batches=6, accumulation=4, max_train_steps=5)
    assert (schedule.steps_per_epoch, schedule.num_epochs, schedule.total_steps) == (2, 3, 5)


def test_resume_mid_epoch_with_accumulation_ends_with_the_uninterrupted_weights(
    tiny_models_dir, tokenizer_dir, tmp_path
):
    data = write_toy_dataset(str(tmp_path / "data"), count=6, batch_size=1, enable_bucket=False)

    def run(out: str, *extra: str) -> None:
        args = train_args(
            os.path.join(tiny_models_dir, "sd1.safetensors"),
            data,
            str(tmp_path / out),
            tokenizer_dir,
            "--gradient_accumulation_steps",
            "4",
            *extra,
        )[1:]
        train_in_process(args)  # 6 batches per epoch: steps of 4 and 2 batches; 4 steps = 2 epochs

    run("full", "--save_every_n_steps", "1", "--save_state")
    state = tmp_path / "full" / "lora-step00000001-state"  # 4 of the epoch's 6 batches done
    run("resumed", "--resume", str(state))
    full, resumed = (load_file(str(tmp_path / out / "lora.safetensors")) for out in ("full", "resumed"))
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)
