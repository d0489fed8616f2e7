"""Measures a real training run from inside without changing it: Python loads this file at start-up when its folder
is on PYTHONPATH (benchmarks/train_step.py puts it there).

Active only when BENCH_HOOK_OUT names a file and the process runs a training entry script (not the `accelerate`
launcher). When `library.training.trainer` is imported, its `_train_step` (and a few phase functions) are wrapped
with clock reads; at exit the times (time.monotonic, comparable across processes), the resident memory at the
first step, the peak resident memory before the first step and during the steps (the high-water mark is reset at
the first step), and the peak CUDA memory are written to BENCH_HOOK_OUT as JSON.
BENCH_PROFILE=steps|startup with BENCH_PROFILE_OUT=path also writes cProfile statistics of the steps after the
first one, or of everything from interpreter start to the first step.
"""

import atexit
import functools
import importlib.abc
import json
import os
import resource
import sys
import time

ENTRY_SCRIPTS = ("train_network.py", "train_db.py", "fine_tune.py", "train_textual_inversion.py",
                 "sdxl_train_network.py", "sdxl_train.py")
TRAINER = "library.training.trainer"
# Phase functions of the loop, marked when they are entered; a missing one is skipped.
PHASES = ("train", "_place_models", "cache_dataset_latents", "_make_dataloader")

_record = {"pid": os.getpid(), "process_start": time.monotonic(), "phases": {}, "phase_peak_rss": {},
           "step_starts": [], "step_ends": [], "step_cpu_seconds": [], "step_sys_seconds": [], "step_minor_faults": []}
_profile = {"mode": os.environ.get("BENCH_PROFILE"), "profiler": None}


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_peak_rss() -> bool:
    """Start a new high-water mark (Linux >= 4.0), so that the peak of the steps can be told from the load's."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _cuda_sync() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed_step(original):
    @functools.wraps(original)
    def step(*args, **kwargs):
        starts = _record["step_starts"]
        if not starts:
            _record["rss_at_first_step_bytes"] = _rss_bytes()
            _record["peak_rss_at_first_step_bytes"] = _peak_rss_bytes()
            _record["peak_reset"] = _reset_peak_rss()
        _cuda_sync()
        starts.append(time.monotonic())
        cpu_started, usage_started = time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
        if len(starts) == 1 and _profile["mode"] == "startup":
            _stop_profile()
        if len(starts) == 2 and _profile["mode"] == "steps":
            _start_profile()
        result = original(*args, **kwargs)
        _cuda_sync()
        _record["step_ends"].append(time.monotonic())
        _record["step_cpu_seconds"].append(time.process_time() - cpu_started)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        _record["step_sys_seconds"].append(usage.ru_stime - usage_started.ru_stime)
        _record["step_minor_faults"].append(usage.ru_minflt - usage_started.ru_minflt)
        return result

    return step


def _marked(name, original):
    @functools.wraps(original)
    def phase(*args, **kwargs):
        if name not in _record["phases"]:
            _record["phases"][name] = time.monotonic()
            _record["phase_peak_rss"][name] = _peak_rss_bytes()
        return original(*args, **kwargs)

    return phase


def _patch(module) -> None:
    module._train_step = _timed_step(module._train_step)
    for name in PHASES:
        if hasattr(module, name):
            setattr(module, name, _marked(name, getattr(module, name)))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the trainer module with the other finders and patches it right after it has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRAINER:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _start_profile() -> None:
    import cProfile

    _profile["profiler"] = cProfile.Profile()
    _profile["profiler"].enable()


def _stop_profile() -> None:
    profiler = _profile["profiler"]
    if profiler is None:
        return
    profiler.disable()
    profiler.dump_stats(os.environ["BENCH_PROFILE_OUT"])
    _profile["profiler"] = None


def _write() -> None:
    _stop_profile()
    _record["exit"] = time.monotonic()
    peak = _peak_rss_bytes()
    if _record.get("peak_reset"):
        _record["peak_rss_training_bytes"] = peak
    _record["peak_rss_bytes"] = max(peak, _record.get("peak_rss_at_first_step_bytes", 0))
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        _record["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
    if torch is not None:
        _record["torch_threads"] = torch.get_num_threads()
    with open(os.environ["BENCH_HOOK_OUT"], "w", encoding="utf-8") as handle:
        json.dump(_record, handle)


def _install() -> None:
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not os.environ.get("BENCH_HOOK_OUT") or script not in ENTRY_SCRIPTS:
        return
    sys.meta_path.insert(0, _PatchOnImport())
    atexit.register(_write)
    if _profile["mode"] == "startup":
        _start_profile()


_install()
