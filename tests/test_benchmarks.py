"""The benchmark harness still measures a real training run, and a model load keeps no view of its checkpoint file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from library.families.sd import SDFamily
from tests.conftest import REPO_ROOT
from tests.test_sd_family import family_args


def test_train_step_benchmark_measures_two_steps_of_the_tiny_model(tiny_models_dir, tokenizer_dir, tmp_path):
    work = tmp_path / "work"
    (work / "tiny").mkdir(parents=True)
    (work / "tiny" / "sd1.safetensors").symlink_to(os.path.join(tiny_models_dir, "sd1.safetensors"))
    (work / "tokenizer").symlink_to(tokenizer_dir)
    results = tmp_path / "results.jsonl"
    command = [sys.executable, "benchmarks/train_step.py", "--model", "tiny", "--settings", "lora_unet_te",
               "--rounds", "1", "--warmup", "1", "--steps", "1", "--no_floor", "--launcher", "python",
               "--threads", "1", "--images", "2", "--resolution", "64", "--work_dir", str(work),
               "--results", str(results)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["name"] == "train_step/tiny/lora_unet_te"
    assert record["repeats"] == 1 and record["seconds"] > 0
    phases = record["phases"]
    assert 0 < phases["python_started"] < phases["train"] < phases["_place_models"] <= phases["first_step"]
    assert record["launch_to_first_step_seconds"] == phases["first_step"]
    assert record["peak_rss_bytes"] >= record["rss_at_first_step_bytes"] > 100 * 2**20
    assert record["settings"]["threads"] == 1 and record["versions"]["torch"] == torch.__version__


def _mapped_ranges(path: str) -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps", encoding="ascii", errors="replace") as handle:
        for line in handle:
            if line.rstrip().endswith(os.path.realpath(path)):
                start, end = line.split()[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    return ranges


def test_sd_load_leaves_no_tensor_inside_a_mapping_of_the_checkpoint_file(tiny_models_dir, tokenizer_dir):
    # The loader reads the file into memory of its own and frees each tensor as its converted copy arrives; a
    # tensor left as a view of a file mapping would keep every page of the file resident for the whole run (2 GB
    # for an fp16 SD 1.5 file trained in fp32).
    path = os.path.join(tiny_models_dir, "sd1.safetensors")
    models = SDFamily(family_args(path, tokenizer_cache_dir=tokenizer_dir)).load(torch.float32)
    tensors = list(models.extras["ldm_extras"].values()) + list(models.denoiser.state_dict().values())
    ranges = _mapped_ranges(path)
    assert tensors and not [t for t in tensors for start, end in ranges if start <= t.data_ptr() < end]
    assert not ranges, "nothing keeps the checkpoint file mapped once the models are loaded"


def test_reference_comparison_runs_both_trainers_alternately_or_says_it_is_skipped(
    tiny_models_dir, tokenizer_dir, tmp_path
):
    work = tmp_path / "work"
    (work / "tiny").mkdir(parents=True)
    (work / "tiny" / "sd1.safetensors").symlink_to(os.path.join(tiny_models_dir, "sd1.safetensors"))
    (work / "tokenizer").symlink_to(tokenizer_dir)
    base = [sys.executable, "benchmarks/compare_reference.py", "--model", "tiny", "--steps", "1", "--rounds", "1",
            "--threads", "1", "--images", "2", "--resolution", "64", "--work_dir", str(work)]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != "SD_SCRIPTS_DIR"}
    skipped = subprocess.run(base, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert skipped.returncode == 0 and json.loads(skipped.stdout.splitlines()[-1])["skipped"].startswith("no reference")
    # this checkout stands in for the reference install: it takes the same command line
    result = subprocess.run([*base, "--reference_dir", REPO_ROOT, "--reference_python", sys.executable],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {record["name"]: record for record in map(json.loads, result.stdout.splitlines())}
    assert set(records) == {"compare/tiny/ours", "compare/tiny/reference", "compare/tiny/ratio"}
    for name in ("ours", "reference"):
        record = records[f"compare/tiny/{name}"]
        assert record["repeats"] == 1 and record["seconds"] > 0 and record["peak_rss_bytes"] > 100 * 2**20
    ratio = records["compare/tiny/ratio"]
    assert ratio["wall_ratio"] > 0 and ratio["peak_rss_ratio"] > 0 and ratio["goals"]["wall_ratio"] == 0.6


def test_gpu_suite_grid_leaves_out_what_the_trainer_refuses():
    from benchmarks.gpu_suite import Setting, grid

    settings = grid(["sd15", "flux"], [512], ["bf16", "fp8", "nf4"], [0, 8], [False, True])
    assert Setting("flux", 512, "fp8", 8) in settings and Setting("flux", 512, "nf4", 0, True) in settings
    assert Setting("sd15", 512, "nf4", 0, True) in settings and Setting("sd15", 512, "fp8", 0) in settings
    assert not [s for s in settings if s.model == "sd15" and s.swap]  # the UNet has no block lists
    assert not [s for s in settings if s.swap and (s.base == "nf4" or s.compile)]
    assert len(settings) == len(set(settings)) == 3 * 2 + 3 * 2 + 2  # each: 3 bases x compile; flux: +2 swapped


def test_gpu_suite_checks_itself_on_the_cpu_with_the_tiny_models(tmp_path):
    results = tmp_path / "gpu.jsonl"
    command = [sys.executable, "benchmarks/gpu_suite.py", "--config", "tiny", "--device", "cpu", "--models", "sd15",
               "flux", "--bases", "bf16", "--swaps", "0", "1", "--compile", "off", "--resolutions", "64", "--steps",
               "1", "--warmup", "1", "--results", str(results)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {record["name"]: record for record in map(json.loads, results.read_text().splitlines())}
    assert sorted(records) == ["gpu/flux/64/bf16/swap0", "gpu/flux/64/bf16/swap1", "gpu/sd15/64/bf16/swap0"]
    assert records["gpu/flux/64/bf16/swap1"]["swapped"] == [0, 2]  # the tiny FLUX's single blocks swap
    assert all(record["seconds"] > 0 and record["peak_rss_bytes"] > 0 for record in records.values())
    table = (tmp_path / "gpu.md").read_text()
    assert table.count("| flux | 64 | bf16 |") == 2 and "| sd15 | 64 | bf16 | 0 | off |" in table
