"""What every benchmark shares: the JSON-line record, versions, peak memory, median timing, the cached work folder.

A record is one measurement: {"name", "family", "settings", "device", "seconds" (median over `repeats`),
"seconds_all", "repeats", "peak_rss_bytes", "peak_gpu_bytes" (null off CUDA), "load_average", "time",
"versions"} plus measurement-specific fields. Scripts print it and, with --results, append it to a file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Models and images are written once and reused across runs (the full-size model file is about 2 GB).
DEFAULT_WORK_DIR = os.path.join(os.path.expanduser("~"), ".cache", "diffusion-trainer-benchmarks")
FULL_SD15_FILE = "sd15-random.safetensors"


# glibc malloc settings under which freed buffers are kept and reused (no mmap, no trimming). By default a step's
# large activation buffers are mapped fresh and returned at every step: about 470,000 page faults and 1-1.5 s of
# system time per full-size SD 1.5 step on 2 cores (measured), and timings that depend on the allocator's history.
MALLOC_REUSE = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--work_dir and --results, the same for every script."""
    parser.add_argument(
        "--work_dir",
        default=os.environ.get("BENCH_WORK_DIR", DEFAULT_WORK_DIR),
        help=f"folder of the generated models and images, written once and reused (default {DEFAULT_WORK_DIR})",
    )
    parser.add_argument("--results", default=None, help="also append every JSON line to this file")


def cpu_count() -> int:
    """The cores this process may run on (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def versions() -> dict[str, str]:
    """Python and the versions of the libraries that set the speed; a library that is missing is left out."""
    found = {"python": platform.python_version(), "cpus": str(cpu_count()), "machine": platform.machine()}
    for module_name, key in (("torch", "torch"), ("diffusers", "diffusers"), ("transformers", "transformers"),
                             ("accelerate", "accelerate"), ("numpy", "numpy"), ("PIL", "pillow"), ("cv2", "opencv")):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        found[key] = getattr(module, "__version__", "?")
    return found


def device_name(device: str = "cpu") -> str:
    """`cpu (2 threads)` or the CUDA device's name."""
    if device.startswith("cuda"):
        import torch

        return f"cuda ({torch.cuda.get_device_name()})"
    import torch

    return f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"


def peak_rss_bytes(children: bool = False) -> int:
    """High-water mark of this process's resident memory (or of its largest finished child); Linux reports KiB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Start a new high-water mark of resident memory (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    """Resident memory now (Linux /proc)."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_gpu_bytes() -> int | None:
    """Peak memory allocated by torch on the CUDA device, or None without one (torch not imported: None too)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return int(torch.cuda.max_memory_allocated())


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class CallTimes:
    """Per timed call: wall seconds, CPU seconds (all threads, user + system), system seconds, minor page faults."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    system: list[float] = field(default_factory=list)
    minor_faults: list[int] = field(default_factory=list)


def time_calls(function: Callable[[], object], warmup: int, repeats: int, synchronize: bool = False) -> CallTimes:
    """Times of each of `repeats` calls after `warmup` untimed ones; CUDA work is waited for when asked."""
    sync = _cuda_sync if synchronize else _no_sync
    for _ in range(warmup):
        function()
    sync()
    times = CallTimes()
    for _ in range(repeats):
        usage, started, cpu_started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.process_time()
        function()
        sync()
        times.wall.append(time.perf_counter() - started)
        times.cpu.append(time.process_time() - cpu_started)
        after = resource.getrusage(resource.RUSAGE_SELF)
        times.system.append(after.ru_stime - usage.ru_stime)
        times.minor_faults.append(after.ru_minflt - usage.ru_minflt)
    return times


def _cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _no_sync() -> None:
    pass


def make_record(name: str, family: str | None, settings: dict, device: str, seconds_all: list[float],
                peak_rss: int | None, peak_gpu: int | None = None, **extra: object) -> dict:
    """One measurement in the common format; `seconds` is the median of `seconds_all`."""
    record = {
        "name": name,
        "family": family,
        "settings": settings,
        "device": device,
        "seconds": _round(median(seconds_all)),
        "seconds_min": _round(min(seconds_all, default=None)),
        "seconds_all": [_round(value) for value in seconds_all],
        "repeats": len(seconds_all),
        "peak_rss_bytes": peak_rss,
        "peak_gpu_bytes": peak_gpu,
    }
    record.update(extra)
    record["load_average"] = [round(value, 2) for value in os.getloadavg()]
    record["time"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    record["versions"] = versions()
    return record


def _round(value: float | None) -> float | None:
    """Four significant digits: enough for timings that vary by more than that between runs."""
    return None if value is None else float(f"{value:.4g}")


def emit(record: dict, results: str | None = None) -> None:
    """Print the record as one JSON line and append it to `results` when given."""
    line = json.dumps(record)
    print(line, flush=True)
    if results:
        os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
        with open(results, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def last_json_line(text: str) -> dict:
    """The last line of a child's output that is a JSON object."""
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"no JSON line in the output:\n{text[-3000:]}")
    return json.loads(lines[-1])


def full_sd15_model(work_dir: str) -> str:
    """The full-size SD 1.5 architecture with random fp16 weights as an LDM single file (~2 GB), written once.

    Written in its own process, so that building the models in fp32 never counts towards a measurement.
    """
    path = os.path.join(work_dir, FULL_SD15_FILE)
    if os.path.isfile(path):
        return path
    os.makedirs(work_dir, exist_ok=True)
    started = time.perf_counter()
    code = "import sys; from library.testing.tiny_models import write_full_sd15; write_full_sd15(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, path], cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return path


def tiny_sd_model(work_dir: str) -> str:
    """The tiny SD 1.x model of the tests as an LDM single file, written once."""
    path = os.path.join(work_dir, "tiny", "sd1.safetensors")
    if not os.path.isfile(path):
        code = "import sys; from library.testing.tiny_models import write_variant; write_variant('sd1', sys.argv[1])"
        subprocess.run([sys.executable, "-c", code, os.path.dirname(path)], cwd=REPO_ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    return path


def tokenizer_folder(work_dir: str) -> str:
    """A CLIP tokenizer folder built locally (no hub), written once."""
    sys.path.insert(0, REPO_ROOT)
    from library.checkpoints.tokenizers import write_clip_tokenizer_files

    folder = os.path.join(work_dir, "tokenizer")
    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        write_clip_tokenizer_files(folder)
    return folder


def square_image_dataset(work_dir: str, count: int, size: int) -> str:
    """`count` toy images of size x size with captions and a dataset TOML (batch 1, no buckets); returns the TOML."""
    sys.path.insert(0, REPO_ROOT)
    import numpy as np

    from library.atomic import atomic_write_text
    from library.testing.toy_data import draw_image

    folder = os.path.join(work_dir, f"images{count}x{size}")
    config = os.path.join(folder, "dataset.toml")
    if os.path.isfile(config):
        return config
    image_dir = os.path.join(folder, "images")
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        image, caption = draw_image(index, (size, size), rng)
        image.save(os.path.join(image_dir, f"img_{index:04d}.png"))
        atomic_write_text(os.path.join(image_dir, f"img_{index:04d}.txt"), caption + "\n")
    lines = ["[general]", "caption_extension = '.txt'", "enable_bucket = false", "", "[[datasets]]",
             f"resolution = {size}", "batch_size = 1", "", "  [[datasets.subsets]]",
             f"  image_dir = '{image_dir}'", "  num_repeats = 1"]
    atomic_write_text(config, "\n".join(lines) + "\n")
    return config
