"""Behaviour the guides describe, checked through the entry scripts' code path (issue 16): masks without
--masked_loss, accelerate's precision, weighted captions, data-loader workers, dataset-kind warnings, --debug_dataset
output, SD options on SDXL, hub model ids, text-encoder names in diffusers outputs, bucket choice."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from library.families import get_family_class
from library.testing.toy_data import write_images
from tests.conftest import run_cli
from tests.hub_standin import write_cached_repo
from tests.training_helpers import parsed_args, train_in_process

pytestmark = pytest.mark.usefixtures("one_thread")


class ReachedModelLoad(Exception):
    """Raised instead of loading a model: every check before the load passed."""


def stop_at_load(monkeypatch, family: str) -> None:
    def stop(*_):
        raise ReachedModelLoad

    monkeypatch.setattr(get_family_class(family), "load", stop)


def base_argv(tiny, dataset: str, out_dir, *extra: str) -> list[str]:
    return [*tiny.model_args, *tiny.fast_args, "--dataset_config", dataset, "--output_dir", str(out_dir),
            "--output_name", "result", "--max_train_steps", "2", "--seed", "1", "--max_data_loader_n_workers", "0",
            "--learning_rate", "1e-4", *extra]  # fmt: skip


def write_dataset(folder, subset_lines: list[str], resolution: int = 64) -> str:
    path = os.path.join(folder, "dataset.toml")
    lines = ["[[datasets]]", f"resolution = {resolution}", "batch_size = 2", "", "  [[datasets.subsets]]"]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines + [f"  {line}" for line in subset_lines]) + "\n")
    return path


def epoch_loss(log: str) -> float:
    line = next(line for line in log.splitlines() if "average loss" in line)
    return float(line.split("average loss ")[1].split()[0])


# ---- masks -----------------------------------------------------------------------------------------------------


def transparent_dataset(folder) -> str:
    """Four fully transparent RGBA images with captions, and a dataset config with alpha_mask = true."""
    images = folder / "transparent"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(4):
        pixels = rng.integers(0, 255, (64, 64, 4), dtype=np.uint8)
        pixels[..., 3] = 0
        Image.fromarray(pixels, "RGBA").save(images / f"img_{index}.png")
        (images / f"img_{index}.txt").write_text("a picture\n", encoding="utf-8")
    return write_dataset(str(folder), [f"image_dir = '{images}'", "caption_extension = '.txt'", "alpha_mask = true"])


def test_alpha_masks_apply_without_masked_loss_and_the_run_says_so(tiny_family, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    dataset = transparent_dataset(tmp_path)
    train_in_process(base_argv(tiny_family("sd"), dataset, tmp_path / "out", "--network_dim", "4"))
    assert "loss masks in use" in caplog.text
    assert epoch_loss(caplog.text) == 0.0  # nothing of a fully transparent image is trained (was ~1.1 unmasked)


def test_masked_loss_without_any_mask_source_warns(tiny_family, toy_dataset, tmp_path, caplog, monkeypatch):
    stop_at_load(monkeypatch, "sd")
    with pytest.raises(ReachedModelLoad):
        train_in_process(base_argv(tiny_family("sd"), toy_dataset, tmp_path / "out", "--masked_loss"))
    assert "--masked_loss: no subset provides masks" in caplog.text


# ---- precision from accelerate launch ----------------------------------------------------------------------------


def test_accelerate_launch_mixed_precision_is_used_when_the_script_option_is_not_given(tiny_family, toy_dataset,
                                                                                        tmp_path):  # fmt: skip
    tiny = tiny_family("sd")
    out = tmp_path / "out"
    argv = base_argv(tiny, toy_dataset, out, "--network_dim", "4")
    command = ["--mixed_precision", "bf16", "train_network.py", *argv]
    result = run_cli(command, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "computing in bf16 mixed precision (from accelerate launch / accelerate config)" in result.stderr
    assert _metadata(out / "result.safetensors")["ss_mixed_precision"] == "bf16"


def _metadata(path) -> dict[str, str]:
    from library.checkpoints.files import read_safetensors_metadata

    return read_safetensors_metadata(str(path))


def test_script_mixed_precision_wins_over_accelerate_and_default_is_fp32(monkeypatch, caplog):
    from library.training.loop_options import resolve_mixed_precision

    caplog.set_level(logging.INFO)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    given = parsed_args("sd", ["--pretrained_model_name_or_path", "m", "--mixed_precision", "fp16"])
    assert resolve_mixed_precision(given) == "fp16" and given.mixed_precision == "fp16"
    assert resolve_mixed_precision(parsed_args("sd", ["--pretrained_model_name_or_path", "m"])) == "bf16"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert resolve_mixed_precision(parsed_args("sd", ["--pretrained_model_name_or_path", "m"])) == "no"
    assert "computing in float32 (no mixed precision) (from default)" in caplog.text


# ---- weighted captions -------------------------------------------------------------------------------------------


def test_weight_rescale_never_divides_by_zero():
    from library.text.weighted_captions import apply_token_weights

    hidden = torch.tensor([[[1.0, -1.0], [2.0, -2.0]], [[0.5, 1.5], [1.0, 1.0]]])  # sample 0 has mean exactly 0
    weights = torch.tensor([[1.5, 1.0], [1.0, 1.0]])
    weighted = apply_token_weights(hidden, weights)
    assert torch.isfinite(weighted).all()
    assert torch.equal(weighted[1], hidden[1])  # no emphasis: unchanged
    assert torch.allclose(weighted[0, 0], hidden[0, 0] * 1.5)  # scaled, mean not restorable: left unrescaled


def test_sdxl_weighted_captions_weigh_both_encoders_and_train(tiny_family, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    tiny = tiny_family("sdxl")
    family = get_family_class("sdxl")(parsed_args("sdxl", [*tiny.model_args, "--weighted_captions"]))
    plain = get_family_class("sdxl")(parsed_args("sdxl", list(tiny.model_args)))
    models = plain.load(torch.float32)
    with torch.no_grad():
        emphasised = family.encode_text(models, ["a (red:1.6) circle"])["encoder_hidden_states"]
        unweighted = plain.encode_text(models, ["a red circle"])["encoder_hidden_states"]
    width1 = models.text_encoders[0].config.hidden_size
    assert not torch.allclose(emphasised[..., :width1], unweighted[..., :width1])  # encoder 1 weighted
    assert not torch.allclose(emphasised[..., width1:], unweighted[..., width1:])  # encoder 2 weighted
    images = tmp_path / "images"
    for path in write_images(str(images), 4):
        with open(os.path.splitext(path)[0] + ".txt", "w", encoding="utf-8") as handle:
            handle.write("a (red:1.3) [circle], picture\n")
    dataset = write_dataset(str(tmp_path), [f"image_dir = '{images}'", "caption_extension = '.txt'"])
    train_in_process(base_argv(tiny, dataset, tmp_path / "out", "--weighted_captions", "--network_dim", "4"), "sdxl")
    assert np.isfinite(epoch_loss(caplog.text)) and (tmp_path / "out" / "result.safetensors").is_file()


def test_textual_inversion_refuses_weighted_captions_in_one_line(tiny_family, toy_dataset, tmp_path, caplog):
    argv = base_argv(tiny_family("sd"), toy_dataset, tmp_path / "out", "--token_string", "mychar4",
                     "--weighted_captions")  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        train_in_process(argv, "sd", "textual_inversion")
    assert stop.value.code == 1
    assert "--weighted_captions does not work with textual inversion" in caplog.text


# ---- data loader workers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cpus, expected", [(1, 0), (2, 1), (4, 3), (16, 8)])
def test_loader_workers_default_to_min_8_and_cpu_threads_minus_one(cpus, expected, toy_dataset, monkeypatch):
    from library.config.dataset_cli import DatasetSource
    from library.data.dataset import build_dataset_group

    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    args = parsed_args("sd", ["--pretrained_model_name_or_path", "m", "--dataset_config", toy_dataset])
    assert args.max_data_loader_n_workers is None
    group = build_dataset_group(DatasetSource.from_args(args), seed=0, prior_loss_weight=1.0)
    assert group.make_dataloader(args.max_data_loader_n_workers, False).num_workers == expected


# ---- fine_tune.py / train_db.py with the other kind of dataset ----------------------------------------------------


def test_fine_tune_with_dreambooth_folders_says_what_trains(tiny_family, toy_dataset, tmp_path, caplog, monkeypatch):
    stop_at_load(monkeypatch, "sd")
    with pytest.raises(ReachedModelLoad):
        train_in_process(base_argv(tiny_family("sd"), toy_dataset, tmp_path / "out"), "sd", "finetune")
    assert "fine_tune.py is documented for fine-tuning metadata, and 2 subset(s) here are DreamBooth folders" in (
        caplog.text
    )
    assert "the U-Net in full, the text encoder frozen" in caplog.text


def test_train_db_with_in_json_says_what_trains(tiny_family, tmp_path, caplog, monkeypatch):
    images = write_images(str(tmp_path / "train"), 2, captions=False)
    metadata = tmp_path / "meta.json"
    metadata.write_text(json.dumps({path: {"caption": "a picture"} for path in images}), encoding="utf-8")
    tiny = tiny_family("sd")
    argv = [*tiny.model_args, "--in_json", str(metadata), "--train_data_dir", str(tmp_path / "train"),
            "--resolution", "64", "--output_dir", str(tmp_path / "out"),
            "--max_data_loader_n_workers", "0"]  # fmt: skip
    stop_at_load(monkeypatch, "sd")
    with pytest.raises(ReachedModelLoad):
        train_in_process(argv, "sd", "dreambooth")
    assert "train_db.py is documented for DreamBooth folders, and 1 subset(s) here are fine-tuning metadata" in (
        caplog.text
    )
    assert "the U-Net and the text encoder in full" in caplog.text


# ---- --debug_dataset --------------------------------------------------------------------------------------------


def test_debug_dataset_writes_batches_with_captions_and_buckets(tiny_family, toy_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    train_in_process([*base_argv(tiny_family("sd"), toy_dataset, out), "--debug_dataset"])
    folder = out / "debug_dataset"
    printed = capsys.readouterr().out
    assert f"written to {folder}" in printed
    rows = (folder / "index.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert len(rows) == 8  # 4 batches of 2
    name, bucket, source, caption = rows[0].split("\t")
    width, height = (int(side) for side in bucket.split("x"))
    assert Image.open(folder / f"{name}.png").size == (width, height)
    assert (folder / f"{name}.txt").read_text(encoding="utf-8").strip() == caption and os.path.isfile(source)


# ---- SD options on sdxl_train_network.py ------------------------------------------------------------------------


def test_sdxl_accepts_clip_skip_and_v2_with_a_warning(tiny_family, toy_dataset, tmp_path, caplog, monkeypatch):
    stop_at_load(monkeypatch, "sdxl")
    argv = base_argv(tiny_family("sdxl"), toy_dataset, tmp_path / "out", "--clip_skip", "2", "--v2")
    with pytest.raises(ReachedModelLoad):
        train_in_process(argv, "sdxl")
    assert "--v2 does not apply to SDXL and is ignored" in caplog.text
    assert "--clip_skip does not apply to SDXL and is ignored" in caplog.text


# ---- hub model ids ---------------------------------------------------------------------------------------------


def test_hub_model_id_offline_and_not_cached_is_one_line_before_loading(toy_dataset, tmp_path, caplog, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    stop_at_load(monkeypatch, "sd")
    for option, repo in (("--pretrained_model_name_or_path", "someone/missing-model"), ("--vae", "someone/vae")):
        argv = ["--pretrained_model_name_or_path", "someone/missing-model" if option != "--vae" else "m.safetensors",
                "--dataset_config", toy_dataset, "--output_dir", str(tmp_path / "out")]  # fmt: skip
        if option == "--vae":
            open(tmp_path / "m.safetensors", "wb").close()
            argv[1] = str(tmp_path / "m.safetensors")
            argv += ["--vae", repo]
        caplog.clear()
        with pytest.raises(SystemExit):
            train_in_process(argv)
        errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
        assert len(errors) == 1 and "\n" not in errors[0]
        assert f"{option} {repo}: this Hugging Face model is not in the hub cache and HF_HUB_OFFLINE=1" in errors[0]


def test_hub_model_and_vae_ids_load_from_the_hub_cache(tiny_family, toy_dataset, tmp_path, monkeypatch):
    import huggingface_hub

    tiny = tiny_family("sd")
    cache = tmp_path / "hub"
    write_cached_repo(str(cache), "tiny/sd1", tiny.files["sd1-diffusers"])
    write_cached_repo(str(cache), "tiny/sd1-vae", os.path.join(tiny.files["sd1-diffusers"], "vae"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    argv = base_argv(tiny, toy_dataset, tmp_path / "out", "--network_dim", "4")
    argv[argv.index("--pretrained_model_name_or_path") + 1] = "tiny/sd1"
    train_in_process([*argv, "--vae", "tiny/sd1-vae"])
    assert (tmp_path / "out" / "result.safetensors").is_file()


def test_t5_tokenizer_is_downloaded_only_when_online(monkeypatch, tmp_path):
    from transformers import T5TokenizerFast

    from library.checkpoints import t5_tokenizer
    from library.errors import CheckpointError

    asked = []
    monkeypatch.setattr(T5TokenizerFast, "from_pretrained",
                        classmethod(lambda cls, source, **kwargs: asked.append(kwargs) or None))  # fmt: skip
    with pytest.raises(CheckpointError, match="no T5 tokenizer found offline: give --t5xxl_tokenizer"):
        t5_tokenizer.load_t5_tokenizer(cache_dir=str(tmp_path))
    monkeypatch.setattr(t5_tokenizer, "hub_offline", lambda: False)
    with pytest.raises(CheckpointError, match="no T5 tokenizer found locally or on the hub"):
        t5_tokenizer.load_t5_tokenizer(cache_dir=str(tmp_path))
    assert [kwargs["local_files_only"] for kwargs in asked] == [True, False]


# ---- text-encoder names in diffusers outputs ----------------------------------------------------------------------


def test_flux_lora_in_diffusers_format_names_clip_as_loaders_read_it_and_refuses_t5(tiny_family):
    import networks.lora as lora
    from library.errors import ConfigError

    tiny = tiny_family("flux")
    family = get_family_class("flux")(parsed_args("flux", list(tiny.model_args)))
    models = family.load(torch.float32)
    encoders, transformer = family.network_text_encoders(models), models.denoiser
    network = lora.create_network(1.0, 4, 2, None, encoders, transformer, save_format="diffusers")
    keys = set(network.diffusers_state_dict())
    clip = [key for key in keys if key.startswith("text_encoder.")]
    # ComfyUI maps "text_encoder.text_model.encoder.layers.N.<layer>" only; diffusers drops the level itself
    assert clip and all(key.startswith("text_encoder.text_model.encoder.layers.") for key in clip)
    with pytest.raises(ConfigError, match="save_format=diffusers with train_t5xxl: neither diffusers nor ComfyUI"):
        lora.create_network(1.0, 4, 2, None, encoders, transformer, save_format="diffusers", train_t5xxl=True)


@pytest.mark.parametrize("family_id", ["sd", "sdxl"])
def test_diffusers_folders_keep_the_text_model_level(family_id, tiny_family, tmp_path):
    tiny = tiny_family(family_id)
    family = get_family_class(family_id)(parsed_args(family_id, list(tiny.model_args), method="finetune"))
    models = family.load(torch.float32)
    folder = str(tmp_path / "saved")
    family.save_model(models, folder, "diffusers_safetensors", None, {})
    components = ["text_encoder"] + (["text_encoder_2"] if family_id == "sdxl" else [])
    for component, encoder in zip(components, models.text_encoders):
        saved = load_file(os.path.join(folder, component, "model.safetensors"))
        assert all(key.startswith(("text_model.", "text_projection.")) for key in saved), component
        reloaded = type(encoder).from_pretrained(os.path.join(folder, component))
        assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), encoder.state_dict().values()))


# ---- buckets ---------------------------------------------------------------------------------------------------


def test_bucket_choice_compares_aspect_ratios_on_a_log_scale():
    """docs/dataset_config.md: a ratio between two buckets goes where it is nearer on a log scale, which for wide
    images is not always where the linear distance (the reference's) points."""
    from library.data.buckets import bucket_sizes, nearest_buckets

    buckets = bucket_sizes((512, 512), 256, 1024, 64)
    ratios = buckets[:, 0] / buckets[:, 1]
    wide = np.sort(ratios[ratios > 1.5])[:2]  # two neighbouring landscape buckets
    between = np.array([[1000 * (np.sqrt(wide[0] * wide[1]) + (wide.mean() - np.sqrt(wide[0] * wide[1])) / 2), 1000]])
    chosen = ratios[nearest_buckets(between.astype(np.int64), buckets)[0]]
    linear = ratios[np.abs(ratios - between[0, 0] / 1000).argmin()]
    assert chosen == wide[1] and linear == wide[0]
