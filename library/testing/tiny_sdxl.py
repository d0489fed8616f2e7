"""Build randomly initialised SDXL models and write them in the real formats: SGM single file and diffusers folder.

The single file goes through the same key map the loader reads it with, and carries the non-model keys that
released files have (OpenCLIP's `logit_scale`, CLIP's `position_ids`).

    python -m library.testing.tiny_sdxl --out models/tiny
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch

from library.checkpoints import sd_configs, sd_keys, sdxl_keys
from library.checkpoints.files import save_state_dict
from library.checkpoints.tokenizers import EOS_TOKEN, write_clip_tokenizer_files
from library.testing import tiny_configs


@dataclass
class SDXLModels:
    """The four models of an SDXL checkpoint and the architecture they follow."""

    arch: sdxl_keys.SDXLArchitecture
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder1: torch.nn.Module
    text_encoder2: torch.nn.Module


def architecture(full_size: bool = False) -> sdxl_keys.SDXLArchitecture:
    """The tiny SDXL configs, or the released SDXL 1.0 base architecture."""
    if full_size:
        return sdxl_keys.SDXLArchitecture(
            tiny_configs.sdxl_unet_config(),
            tiny_configs.sdxl_vae_config(),
            tiny_configs.clip_l_config(),
            tiny_configs.open_clip_bigg_config(),
        )
    text1, text2 = tiny_configs.tiny_sdxl_text_encoder_configs()
    return sdxl_keys.SDXLArchitecture(
        tiny_configs.tiny_sdxl_unet_config(), tiny_configs.tiny_sdxl_vae_config(), text1, text2
    )


def build_models(seed: int = 0, arch: sdxl_keys.SDXLArchitecture | None = None) -> SDXLModels:
    """Randomly initialised models (tiny unless `arch` is given), identical for the same seed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    arch = arch or architecture()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**arch.unet_config)
    vae = AutoencoderKL(**arch.vae_config)
    text_encoder1 = CLIPTextModel(CLIPTextConfig(**arch.text_config1))
    text_encoder2 = CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_config2))
    for model in (unet, vae, text_encoder1, text_encoder2):
        model.eval()
    return SDXLModels(arch, unet, vae, text_encoder1, text_encoder2)


def file_extras(models: SDXLModels) -> dict[str, torch.Tensor]:
    """Non-model keys as the released sd_xl_base_1.0.safetensors carries them."""
    positions = models.arch.text_config1["max_position_embeddings"]
    return {
        sdxl_keys.TE1_PREFIX + "embeddings.position_ids": torch.arange(positions)[None],
        sdxl_keys.TE2_PREFIX + "logit_scale": torch.tensor(4.6052),
    }


def sgm_state_dict(models: SDXLModels, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The models in the SGM single-file layout."""
    components = sdxl_keys.SDXLComponents(
        unet=dict(models.unet.state_dict()),
        vae=dict(models.vae.state_dict()),
        text_encoder1=sd_keys.text_encoder_from_model_keys(models.text_encoder1.state_dict()),
        text_encoder2=dict(models.text_encoder2.state_dict()),
        extras=file_extras(models),
    )
    state_dict = sdxl_keys.join_sgm_checkpoint(components, models.arch)
    if dtype is not None:
        state_dict = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state_dict.items()}
    return state_dict


def write_single_file(models: SDXLModels, path: str, dtype: torch.dtype | None = None) -> str:
    """Write an SGM-layout `.safetensors`."""
    save_state_dict(sgm_state_dict(models, dtype), path)
    return path


def write_diffusers_folder(models: SDXLModels, path: str) -> str:
    """Write a diffusers model folder (both tokenizers, the release's Euler scheduler) for StableDiffusionXLPipeline."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    tokenizer1 = write_clip_tokenizer_files(os.path.join(path, "tokenizer"), EOS_TOKEN)
    tokenizer2 = write_clip_tokenizer_files(os.path.join(path, "tokenizer_2"), "!")
    scheduler = sd_configs.euler_scheduler(v_parameterization=False)
    pipeline = StableDiffusionXLPipeline(
        vae=models.vae,
        text_encoder=models.text_encoder1,
        text_encoder_2=models.text_encoder2,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer1),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer2),
        unet=models.unet,
        scheduler=scheduler,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def write_tiny_sdxl(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Write the tiny SDXL model as `sdxl.safetensors` and `sdxl-diffusers/`."""
    models = build_models(seed)
    os.makedirs(out_dir, exist_ok=True)
    return {
        "safetensors": write_single_file(models, os.path.join(out_dir, "sdxl.safetensors")),
        "diffusers": write_diffusers_folder(models, os.path.join(out_dir, "sdxl-diffusers")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="write a randomly initialised tiny SDXL model in the real formats")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for kind, path in write_tiny_sdxl(args.out, args.seed).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()


def write_tiny(out_dir: str):
    """The registry builder (library/testing/families.py)."""
    from library.testing.families import TinyFamily

    files = write_tiny_sdxl(out_dir)
    tokenizers = os.path.join(files["diffusers"], "tokenizer")
    return TinyFamily(
        "sdxl",
        ("--pretrained_model_name_or_path", files["safetensors"], "--tokenizer_cache_dir", tokenizers),
        ("--pretrained_model_name_or_path", files["diffusers"]),
        {"network": "sdxl_train_network.py", "finetune": "sdxl_train.py"},
        files=files,
    )
