"""Dataset options on the command line: legacy folders, --in_json, flags below the config file, inspect, debug."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest

from library.config.dataset_cli import DatasetSource, load_group_config
from library.data import inspect
from library.data.dataset import add_dataset_arguments, build_dataset_group
from library.errors import ConfigError
from tests.dataset_helpers import one_dataset, subset_lines, write_images

# The seed guide's table of command-line options that a config file overrides, with a value for each.
GUIDE_FLAGS = {
    "--bucket_no_upscale": None,
    "--bucket_reso_steps": "32",
    "--caption_dropout_every_n_epochs": "3",
    "--caption_dropout_rate": "0.1",
    "--caption_extension": ".txt",
    "--caption_tag_dropout_rate": "0.2",
    "--color_aug": None,
    "--dataset_repeats": "4",
    "--enable_bucket": None,
    "--face_crop_aug_range": "1.5,3.0",
    "--flip_aug": None,
    "--keep_tokens": "2",
    "--min_bucket_reso": "128",
    "--random_crop": None,
    "--resolution": "256,320",
    "--shuffle_caption": None,
    "--train_batch_size": "3",
}


def _parse(argv: list[str]) -> DatasetSource:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return DatasetSource.from_args(parser.parse_args(argv))


def _legacy_folders(tmp_path: Path) -> tuple[Path, Path]:
    train, reg = tmp_path / "train", tmp_path / "reg"
    write_images(train / "10_sks dog", [(64, 64)] * 2)
    write_images(train / "3_cat", [(64, 64)], captions={0: "a cat, sitting"})
    (train / "notes").mkdir()
    write_images(reg / "1_dog", [(64, 64)] * 5)
    return train, reg


def test_legacy_folders_give_repeats_class_tokens_and_reg(tmp_path, caplog):
    train, reg = _legacy_folders(tmp_path)
    args = _parse(["--train_data_dir", str(train), "--reg_data_dir", str(reg), "--resolution", "64"])
    with caplog.at_level(logging.WARNING):
        (dataset,) = load_group_config(args).datasets
    found = [(Path(s.image_dir).name, s.num_repeats, s.class_tokens, s.is_reg) for s in dataset.subsets]
    assert found == [("10_sks dog", 10, "sks dog", False), ("3_cat", 3, "cat", False), ("1_dog", 1, "dog", True)]
    assert "folder notes ignored" in caplog.text
    group = build_dataset_group(_parse([*_flags(args)]), seed=0, prior_loss_weight=0.5)
    assert (group.num_train_images, group.num_reg_images) == (23, 5)
    # Without .caption files every image takes its folder's class tokens (the .txt caption is not read).
    assert group.datasets[0].captions == ["sks dog", "sks dog", "cat"] + ["dog"] * 5


def _flags(args: argparse.Namespace) -> list[str]:
    return ["--train_data_dir", args.train_data_dir, "--reg_data_dir", args.reg_data_dir, "--resolution", "64"]


def test_legacy_caption_extension_flag_reads_caption_files(tmp_path):
    train, _ = _legacy_folders(tmp_path)
    args = _parse(["--train_data_dir", str(train), "--resolution", "64", "--caption_extension", ".txt"])
    group = build_dataset_group(args, seed=0, prior_loss_weight=1.0)
    assert "a cat, sitting" in group.datasets[0].captions


def test_legacy_images_directly_in_train_data_dir_explains_the_layout(tmp_path):
    write_images(tmp_path / "train", [(64, 64)])
    args = _parse(["--train_data_dir", str(tmp_path / "train"), "--resolution", "64"])
    with pytest.raises(ConfigError, match=r"has no '<repeats>_<identifier> <class>' folders.*holds images directly"):
        load_group_config(args)


def test_legacy_without_resolution_names_the_flag(tmp_path):
    train, _ = _legacy_folders(tmp_path)
    with pytest.raises(ConfigError, match=r"command line: datasets\[0\] has no resolution.*--resolution"):
        load_group_config(_parse(["--train_data_dir", str(train)]))


def test_legacy_in_json_is_a_finetune_subset_with_dataset_repeats(tmp_path):
    images = write_images(tmp_path / "train", [(64, 64)])
    (tmp_path / "md.json").write_text(json.dumps({"img000": {"caption": "meta"}}), encoding="utf-8")
    argv = ["--train_data_dir", str(images), "--in_json", str(tmp_path / "md.json"), "--resolution", "64"]
    group = build_dataset_group(_parse([*argv, "--dataset_repeats", "5"]), seed=0, prior_loss_weight=1.0)
    assert group.num_train_images == 5 and group.datasets[0].captions == ["meta"]
    with pytest.raises(ConfigError, match=r"--reg_data_dir cannot be used with --in_json"):
        load_group_config(_parse([*argv, "--reg_data_dir", str(images)]))


def test_no_dataset_at_all_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"No dataset given: pass --dataset_config .* or --train_data_dir"):
        load_group_config(_parse([]))


def test_every_guide_flag_reaches_the_config_when_the_file_leaves_it_unset(tmp_path):
    folder = write_images(tmp_path / "a", [(64, 64)])
    path = one_dataset(tmp_path, "", f"image_dir = '{folder.as_posix()}'")
    argv = ["--dataset_config", str(path)]
    for flag, value in GUIDE_FLAGS.items():
        argv += [flag] if value is None else [flag, value]
    (dataset,) = load_group_config(_parse(argv)).datasets
    (subset,) = dataset.subsets
    assert (dataset.resolution, dataset.batch_size, dataset.enable_bucket, dataset.bucket_no_upscale) == (
        (256, 320),
        3,
        True,
        True,
    )
    assert (dataset.min_bucket_reso, dataset.bucket_reso_steps) == (128, 32)
    assert (subset.num_repeats, subset.keep_tokens, subset.caption_extension) == (4, 2, ".txt")
    assert (subset.shuffle_caption, subset.flip_aug, subset.color_aug, subset.random_crop) == (True,) * 4
    assert (subset.caption_dropout_rate, subset.caption_dropout_every_n_epochs) == (0.1, 3)
    assert (subset.caption_tag_dropout_rate, subset.face_crop_aug_range) == (0.2, (1.5, 3.0))


def test_config_file_wins_over_flags_and_source_flags_are_ignored(tmp_path, caplog):
    folder = write_images(tmp_path / "a", [(64, 64)])
    path = one_dataset(
        tmp_path, "resolution = 64\nbatch_size = 2", subset_lines(folder, "flip_aug = false\nnum_repeats = 7")
    )
    argv = ["--dataset_config", str(path), "--flip_aug", "--train_batch_size", "8", "--dataset_repeats", "3"]
    with caplog.at_level(logging.WARNING):
        (dataset,) = load_group_config(_parse([*argv, "--train_data_dir", "x", "--in_json", "y"])).datasets
    assert (dataset.batch_size, dataset.subsets[0].flip_aug, dataset.subsets[0].num_repeats) == (2, False, 7)
    assert "--train_data_dir, --in_json ignored: --dataset_config defines the datasets" in caplog.text


def test_invalid_flag_value_names_the_flag(tmp_path):
    folder = write_images(tmp_path / "a", [(64, 64)])
    path = one_dataset(tmp_path, "resolution = 64", subset_lines(folder))
    with pytest.raises(ConfigError, match=r"--train_batch_size 0 is invalid: expected an integer >= 1"):
        load_group_config(_parse(["--dataset_config", str(path), "--train_batch_size", "0"]))
    with pytest.raises(ConfigError, match=r'--resolution "big" is invalid: expected a positive integer or'):
        load_group_config(_parse(["--dataset_config", str(path), "--resolution", "big"]))


def test_inspect_accepts_legacy_options_and_shows_processed_captions(tmp_path, capsys):
    train, reg = _legacy_folders(tmp_path)
    argv = ["--train_data_dir", str(train), "--reg_data_dir", str(reg), "--resolution", "64", "--train_batch_size", "4"]
    assert inspect.main([*argv, "--caption_extension", ".txt", "--shuffle_caption", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["steps_per_epoch"], summary["num_train_images"], summary["num_reg_images"]) == (12, 23, 5)
    assert summary["datasets"][0]["buckets"] == [[[64, 64], 46]]
    captions = {sample["caption"] for sample in summary["datasets"][0]["sample_captions"]}
    assert captions <= {"sks dog", "dog", "a cat, sitting", "sitting, a cat"} and captions
    assert inspect.main(argv) == 0
    text = capsys.readouterr().out
    assert "sample captions (first epoch):" in text and "10_sks dog" in text


def test_debug_dataset_prints_summary_with_captions(tmp_path, capsys):
    folder = write_images(tmp_path / "a", [(64, 64)], captions={0: "hello, world"})
    path = one_dataset(tmp_path, "resolution = 64", subset_lines(folder))
    build_dataset_group(_parse(["--dataset_config", str(path), "--debug_dataset"]), seed=0, prior_loss_weight=1.0)
    output = capsys.readouterr().out
    assert "steps per epoch: 1" in output and 'img000.png: "hello, world"' in output
