"""Bad inputs and faults, as careless or unlucky users meet them: each case runs through the CLI and checks the exit
code, the one message line, and what is on disk afterwards (nothing lost, nothing half-written).
docs/bad_inputs.md lists every case with what it gets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, cli_env, run_cli
from tests.test_train_network_e2e import train_args


def lora_args(tiny_models_dir, dataset, tokenizer_dir, out_dir, *extra: str) -> list[str]:
    model = os.path.join(tiny_models_dir, "sd1.safetensors")
    return train_args(model, dataset, str(out_dir), tokenizer_dir, *extra)


def error_lines(result) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if " ERROR " in line]


def assert_one_error(result, *fragments: str) -> str:
    """Exit status 1, exactly one ERROR line holding every fragment, no traceback; returns the line."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    lines = error_lines(result)
    assert len(lines) == 1, output
    assert "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---- work lost: every output location is checked before anything loads ---------------------------------------


@pytest.mark.parametrize("option", ["--output_dir", "--logging_dir"])
def test_output_location_under_a_file_fails_before_loading(option, tiny_models_dir, toy_dataset, tokenizer_dir,
                                                           tmp_path):  # fmt: skip
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = tmp_path / "out"
    args = lora_args(tiny_models_dir, toy_dataset, tokenizer_dir, out)
    if option == "--output_dir":
        args[args.index("--output_dir") + 1] = str(blocker / "out")
    else:
        args += ["--logging_dir", str(blocker / "logs")]
    result = run_cli(args, tmp_path, launcher=False)
    line = assert_one_error(result, option, str(blocker))
    assert "models loaded" not in result.stdout + result.stderr, line
    assert blocker.read_text() == "not a folder"


def test_leftovers_of_an_interrupted_state_replacement_are_repaired_at_start(tiny_models_dir, toy_dataset,
                                                                             tokenizer_dir, tmp_path):  # fmt: skip
    """A run killed while replacing `lora-state` left the old complete state aside and a new one half-written."""
    out = tmp_path / "out"
    aside = out / ".lora-state.abcd1234.tmp.old"
    aside.mkdir(parents=True)
    (aside / "train_state.json").write_text("{}")
    half = out / ".lora-state.efgh5678.tmp"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 1024)
    args = lora_args(tiny_models_dir, toy_dataset, tokenizer_dir, out, "--max_train_steps", "1")
    args = args[: args.index("--max_train_steps")] + args[args.index("--max_train_steps") + 2 :]
    result = run_cli([*args, "--max_train_steps", "1"], tmp_path, launcher=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"restored {out / 'lora-state'}" in output and f"removed {half}" in output
    assert (out / "lora-state" / "train_state.json").read_text() == "{}"  # the complete one is back under its name
    assert not [name for name in os.listdir(out) if name.startswith(".")]


def test_state_replacement_killed_at_random_moments_never_loses_the_last_complete_state(tmp_path):
    """20 kills -9 of a process replacing a state folder over and over: after each, the folder under the final name
    (once repaired) is complete and holds one version throughout."""
    script = (
        "import os, sys\n"
        "from library.atomic import atomic_path\n"
        "target = sys.argv[1]\n"
        "for version in range(1, 10**9):\n"
        "    with atomic_path(target, suffix='') as temp:\n"
        "        os.makedirs(temp)\n"
        "        for part in range(20):\n"
        "            with open(os.path.join(temp, f'part{part}'), 'w') as handle:\n"
        "                handle.write(str(version) * 2000)\n"
        "        with open(os.path.join(temp, 'train_state.json'), 'w') as handle:\n"
        "            handle.write(str(version))\n"
        "    print(version, flush=True)\n"
    )
    from library.atomic import recover_interrupted_writes

    target = tmp_path / "lora-state"
    seen = 0
    for kill in range(20):
        process = subprocess.Popen([sys.executable, "-c", script, str(target)], cwd=REPO_ROOT,
                                   stdout=subprocess.PIPE, text=True)  # fmt: skip
        for _ in range(1 + kill % 7):  # let it replace the folder a few times, then kill it somewhere inside a save
            process.stdout.readline()
        process.send_signal(signal.SIGKILL)
        process.wait()
        recover_interrupted_writes(str(tmp_path))
        version = (target / "train_state.json").read_text()
        parts = {(target / f"part{part}").read_text() for part in range(20)}
        assert parts == {version * 2000}, kill
        assert int(version) >= 1 and not [name for name in os.listdir(tmp_path) if name.startswith(".")]
        seen += 1
    assert seen == 20


# ---- work lost: signals -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_saves_and_stops(tiny_models_dir, toy_dataset,
                                                                          tokenizer_dir, tmp_path):  # fmt: skip
    out = tmp_path / "out"
    args = lora_args(tiny_models_dir, toy_dataset, tokenizer_dir, out, "--save_state")
    args[args.index("--max_data_loader_n_workers") + 1] = "2"
    args[args.index("--max_train_steps") + 1] = "400"
    process = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=cli_env(tmp_path), start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "epoch 1/" in line:  # training is under way, the workers are running
            os.killpg(process.pid, signal.SIGTERM)  # what systemd and Slurm send: every process of the group
            break
    output = "".join(lines) + process.communicate(timeout=300)[0]
    assert process.returncode == 130, output
    assert output.count("SIGTERM received") == 1 and "Traceback" not in output and "killed by signal" not in output
    states = [name for name in os.listdir(out) if name.endswith("-state")]
    assert len(states) == 1 and (out / states[0] / "train_state.json").is_file(), os.listdir(out)
