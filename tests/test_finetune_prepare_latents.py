"""finetune/prepare_buckets_latents.py on the tiny SD 1.x model: buckets, .npz contents, metadata, options."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import prepare_buckets_latents as tool
from library.errors import CheckpointError, ConfigError, DatasetError
from tests.finetune_models import write_broken_image

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait


@pytest.fixture
def data(tmp_path) -> tuple[str, str]:
    """A wide, a tall and a square image with a metadata entry each; returns (folder, metadata path)."""
    folder = tmp_path / "train"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (width, height) in {"wide": (96, 64), "tall": (64, 96), "square": (64, 64)}.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    metadata = {name: {"caption": f"a {name} picture"} for name in ("wide", "tall", "square")}
    meta_path = tmp_path / "meta_clean.json"
    meta_path.write_text(json.dumps(metadata), encoding="utf-8")
    return str(folder), str(meta_path)


def bucket_args(folder: str, in_json: str, out_json: str, model: str, *extra: str) -> list[str]:
    return [folder, in_json, out_json, model, "--max_resolution", "64,64", "--min_bucket_reso", "32",
            "--max_bucket_reso", "128", "--bucket_reso_steps", "16", *extra]


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def test_writes_raw_latents_per_bucket_and_train_resolution(tiny_models_dir, data, tmp_path, capsys):
    folder, meta = data
    out = str(tmp_path / "meta_lat.json")
    model = os.path.join(tiny_models_dir, "sd1.safetensors")
    tool.main(bucket_args(folder, meta, out, model, "--batch_size", "2"))
    metadata = read_json(out)
    assert {key: entry["train_resolution"] for key, entry in metadata.items()} == {
        "wide": [80, 48], "tall": [48, 80], "square": [64, 64]
    }
    assert metadata["wide"]["caption"] == "a wide picture"
    with np.load(os.path.join(folder, "wide.npz")) as npz:
        assert npz["latents"].shape == (4, 6, 10) and npz["latents"].dtype == np.float32
        assert npz["original_size"].tolist() == [96, 64]
        # 96x64 scaled to cover 80x48 is 80x53 (rounded): the crop drops 5 rows, 2 above and 3 below
        assert npz["crop_ltrb"].tolist() == [0, 2, 80, 50]
    assert not os.path.exists(os.path.join(folder, "wide_flip.npz"))
    summary = capsys.readouterr().out
    assert "3 images in 3 buckets" in summary and "80x48: 1" in summary and "mean aspect ratio error" in summary


def test_latents_are_unscaled_vae_samples(tiny_models_dir, data, tmp_path):
    """The file holds what SDFamily.encode_images returns: a sample of the VAE posterior, without scaling_factor."""
    from library.families.sd import SDFamily
    from tests.test_sd_family import family_args

    folder, meta = data
    model = os.path.join(tiny_models_dir, "sd1-diffusers")
    tool.main(bucket_args(folder, meta, meta, model))
    vae = SDFamily(family_args(model)).load(torch.float32).vae
    pixels = np.array(Image.open(os.path.join(folder, "square.png")).convert("RGB"))
    images = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    with np.load(os.path.join(folder, "square.npz")) as npz:
        latents = torch.from_numpy(npz["latents"])[None]
    noise = (latents - posterior.mean) / posterior.std  # standard normal when the latents are raw samples
    assert abs(noise.mean().item()) < 0.3 and 0.7 < noise.std().item() < 1.3


def test_flip_aug_writes_mirrored_latents(tiny_models_dir, data, tmp_path):
    folder, meta = data
    tool.main(bucket_args(folder, meta, str(tmp_path / "o.json"), os.path.join(tiny_models_dir, "sd1-diffusers"),
                          "--flip_aug"))
    with np.load(os.path.join(folder, "tall.npz")) as plain, np.load(os.path.join(folder, "tall_flip.npz")) as flip:
        assert flip["latents"].shape == plain["latents"].shape == (4, 10, 6)
        assert not np.allclose(flip["latents"], plain["latents"])


def test_skip_existing_keeps_fitting_files_and_redoes_others(tiny_models_dir, data, tmp_path):
    folder, meta = data
    args = bucket_args(folder, meta, str(tmp_path / "o.json"), os.path.join(tiny_models_dir, "sd1-diffusers"))
    tool.main(args)
    np.savez(os.path.join(folder, "tall.npz"), latents=np.zeros((4, 2, 2), dtype=np.float32))  # wrong size
    before = os.stat(os.path.join(folder, "wide.npz")).st_mtime_ns
    tool.main([*args, "--skip_existing"])
    assert os.stat(os.path.join(folder, "wide.npz")).st_mtime_ns == before
    with np.load(os.path.join(folder, "tall.npz")) as npz:
        assert npz["latents"].shape == (4, 10, 6)
    assert read_json(str(tmp_path / "o.json"))["wide"]["train_resolution"] == [80, 48]


def test_no_upscale_and_unreadable_images(tiny_models_dir, data, tmp_path, caplog):
    folder, meta = data
    write_broken_image(folder)
    metadata = read_json(meta) | {"broken": {"caption": "x"}}
    with open(meta, "w", encoding="utf-8") as handle:
        json.dump(metadata, handle)
    out = str(tmp_path / "o.json")
    tool.main(bucket_args(folder, meta, out, os.path.join(tiny_models_dir, "sd1-diffusers"), "--bucket_no_upscale",
                          "--max_resolution", "48,48"))
    result = read_json(out)
    assert result["square"]["train_resolution"] == [48, 48]
    assert result["wide"]["train_resolution"] == [48, 32]  # 96x64 shrunk to the 48x48 area, sides floored to 16
    assert "train_resolution" not in result["broken"]
    assert "broken.png" in caplog.text and "skipped" in caplog.text


def test_metadata_without_matching_keys_hints_at_full_path(data, tmp_path):
    folder, meta = data
    with pytest.raises(DatasetError, match="written without --full_path"):
        tool.main(bucket_args(folder, meta, str(tmp_path / "o.json"), "model.safetensors", "--full_path"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max_resolution", "512x512"], "--max_resolution '512x512' is invalid"),
        (["--min_bucket_reso", "40"], "--min_bucket_reso = 40 is invalid: expected a multiple"),
        (["--max_resolution", "256,256"], "must include --max_resolution 256,256"),
    ],
)
def test_bucket_options_are_checked_first(data, tmp_path, extra, message):
    folder, meta = data
    with pytest.raises(ConfigError, match=message):
        tool.main(bucket_args(folder, meta, str(tmp_path / "o.json"), "missing.safetensors", *extra))


def test_missing_metadata_and_model_are_clear_errors(data, tmp_path):
    folder, meta = data
    with pytest.raises(DatasetError, match=r"in_json: metadata file .*nothing\.json does not exist"):
        tool.main(bucket_args(folder, str(tmp_path / "nothing.json"), str(tmp_path / "o.json"), "m.safetensors"))
    with pytest.raises(CheckpointError, match=r"file not found: .*missing\.safetensors"):
        tool.main(bucket_args(folder, meta, str(tmp_path / "o.json"), str(tmp_path / "missing.safetensors")))
