"""Fine-tuning subsets: metadata files with full paths or stems, captions + tags, prepared latents, subset rules."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from library.config.dataset_config import load_dataset_config
from library.errors import ConfigError, DatasetError
from tests.dataset_helpers import all_batches, group_of, write_config, write_images


def _metadata(path: Path, entries: dict) -> Path:
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def _finetune_config(tmp_path: Path, metadata: Path, image_dir: Path | None, dataset: str = "resolution = 64") -> Path:
    folder = f"image_dir = '{image_dir.as_posix()}'\n" if image_dir else ""
    return write_config(
        tmp_path, f"[[datasets]]\n{dataset}\n[[datasets.subsets]]\n{folder}metadata_file = '{metadata.as_posix()}'\n"
    )


def _latents(path: Path, value: float, shape=(4, 8, 8), **extra) -> None:
    np.savez(path, latents=np.full(shape, value, dtype=np.float16), **extra)


def test_metadata_with_stems_needs_image_dir_and_merges_caption_and_tags(tmp_path):
    images = write_images(tmp_path / "img", [(64, 64), (64, 64)], names=["a", "b"])
    metadata = _metadata(tmp_path / "md.json", {"a": {"caption": "a frog", "tags": "green, pond"}, "b": {"tags": "x"}})
    group = group_of(_finetune_config(tmp_path, metadata, images))
    dataset = group.datasets[0]
    assert [Path(p).name for p in dataset.image_paths] == ["a.png", "b.png"]
    assert dataset.captions == ["a frog, green, pond", "x"]
    assert not dataset.uses_latents


def test_metadata_with_full_paths_needs_no_image_dir(tmp_path):
    images = write_images(tmp_path / "img", [(64, 64)], ext=".jpg")
    metadata = _metadata(tmp_path / "md.json", {str(images / "img000.jpg"): {"caption": "full path"}})
    batch = group_of(_finetune_config(tmp_path, metadata, None))[0]
    assert batch["captions"] == ["full path"] and batch["images"].shape == (1, 3, 64, 64)


def test_metadata_key_without_image_names_the_key_and_file(tmp_path):
    images = write_images(tmp_path / "img", [(64, 64)])
    metadata = _metadata(tmp_path / "md.json", {"missing": {"caption": "x"}})
    with pytest.raises(DatasetError, match=r'md\.json, entry "missing": no image with this path, name or stem'):
        group_of(_finetune_config(tmp_path, metadata, images))


def test_stem_keys_without_image_dir_explain_full_path(tmp_path):
    metadata = _metadata(tmp_path / "md.json", {"img000": {"caption": "x"}})
    with pytest.raises(DatasetError, match=r"need image_dir .*--full_path"):
        group_of(_finetune_config(tmp_path, metadata, None))


def test_metadata_entry_without_caption_or_tags_is_an_error(tmp_path):
    images = write_images(tmp_path / "img", [(64, 64)])
    metadata = _metadata(tmp_path / "md.json", {"img000": {"train_resolution": [64, 64]}})
    with pytest.raises(DatasetError, match=r'entry "img000": has neither caption nor tags'):
        group_of(_finetune_config(tmp_path, metadata, images))


def test_invalid_metadata_json_names_the_file(tmp_path):
    images = write_images(tmp_path / "img", [(64, 64)])
    (tmp_path / "md.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"metadata_file .*md\.json is not valid JSON"):
        group_of(_finetune_config(tmp_path, tmp_path / "md.json", images))


def test_prepared_latents_replace_images_and_set_buckets(tmp_path):
    images = write_images(tmp_path / "img", [(100, 60), (100, 60), (60, 100)], names=["a", "b", "c"])
    for name, value in (("a", 1.0), ("b", 2.0)):
        _latents(
            images / f"{name}.npz",
            value,
            (4, 6, 10),
            original_size=np.array([100, 60]),
            crop_ltrb=np.array([2, 1, 82, 49]),
        )
    _latents(images / "c.npz", 3.0, (4, 10, 6))
    entries = {"a": [80, 48], "b": [80, 48], "c": [48, 80]}
    metadata = _metadata(
        tmp_path / "md.json", {k: {"caption": k, "train_resolution": size} for k, size in entries.items()}
    )
    group = group_of(_finetune_config(tmp_path, metadata, images, "batch_size = 2"))  # no resolution needed
    assert group.summary()["datasets"][0]["buckets"] == [[[48, 80], 1], [[80, 48], 2]]
    batches = {tuple(b["captions"]): b for b in all_batches(group)}
    pair = batches.get(("a", "b")) or batches[("b", "a")]
    assert pair["images"] is None and pair["latents"].dtype == torch.float32  # fp16 files are widened
    assert pair["latents"].shape == (2, 4, 6, 10) and pair["target_size"] == (48, 80)
    assert sorted(pair["latents"][:, 0, 0, 0].tolist()) == [1.0, 2.0]
    assert pair["original_sizes"] == [(60, 100), (60, 100)] and pair["crop_top_lefts"] == [(1, 2), (1, 2)]
    single = batches[("c",)]
    assert single["latents"].shape == (1, 4, 10, 6) and single["original_sizes"] == [(80, 48)]


def test_flip_latents_are_picked_at_random_and_reproducibly(tmp_path):
    images = write_images(tmp_path / "img", [(64, 64)] * 12)
    for index in range(12):
        _latents(images / f"img{index:03d}.npz", 1.0)
        _latents(images / f"img{index:03d}_flip.npz", -1.0)
    metadata = _metadata(
        tmp_path / "md.json", {f"img{i:03d}": {"caption": "x", "train_resolution": [64, 64]} for i in range(12)}
    )
    path = _finetune_config(tmp_path, metadata, images, "batch_size = 12")
    first, second = group_of(path, seed=5)[0], group_of(path, seed=5)[0]
    signs = first["latents"][:, 0, 0, 0].tolist()
    assert 0 < signs.count(-1.0) < 12
    assert signs == second["latents"][:, 0, 0, 0].tolist()


def test_partial_latents_are_ignored_with_a_warning(tmp_path, caplog):
    images = write_images(tmp_path / "img", [(64, 64)] * 2)
    _latents(images / "img000.npz", 1.0)
    metadata = _metadata(
        tmp_path / "md.json", {f"img{i:03d}": {"caption": "x", "train_resolution": [64, 64]} for i in range(2)}
    )
    with caplog.at_level(logging.WARNING):
        group = group_of(_finetune_config(tmp_path, metadata, images))
    assert not group.datasets[0].uses_latents and group[0]["images"] is not None
    assert "only 1 of 2 images have them" in caplog.text


def test_pixel_augmentation_blocks_latents_and_latent_only_entries_then_fail(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    _latents(images / "a.npz", 1.0)
    metadata = _metadata(tmp_path / "md.json", {"a": {"caption": "x", "train_resolution": [64, 64]}})
    path = _finetune_config(tmp_path, metadata, images, "resolution = 64\ncolor_aug = true")
    with pytest.raises(DatasetError, match=r"color_aug change the pixels .* no image to encode instead"):
        group_of(path)


def test_dataset_cannot_mix_dreambooth_and_finetune_subsets(tmp_path):
    images = write_images(tmp_path / "img", [(64, 64)])
    metadata = _metadata(tmp_path / "md.json", {"img000": {"caption": "x"}})
    path = write_config(
        tmp_path,
        f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{images.as_posix()}'\n"
        f"[[datasets.subsets]]\nmetadata_file = '{metadata.as_posix()}'\n",
    )
    pattern = (
        r"datasets\[0\] mixes a fine-tuning subset \(datasets\[0\]\.subsets\[1\] has metadata_file\) with a "
        r"DreamBooth subset \(datasets\[0\]\.subsets\[0\] has none\)"
    )
    with pytest.raises(ConfigError, match=pattern):
        load_dataset_config(path)


def test_finetune_subset_rejects_dreambooth_options(tmp_path):
    metadata = _metadata(tmp_path / "md.json", {"a": {"caption": "x"}})
    path = write_config(
        tmp_path,
        f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nmetadata_file = '{metadata.as_posix()}'\n"
        "is_reg = true\nclass_tokens = 'x'\n",
    )
    with pytest.raises(ConfigError, match=r"fine-tuning subset, which cannot use class_tokens, is_reg"):
        load_dataset_config(path)


def test_duplicate_metadata_file_in_one_dataset_is_ignored(tmp_path, caplog):
    images = write_images(tmp_path / "img", [(64, 64)])
    metadata = _metadata(tmp_path / "md.json", {"img000": {"caption": "x"}})
    subset = f"[[datasets.subsets]]\nimage_dir = '{images.as_posix()}'\nmetadata_file = '{metadata.as_posix()}'\n"
    path = write_config(tmp_path, f"[[datasets]]\nresolution = 64\n{subset}{subset}")
    with caplog.at_level(logging.WARNING):
        (dataset,) = load_dataset_config(path).datasets
    assert len(dataset.subsets) == 1 and "uses the same metadata_file" in caplog.text


def test_missing_metadata_file_is_named(tmp_path):
    path = write_config(
        tmp_path, "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nmetadata_file = 'nothing.json'\n"
    )
    with pytest.raises(ConfigError, match=r'subsets\[0\]\.metadata_file = "nothing\.json" does not exist'):
        load_dataset_config(path)


def test_finetune_dataset_without_latents_needs_resolution(tmp_path):
    images = write_images(tmp_path / "img", [(64, 64)])
    metadata = _metadata(tmp_path / "md.json", {"img000": {"caption": "x"}})
    with pytest.raises(DatasetError, match=r"datasets\[0\] has no resolution"):
        group_of(_finetune_config(tmp_path, metadata, images, "batch_size = 1"))
