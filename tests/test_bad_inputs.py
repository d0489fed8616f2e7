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


# ---- work lost: images that fail to decode mid-training ----------------------------------------------------------


def write_damaged_png(path) -> None:
    """A PNG whose header and end are intact (it passes the start-up check) but whose image data is damaged."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 64
    data[start : start + 256] = bytes(byte ^ 0xFF for byte in data[start : start + 256])
    path.write_bytes(bytes(data))


def write_png_header(path, width: int, height: int) -> None:
    """A PNG that declares `width` x `height` pixels (a decompression bomb's header) with almost no data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))  # fmt: skip


def dataset_with(tmp_path, bad_name: str, extra: str = ""):
    from tests.dataset_helpers import one_dataset, subset_lines, write_images

    folder = write_images(tmp_path / "images", [(64, 64)] * 3, {index: f"a toy {index}" for index in range(3)})
    (folder / f"{bad_name}.txt").write_text("a damaged toy")
    return folder, one_dataset(tmp_path, "resolution = 64\nbatch_size = 1", subset_lines(folder, extra))


def test_image_failing_to_decode_mid_training_saves_a_state_and_names_the_file(tiny_models_dir, tokenizer_dir,
                                                                               tmp_path):  # fmt: skip
    folder, config = dataset_with(tmp_path, "broken")
    write_damaged_png(folder / "broken.png")
    out = tmp_path / "out"
    args = lora_args(tiny_models_dir, str(config), tokenizer_dir, out)
    args[args.index("--max_data_loader_n_workers") + 1] = "1"  # the failure happens in a loader worker
    result = run_cli(args, tmp_path, launcher=False)
    line = assert_one_error(result, str(folder / "broken.png"), "--resume")
    state = line.rsplit("--resume ", 1)[1].strip()
    assert os.path.isfile(os.path.join(state, "train_state.json")), line
    assert not [name for name in os.listdir(out) if name.startswith(".")]


def test_image_failing_to_decode_is_left_out_with_skip_corrupt_images(tiny_models_dir, tokenizer_dir, tmp_path):
    folder, config = dataset_with(tmp_path, "broken", "skip_corrupt_images = true")
    write_damaged_png(folder / "broken.png")
    result = run_cli(lora_args(tiny_models_dir, str(config), tokenizer_dir, tmp_path / "out"), tmp_path,
                     launcher=False)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"{folder / 'broken.png'}" in output and "left out (skip_corrupt_images)" in output
    assert (tmp_path / "out" / "lora.safetensors").is_file()


def test_image_above_the_pixel_limit_is_refused_at_start(tiny_models_dir, tokenizer_dir, tmp_path):
    folder, config = dataset_with(tmp_path, "huge")
    write_png_header(folder / "huge.png", 30000, 30000)
    result = run_cli(lora_args(tiny_models_dir, str(config), tokenizer_dir, tmp_path / "out"), tmp_path,
                     launcher=False)  # fmt: skip
    assert_one_error(result, str(folder / "huge.png"), "30000x30000", "--max_image_pixels")
    assert not (tmp_path / "out" / "lora.safetensors").exists()


# ---- work lost: a full disk --------------------------------------------------------------------------------------


def test_full_disk_keeps_training_and_puts_the_final_result_where_there_is_room(tiny_models_dir, toy_dataset,
                                                                                tokenizer_dir, tmp_path, monkeypatch,
                                                                                caplog):  # fmt: skip
    import errno

    from library.training import run_outputs
    from networks.lora import LoRANetwork
    from tests.training_helpers import train_in_process

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    original = LoRANetwork.save_weights

    def save_weights(self, file, dtype, metadata):
        if os.path.dirname(os.path.abspath(file)) == str(out):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return original(self, file, dtype, metadata)

    monkeypatch.setattr(LoRANetwork, "save_weights", save_weights)
    monkeypatch.setattr(run_outputs, "fallback_folders", lambda: [str(elsewhere)])
    args = lora_args(tiny_models_dir, toy_dataset, tokenizer_dir, out, "--save_every_n_steps", "1")
    args[args.index("--max_train_steps") + 1] = "2"
    with caplog.at_level("WARNING"):
        train_in_process(args[1:])

    assert "no space left on the disk of" in caplog.text and "needs about" in caplog.text
    assert f"saved as {elsewhere / 'lora.safetensors'} instead" in caplog.text
    assert (elsewhere / "lora.safetensors").is_file()
    assert not [name for name in os.listdir(out) if name.endswith(".safetensors") or name.startswith(".")]


# ---- silent wrong training: images and captions that decode to something else ---------------------------------


@pytest.mark.parametrize("kind", ["gray16", "rgb16", "palette", "la", "cmyk"])
def test_image_modes_decode_as_a_viewer_shows_them(kind, tmp_path):
    import cv2
    import numpy as np
    from PIL import Image

    from library.data.images import load_image

    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    path = tmp_path / ("image.jpg" if kind == "cmyk" else "image.png")
    if kind == "gray16":
        cv2.imwrite(str(path), (ramp * 65535).astype(np.uint16))
        expected = np.repeat((ramp * 255)[..., None], 3, axis=2)
    elif kind == "rgb16":
        cv2.imwrite(str(path), np.stack([ramp * 65535, ramp * 30000, ramp * 0], -1).astype(np.uint16))  # BGR
        expected = np.stack([ramp * 0, ramp * 30000 / 257, ramp * 255], -1)
    elif kind == "palette":
        Image.fromarray((ramp * 255).astype(np.uint8), "L").convert("P").save(path)
        expected = np.repeat((ramp * 255)[..., None], 3, axis=2)
    elif kind == "la":
        Image.fromarray(np.stack([(ramp * 255).astype(np.uint8)] * 2, -1), "LA").save(path)
        expected = np.repeat((ramp * 255)[..., None], 3, axis=2)
    else:
        Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(path, quality=100)
        expected = np.broadcast_to(np.array([255.0, 0, 0]), (32, 32, 3))
    decoded = load_image(str(path)).astype(np.float64)
    assert decoded.shape == (32, 32, 3)
    assert np.abs(decoded - expected).mean() < 3, (kind, decoded.mean(axis=(0, 1)))


def test_utf16_caption_without_bom_is_refused_naming_the_file(tiny_models_dir, tokenizer_dir, tmp_path):
    from tests.dataset_helpers import one_dataset, subset_lines, write_images

    folder = write_images(tmp_path / "images", [(64, 64)] * 2, {0: "a toy"})
    (folder / "img001.txt").write_bytes("a red toy".encode("utf-16-le"))
    config = one_dataset(tmp_path, "resolution = 64", subset_lines(folder))
    result = run_cli(lora_args(tiny_models_dir, str(config), tokenizer_dir, tmp_path / "out"), tmp_path,
                     launcher=False)  # fmt: skip
    assert_one_error(result, str(folder / "img001.txt"), "UTF-16", "UTF-8")


def test_captions_of_another_extension_are_named_in_a_warning(tmp_path, caplog):
    from tests.dataset_helpers import group_of, one_dataset, subset_lines, write_images

    folder = write_images(tmp_path / "images", [(64, 64)] * 2, {0: "a toy", 1: "another toy"})
    config = one_dataset(tmp_path, "resolution = 64", subset_lines(folder).replace("'.txt'", "'.caption'"))
    with caplog.at_level("WARNING"):
        group_of(config)
    assert "no image has a '.caption' caption file, but 2 have '.txt' ones" in caplog.text
    assert "caption_extension = '.txt'" in caplog.text


# ---- resume states: damaged, mismatched, finished ---------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_states(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path_factory):
    """A finished 4-step run with states at step 2 and at its end (`lora-state`)."""
    tmp_path = tmp_path_factory.mktemp("states")
    out = tmp_path / "out"
    args = lora_args(tiny_models_dir, toy_dataset, tokenizer_dir, out, "--save_every_n_steps", "2", "--save_state")
    result = run_cli(args, tmp_path, launcher=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return args, out


def copy_state(out, tmp_path, name: str = "lora-step00000002-state"):
    import shutil

    return shutil.copytree(out / name, tmp_path / name)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda state: (state / "optimizer.bin").write_bytes((state / "optimizer.bin").read_bytes()[:100]),
         "optimizer.bin has 100 of its"),
        (lambda state: (state / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
        (lambda state: (state / "noise_generator.pt").unlink(), "noise_generator.pt is missing"),
        (lambda state: (state / "train_state.json").write_text(""), "train_state.json is damaged"),
    ],
)  # fmt: skip
def test_damaged_state_is_refused_before_loading_naming_the_part(saved_states, tmp_path, damage, message):
    args, out = saved_states
    state = copy_state(out, tmp_path)
    damage(state)
    args = [*args, "--resume", str(state)]
    args[args.index("--output_dir") + 1] = str(tmp_path / "new")
    line = assert_one_error(run_cli(args, tmp_path, launcher=False), "--resume", message)
    assert "models loaded" not in line


def test_resume_given_a_file_or_an_output_folder(saved_states, tmp_path):
    args, out = saved_states
    as_file = run_cli([*args, "--resume", str(out / "lora.safetensors")], tmp_path, launcher=False)
    assert_one_error(as_file, "--resume takes a training state folder", "--network_weights")
    before = (out / "lora.safetensors").read_bytes()
    finished = run_cli([*args, "--resume", str(out)], tmp_path, launcher=False)  # its newest state: the end
    assert_one_error(finished, f"--resume {out / 'lora-state'} is at step 4", "nothing is left to train")
    assert (out / "lora.safetensors").read_bytes() == before  # the final result is not rewritten


def test_state_of_other_options_or_another_script_is_refused(saved_states, tiny_sdxl_dir, tmp_path):
    args, out = saved_states
    wider = [*args, "--resume", str(out / "lora-step00000002-state")]
    wider[wider.index("--network_dim") + 1] = "8"
    wider[wider.index("--output_dir") + 1] = str(tmp_path / "new")
    assert_one_error(run_cli(wider, tmp_path, launcher=False), "does not fit this run", "--network_dim")
    sdxl = [*args, "--resume", str(out / "lora-step00000002-state")]
    sdxl[0] = "sdxl_train_network.py"
    sdxl[sdxl.index("--pretrained_model_name_or_path") + 1] = os.path.join(tiny_sdxl_dir, "sdxl.safetensors")
    assert_one_error(run_cli(sdxl, tmp_path, launcher=False), "saved by a sd network run", "this script trains sdxl")


# ---- one actionable line instead of a traceback or a misleading message ----------------------------------------

ENTRY = {"train_network.py": ("sd", "network"), "sdxl_train_network.py": ("sdxl", "network")}


def run_in_process(argv: list[str], caplog) -> tuple[int, list[str]]:
    """An entry script's main function on `argv` (script first): (exit status, ERROR lines). Cases that end before
    any model loads run here, without a new interpreter for each."""
    from library.training.entry import run_training

    family, method = ENTRY[argv[0]]
    caplog.clear()
    with caplog.at_level("INFO"):
        try:
            run_training(family, method, "test", argv[1:])
            status = 0
        except SystemExit as stop:
            status = stop.code
    return status, [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]


def break_folder_with_links(tmp_path):
    folder = tmp_path / "links" / "1_toy"
    folder.mkdir(parents=True)
    (folder / "a.png").symlink_to(tmp_path / "moved" / "a.png")
    return ["--train_data_dir", str(tmp_path / "links"), "--resolution", "64"]


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("in_json", ["--in_json", "file not found"]),
        ("config_folder", ["--dataset_config", "is a folder"]),
        ("broken_links", ["links to missing files", "a.png ->"]),
        ("negative_lr", ["--learning_rate must be above 0, got -0.0001"]),
        ("output_extension", ["--output_name lora.safetensors", "--output_name lora)"]),
        ("huge_repeats", ["num_repeats = 1000000000", "--max_train_steps"]),
        ("sdxl_folder", ["diffusers folder of an SDXL model", "sdxl_train_network.py"]),
        ("flux_folder", ["diffusers folder of a FLUX.1 model", "flux_train_network.py"]),
    ],
)  # fmt: skip
def test_bad_option_values_get_one_actionable_line(case, fragments, tiny_models_dir, toy_dataset, tokenizer_dir,
                                                   tiny_family, tmp_path, caplog):  # fmt: skip
    args = lora_args(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path / "out")
    dataset = args.index("--dataset_config")
    if case == "in_json":
        args[dataset : dataset + 2] = ["--in_json", str(tmp_path / "missing.json")]
    elif case == "config_folder":
        args[dataset + 1] = str(tmp_path)
    elif case == "broken_links":
        args[dataset : dataset + 2] = break_folder_with_links(tmp_path)
    elif case == "negative_lr":
        args[args.index("--learning_rate") + 1] = "-1e-4"
    elif case == "output_extension":
        args[args.index("--output_name") + 1] = "lora.safetensors"
    elif case == "huge_repeats":
        text = open(toy_dataset).read().replace("num_repeats = 1", "num_repeats = 1000000000", 1)
        (tmp_path / "huge.toml").write_text(text)
        args[dataset + 1] = str(tmp_path / "huge.toml")
    else:
        family = "sdxl" if case == "sdxl_folder" else "flux"
        args[args.index("--pretrained_model_name_or_path") + 1] = tiny_family(family).files["diffusers"]
    status, errors = run_in_process(args, caplog)
    assert status == 1 and len(errors) == 1, errors
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_offline_run_without_a_tokenizer_folder_rebuilds_it_quietly_in_the_hub_home(tiny_models_dir, toy_dataset,
                                                                                     tmp_path):  # fmt: skip
    model = os.path.join(tiny_models_dir, "sd1.safetensors")
    args = train_args(model, toy_dataset, str(tmp_path / "out"), "unused")
    tokenizer = args.index("--tokenizer_cache_dir")
    del args[tokenizer : tokenizer + 2]
    args[args.index("--max_train_steps") + 1] = "1"
    result = run_cli(args, tmp_path, launcher=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "ignoring the tokenizer" not in output
    assert (tmp_path / "hf_home" / "diffusion-trainer" / "clip_tokenizer" / "vocab.json").is_file()


@pytest.mark.parametrize("damage", ["cut_short", "pickle_with_objects"])
def test_unreadable_network_weights_are_refused_before_loading(damage, tiny_models_dir, toy_dataset, tokenizer_dir,
                                                               tmp_path, caplog):  # fmt: skip
    import torch
    from safetensors.torch import save_file

    if damage == "cut_short":
        path = tmp_path / "lora.safetensors"
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 64)}, str(path))
        path.write_bytes(path.read_bytes()[:-100])
        fragments = ["--network_weights", "cut short"]
    else:
        path = tmp_path / "lora.pt"
        torch.save({"weights": torch.zeros(2), "note": argparse_namespace()}, str(path))
        fragments = ["--network_weights", "safe loading refuses", ".safetensors"]
    args = lora_args(tiny_models_dir, toy_dataset, tokenizer_dir, tmp_path / "out", "--network_weights", str(path))
    status, errors = run_in_process(args, caplog)
    assert status == 1 and len(errors) == 1, errors
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "weights_only" not in errors[0]


def argparse_namespace():
    import argparse

    return argparse.Namespace(anything=1)  # an object a weights-only load refuses


def _block_and_ignore_sigint() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _signal_state(pid: int) -> str:
    """The blocked / ignored / caught signal masks of a process (Linux), for a failure message."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            return " ".join(line.strip() for line in handle if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
    except OSError:
        return "(no /proc status)"


@pytest.mark.slow
def test_ctrl_c_while_loading_exits_with_one_line_and_no_traceback(tiny_models_dir, toy_dataset, tokenizer_dir,
                                                                  tmp_path):  # fmt: skip
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        args = lora_args(tiny_models_dir, toy_dataset, tokenizer_dir, out)
        # started with SIGINT blocked and ignored, as a parent may leave it (a shell's background job ignores it; both
        # survive exec): the trainer takes it back
        process = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=cli_env(tmp_path),
                                   start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, preexec_fn=_block_and_ignore_sigint)  # fmt: skip
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "training on the CPU" in line:  # the models load right after this line
                signals = _signal_state(process.pid)
                os.killpg(process.pid, signal.SIGINT)
                break
        output = "".join(lines) + process.communicate(timeout=120)[0]
        if "models loaded" not in output:
            break
        # the signal landed after the loading (this reader lagged behind the tiny run on a loaded machine): again
    assert process.returncode == 130, f"{signals}\n{output}"
    assert "Traceback" not in output and output.count("interrupted") == 1, output
    assert "models loaded" not in output, f"{signals}\n{output}"  # the signal stopped the loading
    assert not (out / "lora.safetensors").exists()
