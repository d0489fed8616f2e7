"""Batches per second from the training data loader, from images and from cached latents.

Usage: python benchmarks/loader_throughput.py [--epochs 20] [--images 16] [--resolution 256]
    [--step_seconds 0.05 | --results results.jsonl]

The dataset is the one benchmarks/train_step.py trains on (toy images with captions, batch 1, no buckets), in its
own copy under --work_dir. Each mode builds the dataset group as the trainer does and iterates its data loader in
the main process (no worker processes, as the step benchmarks run) for --epochs epochs:
- images: every batch decodes and crops a PNG;
- cached_memory: latents from the in-memory latent cache (--cache_latents), filled with the tiny test VAE;
- cached_disk: latents from the per-image cache files (--cache_latents_to_disk), read at every use.
One JSON line each, `loader/<mode>`, with `batches_per_second`. With --step_seconds (or a `train_step/tiny/...`
record in the --results file) the record also gives `batches_per_step`: how many batches the loader makes in the
time of one training step of the tiny model; the loader is never the bottleneck while that is well above 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import harness

MODES = ("images", "cached_memory", "cached_disk")
STEP_RECORD = "train_step/tiny/lora_unet_cached"  # the tiny model's step with cached latents


def build_group(config: str):
    from library.config.dataset_config import load_dataset_config
    from library.data.dataset import DatasetGroup

    return DatasetGroup.from_config(load_dataset_config(config), seed=0, prior_loss_weight=1.0)


def tiny_vae_encoder(seed: int = 0):
    """The tiny test VAE's encoder as the latent cache calls it: (B, 3, H, W) in [-1, 1] -> raw latents."""
    from diffusers import AutoencoderKL

    from library.testing import tiny_configs

    torch.manual_seed(seed)
    vae = AutoencoderKL(**tiny_configs.tiny_vae_config()).eval()

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return vae.encode(images).latent_dist.sample()

    return encode


def remove_cache_files(image_dir: str) -> None:
    from library.data.latent_cache import CACHE_SUFFIX

    for name in os.listdir(image_dir):
        if name.endswith(CACHE_SUFFIX):
            os.remove(os.path.join(image_dir, name))


def measure(mode: str, config: str, epochs: int) -> tuple[float, int, float | None]:
    """(seconds, batches) of iterating the loader for `epochs` epochs, and the seconds filling the cache took."""
    group = build_group(config)
    fill_seconds = None
    if mode != "images":
        remove_cache_files(os.path.join(os.path.dirname(config), "images"))
        started = time.perf_counter()
        group.cache_latents(tiny_vae_encoder(), "loader-benchmark", to_disk=mode == "cached_disk", progress=False)
        fill_seconds = time.perf_counter() - started
        if mode == "cached_disk":  # read from the files, as a later run does
            group = build_group(config)
            group.cache_latents(tiny_vae_encoder(), "loader-benchmark", to_disk=True, progress=False)
    loader = group.make_dataloader(num_workers=0, persistent=False)
    batches = 0
    started = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            batches += 1
            assert (batch.get("latents") is None) == (mode == "images")  # the mode really is what is measured
    return time.perf_counter() - started, batches, fill_seconds


def tiny_step_seconds(args: argparse.Namespace) -> float | None:
    """--step_seconds, or the newest tiny-model step with cached latents in the results file."""
    if args.step_seconds or not args.results or not os.path.isfile(args.results):
        return args.step_seconds
    found = None
    with open(args.results, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("name") == STEP_RECORD:
                found = record["seconds"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_arguments(parser)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--step_seconds", type=float, default=None, help="the tiny model's step time to compare with")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(harness.cpu_count())
    config = harness.square_image_dataset(os.path.join(args.work_dir, "loader"), args.images, args.resolution)
    step_seconds = tiny_step_seconds(args)
    for mode in args.modes:
        seconds, batches, fill_seconds = measure(mode, config, args.epochs)
        per_batch = seconds / batches
        settings = {"images": args.images, "resolution": args.resolution, "batch_size": 1, "epochs": args.epochs,
                    "workers": 0}
        record = harness.make_record(
            f"loader/{mode}", "sd", settings, "cpu", [per_batch], harness.peak_rss_bytes(),
            batches_per_second=round(1 / per_batch, 1), batches=batches,
            cache_fill_seconds=None if fill_seconds is None else round(fill_seconds, 3),
            tiny_step_seconds=step_seconds,
            batches_per_step=None if step_seconds is None else round(step_seconds / per_batch, 1),
        )
        harness.emit(record, args.results)


if __name__ == "__main__":
    main()
