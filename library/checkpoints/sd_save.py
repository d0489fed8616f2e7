"""Saving SD 1.x / 2.x models: the original LDM single file (`.safetensors` / `.ckpt`) or a diffusers folder.

The single file is written through the same key map the loader reads it with (`sd_keys.join_ldm_checkpoint`), so a
file loaded and saved unchanged comes back with the same keys and tensors.
"""

from __future__ import annotations

import logging

import torch

from library.atomic import atomic_path
from library.checkpoints import sd_configs, sd_keys
from library.checkpoints.diffusers_folders import keep_text_model_level
from library.checkpoints.files import save_state_dict
from library.errors import CheckpointError, ConfigError
from library.models import LoadedModels

logger = logging.getLogger(__name__)

SINGLE_FILE_FORMATS = ("safetensors", "ckpt")
DIFFUSERS_FORMATS = ("diffusers", "diffusers_safetensors")
SAVE_FORMATS = SINGLE_FILE_FORMATS + DIFFUSERS_FORMATS
# model-spec `implementation` of original-layout files (what Stability's own checkpoints declare)
LDM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def save_sd_model(
    models: LoadedModels,
    path: str,
    save_as: str,
    dtype: torch.dtype | None,
    metadata: dict[str, str],
    v2: bool,
    v_parameterization: bool,
) -> None:
    """Write `models` to `path` atomically as `save_as` (one of `SAVE_FORMATS`); `dtype` None keeps each tensor's."""
    if save_as in SINGLE_FILE_FORMATS:
        save_single_file(models, path, v2, dtype, metadata)
    elif save_as in DIFFUSERS_FORMATS:
        if dtype is not None:
            logger.warning("--save_precision does not apply to diffusers folders; the weights keep their precision")
        save_diffusers_folder(models, path, v_parameterization, safe_serialization=save_as == "diffusers_safetensors")
    else:
        raise ConfigError(f"--save_model_as {save_as!r} is not a format of SD models; choose one of {SAVE_FORMATS}")


def model_architecture(models: LoadedModels, v2: bool) -> sd_keys.SDArchitecture:
    """The key-map architecture of loaded models, read from their configs."""
    unet_config = dict(models.denoiser.config)
    depth = unet_config.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if len(set(depth)) != 1:
            raise CheckpointError(
                f"The UNet has different transformer depths per level ({depth}); the SD 1.x / 2.x original layout "
                "has one depth for all levels. Save it with --save_model_as diffusers instead."
            )
        unet_config["transformer_layers_per_block"] = depth[0]
    text_config = models.text_encoders[0].config.to_dict()
    return sd_keys.SDArchitecture(v2, unet_config, dict(models.vae.config), text_config)


def ldm_checkpoint(models: LoadedModels, v2: bool) -> dict[str, torch.Tensor]:
    """The models in the original LDM layout, with the non-model keys kept from the loaded file.

    EMA copies (`model_ema.*`) are dropped: they hold the base model's averaged weights, stale after training.
    """
    loaded_extras = models.extras.get("ldm_extras", {})
    extras = {key: tensor for key, tensor in loaded_extras.items() if not key.startswith("model_ema.")}
    if len(extras) < len(loaded_extras):
        logger.info("not saving the base model's EMA weights (model_ema.*): they do not follow the training")
    components = sd_keys.SDComponents(
        unet=models.denoiser.state_dict(),
        vae=models.vae.state_dict(),
        text_encoder=sd_keys.text_encoder_from_model_keys(models.text_encoders[0].state_dict()),
        extras=extras,
    )
    return sd_keys.join_ldm_checkpoint(components, model_architecture(models, v2))


def save_single_file(
    models: LoadedModels, path: str, v2: bool, dtype: torch.dtype | None, metadata: dict[str, str]
) -> None:
    """One original-layout file; `.safetensors` carries `metadata`, `.ckpt` stores it as a JSON string."""
    checkpoint = ldm_checkpoint(models, v2)
    if dtype is not None:
        checkpoint = {key: value.to(dtype) if value.is_floating_point() else value for key, value in checkpoint.items()}
    save_state_dict(checkpoint, path, dict(metadata, **{"modelspec.implementation": LDM_IMPLEMENTATION}))


def save_diffusers_folder(models: LoadedModels, path: str, v_parameterization: bool, safe_serialization: bool) -> None:
    """A diffusers model folder (UNet, VAE, text encoder, tokenizer, scheduler) that StableDiffusionPipeline loads."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=models.vae,
        text_encoder=models.text_encoders[0],
        tokenizer=models.tokenizers[0],
        unet=models.denoiser,
        scheduler=sd_configs.ddim_scheduler(v_parameterization),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # The whole folder appears at once: written under a temporary name, then renamed.
    with atomic_path(path, suffix="") as temp:
        pipeline.save_pretrained(temp, safe_serialization=safe_serialization)
        keep_text_model_level(temp)  # readable by transformers < 5.6 too
