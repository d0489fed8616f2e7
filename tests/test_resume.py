"""Exact resume: a run stopped and resumed (twice, once mid-epoch) ends where the uninterrupted run ends."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, cli_env, run_cli
from tests.test_train_network_e2e import train_args

TOTAL_STEPS = "8"
KILLER = """
import os, signal
import accelerate

_original = accelerate.Accelerator.save_state
_calls = {"n": 0}


def save_state(self, output_dir=None, **kwargs):
    _calls["n"] += 1
    result = _original(self, output_dir, **kwargs)
    if _calls["n"] == int(os.environ["KILL_ON_STATE_SAVE"]):
        os.kill(os.getpid(), signal.SIGKILL)  # killed after the weights are written, before the state is complete
    return result


accelerate.Accelerator.save_state = save_state
"""


def resume_args(models_dir, dataset, out_dir, tokenizer_dir, *extra):
    args = train_args(os.path.join(models_dir, "sd1.safetensors"), dataset, str(out_dir), tokenizer_dir,
                      "--lr_scheduler", "cosine", *extra)
    args[args.index("--max_train_steps") + 1] = TOTAL_STEPS
    return args


def assert_same_weights(path_a: str, path_b: str) -> None:
    a, b = load_file(path_a), load_file(path_b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def steps_of(path: str) -> str:
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return handle.metadata()["ss_steps"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    args = resume_args(tiny_models_dir, toy_dataset, out, tokenizer_dir, "--save_every_n_steps", "3", "--save_state")
    result = run_cli(args, out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_resumed_twice_ends_with_the_uninterrupted_weights(
    uninterrupted, tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path
):
    first_state = uninterrupted / "lora-step00000003-state"  # mid-epoch (6 batches per epoch)
    assert (first_state / "train_state.json").is_file()
    second = tmp_path / "second"
    args = resume_args(tiny_models_dir, toy_dataset, second, tokenizer_dir, "--resume", str(first_state),
                       "--save_every_n_steps", "6", "--save_state")
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    third = tmp_path / "third"
    args = resume_args(tiny_models_dir, toy_dataset, third, tokenizer_dir, "--resume",
                       str(second / "lora-step00000006-state"))
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert steps_of(str(third / "lora.safetensors")) == TOTAL_STEPS
    assert_same_weights(str(uninterrupted / "lora.safetensors"), str(third / "lora.safetensors"))
    assert_same_weights(str(uninterrupted / "lora-step00000006.safetensors"),
                        str(second / "lora-step00000006.safetensors"))


def test_kill_during_state_save_leaves_previous_state_usable(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path):
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(KILLER)
    out = tmp_path / "out"
    args = resume_args(tiny_models_dir, toy_dataset, out, tokenizer_dir, "--save_every_n_steps", "2", "--save_state")
    env = {"PYTHONPATH": str(hook_dir), "KILL_ON_STATE_SAVE": "2"}
    result = run_cli(args, tmp_path, launcher=False, env=env)
    assert result.returncode == -signal.SIGKILL
    entries = sorted(os.listdir(out))
    assert "lora-step00000002-state" in entries
    assert "lora-step00000004-state" not in entries  # the interrupted save never got its final name
    leftovers = [name for name in entries if name.startswith(".lora-step00000004-state")]
    assert leftovers, entries
    refused = run_cli(resume_args(tiny_models_dir, toy_dataset, tmp_path / "x", tokenizer_dir,
                                  "--resume", str(out / leftovers[0])), tmp_path)
    assert refused.returncode == 1 and "not a complete training state" in refused.stderr + refused.stdout
    resumed = run_cli(resume_args(tiny_models_dir, toy_dataset, out, tokenizer_dir,
                                  "--resume", str(out / "lora-step00000002-state")), tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert steps_of(str(out / "lora.safetensors")) == TOTAL_STEPS


def test_ctrl_c_saves_a_state_that_resumes_to_the_end(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    args = resume_args(tiny_models_dir, toy_dataset, out, tokenizer_dir, "--save_state")
    args[args.index("--max_train_steps") + 1] = "400"
    process = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=cli_env(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "epoch 1/" in line:  # training is under way
            process.send_signal(signal.SIGINT)
            break
    output = "".join(lines) + process.communicate(timeout=300)[0]
    assert process.returncode == 130, output
    assert "Traceback" not in output
    states = [name for name in os.listdir(out) if name.endswith("-state")]
    assert len(states) == 1, states
    stopped_at = int(re.fullmatch(r"lora-step(\d{8})-state", states[0]).group(1))
    assert (out / f"lora-step{stopped_at:08d}.safetensors").is_file()  # the LoRA so far is saved too
    args = resume_args(tiny_models_dir, toy_dataset, out, tokenizer_dir, "--resume", str(out / states[0]))
    args[args.index("--max_train_steps") + 1] = str(stopped_at + 2)
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert steps_of(str(out / "lora.safetensors")) == str(stopped_at + 2)
