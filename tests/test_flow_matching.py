"""The shared flow-matching objective: noise-level sampling, targets per prediction type, loss weights."""

from __future__ import annotations

import math

import pytest
import torch

from library.errors import ConfigError
from library.training import flow_matching as fm
from library.training.noise import NoiseOptions


def sigmas_of(batch: int = 4096, image_tokens: int | None = None, **options) -> torch.Tensor:
    return fm.sample_sigmas(batch, fm.FlowMatchingOptions(**options), torch.Generator().manual_seed(0), image_tokens)


@pytest.mark.parametrize("sampling", fm.TIMESTEP_SAMPLING)
def test_flow_matching_sigmas_lie_in_unit_interval_and_repeat_with_seed(sampling):
    first = sigmas_of(256, image_tokens=1024, timestep_sampling=sampling)
    again = sigmas_of(256, image_tokens=1024, timestep_sampling=sampling)
    assert torch.equal(first, again)
    assert first.min() > 0 and first.max() <= 1 and first.dtype == torch.float32


def test_flow_matching_shift_sampling_applies_the_shift_formula():
    plain = sigmas_of(timestep_sampling="sigmoid", sigmoid_scale=1.0)
    shifted = sigmas_of(timestep_sampling="shift", sigmoid_scale=1.0, discrete_flow_shift=3.0)
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain))
    assert shifted.mean() > plain.mean() + 0.1  # a shift above 1 favours noisy levels


def test_flow_matching_flux_shift_grows_with_resolution():
    small = sigmas_of(timestep_sampling="flux_shift", image_tokens=256)
    large = sigmas_of(timestep_sampling="flux_shift", image_tokens=4096)
    plain = sigmas_of(timestep_sampling="sigmoid")
    mu = fm.resolution_shift_mu(4096)
    assert mu == pytest.approx(1.15) and fm.resolution_shift_mu(256) == pytest.approx(0.5)
    assert torch.allclose(large, math.exp(mu) / (math.exp(mu) + 1 / plain - 1))
    assert large.mean() > small.mean()


def test_flow_matching_nextdit_shift_shifts_uniform_draws_by_resolution():
    uniform = sigmas_of(timestep_sampling="uniform")
    large = sigmas_of(timestep_sampling="nextdit_shift", image_tokens=4096)
    small = sigmas_of(timestep_sampling="nextdit_shift", image_tokens=256)
    mu = fm.resolution_shift_mu(4096)
    assert torch.allclose(large, math.exp(mu) / (math.exp(mu) + 1 / uniform - 1))  # the same draws, shifted
    assert large.mean() > small.mean() > uniform.mean()
    with pytest.raises(ValueError, match="image token count"):
        sigmas_of(timestep_sampling="nextdit_shift")


def test_flow_matching_sigma_sampling_draws_from_the_shifted_schedule():
    table = fm.discrete_sigmas(3.0)
    drawn = sigmas_of(timestep_sampling="sigma", discrete_flow_shift=3.0)
    assert len(table) == 1000 and table[0] == 1.0
    assert torch.isin(drawn, table).all()
    logit = sigmas_of(timestep_sampling="sigma", discrete_flow_shift=1.0, weighting_scheme="logit_normal",
                      logit_mean=2.0)  # fmt: skip
    uniform = sigmas_of(timestep_sampling="sigma", discrete_flow_shift=1.0)
    # index = u * 1000 counts from the noisiest level, so a density centred on high u picks clean levels
    assert logit.mean() < uniform.mean() - 0.2


def test_flow_matching_targets_are_met_by_the_true_velocity():
    latents = torch.randn(3, 4, 6, 6)
    for prediction_type in fm.MODEL_PREDICTION_TYPES:
        options = fm.FlowMatchingOptions(timestep_sampling="uniform", model_prediction_type=prediction_type)
        generator = torch.Generator().manual_seed(1)
        inputs = fm.training_inputs(latents, generator, NoiseOptions(), options)
        sigma = (inputs.timesteps / 1000).view(-1, 1, 1, 1)
        noise = (inputs.noisy_latents - (1 - sigma) * latents) / sigma
        prediction = fm.prediction_for_loss(noise - latents, inputs.noisy_latents, inputs.timesteps, options)
        assert torch.allclose(prediction, inputs.target, atol=1e-4), prediction_type


def test_flow_matching_weights_only_with_sigma_scaled():
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    scaled = fm.FlowMatchingOptions(model_prediction_type="sigma_scaled", weighting_scheme="sigma_sqrt")
    assert torch.allclose(fm.loss_weights(sigmas, scaled), sigmas**-2)
    cosmap = fm.FlowMatchingOptions(model_prediction_type="sigma_scaled", weighting_scheme="cosmap")
    assert torch.allclose(fm.loss_weights(sigmas, cosmap), 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2)))
    raw = fm.FlowMatchingOptions(model_prediction_type="raw", weighting_scheme="sigma_sqrt")
    assert torch.equal(fm.loss_weights(sigmas, raw), torch.ones(3))
    assert raw.ignored_settings() == ["--weighting_scheme sigma_sqrt weights the loss only with sigma_scaled"]


def test_flow_matching_fixed_timesteps_and_timestep_range():
    latents = torch.zeros(2, 4, 2, 2)
    options = fm.FlowMatchingOptions(timestep_sampling="uniform", model_prediction_type="raw")
    fixed = fm.training_inputs(latents, None, NoiseOptions(), options, timesteps=torch.tensor([250, 750]))
    assert torch.allclose(fixed.timesteps, torch.tensor([250.0, 750.0]))
    ranged = fm.training_inputs(torch.zeros(512, 1, 2, 2), torch.Generator().manual_seed(0),
                                NoiseOptions(min_timestep=200, max_timestep=300), options)  # fmt: skip
    assert ranged.timesteps.min() >= 200 and ranged.timesteps.max() < 300


def test_flow_matching_options_reject_bad_values():
    with pytest.raises(ConfigError, match="--discrete_flow_shift must be above 0"):
        fm.FlowMatchingOptions(discrete_flow_shift=0)
    with pytest.raises(ConfigError, match="--timestep_sampling must be one of"):
        fm.FlowMatchingOptions(timestep_sampling="cosine")
