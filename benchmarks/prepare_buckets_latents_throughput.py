"""Throughput of finetune/prepare_buckets_latents.py with the full-size SD VAE (random weights), in images/second.

The checkpoint pairs the released VAE architecture with a tiny UNet and text encoder, so only the VAE costs time.
Prints one JSON line (benchmarks/harness.py) with `images_per_second` and `cpu_seconds_per_image`; `seconds` is the
encoding phase (model loading is in settings).
Usage: python benchmarks/prepare_buckets_latents_throughput.py --count 16 --size 256 --batch_size 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from PIL import Image

from benchmarks import harness
from finetune import prepare_buckets_latents as tool
from library.checkpoints import sd_keys
from library.testing import tiny_configs
from library.testing.tiny_models import SDModels, write_single_file


def write_model(path: str) -> str:
    """An SD 1.x single file whose VAE is the released kl-f8 architecture, with random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = sd_keys.SDArchitecture(
        False,
        tiny_configs.tiny_unet_config(False),
        tiny_configs.sd_vae_config(),
        tiny_configs.tiny_text_encoder_config(False),
    )
    torch.manual_seed(0)
    models = SDModels(
        arch,
        UNet2DConditionModel(**arch.unet_config),
        AutoencoderKL(**arch.vae_config),
        CLIPTextModel(CLIPTextConfig(**arch.text_config)),
    )
    return write_single_file(models, path)


def write_images(folder: str, count: int, size: int) -> str:
    """`count` random RGB images of size x size and a metadata file with a caption each; returns the metadata."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(f"{folder}/img{index:04d}.png")
    metadata_path = os.path.join(folder, "meta.json")
    with open(metadata_path, "w", encoding="utf-8") as handle:
        json.dump({f"img{index:04d}": {"caption": "noise"} for index in range(count)}, handle)
    return metadata_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=16, help="images")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--results", default=None, help="also append the JSON line to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        model = write_model(os.path.join(work, "sd-full-vae.safetensors"))
        folder = os.path.join(work, "train")
        metadata = write_images(folder, args.count, args.size)
        argv = [
            folder,
            metadata,
            os.path.join(work, "out.json"),
            model,
            "--batch_size",
            str(args.batch_size),
            "--max_resolution",
            f"{args.size},{args.size}",
            "--min_bucket_reso",
            str(min(256, args.size)),
            "--mixed_precision",
            args.mixed_precision,
        ]
        tool_args = tool.build_parser().parse_args(argv)
        plan = tool.plan_images(
            tool.SourceOptions.from_args(tool_args),
            tool.read_metadata(metadata, "in_json"),
            tool.BucketOptions.from_args(tool_args),
            tool.SkippedFiles(),
        )
        started = time.perf_counter()
        encoder = tool.LatentEncoder(tool.ModelOptions.from_args(tool_args))
        loaded, cpu_start = time.perf_counter(), time.process_time()
        encoding = tool.EncodeOptions.from_args(tool_args)
        tool.encode_all(plan, list(range(len(plan.paths))), encoder, encoding, tool.SkippedFiles())
        seconds, cpu_seconds = time.perf_counter() - loaded, time.process_time() - cpu_start
    settings = {
        "images": args.count,
        "size": args.size,
        "batch_size": args.batch_size,
        "mixed_precision": args.mixed_precision,
        "torch_threads": torch.get_num_threads(),
        "model_load_seconds": round(loaded - started, 2),
    }
    device = str(next(encoder.models.vae.parameters()).device)
    record = harness.make_record(
        "prepare_buckets_latents", "sd", settings, device, [seconds], harness.peak_rss_bytes(),
        harness.peak_gpu_bytes(), images_per_second=round(args.count / seconds, 3),
        # CPU time shows the cost even when other jobs share the cores (wall time then mostly measures waiting)
        cpu_seconds_per_image=round(cpu_seconds / args.count, 3),
    )
    harness.emit(record, args.results)


if __name__ == "__main__":
    main()
