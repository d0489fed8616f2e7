"""The per-sample loss against hand-computed values: SNR weights, masks, huber, per-sample weights."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from library.errors import ConfigError
from library.training.loss import (
    LossOptions,
    add_loss_arguments,
    element_loss,
    huber_threshold,
    per_sample_loss,
    snr,
)

# A four-step schedule whose SNRs alpha_bar / (1 - alpha_bar) are 9, 1, 1/9 and 4.
ALPHAS_CUMPROD = torch.tensor([0.9, 0.5, 0.1, 0.8])
SNRS = [9.0, 1.0, 1 / 9, 4.0]
TIMESTEPS = torch.tensor([0, 1, 2, 3])


def unit_loss_pair(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """prediction, target whose l2 loss is exactly 1 per element."""
    target = torch.zeros(batch, 4, 8, 8)
    return target + 1, target


def weights_for(options: LossOptions, v_prediction: bool) -> list[float]:
    prediction, target = unit_loss_pair()
    return per_sample_loss(prediction, target, TIMESTEPS, ALPHAS_CUMPROD, options, v_prediction).tolist()


def test_snr_is_alpha_bar_over_one_minus_alpha_bar():
    assert snr(TIMESTEPS, ALPHAS_CUMPROD).tolist() == pytest.approx(SNRS)


def test_snr_of_the_sd_schedule_at_the_first_and_last_step():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    values = snr(torch.tensor([0, 999]), alphas_cumprod)
    assert values[0].item() == pytest.approx((1 - 0.00085) / 0.00085, rel=1e-4)
    assert values[1].item() == pytest.approx(0.0047, rel=0.05)


def test_min_snr_gamma_weights_for_noise_prediction():
    # min(SNR, 5) / SNR
    assert weights_for(LossOptions(min_snr_gamma=5), v_prediction=False) == pytest.approx([5 / 9, 1, 1, 1])


def test_min_snr_gamma_weights_for_v_prediction():
    # min(SNR, 5) / (SNR + 1)
    expected = [5 / 10, 1 / 2, (1 / 9) / (10 / 9), 4 / 5]
    assert weights_for(LossOptions(min_snr_gamma=5), v_prediction=True) == pytest.approx(expected)


def test_scale_v_pred_loss_like_noise_pred_weights_by_snr_over_snr_plus_one():
    options = LossOptions(scale_v_pred_loss_like_noise_pred=True)
    assert weights_for(options, v_prediction=True) == pytest.approx([s / (s + 1) for s in SNRS])


def test_v_pred_like_loss_adds_a_weighted_copy_of_the_loss():
    expected = [1 + 0.5 * (s + 1) / s for s in SNRS]  # loss + 0.5 * loss / (SNR / (SNR + 1))
    assert weights_for(LossOptions(v_pred_like_loss=0.5), v_prediction=False) == pytest.approx(expected)


def test_debiased_estimation_weights():
    options = LossOptions(debiased_estimation_loss=True)
    assert weights_for(options, v_prediction=False) == pytest.approx([1 / 3, 1, 3, 1 / 2])  # 1 / sqrt(SNR)
    assert weights_for(options, v_prediction=True) == pytest.approx([1 / 10, 1 / 2, 9 / 10, 1 / 5])  # 1 / (SNR + 1)


def test_debiased_estimation_caps_an_infinite_snr():
    prediction, target = unit_loss_pair(1)
    options = LossOptions(debiased_estimation_loss=True)
    loss = per_sample_loss(prediction, target, torch.tensor([0]), torch.tensor([1.0]), options, v_prediction=False)
    assert loss.item() == pytest.approx(1 / math.sqrt(1000))


def test_snr_weights_compose_with_per_sample_weights():
    prediction, target = unit_loss_pair()
    prior = torch.tensor([1.0, 0.5, 1.0, 2.0])
    loss = per_sample_loss(
        prediction, target, TIMESTEPS, ALPHAS_CUMPROD, LossOptions(min_snr_gamma=5), False, loss_weights=prior
    )
    assert loss.tolist() == pytest.approx([5 / 9, 0.5, 1, 2])


def test_per_sample_loss_is_the_mean_squared_error_by_default():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float16)
    target = torch.randn(3, 4, 8, 8, generator=generator)
    loss = per_sample_loss(prediction, target, TIMESTEPS[:3], None, LossOptions(), v_prediction=False)
    assert loss.dtype == torch.float32 and loss.shape == (3,)
    assert torch.allclose(loss, (prediction.float() - target).square().mean(dim=(1, 2, 3)))


def test_masked_loss_equals_the_loss_over_the_masked_region():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(2, 4, 8, 8, generator=generator)
    target = torch.randn(2, 4, 8, 8, generator=generator)
    masks = torch.zeros(2, 1, 64, 64)  # image resolution, 8x the latents
    masks[0, :, :, :32] = 1  # left half -> latent columns 0..3
    masks[1, :, 16:40, 8:24] = 1  # latent rows 2..4, columns 1..2
    loss = per_sample_loss(prediction, target, TIMESTEPS[:2], None, LossOptions(), False, masks=masks)
    squared = (prediction - target).square()
    assert loss[0].item() == pytest.approx(squared[0, :, :, :4].mean().item(), rel=1e-6)
    assert loss[1].item() == pytest.approx(squared[1, :, 2:5, 1:3].mean().item(), rel=1e-6)


def test_masked_loss_weighs_partly_covered_latent_pixels_by_their_coverage():
    prediction = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]]])  # squared errors 1 and 4 in the top row
    masks = torch.zeros(1, 16, 16)  # (B, H, W) works too
    masks[0, :8, :8] = 1  # top-left latent pixel fully covered
    masks[0, :4, 8:] = 1  # top-right latent pixel half covered
    loss = per_sample_loss(prediction, target, TIMESTEPS[:1], None, LossOptions(), False, masks=masks)
    assert loss.item() == pytest.approx((1 * 1 + 4 * 0.5) / 1.5)


def test_masked_loss_of_a_uniform_grey_mask_is_the_plain_mean_and_an_empty_mask_gives_zero():
    generator = torch.Generator().manual_seed(1)
    prediction, target = torch.randn(2, 4, 8, 8, generator=generator), torch.zeros(2, 4, 8, 8)
    masks = torch.stack([torch.full((1, 64, 64), 0.5), torch.zeros(1, 64, 64)])
    loss = per_sample_loss(prediction, target, TIMESTEPS[:2], None, LossOptions(), False, masks=masks)
    assert loss[0].item() == pytest.approx(prediction[0].square().mean().item(), rel=1e-6)
    assert loss[1].item() == 0.0


def test_huber_and_smooth_l1_follow_the_pseudo_huber_formula():
    prediction = torch.tensor([0.3, 0.001, 10.0]).view(3, 1, 1, 1)
    target = torch.zeros(3, 1, 1, 1)
    c = torch.full((3,), 0.1)
    root = torch.tensor([math.sqrt(0.09 + 0.01), math.sqrt(1e-6 + 0.01), math.sqrt(100 + 0.01)], dtype=torch.float64)
    huber = element_loss(prediction, target, "huber", c).flatten()
    assert huber.tolist() == pytest.approx((2 * 0.1 * (root - 0.1)).tolist(), rel=1e-5)
    assert huber[0].item() == pytest.approx(0.043246, rel=1e-4)
    assert huber[1].item() == pytest.approx(0.001**2, rel=1e-4)  # quadratic for |d| << c
    assert huber[2].item() == pytest.approx(2 * 0.1 * 10, rel=0.02)  # linear for |d| >> c
    smooth = element_loss(prediction, target, "smooth_l1", c).flatten()
    assert smooth.tolist() == pytest.approx((2 * (root - 0.1)).tolist(), rel=1e-5)
    assert element_loss(prediction, target, "l1").flatten().tolist() == pytest.approx([0.3, 0.001, 10.0])


def test_huber_threshold_schedules():
    timesteps = torch.tensor([0, 500, 1000])
    exponential = LossOptions(loss_type="huber", huber_schedule="exponential", huber_c=0.1, huber_scale=2.0)
    values = huber_threshold(timesteps, None, exponential).tolist()
    assert values == pytest.approx([2.0, 2.0 * math.sqrt(0.1), 0.2])  # scale * c ** (t / 1000)
    constant = LossOptions(loss_type="huber", huber_schedule="constant", huber_c=0.3, huber_scale=2.0)
    assert huber_threshold(timesteps, None, constant).tolist() == pytest.approx([0.6, 0.6, 0.6])
    snr_schedule = LossOptions(loss_type="huber", huber_schedule="snr", huber_c=0.1)
    sigmas = [1 / 3, 1, 3, 0.5]  # sqrt((1 - alpha_bar) / alpha_bar)
    expected = [0.9 / (1 + s) ** 2 + 0.1 for s in sigmas]
    assert huber_threshold(TIMESTEPS, ALPHAS_CUMPROD, snr_schedule).tolist() == pytest.approx(expected)


def test_per_sample_loss_uses_the_timestep_huber_threshold():
    prediction, target = unit_loss_pair(4)
    options = LossOptions(loss_type="huber")  # snr schedule, c = 0.1
    loss = per_sample_loss(prediction, target, TIMESTEPS, ALPHAS_CUMPROD, options, v_prediction=False)
    thresholds = [0.9 / (1 + s) ** 2 + 0.1 for s in [1 / 3, 1, 3, 0.5]]
    assert loss.tolist() == pytest.approx([2 * c * (math.sqrt(1 + c * c) - c) for c in thresholds])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_snr_gamma": 0}, "--min_snr_gamma must be above 0"),
        ({"v_pred_like_loss": -0.1}, "--v_pred_like_loss must not be negative"),
        ({"loss_type": "l3"}, "--loss_type must be one of"),
        ({"loss_type": "huber", "huber_c": 0}, "--huber_c must be above 0"),
        ({"loss_type": "huber", "huber_c": 2.0}, "must be at most 1"),
        ({"huber_scale": 0}, "--huber_scale must be above 0"),
    ],
)
def test_loss_options_reject_invalid_values(options, message):
    with pytest.raises(ConfigError, match=message):
        LossOptions(**options)


def test_loss_options_check_the_objective():
    with pytest.raises(ConfigError, match="only with --v_parameterization"):
        LossOptions(scale_v_pred_loss_like_noise_pred=True).check_objective(v_prediction=False)
    with pytest.raises(ConfigError, match="drop it with --v_parameterization"):
        LossOptions(v_pred_like_loss=0.1).check_objective(v_prediction=True)
    with pytest.raises(ConfigError, match="need a DDPM noise schedule"):
        LossOptions(min_snr_gamma=5).check_objective(v_prediction=False, has_noise_schedule=False)
    LossOptions(loss_type="huber", huber_schedule="constant").check_objective(False, has_noise_schedule=False)


def test_loss_options_from_parsed_arguments():
    parser = argparse.ArgumentParser()
    add_loss_arguments(parser)
    options = LossOptions.from_args(parser.parse_args(["--min_snr_gamma", "5", "--loss_type", "smooth_l1"]))
    assert options.min_snr_gamma == 5.0 and options.loss_type == "smooth_l1"
    assert (options.huber_c, options.huber_scale, options.huber_schedule) == (0.1, 1.0, "snr")
    assert not options.masked_loss and not options.debiased_estimation_loss
