"""Training noise and timesteps: offset noise, adaptive offset, multi-resolution (pyramid) noise, input
perturbation and the timestep range. Pure functions of the latents, the options and an explicit generator."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from library.errors import ConfigError

# Every family in the suite numbers its training timesteps 0..999 (DDPM for SD / SDXL; the rectified-flow
# families scale t in [0, 1] by 1000), so the timestep range is checked against this count.
NUM_TRAIN_TIMESTEPS = 1000


def add_noise_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that shape the training noise and the sampled timesteps."""
    parser.add_argument(
        "--noise_offset",
        type=float,
        default=None,
        help="add a per-channel constant offset of this strength to the noise (offset noise; about 0.1 helps very "
        "dark or bright images)",
    )
    parser.add_argument(
        "--noise_offset_random_strength",
        action="store_true",
        help="draw the offset strength uniformly from [0, noise_offset] at every step",
    )
    parser.add_argument(
        "--adaptive_noise_scale",
        type=float,
        default=None,
        help="with --noise_offset: add this times |channel mean of the latents| to the offset (may be negative; "
        "the offset is clipped at 0)",
    )
    parser.add_argument(
        "--multires_noise_iterations",
        type=int,
        default=None,
        help="multi-resolution (pyramid) noise with this many levels (6-10 works well)",
    )
    parser.add_argument(
        "--multires_noise_discount",
        type=float,
        default=0.3,
        help="weight factor per pyramid level of --multires_noise_iterations (default 0.3; 0.8 in the original "
        "article)",
    )
    parser.add_argument(
        "--ip_noise_gamma",
        type=float,
        default=None,
        help="input perturbation: noise the model input with extra noise of this strength, keeping the target "
        "(about 0.1)",
    )
    parser.add_argument(
        "--ip_noise_gamma_random_strength",
        action="store_true",
        help="draw the input perturbation strength uniformly from [0, ip_noise_gamma] at every step",
    )
    parser.add_argument(
        "--min_timestep", type=int, default=None, help="smallest training timestep (inclusive, default 0)"
    )
    parser.add_argument(
        "--max_timestep",
        type=int,
        default=None,
        help=f"largest training timestep (exclusive, default {NUM_TRAIN_TIMESTEPS})",
    )


@dataclass
class NoiseOptions:
    """Typed noise and timestep options; checked on construction."""

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> NoiseOptions:
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})

    def __post_init__(self) -> None:
        self._check_noise()
        self._check_timesteps()

    def _check_noise(self) -> None:
        for name in ("noise_offset", "ip_noise_gamma", "multires_noise_iterations"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name} must not be negative, got {value}")
        if self.adaptive_noise_scale is not None and not self.noise_offset:
            raise ConfigError("--adaptive_noise_scale adjusts the noise offset: give a --noise_offset above 0 as well")
        if self.noise_offset_random_strength and not self.noise_offset:
            raise ConfigError("--noise_offset_random_strength needs a --noise_offset above 0")
        if self.ip_noise_gamma_random_strength and not self.ip_noise_gamma:
            raise ConfigError("--ip_noise_gamma_random_strength needs an --ip_noise_gamma above 0")
        if self.noise_offset and self.multires_noise_iterations:
            raise ConfigError(
                "--noise_offset and --multires_noise_iterations cannot be used together (the pyramid noise is "
                "renormalised, which would rescale the offset); choose one"
            )
        if not 0 <= self.multires_noise_discount <= 1:
            raise ConfigError(f"--multires_noise_discount must be between 0 and 1, got {self.multires_noise_discount}")

    def _check_timesteps(self) -> None:
        if self.min_timestep is not None and not 0 <= self.min_timestep < NUM_TRAIN_TIMESTEPS:
            raise ConfigError(f"--min_timestep must be in 0..{NUM_TRAIN_TIMESTEPS - 1}, got {self.min_timestep}")
        if self.max_timestep is not None and not 1 <= self.max_timestep <= NUM_TRAIN_TIMESTEPS:
            raise ConfigError(f"--max_timestep must be in 1..{NUM_TRAIN_TIMESTEPS}, got {self.max_timestep}")
        low, high = self.timestep_range(NUM_TRAIN_TIMESTEPS)
        if low >= high:
            raise ConfigError(
                f"--min_timestep ({low}) must be smaller than --max_timestep ({high}); the range is [min, max)"
            )

    def timestep_range(self, num_train_timesteps: int) -> tuple[int, int]:
        """The half-open range [low, high) timesteps are drawn from."""
        low = 0 if self.min_timestep is None else self.min_timestep
        high = num_train_timesteps if self.max_timestep is None else min(self.max_timestep, num_train_timesteps)
        return low, high


def sample_noise(latents: torch.Tensor, options: NoiseOptions, generator: torch.Generator | None) -> torch.Tensor:
    """The noise the model learns to remove: Gaussian, plus offset or pyramid components. Same shape as latents."""
    noise = _randn(latents.shape, generator, latents.device)  # (B, C, H, W)
    if options.noise_offset:
        noise = noise + _offset_noise(latents, options, generator)
    if options.multires_noise_iterations:
        noise = _pyramid_noise(noise, options.multires_noise_iterations, options.multires_noise_discount, generator)
    return noise.to(latents.dtype)


def perturb_input_noise(noise: torch.Tensor, options: NoiseOptions, generator: torch.Generator | None) -> torch.Tensor:
    """The noise to build the model input with (input perturbation, Ning et al. 2023); the target keeps `noise`."""
    if not options.ip_noise_gamma:
        return noise
    strength = _strength(options.ip_noise_gamma, options.ip_noise_gamma_random_strength, generator, noise.device)
    return noise + strength * _randn(noise.shape, generator, noise.device).to(noise.dtype)


def sample_timesteps(
    batch: int,
    num_train_timesteps: int,
    options: NoiseOptions,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> torch.Tensor:
    """Integer timesteps (B,), uniform over [min_timestep, max_timestep)."""
    low, high = options.timestep_range(num_train_timesteps)
    source = generator.device if generator is not None else device
    return torch.randint(low, high, (batch,), generator=generator, device=source).to(device)


def _randn(shape: torch.Size | tuple, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """float32 Gaussian drawn where the generator lives (so a run repeats exactly), then moved to `device`."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=torch.float32).to(device)


def _strength(
    maximum: float, random_strength: bool, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor | float:
    """`maximum`, or one value drawn uniformly from [0, maximum) for the whole batch."""
    if not random_strength:
        return maximum
    source = generator.device if generator is not None else device
    return torch.rand(1, generator=generator, device=source).to(device) * maximum


def _offset_noise(latents: torch.Tensor, options: NoiseOptions, generator: torch.Generator | None) -> torch.Tensor:
    """offset * N(0, 1) per sample and channel (B, C, 1, 1); the adaptive part grows it with |channel mean|."""
    offset = _strength(options.noise_offset, options.noise_offset_random_strength, generator, latents.device)
    if options.adaptive_noise_scale is not None:
        channel_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()  # (B, C, 1, 1)
        offset = (offset + options.adaptive_noise_scale * channel_mean).clamp(min=0.0)
    return offset * _randn((latents.shape[0], latents.shape[1], 1, 1), generator, latents.device)


def _pyramid_noise(
    noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Add upsampled coarse noise, level i at 1/r**i of the size (r random in [2, 4)) weighted discount**i,
    stop at 1 pixel, then rescale to unit standard deviation (multi-resolution noise, J. Whitaker 2023)."""
    batch, channels, height, width = noise.shape
    source = generator.device if generator is not None else noise.device
    # One read-back per step for all level sizes; only paid when pyramid noise is on.
    ratios = (2 + 2 * torch.rand(iterations, generator=generator, device=source)).tolist()
    for level, ratio in enumerate(ratios):
        level_height = max(1, int(height / ratio**level))
        level_width = max(1, int(width / ratio**level))
        coarse = _randn((batch, channels, level_height, level_width), generator, noise.device)
        upsampled = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        noise = noise + upsampled * discount**level
        if level_height == 1 or level_width == 1:
            break
    return noise / noise.std()
