"""Several training processes: two CPU processes (gloo) through `accelerate launch --multi_gpu --num_processes 2`.

2 processes x batch 1 must train exactly like 1 process x batch 2 (same global batches, same noise, gradients
averaged by DDP), save once, resume exactly, write disk caches once and stop together when one process is told to.
SGD keeps the comparison about the gradients: Adam turns float-rounding differences of near-zero gradients into
steps of the learning rate's size.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from library.testing.toy_data import write_toy_dataset
from tests.conftest import REPO_ROOT, cli_env, run_cli
from tests.test_resume import steps_of

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[int, str]:
    """The same 4 images as batches of 1 and of 2 (one bucket: every global batch is 2 images)."""
    root = tmp_path_factory.mktemp("multi")
    return {size: write_toy_dataset(str(root / f"batch{size}"), count=4, batch_size=size, enable_bucket=False)
            for size in (1, 2)}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(processes: int) -> list[str]:
    if processes == 1:
        return []
    return ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(_free_port())]


def _lora_args(tiny, dataset: str, out_dir, steps: int = 4, *extra: str) -> list[str]:
    return [
        tiny.scripts["network"], *tiny.model_args, *tiny.fast_args,
        "--dataset_config", dataset, "--output_dir", str(out_dir), "--output_name", "lora",
        "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2",
        "--optimizer_type", "SGDNesterov", "--learning_rate", "0.5", "--max_train_steps", str(steps), "--seed", "3",
        "--cache_latents", "--max_data_loader_n_workers", "0", "--cpu_threads", "1", *extra,
    ]  # fmt: skip


# Counts the cache files each process writes, printed when it exits (loaded through PYTHONPATH as sitecustomize).
CACHE_WRITES = """
import atexit, os
import library.data.cache_files as cache_files

_write, _count = cache_files.write_cache_file, [0]


def write_cache_file(*args, **kwargs):
    _count[0] += 1
    return _write(*args, **kwargs)


cache_files.write_cache_file = write_cache_file
atexit.register(lambda: print(f"cache files written by rank {os.environ.get('RANK', '0')}: {_count[0]}", flush=True))
"""


def _run(tmp_path, processes: int, args: list[str], count_cache_writes: bool = False) -> str:
    env = None
    if count_cache_writes:
        hook_dir = tmp_path / "hook"
        hook_dir.mkdir(exist_ok=True)
        (hook_dir / "sitecustomize.py").write_text(CACHE_WRITES)
        env = {"PYTHONPATH": os.pathsep.join([str(hook_dir), REPO_ROOT])}
    result = run_cli(_launch(processes) + args, tmp_path, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def _assert_close_and_trained(path_a: str, path_b: str) -> None:
    a, b = load_file(path_a), load_file(path_b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)
    # lora_up starts at zero: the comparison is between trained weights, not two copies of the start
    assert max(a[key].abs().max().item() for key in a if "lora_up" in key) > 1e-3


@pytest.mark.parametrize("family_id", ["sd", "sdxl", "flux"])
def test_two_processes_of_batch_one_train_like_one_process_of_batch_two(family_id, tiny_family, datasets, tmp_path):
    tiny = tiny_family(family_id)
    extra = {
        # --clip_skip 2: the LoRA of the text encoder's last layer never gets a gradient (DDP must cope)
        "sd": ["--save_every_n_steps", "2", "--save_state", "--clip_skip", "2"],
        # accumulation: only the last batch of each group exchanges gradients
        "sdxl": ["--gradient_accumulation_steps", "2"],
        # disk caches: the main process writes them, the other reads them
        "flux": ["--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk"],
    }[family_id]
    two = _run(tmp_path, 2, _lora_args(tiny, datasets[1], tmp_path / "two", 4, *extra), family_id == "flux")
    assert "2 processes: gradients are averaged by DistributedDataParallel during backward" in two
    epochs = 4 if family_id == "sdxl" else 2
    assert f"{4 // epochs} steps per epoch, {epochs} epochs, 4 steps in total" in two
    one = _run(tmp_path, 1, _lora_args(tiny, datasets[2], tmp_path / "one", 4, *extra))
    losses = [re.findall(r"average loss (\S+)", output) for output in (one, two)]
    assert losses[0] == losses[1] and len(losses[0]) == epochs  # the logged loss is the global batch's
    _assert_close_and_trained(str(tmp_path / "one" / "lora.safetensors"), str(tmp_path / "two" / "lora.safetensors"))
    saved = sorted(name for name in os.listdir(tmp_path / "two") if not name.startswith("."))
    assert saved.count("lora.safetensors") == 1 and len(re.findall(r"saved \S*two/lora.safetensors", two)) == 1

    if family_id == "flux":  # 4 latent files and 4 text-encoder output files, each written once, by rank 0
        assert "cache files written by rank 0: 8" in two and "cache files written by rank 1: 0" in two
        assert "latent cache: 4 images encoded, 0 reused from cache files" in two
    if family_id == "sd":  # a state saved mid-run by two processes continues to the same end, bit for bit
        state = tmp_path / "two" / "lora-step00000002-state"
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(state))
        _run(tmp_path, 2, _lora_args(tiny, datasets[1], tmp_path / "resumed", 4, *extra, "--resume", str(state)))
        ended = [load_file(str(tmp_path / name / "lora.safetensors")) for name in ("two", "resumed")]
        assert all(torch.equal(ended[0][key], ended[1][key]) for key in ended[0])


def _rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("LOCAL_RANK") == str(rank):
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.2)
    raise AssertionError(f"no training process of rank {rank} found")


def test_sigterm_to_one_process_saves_once_stops_all_and_resumes(tiny_family, datasets, tmp_path):
    tiny = tiny_family("sd")
    out = tmp_path / "out"
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    args = _lora_args(tiny, datasets[1], out, 400, "--save_state")
    launcher = subprocess.Popen([accelerate, "launch", "--quiet", *_launch(2), *args], cwd=REPO_ROOT,
                                env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in launcher.stdout:
        lines.append(line)
        if "epoch 1/" in line:  # training is under way
            _rank_process(launcher, 1).send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + launcher.communicate(timeout=300)[0]
    # rank 1 stops on the signal (exit code 130); rank 0 stops at the same step, after the one save
    assert launcher.returncode != 0 and "exitcode  : 130" in output, output[-6000:]
    assert output.count("SIGTERM received") == 1 and output.count("training stopped at step") == 1
    states = [name for name in os.listdir(out) if name.endswith("-state")]
    assert len(states) == 1, states
    stopped_at = int(re.fullmatch(r"lora-step(\d{8})-state", states[0]).group(1))
    assert stopped_at < 400 and (out / f"lora-step{stopped_at:08d}.safetensors").is_file()
    assert sorted(name for name in os.listdir(out) if not name.startswith(".")) == sorted(
        [states[0], f"lora-step{stopped_at:08d}.safetensors"]
    )  # one save, nothing half-written
    resumed = _lora_args(tiny, datasets[1], out, stopped_at + 2, "--resume", str(out / states[0]))
    _run(tmp_path, 2, resumed)
    assert steps_of(str(out / "lora.safetensors")) == str(stopped_at + 2)


def _fine_tune_args(tiny, dataset: str, out_dir, *extra: str) -> list[str]:
    return [
        tiny.scripts["finetune"], *tiny.model_args, "--dataset_config", dataset, "--output_dir", str(out_dir),
        "--output_name", "model", "--save_model_as", "safetensors", "--optimizer_type", "SGDNesterov",
        "--learning_rate", "0.1", "--max_train_steps", "4", "--seed", "3", "--cache_latents",
        "--max_data_loader_n_workers", "0", "--cpu_threads", "1", *extra,
    ]  # fmt: skip


def _fsdp_run(tmp_path, args: list[str]) -> str:
    launch = ["--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--main_process_port", str(_free_port())]
    result = run_cli(launch + args, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def test_fsdp_full_fine_tune_trains_like_one_process_saves_a_loadable_file_and_resumes(
    tiny_family, datasets, tmp_path
):
    from diffusers import UNet2DConditionModel

    tiny = tiny_family("sd")
    two = _fsdp_run(tmp_path, _fine_tune_args(tiny, datasets[1], tmp_path / "two", "--save_every_n_steps", "2",
                                              "--save_state"))  # fmt: skip
    assert "FSDP: denoiser sharded in" in two and "FSDP reduce-scatters the gradients" in two
    one = _run(tmp_path, 1, _fine_tune_args(tiny, datasets[2], tmp_path / "one"))
    assert re.findall(r"average loss (\S+)", one) == re.findall(r"average loss (\S+)", two)
    folder = tiny.diffusers_args[tiny.diffusers_args.index("--pretrained_model_name_or_path") + 1]
    unets = [UNet2DConditionModel.from_single_file(str(tmp_path / name / "model.safetensors"), config=folder,
                                                   subfolder="unet", local_files_only=True).state_dict()
             for name in ("one", "two")]  # fmt: skip
    start = UNet2DConditionModel.from_single_file(
        tiny.model_args[1], config=folder, subfolder="unet", local_files_only=True
    ).state_dict()
    assert max((unets[0][key] - start[key]).abs().max().item() for key in start) > 1e-3  # it trained
    for key in unets[0]:
        torch.testing.assert_close(unets[0][key], unets[1][key], rtol=0, atol=1e-5, msg=key)

    # the state holds the full weights and optimizer state, gathered once; it continues to the same end
    state = tmp_path / "two" / "model-step00000002-state"
    assert {"random_states_0.pkl", "random_states_1.pkl", "custom_checkpoint_1.pkl"} <= set(os.listdir(state))
    _fsdp_run(tmp_path, _fine_tune_args(tiny, datasets[1], tmp_path / "resumed", "--resume", str(state)))
    ended = [load_file(str(tmp_path / name / "model.safetensors")) for name in ("two", "resumed")]
    assert all(torch.equal(ended[0][key], ended[1][key]) for key in ended[0])


def test_fsdp_refuses_what_cannot_run_on_shards(monkeypatch):
    from types import SimpleNamespace

    from library.errors import ConfigError
    from library.training.sharding import ShardingOptions

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    options = ShardingOptions.from_environment()
    assert options.enabled and not options.reshard_after_forward
    lora = SimpleNamespace(name="network", trains_base_weights=False)
    with pytest.raises(ConfigError, match="the network method trains small modules.*without --use_fsdp"):
        options.check(lora, {}, 2)
    full = SimpleNamespace(name="finetune", trains_base_weights=True)
    with pytest.raises(ConfigError, match="cannot be combined with --ema"):
        options.check(full, {"--ema": True}, 2)
    options.check(full, {"--ema": False}, 2)
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD")
    with pytest.raises(ConfigError, match="HYBRID_SHARD .* is not supported"):
        ShardingOptions.from_environment()
