"""Every command example of the guides (tests/data/guide_commands.toml) runs on the default install.

Each training command goes through its entry script's parser and every check made before a model loads (the load
itself is stopped), with paths swapped for the tiny models and toy data; the `train = true` ones really train for
two steps. The metadata tools run in the guide's order on a toy folder, and the fine-tuning command that reads their
result trains on it. `accelerate launch --mixed_precision bf16` reaches the script as accelerate passes it: in
ACCELERATE_MIXED_PRECISION.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import tomllib

import pytest

from library.testing.toy_data import write_images
from tests.conftest import REPO_ROOT
from tests.finetune_models import write_tiny_blip, write_tiny_tagger
from tests.hub_standin import write_cached_repo
from tests.training_helpers import train_in_process

pytestmark = pytest.mark.usefixtures("one_thread")

with open(os.path.join(REPO_ROOT, "tests", "data", "guide_commands.toml"), "rb") as _file:
    COMMANDS = tomllib.load(_file)["command"]
BLIP_REPO = "Salesforce/blip-image-captioning-large"  # make_captions.py's default --caption_weights
# Options whose value is a path of the user's (or a model file) and what stands for it here.
PATH_OPTIONS = ("--dataset_config", "--output_dir", "--train_data_dir", "--reg_data_dir", "--in_json", "--logging_dir")
MODEL_OPTIONS = ("--pretrained_model_name_or_path", "--clip_l", "--clip_g", "--t5xxl", "--ae", "--gemma2", "--vae")
TINY_BLOCKS_TO_SWAP = "1"  # the tiny transformers have a few blocks; the guides' 10-32 are for the real models


class ReachedModelLoad(Exception):
    """Raised instead of loading: every check before the load passed."""


def split_command(line: str) -> tuple[list[str], str, list[str]]:
    """(launcher options, script path, script arguments) of a guide command line (Windows separators made /)."""
    line = re.sub(r"<([^>]*)>", lambda match: "<" + match.group(1).replace(" ", "_") + ">", line)  # one token each
    tokens = shlex.split(line.replace("\\", "/"))
    if tokens[0] == "accelerate":
        script_at = next(index for index, token in enumerate(tokens) if token.endswith(".py"))
        return tokens[2:script_at], tokens[script_at], tokens[script_at + 1 :]
    assert tokens[0] == "python", line
    return [], tokens[1], tokens[2:]


def option_pairs(arguments: list[str]) -> list[tuple[str, list[str]]]:
    """`--a=1 --b 2 3 --flag` -> [("--a", ["1"]), ("--b", ["2", "3"]), ("--flag", [])]."""
    pairs: list[tuple[str, list[str]]] = []
    for token in arguments:
        if token.startswith("--"):
            name, equals, value = token.partition("=")
            pairs.append((name, [value] if equals else []))
        else:
            pairs[-1][1].append(token)
    return pairs


def entry_of(script: str) -> tuple[str, str]:
    """(family id, method id) an entry script trains, read from the script itself."""
    with open(os.path.join(REPO_ROOT, os.path.basename(script)), encoding="utf-8") as handle:
        match = re.search(r'run_training\("(\w+)", "(\w+)"', handle.read())
    assert match, f"{script} is not an entry script"
    return match.group(1), match.group(2)


def training_commands() -> list[tuple[str, str]]:
    """(id, command line) of every training example, `{script_name}` expanded and fragments appended."""
    lines = {command["where"]: command["line"] for command in COMMANDS}
    found = []
    for command in COMMANDS:
        if command.get("tool") or command.get("after_tools"):
            continue
        if "fragment_of" in command:
            found.append((command["where"], f"{lines[command['fragment_of']]} {command['line']}"))
        elif "script_names" in command:
            found += [(f"{command['where']}-{name}", command["line"].replace("{script_name}", name))
                      for name in command["script_names"]]  # fmt: skip
        else:
            found.append((command["where"], command["line"]))
    return found


TRAINED = {command["where"] for command in COMMANDS if command.get("train")}


@pytest.fixture(scope="module")
def places(tmp_path_factory, toy_dataset) -> dict[str, str]:
    """The toy data standing for the guides' paths: a dataset config, DreamBooth folders, a log folder."""
    root = tmp_path_factory.mktemp("guide")
    legacy = root / "legacy"
    write_images(str(legacy / "train" / "2_toy picture"), 4)
    write_images(str(legacy / "reg" / "1_picture"), 2, seed=1, captions=False, offset=100)
    return {
        "--dataset_config": toy_dataset,
        "--train_data_dir": str(legacy / "train"),
        "--reg_data_dir": str(legacy / "reg"),
        "--logging_dir": str(root / "logs"),
    }


def tiny_argv(family: str, pairs: list[tuple[str, list[str]]], places: dict, tiny, out_dir: str, train: bool):
    """The guide's arguments with paths and model sizes swapped for the tiny ones."""
    argv: list[str] = []
    for name, values in pairs:
        if name in MODEL_OPTIONS or (train and name in ("--max_train_epochs", "--max_train_steps")):
            continue
        if name == "--output_dir":
            values = [out_dir]
        elif name in places:
            values = [places[name]]
        elif name == "--blocks_to_swap":
            values = [TINY_BLOCKS_TO_SWAP]
        elif values and values[0].startswith("<"):  # a name placeholder, e.g. <output file name>
            values = ["guide_output"]
        argv += [name, *values]
    argv += [*tiny.model_args, *tiny.fast_args, "--max_data_loader_n_workers", "0"]
    return argv + (["--max_train_steps", "2"] if train else [])


def run_guide_command(line: str, places, tiny_family, tmp_path, monkeypatch, train: bool) -> None:
    launch, script, arguments = split_command(line)
    family, method = entry_of(script)
    launch_pairs = dict(option_pairs(launch))
    if "--mixed_precision" in launch_pairs:  # what `accelerate launch --mixed_precision X` hands the script
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launch_pairs["--mixed_precision"][0])
    else:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    argv = tiny_argv(family, option_pairs(arguments), places, tiny_family(family), str(tmp_path / "out"), train)
    if not train:
        from library.families import get_family_class

        def stop(*_):
            raise ReachedModelLoad

        monkeypatch.setattr(get_family_class(family), "load", stop)
    try:
        if train:
            train_in_process(argv, family, method)
        else:
            with pytest.raises(ReachedModelLoad):
                train_in_process(argv, family, method)
    except SystemExit as stop:
        pytest.fail(f"{script} exited with {stop.code}; argv: {' '.join(argv)}")


@pytest.mark.parametrize("where, line", training_commands(), ids=[where for where, _ in training_commands()])
def test_guide_training_command_runs_on_the_default_install(where, line, places, tiny_family, tmp_path, monkeypatch,
                                                            caplog):  # fmt: skip
    train = where in TRAINED
    run_guide_command(line, places, tiny_family, tmp_path, monkeypatch, train)
    if train:
        outputs = [name for name in os.listdir(tmp_path / "out") if not name.startswith(".")]
        assert any(name.endswith(".safetensors") or os.path.isdir(tmp_path / "out" / name) for name in outputs)
        assert "loss is not finite" not in caplog.text


def tool_module(script: str):
    return importlib.import_module(f"finetune.{os.path.splitext(os.path.basename(script))[0]}")


def test_guide_metadata_tools_then_fine_tuning_from_their_metadata(tiny_family, places, tmp_path, monkeypatch):
    """The guide's preprocessing in order (BLIP captions, WD14 tags, merges, cleaning, bucketing with latents), each
    command as written, then `fine_tune.py --in_json meta_lat.json` trains on the result."""
    import huggingface_hub

    work = tmp_path / "work"
    write_images(str(work / "train_data"), 3, captions=False)  # captioned and tagged by the tools below
    for folder, offset in (("train_data1", 10), ("train_data2", 20)):  # the guide's two-folder example: ready
        for image in write_images(str(work / folder), 3, offset=offset):
            shutil.copy(os.path.splitext(image)[0] + ".txt", os.path.splitext(image)[0] + ".caption")
    write_tiny_tagger(str(work / "wd14_tagger_model"))  # the tagger's default --model_dir, already downloaded
    cache = tmp_path / "hub"  # the hub cache holds make_captions.py's default BLIP model, as after a download
    write_cached_repo(str(cache), BLIP_REPO, write_tiny_blip(str(tmp_path / "blip")))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    shutil.copy(tiny_family("sd").files["sd1-ckpt"], work / "model.ckpt")
    monkeypatch.chdir(work)
    for command in [command for command in COMMANDS if command.get("tool")]:
        if command["where"] == "001:992":  # the two-folder example buckets the cleaned metadata of both folders
            tool_module("clean_captions_and_tags.py").main(["meta_cap_dd2.json", "meta_clean.json"])
        _, script, arguments = split_command(command["line"])
        tool_module(script).main([token.removeprefix("../") for token in arguments])  # the guide runs in finetune/
    assert (work / "train_data" / "img_0000.caption").is_file() and (work / "train_data" / "img_0000.txt").is_file()
    for name in ("meta_cap.json", "meta_cap2.json", "meta_cap_dd2.json", "meta_clean.json", "meta_lat.json",
                 "meta_lat2.json"):  # fmt: skip
        assert (work / name).is_file(), name
    fine_tune = next(command for command in COMMANDS if command.get("after_tools"))
    local = dict(places, **{"--in_json": str(work / "meta_lat.json"), "--train_data_dir": str(work / "train_data")})
    run_guide_command(fine_tune["line"], local, tiny_family, tmp_path, monkeypatch, train=True)
    assert any(name.endswith(".safetensors") for name in os.listdir(tmp_path / "out"))
