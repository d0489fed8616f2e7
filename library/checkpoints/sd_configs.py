"""The noise schedule of the Stable Diffusion releases (SD 1.x, 2.x, SDXL) and the schedulers built from it."""

from __future__ import annotations

# Scaled-linear betas 0.00085..0.012 over 1000 steps: what every SD release was trained with.
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def prediction_type(v_parameterization: bool) -> str:
    return "v_prediction" if v_parameterization else "epsilon"


def ddpm_scheduler(v_parameterization: bool):
    """The training noise schedule (DDPM), predicting epsilon or v."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD_SCHEDULE, clip_sample=False, prediction_type=prediction_type(v_parameterization))


def ddim_scheduler(v_parameterization: bool):
    """The DDIM sampler settings of the SD 1.x / 2.x releases' diffusers folders."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type=prediction_type(v_parameterization))  # fmt: skip


def euler_scheduler(v_parameterization: bool):
    """The Euler sampler settings of the SDXL release's diffusers folder."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SD_SCHEDULE, steps_offset=1, timestep_spacing="leading",
                                  prediction_type=prediction_type(v_parameterization))  # fmt: skip
