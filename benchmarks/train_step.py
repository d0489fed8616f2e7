"""Training step time, launch-to-first-step time and peak memory of our real entry scripts, next to the floor.

Usage: python benchmarks/train_step.py --model sd15 --settings lora_unet_te lora_unet_cached [--steps 4]
    [--warmup 1] [--rounds 2] [--no_floor] [--results results.jsonl] [--work_dir ~/.cache/...]

Each run is `accelerate launch <entry script> ...` (or plain `python`, --launcher) in a fresh process, as a user
starts it, on the tiny test model or the full-size SD 1.5 architecture with random weights (written once into
--work_dir), with 16 toy images at 256 px, batch 1, fp32, AdamW. The script itself is not changed:
benchmarks/hook/sitecustomize.py, put on PYTHONPATH, wraps the loop's `_train_step` with clock reads and reports
the times and the peak resident memory of the training process. For every setting, ours and the floor
(benchmarks/floor_step.py: the same work in a minimal hand-written loop) alternate `--rounds` times (A/B/A/B), so
that both see the same load on a shared machine.
JSON lines: `train_step/<model>/<setting>`, `floor_step/<model>/<setting>` and `overhead/<model>/<setting>`
(`<setting>+malloc_reuse` with --malloc reuse).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness

HOOK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hook")
LORA_OPTIONS = ("--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "8")


@dataclass(frozen=True)
class Setting:
    """One configuration: the entry script and its options, and the floor_step.py flags doing the same work."""

    script: str
    options: tuple[str, ...]
    floor: tuple[str, ...]
    cached_latents: bool = False


SETTINGS = {
    "lora_unet_te": Setting("train_network.py", LORA_OPTIONS, ("--train_text_encoder",)),
    "lora_unet_te_gc": Setting("train_network.py", (*LORA_OPTIONS, "--gradient_checkpointing"),
                               ("--train_text_encoder", "--gradient_checkpointing")),
    "lora_unet_cached": Setting("train_network.py", (*LORA_OPTIONS, "--network_train_unet_only", "--cache_latents"),
                                ("--cached_latents",), cached_latents=True),
    "lora_unet_cached_gc": Setting("train_network.py", (*LORA_OPTIONS, "--network_train_unet_only", "--cache_latents",
                                                        "--gradient_checkpointing"),
                                   ("--cached_latents", "--gradient_checkpointing"), cached_latents=True),
    "finetune_unet": Setting("fine_tune.py", ("--save_precision", "fp16"), ("--method", "full")),
    "finetune_unet_gc": Setting("fine_tune.py", ("--save_precision", "fp16", "--gradient_checkpointing"),
                                ("--method", "full", "--gradient_checkpointing")),
}


@dataclass
class Inputs:
    """The files a run reads, prepared once."""

    model: str
    dataset: str
    tokenizer: str


def prepare(model: str, work_dir: str, images: int, resolution: int) -> Inputs:
    path = harness.full_sd15_model(work_dir) if model == "sd15" else harness.tiny_sd_model(work_dir)
    return Inputs(path, harness.square_image_dataset(work_dir, images, resolution), harness.tokenizer_folder(work_dir))


def environment(hook_out: str | None, extra: dict[str, str], args: argparse.Namespace | None = None) -> dict[str, str]:
    """The environment of a measured process: offline, with the hook when `hook_out` is given.

    `--malloc reuse` keeps glibc from mapping and unmapping the large activation buffers at every step (see
    harness.MALLOC_REUSE); ours and the floor then pay no page faults for them, so their ratio shows the loop alone.

    OMP_WAIT_POLICY=PASSIVE stops idle OpenMP threads from spinning. On a machine whose cores other jobs share,
    spinning threads of every torch process steal the cores that stragglers need, and 2-thread steps then take
    3 times as long as 1-thread steps; with PASSIVE they stay close to the times of an idle machine.
    """
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    if args is not None and args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    if args is not None and args.malloc == "reuse":
        env.update(harness.MALLOC_REUSE)
    if hook_out:
        env["BENCH_HOOK_OUT"] = hook_out
        env["PYTHONPATH"] = os.pathsep.join([HOOK_DIR, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def command_of(setting: Setting, inputs: Inputs, out_dir: str, args: argparse.Namespace) -> list[str]:
    """`accelerate launch` (or plain `python`) with the options a user would give for this setting."""
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    launcher = [accelerate, "launch", "--quiet", "--num_processes", "1", "--num_machines", "1", "--mixed_precision",
                "no", "--dynamo_backend", "no"] if args.launcher == "accelerate" else [sys.executable]
    return [
        *launcher, setting.script,
        "--pretrained_model_name_or_path", inputs.model, "--dataset_config", inputs.dataset,
        "--tokenizer_cache_dir", inputs.tokenizer, "--output_dir", out_dir, "--output_name", "bench",
        "--max_train_steps", str(args.warmup + args.steps), "--learning_rate", "1e-4", "--optimizer_type", "AdamW",
        "--mixed_precision", "no", "--seed", "0", "--max_data_loader_n_workers", "0",
        "--cpu_threads", str(args.threads),
        *setting.options, *args.extra_args.split(),
    ]  # fmt: skip


@dataclass
class RunTimes:
    """What one run of ours measured (times in seconds from the launch)."""

    hook: dict
    launched: float
    output: str


def run_ours(setting: Setting, inputs: Inputs, args: argparse.Namespace, profile: str | None = None) -> RunTimes:
    """Launch the entry script with the hook and return what the hook recorded."""
    with tempfile.TemporaryDirectory(prefix="train_step_") as temp:
        hook_out = os.path.join(temp, "hook.json")
        extra = {"HF_HOME": os.path.join(temp, "hf_home")}
        if profile:
            extra.update({"BENCH_PROFILE": profile.split(":", 1)[0], "BENCH_PROFILE_OUT": profile.split(":", 1)[1]})
        command = command_of(setting, inputs, os.path.join(temp, "out"), args)
        launched = time.monotonic()
        result = subprocess.run(command, cwd=harness.REPO_ROOT, env=environment(hook_out, extra, args),
                                capture_output=True, text=True, check=False)
        output = result.stdout + result.stderr
        unknown = re.search(r"unrecognized arguments: (.*)", output)
        if unknown:  # an option this checkout does not have yet (e.g. a benchmark newer than the code)
            raise RuntimeError(f"{setting.script} has no {unknown.group(1).strip()}: setting skipped")
        if result.returncode != 0 or not os.path.isfile(hook_out):
            raise RuntimeError(f"{setting.script} failed (exit {result.returncode}):\n{output[-4000:]}")
        with open(hook_out, encoding="utf-8") as handle:
            return RunTimes(json.load(handle), launched, output)


def step_seconds(hook: dict, warmup: int) -> tuple[list[float], list[float]]:
    """(start of a step to the start of the next, the last step to its end; the loop's step function alone)."""
    starts, ends = hook["step_starts"], hook["step_ends"]
    whole = [later - earlier for earlier, later in itertools.pairwise(starts)] + [ends[-1] - starts[-1]]
    inner = [end - start for start, end in zip(starts, ends, strict=True)]
    return whole[warmup:], inner[warmup:]


def phases_of(times: RunTimes) -> dict[str, float]:
    """When each phase began, in seconds from the launch."""
    hook = times.hook
    marks = {"python_started": hook["process_start"], **hook["phases"], "first_step": hook["step_starts"][0]}
    phases = {name: round(value - times.launched, 3) for name, value in marks.items()}
    loaded = re.search(r"models loaded in ([0-9.]+) s", times.output)
    if loaded:
        phases["model_load_seconds"] = float(loaded.group(1))
    return phases


def caching_seconds(phases: dict[str, float]) -> float | None:
    """How long the latent cache took to fill (from its start to the data loader's creation)."""
    if "cache_dataset_latents" not in phases or "_make_dataloader" not in phases:
        return None
    return round(phases["_make_dataloader"] - phases["cache_dataset_latents"], 3)


def ours_record(model: str, name: str, setting: Setting, times: RunTimes, warmup: int, settings: dict) -> dict:
    whole, inner = step_seconds(times.hook, warmup)
    phases = phases_of(times)
    cached = caching_seconds(phases) if setting.cached_latents else None
    return harness.make_record(
        f"train_step/{model}/{name}", "sd", settings, f"cpu ({times.hook.get('torch_threads')} threads)", whole,
        times.hook["peak_rss_bytes"], times.hook.get("peak_gpu_bytes"),
        launch_to_first_step_seconds=phases["first_step"],
        loop_step_seconds=round(statistics.median(inner), 4),
        step_cpu_seconds=round(statistics.median(times.hook["step_cpu_seconds"][warmup:]), 4),
        step_sys_seconds=round(statistics.median(times.hook["step_sys_seconds"][warmup:]), 4),
        step_minor_faults=int(statistics.median(times.hook["step_minor_faults"][warmup:])),
        phases=phases,
        phase_peak_rss_bytes=times.hook["phase_peak_rss"],
        latent_caching_seconds=cached,
        rss_at_first_step_bytes=times.hook["rss_at_first_step_bytes"],
        peak_rss_before_first_step_bytes=times.hook["peak_rss_at_first_step_bytes"],
        peak_rss_training_bytes=times.hook.get("peak_rss_training_bytes"),
    )


def run_floor(model: str, name: str, setting: Setting, args: argparse.Namespace) -> dict:
    """floor_step.py in a fresh process; returns its record."""
    command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor_step.py"),
               "--model", model, "--setting_name", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--work_dir", args.work_dir, "--images", str(args.images),
               "--resolution", str(args.resolution), *setting.floor]  # fmt: skip
    result = subprocess.run(command, cwd=harness.REPO_ROOT, env=environment(None, {}, args),
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"floor_step.py failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return harness.last_json_line(result.stdout)


def overhead_record(model: str, name: str, ours: list[dict], floors: list[dict], settings: dict) -> dict:
    """Our median step over the floor's, all rounds pooled, and the ratio of each round."""
    ours_all = [value for record in ours for value in record["seconds_all"]]
    floor_all = [value for record in floors for value in record["seconds_all"]]
    ratio = statistics.median(ours_all) / statistics.median(floor_all)
    rounds = [round(a["seconds"] / b["seconds"], 3) for a, b in zip(ours, floors, strict=False)]
    cpu_ratio = statistics.median(r["step_cpu_seconds"] for r in ours) / statistics.median(
        r["step_cpu_seconds"] for r in floors)
    extra = {}
    caching = [r["latent_caching_seconds"] for r in ours if r.get("latent_caching_seconds")]
    encoding = [r["raw_encode_seconds"] for r in floors if r.get("raw_encode_seconds")]
    if caching and encoding:
        caching_seconds, encode_seconds = statistics.median(caching), statistics.median(encoding)
        extra = {"latent_caching_seconds": caching_seconds, "raw_encode_seconds": encode_seconds,
                 "caching_ratio": round(caching_seconds / encode_seconds, 3)}
    return harness.make_record(
        f"overhead/{model}/{name}", "sd", settings, ours[0]["device"], ours_all, None,
        floor_seconds=round(statistics.median(floor_all), 4), floor_seconds_min=min(floor_all),
        overhead_ratio=round(ratio, 3), overhead_ratio_min=round(min(ours_all) / min(floor_all), 3),
        overhead_ratio_cpu=round(cpu_ratio, 3), overhead_ratio_per_round=rounds, **extra,
    )


def measure_setting(model: str, name: str, inputs: Inputs, args: argparse.Namespace) -> None:
    setting = SETTINGS[name]
    settings = {"model": model, "script": setting.script, "options": [*setting.options, *args.extra_args.split()],
                "images": args.images,
                "resolution": args.resolution, "batch_size": 1, "precision": "fp32", "optimizer": "AdamW",
                "warmup_steps": args.warmup, "launcher": args.launcher, "data_loader_workers": 0,
                "threads": args.threads, "omp_wait_policy": args.omp_wait_policy or None, "malloc": args.malloc}
    label = name if args.malloc == "default" else f"{name}+malloc_{args.malloc}"  # the name in the JSON lines
    ours, floors = [], []
    for _ in range(args.rounds):
        times = run_ours(setting, inputs, args)
        ours.append(ours_record(model, label, setting, times, args.warmup, settings))
        harness.emit(ours[-1], args.results)
        if not args.no_floor:
            floors.append(run_floor(model, label, setting, args))
            harness.emit(floors[-1], args.results)
    if floors:
        harness.emit(overhead_record(model, label, ours, floors, settings), args.results)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_arguments(parser)
    parser.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["lora_unet_te", "lora_unet_cached"])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of ours and of the floor, alternating")
    parser.add_argument("--threads", type=int, default=harness.cpu_count(), help="CPU threads (--cpu_threads)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--no_floor", action="store_true", help="measure ours only")
    parser.add_argument("--extra_args", default="", help="more options for our runs, e.g. '--upcast_frozen_weights' "
                        "to measure an option's effect (give it as --extra_args=... when it starts with --)")
    parser.add_argument("--malloc", choices=["default", "reuse"], default="default",
                        help="glibc malloc as installed, or set to keep and reuse freed buffers (see environment())")
    parser.add_argument("--launcher", choices=["accelerate", "python"], default="accelerate",
                        help="start the entry script with `accelerate launch` (as users do) or plain `python`")
    parser.add_argument("--omp_wait_policy", default="PASSIVE",
                        help="OMP_WAIT_POLICY of the measured processes ('' leaves it unset; see environment())")
    parser.add_argument("--profile", default=None, metavar="MODE:PATH",
                        help="one extra run of the first setting with cProfile (steps or startup) written to PATH")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    inputs = prepare(args.model, args.work_dir, args.images, args.resolution)
    failed = []
    for name in args.settings:
        try:
            measure_setting(args.model, name, inputs, args)
        except RuntimeError as err:  # a failed run is reported; the other settings still run
            print(f"{name}: {err}", file=sys.stderr)
            failed.append(name)
    if args.profile:
        run_ours(SETTINGS[args.settings[0]], inputs, args, args.profile)
        print(f"profile written to {args.profile.split(':', 1)[1]}", file=sys.stderr)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
