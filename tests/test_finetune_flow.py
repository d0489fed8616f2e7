"""The guide's metadata workflow end to end: tag -> merge captions -> merge tags -> clean -> prepare latents,
then the result read by the dataset engine as a fine-tuning subset that trains from the prepared latents."""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import pytest
import torch

from finetune import (
    clean_captions_and_tags,
    merge_captions_to_metadata,
    merge_dd_tags_to_metadata,
    prepare_buckets_latents,
    tag_images_by_wd14_tagger,
)
from library.checkpoints.files import read_safetensors_metadata
from library.config.dataset_config import parse_dataset_config
from library.data.dataset import DatasetGroup
from library.testing.toy_data import write_images
from tests.finetune_models import write_tiny_tagger

pytest.importorskip("onnxruntime", reason="the tagger needs onnxruntime (optional extra)")
pytest.importorskip("onnx", reason="the tiny tagger is exported with torch.onnx, which needs onnx")


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models run far faster on one thread than on threads competing for a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def flow(tiny_models_dir, tmp_path_factory) -> dict[str, str]:
    """Run the guide's steps on three toy images (hand-written captions, tiny tagger); returns the paths used."""
    root = tmp_path_factory.mktemp("flow")
    train = str(root / "train_data")
    paths = write_images(train, 3, captions=False)  # 64x64, 96x64, 64x96 pictures of shapes
    for path in paths:
        with open(os.path.splitext(path)[0] + ".caption", "w", encoding="utf-8") as handle:
            handle.write("an anime girl drawing a shape\n")
    tagger = write_tiny_tagger(str(root / "wd14_tagger_model"))
    meta = {name: str(root / f"meta_{name}.json") for name in ("cap", "cap_dd", "clean", "lat")}
    model = os.path.join(tiny_models_dir, "sd1.safetensors")
    with one_torch_thread():
        tag_images_by_wd14_tagger.main([train, "--model_dir", tagger, "--thresh", "0.7", "--batch_size", "2"])
        merge_captions_to_metadata.main(["--full_path", train, meta["cap"]])
        merge_dd_tags_to_metadata.main(["--full_path", train, "--in_json", meta["cap"], meta["cap_dd"]])
        clean_captions_and_tags.main([meta["cap_dd"], meta["clean"]])
        prepare_buckets_latents.main([
            "--full_path", train, meta["clean"], meta["lat"], model, "--batch_size", "2", "--max_resolution", "64,64",
            "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16",
            "--mixed_precision", "no", "--flip_aug",
        ])
    return {"train": train, "model": model, "root": str(root), **meta, **{f"image{i}": p for i, p in enumerate(paths)}}


def test_flow_writes_cleaned_captions_tags_and_train_resolution(flow):
    with open(flow["lat"], encoding="utf-8") as handle:
        metadata = json.load(handle)
    first = metadata[os.path.abspath(flow["image0"])]
    assert first["caption"] == "a girl drawing a shape"
    assert first["tags"] == "red theme, 1girl, ^_^, hatsune miku"  # long_hair (0.6) is below 0.7
    assert [metadata[os.path.abspath(flow[f"image{i}"])]["train_resolution"] for i in range(3)] == [
        [64, 64], [80, 48], [48, 80]
    ]
    assert all(os.path.isfile(os.path.splitext(flow[f"image{i}"])[0] + "_flip.npz") for i in range(3))


def test_flow_metadata_feeds_the_dataset_engine_with_prepared_latents(flow):
    data = {"general": {"shuffle_caption": False}, "datasets": [{"batch_size": 1, "subsets": [
        {"metadata_file": flow["lat"]}
    ]}]}
    group = DatasetGroup.from_config(parse_dataset_config(data, "flow test"), seed=0, prior_loss_weight=1.0)
    dataset = group.datasets[0]
    assert dataset.uses_latents
    assert sorted(dataset.bucket_sizes.tolist()) == [[48, 80], [64, 64], [80, 48]]
    sample = dataset.load_sample(int(np.flatnonzero(dataset.samples == 1)[0]), np.random.default_rng(0))
    assert sample.latents.shape == (4, 6, 10)  # 80x48 / 8
    with open(flow["lat"], encoding="utf-8") as handle:
        entry = json.load(handle)[os.path.abspath(flow["image1"])]
    assert sample.caption == f"{entry['caption']}, {entry['tags']}"
    assert sample.original_size == (64, 96) and sample.crop_top_left == (2, 0)  # (height, width), (top, left)


def test_fine_tune_trains_from_the_flow_metadata(flow, tokenizer_dir, tmp_path):
    """What `fine_tune.py --in_json meta_lat.json` runs, in this process (a subprocess would cost 15 s more)."""
    from library.training.entry import run_training

    out = tmp_path / "out"
    with one_torch_thread():
        run_training("sd", "finetune", "fine_tune.py", [
            "--pretrained_model_name_or_path", flow["model"], "--in_json", flow["lat"], "--resolution", "64",
            "--output_dir", str(out), "--output_name", "model", "--learning_rate", "1e-4", "--max_train_steps", "2",
            "--seed", "1", "--tokenizer_cache_dir", tokenizer_dir, "--max_data_loader_n_workers", "0",
        ])
    assert read_safetensors_metadata(str(out / "model.safetensors"))["ss_num_train_images"] == "3"
