"""Dataset config files: schema per table, precedence general < dataset < subset, and the error messages."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from library.config.dataset_config import DatasetConfig, SubsetConfig, load_dataset_config
from library.config.dataset_options import OPTIONS, options_of
from library.errors import ConfigError


def _folder(tmp_path: Path, name: str) -> str:
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    return folder.as_posix()


def _write(tmp_path: Path, text: str, name: str = "data.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _one_subset_config(tmp_path: Path, subset_lines: str = "", dataset_lines: str = "resolution = 512") -> Path:
    image_dir = _folder(tmp_path, "images")
    return _write(
        tmp_path, f"[[datasets]]\n{dataset_lines}\n[[datasets.subsets]]\nimage_dir = '{image_dir}'\n{subset_lines}\n"
    )


def test_config_guide_dreambooth_example_loads(tmp_path):
    hoge, fuga, reg = _folder(tmp_path, "hoge"), _folder(tmp_path, "fuga"), _folder(tmp_path, "reg")
    path = _write(
        tmp_path,
        f"""
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{hoge}'
  class_tokens = 'hoge girl'

  [[datasets.subsets]]
  image_dir = '{fuga}'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{reg}'
  class_tokens = 'human'
  keep_tokens = 1
""",
    )
    config = load_dataset_config(path)
    (dataset,) = config.datasets
    assert (dataset.resolution, dataset.batch_size) == ((512, 512), 4)
    assert [s.keep_tokens for s in dataset.subsets] == [2, 3, 1]
    assert [s.is_reg for s in dataset.subsets] == [False, False, True]
    assert [s.class_tokens for s in dataset.subsets] == ["hoge girl", "fuga boy", "human"]
    assert all(s.shuffle_caption and s.caption_extension == ".txt" for s in dataset.subsets)


def test_config_precedence_is_subset_over_dataset_over_general(tmp_path):
    a, b = _folder(tmp_path, "a"), _folder(tmp_path, "b")
    path = _write(
        tmp_path,
        f"""
[general]
resolution = 768
num_repeats = 2
flip_aug = true
caption_prefix = 'general, '
[[datasets]]
num_repeats = 3
  [[datasets.subsets]]
  image_dir = '{a}'
  num_repeats = 4
  [[datasets.subsets]]
  image_dir = '{b}'
[[datasets]]
resolution = [512, 768]
  [[datasets.subsets]]
  image_dir = '{a}'
""",
    )
    first, second = load_dataset_config(path).datasets
    assert [s.num_repeats for s in first.subsets] == [4, 3]
    assert second.subsets[0].num_repeats == 2
    assert all(s.flip_aug and s.caption_prefix == "general, " for s in first.subsets + second.subsets)
    assert (first.resolution, second.resolution) == ((768, 768), (512, 768))


def test_config_defaults_follow_the_guide(tmp_path):
    dataset = load_dataset_config(_one_subset_config(tmp_path)).datasets[0]
    subset = dataset.subsets[0]
    assert (dataset.batch_size, dataset.enable_bucket, dataset.bucket_no_upscale) == (1, False, False)
    assert (dataset.min_bucket_reso, dataset.max_bucket_reso, dataset.bucket_reso_steps) == (256, 1024, 64)
    assert (subset.caption_extension, subset.num_repeats, subset.keep_tokens) == (".caption", 1, 0)
    assert (subset.is_reg, subset.shuffle_caption, subset.flip_aug, subset.class_tokens) == (False, False, False, None)


def test_config_unknown_key_gets_did_you_mean_and_table_path(tmp_path):
    path = _one_subset_config(tmp_path, "num_repeat = 10")
    pattern = r"data\.toml: datasets\[0\]\.subsets\[0\]: unknown option 'num_repeat'; did you mean 'num_repeats'\?"
    with pytest.raises(ConfigError, match=pattern):
        load_dataset_config(path)


def test_config_wrong_type_names_file_path_value_and_allowed(tmp_path):
    path = _one_subset_config(tmp_path, "num_repeats = 'ten'")
    with pytest.raises(ConfigError) as error:
        load_dataset_config(path)
    message = str(error.value)
    assert str(path) in message
    assert 'datasets[0].subsets[0].num_repeats = "ten"' in message
    assert "expected an integer >= 1" in message


def test_config_boolean_is_not_accepted_as_integer(tmp_path):
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.batch_size = true is invalid: expected an integer >= 1"):
        load_dataset_config(_one_subset_config(tmp_path, dataset_lines="resolution = 512\nbatch_size = true"))


def test_config_dataset_option_in_subset_says_where_it_belongs(tmp_path):
    path = _one_subset_config(tmp_path, "resolution = 768")
    pattern = r"'resolution' cannot be set in \[\[datasets.subsets\]\]; it belongs in \[general\] or \[\[datasets\]\]"
    with pytest.raises(ConfigError, match=pattern):
        load_dataset_config(path)


def test_config_subset_only_option_in_general_is_rejected(tmp_path):
    path = _write(tmp_path, "[general]\nclass_tokens = 'sks'\n")
    with pytest.raises(ConfigError, match=r"general: option 'class_tokens' cannot be set in \[general\]"):
        load_dataset_config(path)


def test_config_reports_every_error(tmp_path):
    path = _one_subset_config(tmp_path, "keep_tokens = -1\nflip_aug = 'yes'")
    with pytest.raises(ConfigError, match="has 2 errors") as error:
        load_dataset_config(path)
    assert "keep_tokens = -1" in str(error.value) and 'flip_aug = "yes"' in str(error.value)


def test_config_missing_image_dir_folder_is_named(tmp_path):
    missing = (tmp_path / "nowhere").as_posix()
    path = _write(tmp_path, f"[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = '{missing}'\n")
    with pytest.raises(
        ConfigError, match=rf"datasets\[0\]\.subsets\[0\]\.image_dir = \"{missing}\" is not an existing"
    ):
        load_dataset_config(path)


def test_config_subset_without_image_dir_is_an_error(tmp_path):
    path = _write(tmp_path, "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nnum_repeats = 2\n")
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.subsets\[0\] has no image_dir"):
        load_dataset_config(path)


def test_config_missing_resolution_is_a_clear_error(tmp_path):
    path = _one_subset_config(tmp_path, dataset_lines="batch_size = 2")
    with pytest.raises(ConfigError, match=r"datasets\[0\] has no resolution; set e\.g\. resolution = 512"):
        load_dataset_config(path)


def test_config_resolution_must_be_int_or_pair(tmp_path):
    path = _one_subset_config(tmp_path, dataset_lines="resolution = [512, 512, 3]")
    with pytest.raises(ConfigError, match=r"resolution = \[512, 512, 3\] is invalid: expected a positive integer or"):
        load_dataset_config(path)


def test_config_bucket_reso_must_be_multiple_of_steps(tmp_path):
    path = _one_subset_config(tmp_path, dataset_lines="resolution = 512\nenable_bucket = true\nmin_bucket_reso = 200")
    with pytest.raises(
        ConfigError, match=r"min_bucket_reso = 200 is invalid: expected a multiple of bucket_reso_steps"
    ):
        load_dataset_config(path)


def test_config_bucket_range_must_include_resolution(tmp_path):
    path = _one_subset_config(tmp_path, dataset_lines="resolution = 1024\nenable_bucket = true\nmax_bucket_reso = 768")
    with pytest.raises(ConfigError, match=r"must include the resolution \[1024, 1024\]"):
        load_dataset_config(path)


def test_config_json_file_loads(tmp_path):
    image_dir = _folder(tmp_path, "images")
    data = {
        "general": {"flip_aug": True},
        "datasets": [{"resolution": [640, 512], "subsets": [{"image_dir": image_dir}]}],
    }
    path = _write(tmp_path, json.dumps(data), name="data.json")
    dataset = load_dataset_config(path).datasets[0]
    assert dataset.resolution == (640, 512) and dataset.subsets[0].flip_aug


def test_config_toml_syntax_error_names_file_and_hints_at_windows_paths(tmp_path):
    path = _write(tmp_path, '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "C:\\hoge"\n')
    with pytest.raises(ConfigError, match=r"data\.toml is not valid TOML: .*single quotes"):
        load_dataset_config(path)


def test_config_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nothing\.toml does not exist"):
        load_dataset_config(tmp_path / "nothing.toml")


def test_config_without_datasets_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"no \[\[datasets\]\] table"):
        load_dataset_config(_write(tmp_path, "[general]\nflip_aug = true\n"))


def test_config_duplicate_image_dir_in_one_dataset_is_ignored_with_warning(tmp_path, caplog):
    a = _folder(tmp_path, "a")
    path = _write(
        tmp_path,
        f"[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = '{a}'\n[[datasets.subsets]]\n"
        f"image_dir = '{a}'\n[[datasets]]\nresolution = 768\n[[datasets.subsets]]\nimage_dir = '{a}'\n",
    )
    with caplog.at_level(logging.WARNING):
        first, second = load_dataset_config(path).datasets
    assert (len(first.subsets), len(second.subsets)) == (1, 1)
    assert "datasets[0].subsets[1] uses the same image_dir as datasets[0].subsets[0]" in caplog.text


def test_config_overrides_rank_below_general(tmp_path):
    path = _write(
        tmp_path,
        f"[general]\nflip_aug = false\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{_folder(tmp_path, 'a')}'\n",
    )
    dataset = load_dataset_config(path, overrides={"resolution": 640, "flip_aug": True}).datasets[0]
    assert dataset.resolution == (640, 640) and not dataset.subsets[0].flip_aug


def test_option_table_matches_config_dataclasses():
    def option_fields(cls: type) -> set[str]:
        return {field.name for field in dataclasses.fields(cls)} - {"where", "subsets"}

    assert option_fields(DatasetConfig) == {spec.name for spec in options_of("dataset")}
    assert option_fields(SubsetConfig) == {spec.name for spec in options_of("subset")}
    assert len({spec.name for spec in OPTIONS}) == len(OPTIONS)
