"""Training noise and timesteps against their formulas, with fixed generators."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from library.errors import ConfigError
from library.training.noise import (
    NoiseOptions,
    add_noise_arguments,
    perturb_input_noise,
    sample_noise,
    sample_timesteps,
)

SEED = 1234


def generator(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sample_noise_is_plain_gaussian_without_options():
    latents = torch.zeros(2, 4, 8, 8)
    noise = sample_noise(latents, NoiseOptions(), generator())
    assert torch.equal(noise, torch.randn(2, 4, 8, 8, generator=generator()))


def test_noise_offset_adds_offset_times_one_gaussian_per_channel():
    latents = torch.zeros(64, 64, 16, 16)
    base = sample_noise(latents, NoiseOptions(), generator())
    noise = sample_noise(latents, NoiseOptions(noise_offset=0.1), generator())
    reference = generator()
    torch.randn(64, 64, 16, 16, generator=reference)
    per_channel = torch.randn(64, 64, 1, 1, generator=reference)
    assert torch.allclose(noise - base, (0.1 * per_channel).expand_as(noise), atol=1e-6)
    # the offset is constant over the image and its magnitude is the option's value
    offsets = (noise - base).mean(dim=(2, 3))
    assert offsets.std().item() == pytest.approx(0.1, rel=0.05)


def test_noise_offset_random_strength_draws_one_strength_below_the_offset():
    latents = torch.zeros(8, 4, 8, 8)
    noise = sample_noise(latents, NoiseOptions(noise_offset=0.2, noise_offset_random_strength=True), generator())
    reference = generator()
    base = torch.randn(8, 4, 8, 8, generator=reference)
    strength = torch.rand(1, generator=reference) * 0.2
    per_channel = torch.randn(8, 4, 1, 1, generator=reference)
    assert 0 <= strength.item() < 0.2
    assert torch.allclose(noise, base + strength * per_channel, atol=1e-6)


def test_adaptive_noise_scale_grows_offset_with_absolute_channel_mean():
    channel_means = torch.tensor([0.5, -1.0, 0.0, 2.0])
    latents = channel_means.view(1, 4, 1, 1).expand(3, 4, 8, 8).contiguous()
    base = sample_noise(latents, NoiseOptions(), generator())
    plain = sample_noise(latents, NoiseOptions(noise_offset=0.1), generator()) - base
    adaptive = sample_noise(latents, NoiseOptions(noise_offset=0.1, adaptive_noise_scale=0.05), generator()) - base
    expected_offset = 0.1 + 0.05 * channel_means.abs()  # noise_offset + scale * |mean|, per channel
    assert torch.allclose(adaptive, plain / 0.1 * expected_offset.view(1, 4, 1, 1), atol=1e-6)


def test_negative_adaptive_noise_scale_clips_the_offset_at_zero():
    latents = torch.full((2, 4, 8, 8), 0.5)
    base = sample_noise(latents, NoiseOptions(), generator())
    noise = sample_noise(latents, NoiseOptions(noise_offset=0.1, adaptive_noise_scale=-1.0), generator())
    assert torch.equal(noise, base)  # 0.1 - 1.0 * 0.5 < 0 -> offset 0


def test_multires_noise_is_renormalised_sum_of_upsampled_levels():
    latents = torch.zeros(2, 4, 32, 32)
    options = NoiseOptions(multires_noise_iterations=3, multires_noise_discount=0.5)
    noise = sample_noise(latents, options, generator())
    reference = generator()
    expected = torch.randn(2, 4, 32, 32, generator=reference)
    ratios = 2 + 2 * torch.rand(3, generator=reference)
    for level in range(3):
        size = max(1, int(32 / ratios[level].item() ** level))
        coarse = torch.randn(2, 4, size, size, generator=reference)
        expected += F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False) * 0.5**level
    assert noise.shape == latents.shape
    assert torch.allclose(noise, expected / expected.std(), atol=1e-5)
    assert noise.std().item() == pytest.approx(1.0, abs=1e-5)


def test_multires_noise_carries_more_low_frequency_energy_than_white_noise():
    latents = torch.zeros(8, 4, 64, 64)
    white = sample_noise(latents, NoiseOptions(), generator())
    pyramid = sample_noise(latents, NoiseOptions(multires_noise_iterations=8, multires_noise_discount=0.8), generator())
    # variance of each channel's image mean: 1/(64*64) for white noise, far larger with coarse levels
    assert white.mean(dim=(2, 3)).var().item() < 5 / (64 * 64)
    assert pyramid.mean(dim=(2, 3)).var().item() > 10 / (64 * 64)


def test_multires_noise_stops_at_one_pixel_on_small_latents():
    noise = sample_noise(torch.zeros(1, 4, 4, 4), NoiseOptions(multires_noise_iterations=10), generator())
    assert noise.shape == (1, 4, 4, 4)
    assert torch.isfinite(noise).all()


def test_sample_noise_keeps_the_latents_dtype():
    latents = torch.zeros(1, 4, 8, 8, dtype=torch.float16)
    assert sample_noise(latents, NoiseOptions(noise_offset=0.1), generator()).dtype == torch.float16


def test_perturb_input_noise_adds_gamma_times_fresh_gaussian():
    noise = torch.randn(2, 4, 8, 8, generator=generator(7))
    perturbed = perturb_input_noise(noise, NoiseOptions(ip_noise_gamma=0.1), generator())
    assert torch.allclose(perturbed - noise, 0.1 * torch.randn(2, 4, 8, 8, generator=generator()), atol=1e-6)
    assert perturb_input_noise(noise, NoiseOptions(), generator()) is noise


def test_sample_timesteps_respects_the_half_open_range():
    options = NoiseOptions(min_timestep=200, max_timestep=300)
    timesteps = sample_timesteps(5000, 1000, options, generator(), "cpu")
    assert timesteps.dtype == torch.long and timesteps.shape == (5000,)
    assert timesteps.min().item() == 200 and timesteps.max().item() == 299


def test_sample_timesteps_defaults_to_the_whole_schedule():
    timesteps = sample_timesteps(20000, 1000, NoiseOptions(), generator(), "cpu")
    assert timesteps.min().item() == 0 and timesteps.max().item() == 999


def test_sample_timesteps_is_reproducible_with_the_same_generator():
    first = sample_timesteps(16, 1000, NoiseOptions(), generator(), "cpu")
    assert torch.equal(first, sample_timesteps(16, 1000, NoiseOptions(), generator(), "cpu"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"adaptive_noise_scale": 0.01}, "give a --noise_offset"),
        ({"noise_offset_random_strength": True}, "needs a --noise_offset"),
        ({"ip_noise_gamma_random_strength": True}, "needs an --ip_noise_gamma"),
        ({"noise_offset": 0.1, "multires_noise_iterations": 6}, "cannot be used together"),
        ({"noise_offset": -0.1}, "--noise_offset must not be negative"),
        ({"multires_noise_iterations": 6, "multires_noise_discount": 1.5}, "between 0 and 1"),
        ({"min_timestep": 500, "max_timestep": 500}, r"smaller than --max_timestep \(500\)"),
        ({"min_timestep": 900, "max_timestep": 800}, r"--min_timestep \(900\) must be smaller"),
        ({"min_timestep": -1}, "--min_timestep must be in 0..999"),
        ({"max_timestep": 1001}, "--max_timestep must be in 1..1000"),
    ],
)
def test_noise_options_reject_invalid_combinations(options, message):
    with pytest.raises(ConfigError, match=message):
        NoiseOptions(**options)


def test_noise_options_from_parsed_arguments():
    parser = argparse.ArgumentParser()
    add_noise_arguments(parser)
    options = NoiseOptions.from_args(parser.parse_args(["--noise_offset", "0.05", "--max_timestep", "800"]))
    assert options.noise_offset == 0.05 and options.max_timestep == 800
    assert options.multires_noise_discount == 0.3 and options.multires_noise_iterations is None
    assert options.timestep_range(1000) == (0, 800)
