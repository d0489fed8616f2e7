"""The floor: the least a training step of an SD model can cost, measured with a minimal hand-written PyTorch loop.

Usage: python benchmarks/floor_step.py --model sd15 [--train_text_encoder] [--cached_latents]
    [--gradient_checkpointing] [--method lora|full] [--steps 4] [--warmup 1] [--threads 2]

The same models as benchmarks/train_step.py (diffusers UNet2DConditionModel, AutoencoderKL and transformers
CLIPTextModel, loaded from the same file), our networks/lora.py LoRA (dim 8) or the whole UNet, the same 16
images at batch 1, fp32, AdamW. Each step does only: VAE encode (without cached latents), text encode, noise,
UNet forward, MSE loss, backward, optimizer step, zero grad. Images, token ids and (with --cached_latents) latents
are prepared before the timed steps. Prints one JSON line (see benchmarks/harness.py), name `floor_step/...`.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from PIL import Image

from benchmarks import harness

VAE_SCALE = 0.18215  # SD 1.x latent scaling factor


@dataclass
class FloorModels:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module


@dataclass
class FloorBatches:
    """Per image: pixels (1, 3, H, W) in [-1, 1] or raw latents (1, 4, h, w), and token ids (1, 77)."""

    inputs: list[torch.Tensor]
    token_ids: list[torch.Tensor]


def load_models(path: str, device: str) -> FloorModels:
    """The three models from an LDM single file, in fp32, frozen, in eval mode (weights assigned, not copied)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.checkpoints import sd_keys
    from library.checkpoints.files import load_state_dict

    state_dict = load_state_dict(path)
    arch = sd_keys.infer_architecture(state_dict)
    parts = sd_keys.split_ldm_checkpoint(state_dict, arch)
    del state_dict
    with init_empty_weights(include_buffers=False):
        unet = UNet2DConditionModel(**arch.unet_config)
        vae = AutoencoderKL(**arch.vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text_config))
    text_state = sd_keys.text_encoder_to_model_keys(parts.text_encoder, text_encoder)
    for model, weights in ((unet, parts.unet), (vae, parts.vae), (text_encoder, text_state)):
        model.load_state_dict({key: value.float() for key, value in weights.items()}, assign=True)
        model.requires_grad_(False)
        model.eval()
        model.to(device)
    return FloorModels(unet, vae, text_encoder)


def load_batches(image_dir: str, tokenizer_dir: str, device: str) -> FloorBatches:
    """The images and captions of the dataset, tokenized to 77 ids (BOS, caption, EOS, padding) like ours."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    inputs, token_ids = [], []
    for path in sorted(glob.glob(os.path.join(image_dir, "*.png"))):
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
        inputs.append(torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device))  # (1, 3, H, W)
        with open(os.path.splitext(path)[0] + ".txt", encoding="utf-8") as handle:
            caption = handle.read().strip()
        ids = tokenizer(caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        token_ids.append(ids.to(device))
    return FloorBatches(inputs, token_ids)


def encode_all(models: FloorModels, batches: FloorBatches, synchronize: bool) -> list[float]:
    """Replace the pixels by raw latents (1, 4, H/8, W/8), one image at a time; returns the seconds of each.

    This is the raw VAE encode that a latent cache is compared with.
    """
    seconds = []
    for index, image in enumerate(batches.inputs):
        with torch.no_grad():
            started = time.perf_counter()
            batches.inputs[index] = models.vae.encode(image).latent_dist.sample()
            if synchronize:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - started)
    return seconds


def trainable_parameters(models: FloorModels, method: str, train_text_encoder: bool) -> list[torch.nn.Parameter]:
    """LoRA dim 8 from networks/lora.py on the UNet (and text encoder), or the whole UNet."""
    if method == "full":
        models.unet.requires_grad_(True)
        return list(models.unet.parameters())
    from library.adapters.targets import with_text_model_level
    from networks import lora

    text_view = with_text_model_level(models.text_encoder)
    network = lora.create_network(1.0, 8, 8, models.vae, text_view, models.unet)
    network.apply_to(text_view, models.unet, train_text_encoder, True)
    network.to(next(models.unet.parameters()).device)
    network.requires_grad_(True)
    network.train()
    return list(network.parameters())


def make_step(models: FloorModels, batches: FloorBatches, optimizer: torch.optim.Optimizer, cached: bool,
              train_text_encoder: bool) -> Callable[[], None]:
    """One training step per call, cycling through the images."""
    from library.checkpoints.sd_configs import ddpm_scheduler

    scheduler = ddpm_scheduler(v_parameterization=False)
    position = {"index": 0}

    def step() -> None:
        index = position["index"] % len(batches.inputs)
        position["index"] += 1
        with torch.no_grad():
            raw = batches.inputs[index]
            latents = (raw if cached else models.vae.encode(raw).latent_dist.sample()) * VAE_SCALE
        with torch.set_grad_enabled(train_text_encoder):
            hidden = models.text_encoder(batches.token_ids[index]).last_hidden_state  # (1, 77, 768)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = models.unet(noisy, timesteps, hidden).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def settings_of(args: argparse.Namespace) -> dict:
    return {
        "model": args.model,
        "method": args.method,
        "train_text_encoder": args.train_text_encoder,
        "cached_latents": args.cached_latents,
        "gradient_checkpointing": args.gradient_checkpointing,
        "resolution": args.resolution,
        "images": args.images,
        "batch_size": 1,
        "precision": "fp32",
        "optimizer": "AdamW",
        "network_dim": 8 if args.method == "lora" else None,
        "warmup_steps": args.warmup,
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "malloc": "reuse" if all(os.environ.get(k) == v for k, v in harness.MALLOC_REUSE.items()) else "default",
    }


def measure(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    write_model = harness.full_sd15_model if args.model == "sd15" else harness.tiny_sd_model
    model_path = write_model(args.work_dir)
    config = harness.square_image_dataset(args.work_dir, args.images, args.resolution)
    models = load_models(model_path, device)
    batches = load_batches(os.path.join(os.path.dirname(config), "images"), harness.tokenizer_folder(args.work_dir),
                           device)
    encode_seconds = encode_all(models, batches, device == "cuda") if args.cached_latents else []
    params = trainable_parameters(models, args.method, args.train_text_encoder)
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            models.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    step = make_step(models, batches, optimizer, args.cached_latents, args.train_text_encoder)
    rss_before, peak_before = harness.current_rss_bytes(), harness.peak_rss_bytes()
    reset = harness.reset_peak_rss()
    times = harness.time_calls(step, args.warmup, args.steps, synchronize=device == "cuda")
    peak_steps = harness.peak_rss_bytes() if reset else None
    name = f"floor_step/{args.model}/{args.setting_name or 'custom'}"
    return harness.make_record(
        name, "sd", settings_of(args), harness.device_name(device), times.wall,
        max(harness.peak_rss_bytes(), peak_before), harness.peak_gpu_bytes(),
        step_cpu_seconds=round(harness.median(times.cpu), 4), step_sys_seconds=round(harness.median(times.system), 4),
        step_minor_faults=int(harness.median(times.minor_faults)), rss_before_steps_bytes=rss_before,
        peak_rss_before_steps_bytes=peak_before, peak_rss_training_bytes=peak_steps,
        trainable_parameters=sum(param.numel() for param in params),
        raw_encode_seconds=round(sum(encode_seconds), 3) if encode_seconds else None,
        raw_encode_images=len(encode_seconds),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_arguments(parser)
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--train_text_encoder", action="store_true", help="LoRA on the text encoder too")
    parser.add_argument("--cached_latents", action="store_true", help="latents encoded before the timed steps")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=harness.cpu_count(), help="torch CPU threads")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--setting_name", default=None, help="the train_step.py setting this floor belongs to")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    harness.emit(measure(args), args.results)


if __name__ == "__main__":
    main()
