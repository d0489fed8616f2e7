"""Rectified-flow (flow matching) training objective shared by FLUX, SD3 and Lumina: timestep sampling, noisy input,
target in the space the chosen prediction type compares, and per-sample loss weights.

A sample at noise level sigma in [0, 1] is x_t = (1 - sigma) * latents + sigma * noise; the denoiser predicts the
velocity v = noise - latents. Timesteps handed to the loss are sigma * 1000, like the DDPM families' 0..999.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch

from library.errors import ConfigError
from library.families.base import TrainingInputs
from library.training.noise import NUM_TRAIN_TIMESTEPS, NoiseOptions, perturb_input_noise, sample_noise

logger = logging.getLogger(__name__)

TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift", "nextdit_shift")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
WEIGHTING_SCHEMES = ("none", "uniform", "sigma_sqrt", "logit_normal", "mode", "cosmap")  # uniform: SD3's name of none
DENSITY_SCHEMES = ("logit_normal", "mode")  # schemes that shape the density of "sigma" sampling
LOSS_WEIGHT_SCHEMES = ("sigma_sqrt", "cosmap")  # schemes that weight the loss (with sigma_scaled)
# flux_shift: mu grows linearly with the image token count, 0.5 at 256 tokens and 1.15 at 4096 (FLUX.1's schedule).
# nextdit_shift (Lumina 2) applies the same shift to uniform draws instead of sigmoid-normal ones.
FLUX_SHIFT_POINTS = ((256, 0.5), (4096, 1.15))

TimestepSampling = Literal["sigma", "uniform", "sigmoid", "shift", "flux_shift", "nextdit_shift"]
PredictionType = Literal["raw", "additive", "sigma_scaled"]
WeightingScheme = Literal["none", "uniform", "sigma_sqrt", "logit_normal", "mode", "cosmap"]


def add_flow_matching_arguments(
    parser: argparse.ArgumentParser,
    timestep_sampling: str = "sigma",
    discrete_flow_shift: float = 3.0,
    model_prediction_type: str = "sigma_scaled",
) -> None:
    """The objective's options; a family passes the defaults its release was trained with."""
    parser.add_argument(
        "--timestep_sampling",
        type=str,
        default=timestep_sampling,
        choices=TIMESTEP_SAMPLING,
        help="how noise levels are drawn: sigma (the shifted discrete schedule, density from --weighting_scheme), "
        "uniform, sigmoid (sigmoid of a scaled normal), shift (sigmoid, then --discrete_flow_shift), flux_shift "
        "(sigmoid, then the resolution-dependent shift of FLUX.1), nextdit_shift (uniform, then that same shift); "
        f"default {timestep_sampling}",
    )
    parser.add_argument(
        "--sigmoid_scale",
        type=float,
        default=1.0,
        help="scale of the normal draw in sigmoid, shift and flux_shift sampling (larger: closer to 0 and 1)",
    )
    parser.add_argument(
        "--discrete_flow_shift",
        type=float,
        default=discrete_flow_shift,
        help=f"shift s of the schedule, sigma' = s*sigma / (1 + (s-1)*sigma), for sigma and shift sampling "
        f"(default {discrete_flow_shift})",
    )
    parser.add_argument(
        "--model_prediction_type",
        type=str,
        default=model_prediction_type,
        choices=MODEL_PREDICTION_TYPES,
        help="what the loss compares: raw (the predicted velocity), additive (prediction added to the noisy input), "
        "sigma_scaled (the clean latents the prediction implies, weighted by --weighting_scheme); default "
        f"{model_prediction_type}",
    )
    parser.add_argument(
        "--weighting_scheme",
        type=str,
        default="none",
        choices=WEIGHTING_SCHEMES,
        help="logit_normal / mode: noise-level density of sigma sampling; sigma_sqrt / cosmap: loss weight per noise "
        "level with sigma_scaled; default none",
    )
    parser.add_argument("--logit_mean", type=float, default=0.0, help="mean of the logit_normal density (default 0)")
    parser.add_argument("--logit_std", type=float, default=1.0, help="std of the logit_normal density (default 1)")
    parser.add_argument("--mode_scale", type=float, default=1.29, help="scale of the mode density (default 1.29)")


@dataclass
class FlowMatchingOptions:
    """Typed objective options; checked on construction."""

    timestep_sampling: TimestepSampling = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: PredictionType = "sigma_scaled"
    weighting_scheme: WeightingScheme = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FlowMatchingOptions:
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})

    def __post_init__(self) -> None:
        for name, allowed in (
            ("timestep_sampling", TIMESTEP_SAMPLING),
            ("model_prediction_type", MODEL_PREDICTION_TYPES),
            ("weighting_scheme", WEIGHTING_SCHEMES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("sigmoid_scale", "discrete_flow_shift", "logit_std"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be above 0, got {getattr(self, name)}")

    def ignored_settings(self) -> list[str]:
        """Combinations where an option has no effect, worded for a warning."""
        notes = []
        if self.weighting_scheme in DENSITY_SCHEMES and self.timestep_sampling != "sigma":
            notes.append(f"--weighting_scheme {self.weighting_scheme} shapes only --timestep_sampling sigma")
        if self.weighting_scheme in LOSS_WEIGHT_SCHEMES and self.model_prediction_type != "sigma_scaled":
            notes.append(f"--weighting_scheme {self.weighting_scheme} weights the loss only with sigma_scaled")
        return notes


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = s*sigma / (1 + (s-1)*sigma): more time at high noise for s > 1 (SD3 / FLUX schedules)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_shift_mu(image_tokens: int) -> float:
    """FLUX.1's mu for an image of `image_tokens` packed tokens (linear through FLUX_SHIFT_POINTS)."""
    (x1, y1), (x2, y2) = FLUX_SHIFT_POINTS
    return y1 + (y2 - y1) * (image_tokens - x1) / (x2 - x1)


def time_shift(mu: float, sigmas: torch.Tensor) -> torch.Tensor:
    """exp(mu) / (exp(mu) + 1/sigma - 1): the exponential shift of FLUX.1's schedule."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def discrete_sigmas(shift: float) -> torch.Tensor:
    """The 1000 noise levels of the shifted flow-matching Euler schedule, noisiest first (diffusers' table)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    return scheduler.sigmas[:NUM_TRAIN_TIMESTEPS].float()


def _density(batch: int, options: FlowMatchingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """u in [0, 1) per sample from the weighting scheme's density (SD3 paper, section 3.1)."""
    device = generator.device if generator is not None else "cpu"
    if options.weighting_scheme == "logit_normal":
        normal = torch.randn(batch, generator=generator, device=device)
        return torch.sigmoid(normal * options.logit_std + options.logit_mean)
    u = torch.rand(batch, generator=generator, device=device)
    if options.weighting_scheme == "mode":
        return 1 - u - options.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sample_sigmas(
    batch: int,
    options: FlowMatchingOptions,
    generator: torch.Generator | None,
    image_tokens: int | None = None,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Noise levels (B,) in (0, 1], float32, where the generator lives.

    `image_tokens` is needed by flux_shift and nextdit_shift; `table` (discrete_sigmas) by sigma sampling, built
    when not given.
    """
    device = generator.device if generator is not None else "cpu"
    kind = options.timestep_sampling
    if kind == "sigma":
        table = discrete_sigmas(options.discrete_flow_shift) if table is None else table
        u = _density(batch, options, generator).clamp(0, 1 - 1e-6)
        return table.to(device)[(u * len(table)).long()]
    if kind == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if kind == "nextdit_shift":
        return _nextdit_shift(batch, generator, device, image_tokens)
    sigmas = torch.sigmoid(options.sigmoid_scale * torch.randn(batch, generator=generator, device=device))
    if kind == "shift":
        return shift_sigmas(sigmas, options.discrete_flow_shift)
    if kind == "flux_shift":
        if image_tokens is None:
            raise ValueError("flux_shift sampling needs the image token count")
        return time_shift(resolution_shift_mu(image_tokens), sigmas)
    return sigmas  # sigmoid


def _nextdit_shift(batch: int, generator, device, image_tokens: int | None) -> torch.Tensor:
    """Uniform draws kept above zero, then FLUX.1's resolution-dependent shift (the reference's Lumina 2 sampling)."""
    if image_tokens is None:
        raise ValueError("nextdit_shift sampling needs the image token count")
    uniform = torch.rand(batch, generator=generator, device=device).clamp_min(1e-7)
    return time_shift(resolution_shift_mu(image_tokens), uniform)


def sample_shifted_timesteps(
    batch: int, options: FlowMatchingOptions, generator: torch.Generator | None, shift: float, noise: NoiseOptions
) -> torch.Tensor:
    """SD3's training timesteps (B,): u from the weighting scheme's density, shifted by `shift` (SD3's
    --training_shift), spread over [min_timestep, max_timestep) and cut to whole steps, float32.

    Step 0 is raised to 1: at sigma 0 the sample teaches nothing and sigma_sqrt would weight it infinitely.
    """
    u = shift_sigmas(_density(batch, options, generator), shift)
    low, high = noise.timestep_range(NUM_TRAIN_TIMESTEPS)
    return (u * (high - low) + low).floor().clamp(min=max(low, 1))


def restrict_to_range(sigmas: torch.Tensor, noise: NoiseOptions) -> torch.Tensor:
    """Map sigmas linearly into [min_timestep, max_timestep) / 1000 when a range is set."""
    low, high = noise.timestep_range(NUM_TRAIN_TIMESTEPS)
    if (low, high) == (0, NUM_TRAIN_TIMESTEPS):
        return sigmas
    return (low + (high - low) * sigmas) / NUM_TRAIN_TIMESTEPS


def loss_weights(sigmas: torch.Tensor, options: FlowMatchingOptions) -> torch.Tensor:
    """Per-sample loss weights (B,): sigma_sqrt (1/sigma^2) or cosmap with sigma_scaled, else ones."""
    if options.model_prediction_type != "sigma_scaled" or options.weighting_scheme not in LOSS_WEIGHT_SCHEMES:
        return torch.ones_like(sigmas, dtype=torch.float32)
    if options.weighting_scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))  # cosmap


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable over `like`."""
    return values.view(-1, *([1] * (like.ndim - 1))).to(like.device, like.dtype)


def training_inputs(
    latents: torch.Tensor,
    generator: torch.Generator | None,
    noise_options: NoiseOptions,
    options: FlowMatchingOptions,
    image_tokens: int | None = None,
    table: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
) -> TrainingInputs:
    """Noise scaled latents (B, C, H, W) at sampled levels; the target matches `prediction_for_loss`.

    `timesteps` (B,) in 0..999 fixes the levels (sigma = t / 1000) instead of sampling them (validation).
    """
    noise = sample_noise(latents, noise_options, generator)
    if timesteps is not None:
        sigmas = timesteps.to(latents.device, torch.float32) / NUM_TRAIN_TIMESTEPS
    else:
        sigmas = sample_sigmas(latents.shape[0], options, generator, image_tokens, table).to(latents.device)
        sigmas = restrict_to_range(sigmas, noise_options)
    sigma = _per_sample(sigmas, latents)
    input_noise = perturb_input_noise(noise, noise_options, generator)
    noisy = (1 - sigma) * latents + sigma * input_noise  # (B, C, H, W)
    if options.model_prediction_type == "sigma_scaled":
        target = latents
    elif options.model_prediction_type == "additive":
        target = noisy + (noise - latents)
    else:
        target = noise - latents
    return TrainingInputs(noisy, sigmas * NUM_TRAIN_TIMESTEPS, target, loss_weights(sigmas, options))


def prediction_for_loss(
    velocity: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor, options: FlowMatchingOptions
) -> torch.Tensor:
    """The denoiser's velocity -> what the loss compares with the target of `training_inputs`.

    sigma_scaled: the clean latents it implies, x_t - sigma * v (SD3's preconditioning); additive: x_t + v; raw: v.
    """
    if options.model_prediction_type == "sigma_scaled":
        sigma = _per_sample(timesteps / NUM_TRAIN_TIMESTEPS, velocity)
        return noisy.to(velocity.dtype) - sigma * velocity
    if options.model_prediction_type == "additive":
        return velocity + noisy.to(velocity.dtype)
    return velocity


def flow_training_metadata(options: FlowMatchingOptions) -> dict[str, str]:
    """`ss_*` keys of the objective, as users' tools read them."""
    return {
        "ss_timestep_sampling": options.timestep_sampling,
        "ss_sigmoid_scale": str(options.sigmoid_scale),
        "ss_discrete_flow_shift": str(options.discrete_flow_shift),
        "ss_model_prediction_type": options.model_prediction_type,
        "ss_weighting_scheme": options.weighting_scheme,
        "ss_logit_mean": str(options.logit_mean),
        "ss_logit_std": str(options.logit_std),
        "ss_mode_scale": str(options.mode_scale),
    }
