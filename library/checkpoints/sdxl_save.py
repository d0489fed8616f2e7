"""Saving SDXL models: the original SGM single file (`.safetensors` / `.ckpt`) or a diffusers folder.

The single file goes through the key map the loader reads it with (`sdxl_keys.join_sgm_checkpoint`), so a file
loaded and saved unchanged comes back with the same keys and tensors.
"""

from __future__ import annotations

import logging

import torch

from library.atomic import atomic_path
from library.checkpoints import sd_configs, sd_keys, sdxl_keys
from library.checkpoints.diffusers_folders import keep_text_model_level
from library.checkpoints.files import save_state_dict
from library.checkpoints.sd_save import DIFFUSERS_FORMATS, LDM_IMPLEMENTATION, SAVE_FORMATS, SINGLE_FILE_FORMATS
from library.errors import ConfigError
from library.models import LoadedModels

logger = logging.getLogger(__name__)


def save_sdxl_model(
    models: LoadedModels,
    path: str,
    save_as: str,
    dtype: torch.dtype | None,
    metadata: dict[str, str],
    v_parameterization: bool,
) -> None:
    """Write `models` to `path` atomically as `save_as`; `dtype` None keeps each tensor's precision."""
    if save_as in SINGLE_FILE_FORMATS:
        checkpoint = sgm_checkpoint(models)
        if dtype is not None:
            checkpoint = {key: t.to(dtype) if t.is_floating_point() else t for key, t in checkpoint.items()}
        save_state_dict(checkpoint, path, dict(metadata, **{"modelspec.implementation": LDM_IMPLEMENTATION}))
    elif save_as in DIFFUSERS_FORMATS:
        if dtype is not None:
            logger.warning("--save_precision does not apply to diffusers folders; the weights keep their precision")
        save_diffusers_folder(models, path, v_parameterization, safe_serialization=save_as == "diffusers_safetensors")
    else:
        raise ConfigError(f"--save_model_as {save_as!r} is not a format of SDXL models; choose one of {SAVE_FORMATS}")


def model_architecture(models: LoadedModels) -> sdxl_keys.SDXLArchitecture:
    """The key-map architecture of loaded models, read from their configs."""
    encoder1, encoder2 = models.text_encoders
    return sdxl_keys.SDXLArchitecture(
        dict(models.denoiser.config), dict(models.vae.config), encoder1.config.to_dict(), encoder2.config.to_dict()
    )


def sgm_checkpoint(models: LoadedModels) -> dict[str, torch.Tensor]:
    """The models in the SGM layout, with the non-model keys of the loaded file (EMA copies dropped: stale)."""
    loaded_extras = models.extras.get("sgm_extras", {})
    extras = {key: tensor for key, tensor in loaded_extras.items() if not key.startswith("model_ema.")}
    encoder1, encoder2 = models.text_encoders
    components = sdxl_keys.SDXLComponents(
        unet=models.denoiser.state_dict(),
        vae=models.vae.state_dict(),
        text_encoder1=sd_keys.text_encoder_from_model_keys(encoder1.state_dict()),
        text_encoder2=dict(encoder2.state_dict()),
        extras=extras,
    )
    return sdxl_keys.join_sgm_checkpoint(components, model_architecture(models))


def save_diffusers_folder(models: LoadedModels, path: str, v_parameterization: bool, safe_serialization: bool) -> None:
    """A diffusers folder that StableDiffusionXLPipeline loads (both tokenizers, the release's Euler sampler)."""
    from diffusers import StableDiffusionXLPipeline

    scheduler = sd_configs.euler_scheduler(v_parameterization)
    encoder1, encoder2 = models.text_encoders
    pipeline = StableDiffusionXLPipeline(
        vae=models.vae,
        text_encoder=encoder1,
        text_encoder_2=encoder2,
        tokenizer=models.tokenizers[0],
        tokenizer_2=models.tokenizers[1],
        unet=models.denoiser,
        scheduler=scheduler,
    )
    with atomic_path(path, suffix="") as temp:
        pipeline.save_pretrained(temp, safe_serialization=safe_serialization)
        keep_text_model_level(temp)  # readable by transformers < 5.6 too
