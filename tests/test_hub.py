"""Hub upload and resume through a local stand-in for HfApi: repo, path, files, visibility; the token stays secret."""

from __future__ import annotations

import argparse
import logging
import os
import threading
from pathlib import Path

import huggingface_hub
import pytest
from safetensors import safe_open

from library.errors import ConfigError, UserError
from library.training import hub
from library.training.hub import HubOptions, HubState, Uploader, add_hub_arguments, parse_hub_state
from tests.conftest import REPO_ROOT, run_cli
from tests.hub_standin import ROOT_VARIABLE, SITECUSTOMIZE, StandInHfApi, read_calls
from tests.test_train_network_e2e import train_args

TOKEN = "hf_TopSecretToken42"


@pytest.fixture
def standin(tmp_path, monkeypatch) -> str:
    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setenv(ROOT_VARIABLE, str(root))
    monkeypatch.setattr(huggingface_hub, "HfApi", StandInHfApi)
    return str(root)


def hub_args(*argv: str, save_state: bool = False, resume: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_hub_arguments(parser)
    args = parser.parse_args(list(argv))
    args.save_state, args.save_state_on_train_end, args.resume = save_state, False, resume
    return args


def options(**values) -> HubOptions:
    values.setdefault("repo_id", "me/my-lora")
    return HubOptions(**values)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--huggingface_path_in_repo", "x"], "--huggingface_path_in_repo needs --huggingface_repo_id"),
        (["--async_upload"], "--async_upload needs --huggingface_repo_id"),
        (
            ["--huggingface_repo_id", "me/lora", "--save_state_to_huggingface"],
            "--save_state_to_huggingface needs --save_state or --save_state_on_train_end",
        ),
        (["--huggingface_repo_id", "me/lo ra"], "--huggingface_repo_id 'me/lo ra' is not a repo id"),
        (["--resume_from_huggingface"], "--resume_from_huggingface needs --resume"),
    ],
)
def test_hub_options_reject_incomplete_combinations(argv, message):
    with pytest.raises(ConfigError, match=message):
        HubOptions.from_args(hub_args(*argv))


def test_hub_options_visibility_is_private_unless_public(caplog):
    assert HubOptions.from_args(hub_args("--huggingface_repo_id", "me/lora")).private
    assert not HubOptions.from_args(
        hub_args("--huggingface_repo_id", "me/lora", "--huggingface_repo_visibility", "public")
    ).private
    with caplog.at_level(logging.WARNING):
        typo = HubOptions.from_args(
            hub_args("--huggingface_repo_id", "me/lora", "--huggingface_repo_visibility", "pubic")
        )
    assert typo.private and "'pubic' is not 'public': the repo is private" in caplog.text


def test_hub_options_never_show_the_token():
    assert TOKEN not in repr(options(token=TOKEN))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("me/repo/run/lora-000002-state:main:model", HubState("me/repo", "run/lora-000002-state", "main", "model")),
        ("me/repo/lora-state:v1", HubState("me/repo", "lora-state", "v1", "model")),
        ("me/repo/lora-state::dataset", HubState("me/repo", "lora-state", None, "dataset")),
        ("me/repo", HubState("me/repo", "", None, "model")),
    ],
)
def test_parse_hub_state_reads_repo_path_revision_and_type(text, expected):
    assert parse_hub_state(text) == expected


@pytest.mark.parametrize("text", ["lora-state", "me/repo/x:main:model:extra", "me/repo/x:main:bucket", "C:/runs/x"])
def test_parse_hub_state_rejects_other_forms(text):
    with pytest.raises(ConfigError, match="--resume"):
        parse_hub_state(text)


def test_uploader_sends_files_and_folders_to_the_repo_path(standin, tmp_path):
    result = tmp_path / "lora.safetensors"
    result.write_bytes(b"weights")
    state = tmp_path / "lora-state"
    (state / "sub").mkdir(parents=True)
    (state / "train_state.json").write_text("{}")
    (state / "sub" / "optimizer.bin").write_bytes(b"o")
    uploader = Uploader(
        options(path_in_repo="runs/a", repo_type="dataset", token=TOKEN, save_state_to_huggingface=True)
    )
    uploader.upload_result(str(result))
    uploader.upload_state(str(state))
    uploader.finish()
    calls = read_calls(standin)
    assert [call["call"] for call in calls] == ["create_repo", "upload_file", "upload_folder"]
    assert calls[0] == {
        "call": "create_repo",
        "repo_id": "me/my-lora",
        "repo_type": "dataset",
        "private": True,
        "exist_ok": True,
        "token": TOKEN,
    }
    assert calls[1]["path_in_repo"] == "runs/a/lora.safetensors" and calls[1]["repo_type"] == "dataset"
    assert calls[2]["path_in_repo"] == "runs/a/lora-state"
    assert calls[2]["files"] == ["sub/optimizer.bin", "train_state.json"]
    repo = os.path.join(standin, "dataset", "me/my-lora", "runs", "a")
    assert Path(repo, "lora.safetensors").read_bytes() == b"weights"


def test_uploader_skips_states_unless_asked_and_everything_off_the_main_process(standin, tmp_path):
    state = tmp_path / "lora-state"
    state.mkdir()
    Uploader(options()).upload_state(str(state))
    Uploader(options(), main_process=False).upload_result(str(state))
    Uploader(None).upload_result(str(state))
    assert read_calls(standin) == []


def test_async_upload_sends_a_file_removed_before_its_turn(standin, tmp_path, monkeypatch):
    gate = threading.Event()

    class SlowHub(StandInHfApi):
        def create_repo(self, *args, **kwargs):
            gate.wait(5)
            return super().create_repo(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "HfApi", SlowHub)
    old = tmp_path / "lora-step00000002.safetensors"
    old.write_bytes(b"step 2")
    uploader = Uploader(options(async_upload=True))
    uploader.upload_result(str(old))
    old.unlink()  # what --save_last_n_steps does to an old save
    gate.set()
    uploader.finish()
    assert Path(standin, "model", "me/my-lora", old.name).read_bytes() == b"step 2"
    assert os.listdir(tmp_path) == ["hub"]  # the hard-linked snapshot is gone


def test_failed_upload_does_not_stop_training_but_is_reported_at_the_end(standin, tmp_path, monkeypatch, caplog):
    def refuse(self, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(StandInHfApi, "upload_file", refuse)
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"w")
    uploader = Uploader(options(token=TOKEN))
    uploader.upload_result(str(path))  # returns: training goes on
    assert "upload of" in caplog.text and "connection refused" in caplog.text
    with pytest.raises(UserError, match=r"1 upload\(s\) to the hub repo me/my-lora failed .*: .*lora.safetensors"):
        uploader.finish()
    assert TOKEN not in caplog.text


def test_local_resume_downloads_the_state_folder(standin, tmp_path):
    folder = os.path.join(standin, "model", "me/my-lora", "runs", "lora-000002-state")
    os.makedirs(folder)
    Path(folder, "train_state.json").write_text("{}")
    os.makedirs(os.path.join(standin, "model", "me/my-lora", "other"))
    hub_options = HubOptions(token=TOKEN, resume_from_huggingface=True)
    local = hub_options.local_resume("me/my-lora/runs/lora-000002-state:main:model")
    assert os.path.isfile(os.path.join(local, "train_state.json"))
    assert read_calls(standin)[-1]["allow_patterns"] == ["runs/lora-000002-state/*"]
    assert read_calls(standin)[-1]["revision"] == "main"
    with pytest.raises(ConfigError, match="has no folder 'runs/missing-state'"):
        hub_options.local_resume("me/my-lora/runs/missing-state")
    assert HubOptions().local_resume("local/folder") == "local/folder"


def test_download_errors_are_user_errors(standin, monkeypatch):
    def offline(self, repo_id, **kwargs):
        raise huggingface_hub.errors.OfflineModeIsEnabled("HF_HUB_OFFLINE is set")

    monkeypatch.setattr(StandInHfApi, "snapshot_download", offline)
    with pytest.raises(ConfigError, match="cannot download me/nothing/s-state .*HF_HUB_OFFLINE is set"):
        hub.download_state(parse_hub_state("me/nothing/s-state"), None)


def cli_run(args: list[str], tmp_path, hub_root: str):
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {"PYTHONPATH": str(hook_dir), "HUB_STANDIN_REPO": REPO_ROOT, ROOT_VARIABLE: hub_root}
    return run_cli(args, tmp_path, launcher=False, env=env)


def files_containing(folder, text: str) -> list[str]:
    """Files under `folder` (or the file itself) whose bytes contain `text`."""
    needle = text.encode()
    found = []
    walk = os.walk(folder) if os.path.isdir(folder) else [(os.path.dirname(folder), [], [os.path.basename(folder)])]
    for top, _dirs, names in walk:
        for name in names:
            path = os.path.join(top, name)
            with open(path, "rb") as handle:
                if needle in handle.read():
                    found.append(path)
    return found


# fmt: off
UPLOAD_OPTIONS = [
    "--save_every_n_steps", "2", "--save_state", "--save_state_to_huggingface", "--async_upload",
    "--huggingface_repo_id", "me/my-lora", "--huggingface_path_in_repo", "runs/one",
    "--huggingface_repo_visibility", "public",
]
# fmt: on


@pytest.fixture(scope="module")
def uploaded(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path_factory):
    """One training run that uploads to the stand-in, its options read from a file written by --output_config."""
    from library.training.entry import run_training

    tmp_path = tmp_path_factory.mktemp("upload")
    hub_root = tmp_path / "hub"
    hub_root.mkdir()
    config = tmp_path / "run.toml"
    args = train_args(
        os.path.join(tiny_models_dir, "sd1.safetensors"),
        toy_dataset,
        str(tmp_path / "out"),
        tokenizer_dir,
        *UPLOAD_OPTIONS,
        "--huggingface_token",
        TOKEN,
    )
    args[args.index("--max_train_steps") + 1] = "6"  # the command line below overrides it
    run_training("sd", "network", "test", [*args[1:], "--config_file", str(config), "--output_config"])
    command = ["train_network.py", "--config_file", str(config), "--huggingface_token", TOKEN, "--max_train_steps", "4"]
    result = cli_run(command, tmp_path, str(hub_root))
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp_path, result


def test_training_uploads_every_save_to_the_repo_path(uploaded):
    tmp_path, _ = uploaded
    calls = read_calls(str(tmp_path / "hub"))
    assert [(call["call"], call.get("path_in_repo")) for call in calls] == [
        ("create_repo", None),
        ("upload_file", "runs/one/lora-step00000002.safetensors"),
        ("upload_folder", "runs/one/lora-step00000002-state"),
        ("upload_file", "runs/one/lora.safetensors"),
        ("upload_folder", "runs/one/lora-state"),
    ]
    assert calls[0]["private"] is False and calls[0]["repo_type"] is None  # None: the hub's default, model
    assert all(call["repo_id"] == "me/my-lora" and call["token"] == TOKEN for call in calls)
    assert "train_state.json" in calls[2]["files"]
    with safe_open(str(tmp_path / "hub" / "model" / "me/my-lora" / "runs/one/lora.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_steps"] == "4"  # --max_train_steps on the command line beat the file's 6


def test_training_writes_the_token_nowhere(uploaded):
    tmp_path, result = uploaded
    assert TOKEN not in result.stdout + result.stderr
    assert files_containing(tmp_path / "out", TOKEN) == []
    assert files_containing(tmp_path / "run.toml", TOKEN) == []
    assert not [name for name in os.listdir(tmp_path / "out") if name.startswith(".upload-")]


def test_training_resumes_from_a_state_on_the_hub(uploaded, tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path):
    hub_root = str(uploaded[0] / "hub")
    out = tmp_path / "resumed"
    resume = "me/my-lora/runs/one/lora-step00000002-state:main:model"
    args = train_args(
        os.path.join(tiny_models_dir, "sd1.safetensors"),
        toy_dataset,
        str(out),
        tokenizer_dir,
        "--resume_from_huggingface",
        "--resume",
        resume,
        "--huggingface_token",
        TOKEN,
    )
    result = cli_run(args, tmp_path, hub_root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from" in result.stderr and "step 2" in result.stderr
    download = read_calls(hub_root)[-1]
    assert download["call"] == "snapshot_download" and download["revision"] == "main"
    assert download["allow_patterns"] == ["runs/one/lora-step00000002-state/*"]
    with safe_open(str(out / "lora.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_steps"] == "4"
    assert files_containing(out, TOKEN) == []
