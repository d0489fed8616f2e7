"""Our trainer next to a reference trainer install (kohya-ss sd-scripts), the same LoRA run, whole-run wall time and
peak memory.

Usage: python benchmarks/compare_reference.py --reference_dir ~/sd-scripts
    [--reference_python ~/sd-scripts/venv/bin/python] [--model sd15|tiny] [--steps 8] [--rounds 2]
    [--threads 2] [--results file.jsonl]

Both run `<python> train_network.py` with the options they share (the dataset TOML, LoRA dim 8 on the UNet and the
text encoder, AdamW at 1e-4, fp32, batch 1, 16 images at 256 px, no data-loader workers, seed 0), in fresh processes,
alternating (ours, reference, ours, reference...) so both see the same load. A run is measured from the outside:
wall time from start to exit and the peak resident memory of the process (`wait4`). Without a reference install
(no --reference_dir and no SD_SCRIPTS_DIR) one line says the comparison was skipped.

JSON lines: `compare/<model>/ours`, `compare/<model>/reference` (seconds = median wall time of a run) and
`compare/<model>/ratio` (ours / reference, for wall time and peak RSS; the issue's goals: at most 0.60 and 0.65).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness

SCRIPT = "train_network.py"
REFERENCE_TOKENIZER = "openai_clip-vit-large-patch14"


def shared_options(model: str, dataset: str, tokenizer: str, out_dir: str, steps: int) -> list[str]:
    return [
        "--pretrained_model_name_or_path", model, "--dataset_config", dataset, "--tokenizer_cache_dir", tokenizer,
        "--output_dir", out_dir, "--output_name", "compare", "--save_model_as", "safetensors",
        "--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "8",
        "--max_train_steps", str(steps), "--learning_rate", "1e-4", "--optimizer_type", "AdamW",
        "--mixed_precision", "no", "--seed", "0", "--max_data_loader_n_workers", "0",
    ]  # fmt: skip


def measure_run(python: str, directory: str, options: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, output) of one fresh run."""
    with tempfile.TemporaryFile("w+") as output:
        started = time.perf_counter()
        process = subprocess.Popen([python, SCRIPT, *options], cwd=directory, env=env, stdout=output,
                                   stderr=subprocess.STDOUT)  # fmt: skip
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read()
    if process.returncode != 0:
        raise RuntimeError(f"{python} {SCRIPT} in {directory} failed (exit {process.returncode}):\n{text[-4000:]}")
    return seconds, usage.ru_maxrss * 1024, text  # ru_maxrss is in KiB on Linux


def record(name: str, settings: dict, seconds: list[float], peaks: list[int]) -> dict:
    return harness.make_record(name, "sd", settings, harness.device_name(), seconds, max(peaks), peak_rss_all=peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference_dir", default=os.environ.get("SD_SCRIPTS_DIR"),
                        help="a checkout of the reference trainer (default: $SD_SCRIPTS_DIR)")
    parser.add_argument("--reference_python", default=None,
                        help="the Python of the reference's environment (default: its venv's, else this one)")
    parser.add_argument("--model", choices=["tiny", "sd15"], default="sd15")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=harness.cpu_count())
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256)
    harness.add_common_arguments(parser)
    args = parser.parse_args()

    settings = {"model": args.model, "steps": args.steps, "images": args.images, "resolution": args.resolution,
                "threads": args.threads, "lora_dim": 8, "optimizer": "AdamW", "precision": "fp32"}  # fmt: skip
    if not args.reference_dir or not os.path.isfile(os.path.join(args.reference_dir, SCRIPT)):
        harness.emit({"name": f"compare/{args.model}/skipped", "settings": settings,
                      "skipped": "no reference install (--reference_dir or SD_SCRIPTS_DIR with train_network.py)"},
                     args.results)  # fmt: skip
        return
    reference_python = args.reference_python or next(
        (path for path in (os.path.join(args.reference_dir, folder, "bin", "python") for folder in ("venv", ".venv"))
         if os.path.isfile(path)), sys.executable)  # fmt: skip
    model = harness.full_sd15_model(args.work_dir) if args.model == "sd15" else harness.tiny_sd_model(args.work_dir)
    dataset = harness.square_image_dataset(args.work_dir, args.images, args.resolution)
    # one --tokenizer_cache_dir in the reference's layout (<hub id with _ for />/), which ours reads as well
    tokenizers = os.path.join(args.work_dir, "tokenizer_cache_reference")
    if not os.path.isdir(os.path.join(tokenizers, REFERENCE_TOKENIZER)):
        shutil.copytree(harness.tokenizer_folder(args.work_dir), os.path.join(tokenizers, REFERENCE_TOKENIZER))
    runs = {"ours": (sys.executable, harness.REPO_ROOT, ["--cpu_threads", str(args.threads)]),
            "reference": (reference_python, args.reference_dir, [])}  # fmt: skip
    measured: dict[str, tuple[list[float], list[int]]] = {name: ([], []) for name in runs}
    for _ in range(args.rounds):
        for name, (python, directory, extra) in runs.items():
            with tempfile.TemporaryDirectory(prefix="compare_") as temp:
                env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads),
                           HF_HOME=os.path.join(temp, "hf_home"), PYTHONUNBUFFERED="1")  # fmt: skip
                options = shared_options(model, dataset, tokenizers, os.path.join(temp, "out"), args.steps) + extra
                seconds, peak, _ = measure_run(python, directory, options, env)
            measured[name][0].append(seconds)
            measured[name][1].append(peak)
    records = {name: record(f"compare/{args.model}/{name}", settings, *values) for name, values in measured.items()}
    for result in records.values():
        harness.emit(result, args.results)
    ours, reference = records["ours"], records["reference"]
    harness.emit({
        "name": f"compare/{args.model}/ratio", "settings": settings,
        "wall_ratio": round(ours["seconds"] / reference["seconds"], 3),
        "peak_rss_ratio": round(ours["peak_rss_bytes"] / reference["peak_rss_bytes"], 3),
        "goals": {"wall_ratio": 0.60, "peak_rss_ratio": 0.65},
    }, args.results)  # fmt: skip


if __name__ == "__main__":
    main()
