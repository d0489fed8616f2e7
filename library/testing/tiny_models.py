"""Build randomly initialised SD 1.x / 2.x models and write them in the real formats.

Formats: the original single-file LDM layout (`.safetensors` and pickled `.ckpt`) and a diffusers folder with
a locally built CLIP tokenizer. The LDM file goes through the same key map the loader reads it with.

    python -m library.testing.tiny_models --out models/tiny --variant sd1
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import torch

from library.checkpoints import sd_configs, sd_keys
from library.checkpoints.files import save_state_dict
from library.checkpoints.tokenizers import EOS_TOKEN, write_clip_tokenizer_files
from library.testing import tiny_configs

VARIANTS = ("sd1", "sd2", "sd2-v", "sd15-full")


@dataclass
class SDModels:
    """The three models of an SD checkpoint and the architecture they follow."""

    arch: sd_keys.SDArchitecture
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module


def architecture(variant: str) -> sd_keys.SDArchitecture:
    """The diffusers configs of a variant: tiny `sd1`, `sd2`, `sd2-v`, or the full-size `sd15-full`."""
    if variant == "sd15-full":
        return sd_keys.SDArchitecture(
            False, tiny_configs.sd15_unet_config(), tiny_configs.sd_vae_config(), tiny_configs.clip_l_config()
        )
    v2 = variant.startswith("sd2")
    text_config = tiny_configs.tiny_text_encoder_config(v2)
    if v2:  # the model holds the layers SD 2.x uses; the file adds one more (see sd_keys)
        text_config = dict(text_config, num_hidden_layers=text_config["num_hidden_layers"] - 1)
    return sd_keys.SDArchitecture(
        v2, tiny_configs.tiny_unet_config(v2), tiny_configs.tiny_vae_config(), text_config
    )


def build_models(variant: str, seed: int = 0) -> SDModels:
    """Randomly initialised models of a variant, identical for the same seed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = architecture(variant)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**arch.unet_config)
    vae = AutoencoderKL(**arch.vae_config)
    text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text_config))
    for model in (unet, vae, text_encoder):
        model.eval()
    return SDModels(arch, unet, vae, text_encoder)


def ldm_schedule_buffers() -> dict[str, torch.Tensor]:
    """The DDPM buffers LDM checkpoints carry (scaled-linear betas 0.00085..0.012, 1000 steps)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    cumprod = torch.cumprod(alphas, dim=0)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    variance = betas * (1.0 - previous) / (1.0 - cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": cumprod,
        "alphas_cumprod_prev": previous,
        "sqrt_alphas_cumprod": cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / cumprod - 1).sqrt(),
        "posterior_variance": variance,
        "posterior_log_variance_clipped": variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * previous.sqrt() / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - previous) * alphas.sqrt() / (1.0 - cumprod),
    }
    return {key: value.float() for key, value in buffers.items()}


def ldm_state_dict(models: SDModels, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The models in the original LDM single-file layout."""
    components = sd_keys.SDComponents(
        unet=dict(models.unet.state_dict()),
        vae=dict(models.vae.state_dict()),
        text_encoder=sd_keys.text_encoder_from_model_keys(models.text_encoder.state_dict()),
        extras=ldm_schedule_buffers(),
    )
    state_dict = sd_keys.join_ldm_checkpoint(components, models.arch)
    if dtype is not None:
        state_dict = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state_dict.items()}
    return state_dict


def write_single_file(models: SDModels, path: str, dtype: torch.dtype | None = None) -> str:
    """Write an LDM-layout `.safetensors` or `.ckpt` (chosen by the extension)."""
    save_state_dict(ldm_state_dict(models, dtype), path)
    return path


def write_diffusers_folder(models: SDModels, path: str, v_prediction: bool = False) -> str:
    """Write a diffusers model folder (with tokenizer and scheduler) that StableDiffusionPipeline loads."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer_dir = write_clip_tokenizer_files(os.path.join(path, "tokenizer"), "!" if models.arch.v2 else EOS_TOKEN)
    scheduler = sd_configs.ddim_scheduler(v_prediction)
    pipeline = StableDiffusionPipeline(
        vae=models.vae,
        text_encoder=models.text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=models.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path, safe_serialization=True)
    return path


def write_variant(variant: str, out_dir: str, seed: int = 0) -> dict[str, str]:
    """Write a variant in every format: `<variant>.safetensors`, `<variant>.ckpt`, `<variant>-diffusers/`."""
    models = build_models(variant, seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "safetensors": write_single_file(models, os.path.join(out_dir, f"{variant}.safetensors")),
        "ckpt": write_single_file(models, os.path.join(out_dir, f"{variant}.ckpt")),
        "diffusers": write_diffusers_folder(
            models, os.path.join(out_dir, f"{variant}-diffusers"), v_prediction=variant == "sd2-v"
        ),
    }
    return paths


def write_full_sd15(path: str, dtype: torch.dtype = torch.float16, seed: int = 0) -> str:
    """The full-size SD 1.5 architecture with random weights as one LDM-layout file (for benchmarks)."""
    return write_single_file(build_models("sd15-full", seed), path, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description="write randomly initialised SD models in the real file formats")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--variant", choices=VARIANTS, default="sd1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.variant == "sd15-full":
        print(write_full_sd15(os.path.join(args.out, "sd15-random.safetensors"), seed=args.seed))
        return
    for kind, path in write_variant(args.variant, args.out, args.seed).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()


def write_tiny(out_dir: str):
    """The registry builder (library/testing/families.py): SD 1.x and SD 2.x-v in every format; trained as SD 1.x."""
    from library.testing.families import TinyFamily

    files = {f"{variant}-{kind}": path for variant in ("sd1", "sd2-v")
             for kind, path in write_variant(variant, out_dir).items()}  # fmt: skip
    tokenizers = os.path.join(files["sd1-diffusers"], "tokenizer")
    return TinyFamily(
        "sd",
        ("--pretrained_model_name_or_path", files["sd1-safetensors"], "--tokenizer_cache_dir", tokenizers),
        ("--pretrained_model_name_or_path", files["sd1-diffusers"]),
        {"network": "train_network.py", "finetune": "fine_tune.py"},
        files=files,
    )
