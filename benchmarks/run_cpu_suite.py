"""The CPU suite in one command: every benchmark in turn, JSON lines appended to one results file, then the report.

Usage: python benchmarks/run_cpu_suite.py [--name 2026-11-21-cpu] [--skip_full_size] [--full_finetune]

Writes benchmarks/results/<name>.jsonl (appended) and benchmarks/results/<name>.md (rewritten from all its
lines). 11 minutes on 2 idle cores (more when other jobs share them); the full-size SD 1.5 model (~2 GB) and the
images are written once into --work_dir first (about 30 s). Runs never overlap: full-size runs hold 5-7 GB each.
Order: dataset start-up (10,000 images, generated once), tiny-model steps (LoRA with and without cached latents
and full fine-tuning next to the floor; the same with gradient checkpointing, ours only), loader throughput,
full-size LoRA steps with and without cached latents (two rounds of ours and the floor), the LoRA step again with
glibc malloc set to reuse buffers (one round of each; see train_step.py --malloc), and with gradient checkpointing
(ours only). Full fine-tuning of the full-size UNet needs about 17 GB and is left to
--full_finetune.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_SETTINGS = ["lora_unet_te", "lora_unet_cached", "finetune_unet"]


def stages(args: argparse.Namespace, results: str) -> list[tuple[str, list[str]]]:
    """(title, command) of every benchmark of the suite, in order."""
    common = ["--work_dir", args.work_dir, "--results", results]
    step = [os.path.join(HERE, "train_step.py"), *common]
    plan = [
        ("dataset start-up, 10,000 images", [os.path.join(HERE, "dataset_startup.py"), "--results", results]),
        ("tiny model steps", [*step, "--model", "tiny", "--settings", *TINY_SETTINGS, "--rounds", "1", "--steps", "3"]),
        ("tiny model steps, gradient checkpointing (ours only)",
         [*step, "--model", "tiny", "--settings", *(f"{name}_gc" for name in TINY_SETTINGS), "--rounds", "1",
          "--steps", "3", "--no_floor"]),
        ("loader throughput", [os.path.join(HERE, "loader_throughput.py"), *common]),
    ]
    if not args.skip_full_size:
        plan += [
            ("full-size LoRA steps", [*step, "--model", "sd15", "--settings", "lora_unet_te", "lora_unet_cached",
                                      "--rounds", "2", "--steps", "2"]),
            ("full-size LoRA step, allocator set to reuse buffers (ours and the floor)",
             [*step, "--model", "sd15", "--settings", "lora_unet_te", "--rounds", "1", "--steps", "2", "--malloc",
              "reuse"]),
            ("full-size LoRA steps, gradient checkpointing (ours only)",
             [*step, "--model", "sd15", "--settings", "lora_unet_te_gc", "lora_unet_cached_gc", "--rounds", "1",
              "--steps", "2", "--no_floor"]),
        ]
    if args.full_finetune:
        plan.append(("full-size fine-tune steps", [*step, "--model", "sd15", "--settings", "finetune_unet",
                                                   "--rounds", "1", "--steps", "2"]))
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_arguments(parser)
    parser.add_argument("--name", default=f"{datetime.date.today().isoformat()}-cpu", help="results file name")
    parser.add_argument("--skip_full_size", action="store_true", help="only the tiny model and the data benchmarks")
    parser.add_argument("--full_finetune", action="store_true", help="also fine-tune the full-size UNet (~17 GB RAM)")
    args = parser.parse_args()
    results = args.results or os.path.join(HERE, "results", f"{args.name}.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
    started = time.monotonic()
    if not args.skip_full_size:
        harness.full_sd15_model(args.work_dir)
    failed = []
    for title, command in stages(args, results):
        print(f"[{time.monotonic() - started:6.0f} s] {title}", file=sys.stderr, flush=True)
        if subprocess.run([sys.executable, *command], cwd=harness.REPO_ROOT, check=False).returncode != 0:
            failed.append(title)
    subprocess.run([sys.executable, os.path.join(HERE, "report.py"), results], check=True)
    print(f"[{time.monotonic() - started:6.0f} s] done; results in {results}", file=sys.stderr)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
