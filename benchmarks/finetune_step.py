"""Full fine-tuning speed and memory on the full-size SD 1.5 architecture (random weights), through the real loop.

Usage: python benchmarks/finetune_step.py [--folder /tmp/finetune_step_bench] [--steps 3] [--warmup 1]
    [--settings unet unet_gc unet_te] [--resolution 256]

The model (the SD 1.5 UNet, VAE and CLIP-L shapes, random fp16 weights in the original single-file layout, ~2 GB)
and a toy dataset are written once into --folder and reused. Each setting trains in a fresh Python process
(`fine_tune.py` / `train_db.py` options, batch 1, fp32, AdamW) for warmup + steps steps and prints one JSON line:
{"name", "family", "settings", "device", "median_step_seconds", "step_seconds", "peak_rss_bytes",
"rss_before_training_bytes", "versions"}. Step time is measured between the starts of consecutive steps (data,
forward, backward, optimizer); peak RSS is the process's high-water mark (training state dominates it).
Full AdamW training of the UNet needs about 4 bytes x 4 per parameter (weights, gradients, two moments): ~14 GB.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {
    "unet": ("finetune", []),  # fine_tune.py default: the UNet only
    "unet_gc": ("finetune", ["--gradient_checkpointing"]),
    "unet_te": ("dreambooth", []),  # train_db.py default: UNet and text encoder
}


def prepare(folder: str, resolution: int) -> tuple[str, str, str]:
    """The model file, dataset config and tokenizer folder, written once."""
    sys.path.insert(0, REPO_ROOT)
    from library.checkpoints.tokenizers import write_clip_tokenizer_files
    from library.testing.toy_data import write_toy_dataset

    os.makedirs(folder, exist_ok=True)
    model = os.path.join(folder, "sd15-random.safetensors")
    if not os.path.exists(model):
        started = time.perf_counter()
        # In its own process, so that building the fp32 models does not count towards any measurement.
        command = [sys.executable, "-m", "library.testing.tiny_models", "--variant", "sd15-full", "--out", folder]
        subprocess.run(command, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
        print(f"wrote {model} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    tokenizer = os.path.join(folder, "tokenizer")
    if not os.path.isfile(os.path.join(tokenizer, "vocab.json")):
        write_clip_tokenizer_files(tokenizer)
    data = os.path.join(folder, f"data{resolution}")
    config = os.path.join(data, "dataset.toml")
    if not os.path.exists(config):
        write_toy_dataset(data, count=4, resolution=resolution, batch_size=1, enable_bucket=False)
    return model, config, tokenizer


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name: str, folder: str, resolution: int, warmup: int, steps: int) -> dict:
    """Train one setting in this process and return its measurement."""
    sys.path.insert(0, REPO_ROOT)
    import torch

    from library.families.sd import SDFamily
    from library.methods import get_method_class
    from library.training.entry import build_parser, configure_logging
    from library.training.trainer import train

    model, config, tokenizer = prepare(folder, resolution)
    method_id, extra = SETTINGS[name]
    base_class = get_method_class(method_id)
    starts: list[float] = []
    rss_before: list[int] = []

    class Timed(base_class):
        """Records when each step starts; saves nothing (the benchmark measures steps)."""

        def on_step_start(self, models, global_step):
            if not starts:
                rss_before.append(_rss_bytes())
            starts.append(time.perf_counter())
            super().on_step_start(models, global_step)

        def save(self, path, metadata, unwrap):
            starts.append(time.perf_counter())  # the end of the last step

    with tempfile.TemporaryDirectory() as out_dir:
        argv = [
            "--pretrained_model_name_or_path", model, "--dataset_config", config, "--output_dir", out_dir,
            "--tokenizer_cache_dir", tokenizer, "--max_train_steps", str(warmup + steps), "--seed", "0",
            "--max_data_loader_n_workers", "0", "--learning_rate", "1e-6", *extra,
        ]  # fmt: skip
        args = build_parser(SDFamily, Timed, __doc__).parse_args(argv)
        configure_logging()
        train(SDFamily(args), Timed(args), args)
    step_seconds = [later - earlier for earlier, later in itertools.pairwise(starts)][warmup:]
    import diffusers
    import transformers

    return {
        "name": f"finetune_step/{name}",
        "family": "sd",
        "settings": {
            "model": "sd15-full (random weights)",
            "method": method_id,
            "options": extra,
            "resolution": resolution,
            "batch_size": 1,
            "precision": "fp32",
            "optimizer": "AdamW",
            "warmup_steps": warmup,
            "steps": steps,
        },
        "device": f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
        "median_step_seconds": round(statistics.median(step_seconds), 3),
        "step_seconds": [round(value, 3) for value in step_seconds],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_training_bytes": rss_before[0] if rss_before else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "finetune_step_bench"))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per setting")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["unet", "unet_gc"])
    parser.add_argument("--measure", choices=sorted(SETTINGS), help=argparse.SUPPRESS)  # one setting, in-process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.folder, args.resolution, args.warmup, args.steps)), flush=True)
        return
    prepare(args.folder, args.resolution)
    for name in args.settings:
        command = [sys.executable, os.path.abspath(__file__), "--measure", name, "--folder", args.folder,
                   "--resolution", str(args.resolution), "--warmup", str(args.warmup), "--steps", str(args.steps)]
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or not lines:
            print(f"{name} failed (exit {result.returncode}):\n{result.stderr[-3000:]}", file=sys.stderr)
            continue
        print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
