"""The training loss per sample: element loss (l2 / l1 / huber / smooth l1), masks, timestep weights from the
signal-to-noise ratio (min-SNR-gamma, v-prediction scaling, debiased estimation) and per-sample weights."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from library.errors import ConfigError

logger = logging.getLogger(__name__)

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
# SNR at t=0 of the SD schedule is about 1,180; the v-pred scales and debiased estimation cap it here so a
# schedule whose first step is noise-free (SNR infinite) still gives finite weights.
SNR_CAP = 1000.0
MIN_MASK_AREA = 1e-8  # a sample whose mask is all zero contributes 0, not 0/0

LossType = Literal["l2", "l1", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]


def add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the loss function and its weighting over timesteps."""
    parser.add_argument(
        "--min_snr_gamma",
        type=float,
        default=None,
        help="min-SNR weighting: weight each timestep by min(SNR, gamma) / SNR (v-prediction: / (SNR + 1)); "
        "the paper recommends 5",
    )
    parser.add_argument(
        "--scale_v_pred_loss_like_noise_pred",
        action="store_true",
        help="with --v_parameterization: scale the loss by SNR / (SNR + 1) so timesteps weigh as in noise prediction",
    )
    parser.add_argument(
        "--v_pred_like_loss",
        type=float,
        default=None,
        help="for noise prediction: add this much of a v-prediction-like loss (loss * (1 + k * (SNR + 1) / SNR))",
    )
    parser.add_argument(
        "--debiased_estimation_loss",
        action="store_true",
        help="weight the loss by 1 / sqrt(SNR) (v-prediction: 1 / (SNR + 1)), debiased estimation",
    )
    parser.add_argument(
        "--masked_loss",
        action="store_true",
        help="accepted for compatibility: the masks a subset provides (alpha_mask, conditioning_data_dir) always "
        "apply; the loss of each sample is averaged over its mask",
    )
    parser.add_argument(
        "--loss_type", type=str, default="l2", choices=LOSS_TYPES, help="element loss (default l2, squared error)"
    )
    parser.add_argument(
        "--huber_c",
        type=float,
        default=0.1,
        help="threshold c of the huber and smooth_l1 losses, or its value at the last timestep for the "
        "exponential and snr schedules (default 0.1)",
    )
    parser.add_argument(
        "--huber_scale",
        type=float,
        default=1.0,
        help="multiplier of the huber threshold for the constant and exponential schedules (default 1.0)",
    )
    parser.add_argument(
        "--huber_schedule",
        type=str,
        default="snr",
        choices=HUBER_SCHEDULES,
        help="how the huber threshold changes over timesteps (default snr)",
    )


@dataclass
class LossOptions:
    """Typed loss options; checked on construction."""

    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    masked_loss: bool = False
    loss_type: LossType = "l2"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    huber_schedule: HuberSchedule = "snr"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LossOptions:
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})

    def __post_init__(self) -> None:
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ConfigError(f"--min_snr_gamma must be above 0 (5 is usual), got {self.min_snr_gamma}")
        if self.v_pred_like_loss is not None and self.v_pred_like_loss < 0:
            raise ConfigError(f"--v_pred_like_loss must not be negative, got {self.v_pred_like_loss}")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise ConfigError(
                f"--huber_schedule must be one of {', '.join(HUBER_SCHEDULES)}, got {self.huber_schedule!r}"
            )
        if self.huber_scale <= 0:
            raise ConfigError(f"--huber_scale must be above 0, got {self.huber_scale}")
        if self.uses_huber and self.huber_c <= 0:
            raise ConfigError(f"--huber_c must be above 0, got {self.huber_c}")
        if self.uses_huber and self.huber_schedule != "constant" and self.huber_c > 1:
            raise ConfigError(
                f"--huber_c is the threshold at the noisiest timestep of the {self.huber_schedule} schedule and must "
                f"be at most 1, got {self.huber_c}"
            )

    @property
    def uses_huber(self) -> bool:
        return self.loss_type in ("huber", "smooth_l1")

    @property
    def uses_snr_weights(self) -> bool:
        """Whether any per-timestep weight from the SNR is on."""
        return bool(
            self.min_snr_gamma
            or self.scale_v_pred_loss_like_noise_pred
            or self.v_pred_like_loss
            or self.debiased_estimation_loss
        )

    @property
    def uses_snr(self) -> bool:
        """Whether the loss needs the DDPM noise schedule (alphas_cumprod)."""
        return self.uses_snr_weights or (self.uses_huber and self.huber_schedule == "snr")

    def check_objective(self, v_prediction: bool, has_noise_schedule: bool = True) -> None:
        """Check the options against the family's objective; call before loading models."""
        if self.scale_v_pred_loss_like_noise_pred and not v_prediction:
            raise ConfigError("--scale_v_pred_loss_like_noise_pred applies only with --v_parameterization")
        if self.v_pred_like_loss and v_prediction:
            raise ConfigError("--v_pred_like_loss is for noise-prediction models; drop it with --v_parameterization")
        if self.uses_snr and not has_noise_schedule:
            raise ConfigError(
                "--min_snr_gamma, --scale_v_pred_loss_like_noise_pred, --v_pred_like_loss, "
                "--debiased_estimation_loss and --huber_schedule snr need a DDPM noise schedule, which this model "
                "family does not use (choose --huber_schedule constant or exponential for huber losses)"
            )


def report_masks(options: LossOptions, has_masks: bool) -> None:
    """Say once whether loss masks are in use: they apply whenever a subset provides them (alpha_mask = true or
    conditioning_data_dir), as the masked-loss guide describes, with or without --masked_loss."""
    if has_masks:
        logger.info(
            "loss masks in use: the subsets with alpha_mask or conditioning_data_dir train only where their mask is "
            "set (images of other subsets count whole)"
        )
    elif options.masked_loss:
        logger.warning(
            "--masked_loss: no subset provides masks (alpha_mask = true or conditioning_data_dir), so every image "
            "is trained whole"
        )


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep, float32 (B,)."""
    alpha_bar = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


def snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, options: LossOptions, v_prediction: bool
) -> torch.Tensor:
    """Per-sample loss factors (B,) from the SNR options; all ones when none is on."""
    weights = torch.ones(timesteps.shape[0], device=timesteps.device)
    if not options.uses_snr_weights:
        return weights
    ratio = snr(timesteps, alphas_cumprod)
    capped = ratio.clamp(max=SNR_CAP)
    if options.min_snr_gamma:  # Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"
        weights = weights * ratio.clamp(max=options.min_snr_gamma) / (ratio + 1 if v_prediction else ratio)
    if options.scale_v_pred_loss_like_noise_pred:
        weights = weights * capped / (capped + 1)
    if options.v_pred_like_loss:  # loss + k * loss / (SNR / (SNR + 1))
        weights = weights * (1 + options.v_pred_like_loss * (capped + 1) / capped)
    if options.debiased_estimation_loss:
        weights = weights * (1 / (capped + 1) if v_prediction else capped.rsqrt())
    return weights


def huber_threshold(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor | None, options: LossOptions) -> torch.Tensor:
    """The huber threshold c per sample (B,): constant, decaying exponentially to huber_c, or following the SNR."""
    t = timesteps.float()
    if options.huber_schedule == "constant":
        return torch.full_like(t, options.huber_c * options.huber_scale)
    if options.huber_schedule == "exponential":  # huber_scale at t=0, huber_c * huber_scale at t=T
        num_train_timesteps = len(alphas_cumprod) if alphas_cumprod is not None else 1000
        return options.huber_c ** (t / num_train_timesteps) * options.huber_scale
    # snr: near 1 for clean timesteps, falling towards huber_c as the noise grows; huber_scale is not applied
    alpha_bar = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    return (1 - options.huber_c) / (1 + sigma) ** 2 + options.huber_c


def element_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: LossType, huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """Loss of every element (B, C, H, W); `huber_c` (B,) is needed for huber and smooth_l1."""
    difference = prediction - target
    if loss_type == "l2":
        return difference.square()
    if loss_type == "l1":
        return difference.abs()
    c = huber_c.view(-1, *([1] * (difference.ndim - 1)))
    # Pseudo-Huber 2c(sqrt(d**2 + c**2) - c): quadratic (d**2) for |d| << c, linear (2c|d|) for |d| >> c.
    # Written as d**2 / (sqrt(d**2 + c**2) + c), the same value without float32 cancellation for small d.
    squared = difference.square()
    smooth = squared / ((squared + c.square()).sqrt() + c)
    return 2 * c * smooth if loss_type == "huber" else 2 * smooth


def masked_mean(losses: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean of each sample's element losses (B, C, h, w) weighted by its mask (B, 1, H, W) in [0, 1] -> (B,).

    The mask is reduced to the latent size by area averaging, so a half-covered latent pixel weighs 0.5.
    """
    if masks.ndim == 3:
        masks = masks.unsqueeze(1)
    weight = F.interpolate(masks.to(losses.device, losses.dtype), size=losses.shape[-2:], mode="area")  # (B,1,h,w)
    total = (losses * weight).sum(dim=(1, 2, 3))
    area = weight.sum(dim=(1, 2, 3)) * losses.shape[1]
    return total / area.clamp(min=MIN_MASK_AREA)


def per_sample_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor | None,
    options: LossOptions,
    v_prediction: bool,
    masks: torch.Tensor | None = None,
    loss_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of each sample (B,): element loss, mask, per-sample weights and SNR weights; the loop takes mean().

    Args:
        prediction, target: (B, C, H, W) denoiser output and what it should have been, computed in float32.
        alphas_cumprod: the DDPM schedule (T,), needed only for the SNR-based options.
        masks: (B, 1, H', W') or (B, H', W') loss masks at image resolution, 1 = train, 0 = ignore.
        loss_weights: (B,) per-sample factors, e.g. prior_loss_weight for regularization images.
    """
    prediction, target = prediction.float(), target.float()
    huber_c = huber_threshold(timesteps, alphas_cumprod, options) if options.uses_huber else None
    losses = element_loss(prediction, target, options.loss_type, huber_c)  # (B, C, H, W)
    if masks is not None:
        per_sample = masked_mean(losses, masks)
    else:
        per_sample = losses.mean(dim=tuple(range(1, losses.ndim)))  # (B,)
    if loss_weights is not None:
        per_sample = per_sample * loss_weights.to(per_sample.device, per_sample.dtype)
    if options.uses_snr_weights:
        per_sample = per_sample * snr_weights(timesteps, alphas_cumprod, options, v_prediction)
    return per_sample
