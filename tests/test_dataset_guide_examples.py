"""The example dataset configs of the seed guides, with their folders pointed at test data, load and inspect."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.data import inspect
from tests.dataset_helpers import write_images

# Each example as the guides write it, with {name} standing for a folder of test images.
EXAMPLES = {
    "config_overview": """
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

[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '{piyo}'
  metadata_file = '{piyo}/piyo_md.json'
""",
    "duplicate_subsets_in_two_datasets": """
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = '{hoge}'

[[datasets]]
resolution = 768
  [[datasets.subsets]]
  image_dir = '{hoge}'
""",
    "separators_and_wildcards": """
[general]
flip_aug = true
color_aug = false
resolution = [1024, 1024]

[[datasets]]
batch_size = 6
enable_bucket = true
bucket_no_upscale = true
caption_extension = ".txt"
keep_tokens_separator= "|||"
shuffle_caption = true
caption_tag_dropout_rate = 0.1
secondary_separator = ";;;"
enable_wildcard = true

  [[datasets.subsets]]
  image_dir = "{hoge}"
  num_repeats = 1
  caption_prefix = "1girl, hatsune miku, vocaloid |||"
  caption_suffix = ", anime screencap ||| masterpiece, rating: general"
""",
    "dreambooth_class_identifier": """
[general]
enable_bucket = true

[[datasets]]
resolution = 512
batch_size = 4

  [[datasets.subsets]]
  image_dir = '{hoge}'
  class_tokens = 'hoge girl'
  num_repeats = 10

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{reg}'
  class_tokens = 'girl'
  num_repeats = 1
""",
    "dreambooth_captions": """
[general]
enable_bucket = true

[[datasets]]
resolution = 512
batch_size = 4

  [[datasets.subsets]]
  image_dir = '{fuga}'
  caption_extension = '.caption'
  num_repeats = 10

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{reg}'
  class_tokens = 'girl'
  num_repeats = 1
""",
    "fine_tuning": """
[general]
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 4

  [[datasets.subsets]]
  image_dir = '{piyo}'
  metadata_file = '{piyo}/piyo_md.json'
""",
    "masked_loss_mask_images": """
[[datasets]]
resolution = 512
[[datasets.subsets]]
image_dir = "{fuga}"
caption_extension = ".txt"
conditioning_data_dir = "{masks}"
num_repeats = 8
""",
    "masked_loss_alpha": """
[[datasets]]
resolution = 512
[[datasets.subsets]]
image_dir = "{alpha}"
caption_extension = ".txt"
num_repeats = 8
alpha_mask = true
""",
}

# (steps per epoch, training samples, reg images, buckets of the first dataset) per example.
EXPECTED = {
    "config_overview": (3 + 2, 5 + 3, 5, [[[512, 512], 10]]),
    "duplicate_subsets_in_two_datasets": (6, 6, 0, [[[512, 512], 3]]),
    "separators_and_wildcards": (1, 3, 0, [[[320, 448], 3]]),
    "dreambooth_class_identifier": (8 + 8, 30, 5, [[[448, 576], 30], [[512, 512], 30]]),
    "dreambooth_captions": (10, 20, 5, [[[512, 512], 40]]),
    "fine_tuning": (1, 3, 0, [[[512, 512], 3]]),
    "masked_loss_mask_images": (16, 16, 0, [[[512, 512], 16]]),
    "masked_loss_alpha": (8, 8, 0, [[[512, 512], 8]]),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("guide")
    captions = {0: "a, b ||| c;;;d, {x|y}", 1: "e, f", 2: "g"}
    hoge = write_images(root / "hoge", [(320, 448)] * 3, captions=captions)
    for index, caption in captions.items():
        (hoge / f"img{index:03d}.caption").write_text(caption + "\n", encoding="utf-8")
    fuga = write_images(root / "fuga", [(512, 512)] * 2, names=["f0", "f1"])
    for name in ("f0", "f1"):
        (fuga / f"{name}.caption").write_text(f"{name} caption\n", encoding="utf-8")
        (fuga / f"{name}.txt").write_text(f"{name} text\n", encoding="utf-8")
    reg = write_images(root / "reg", [(512, 512)] * 5)
    piyo = write_images(root / "piyo", [(600, 600)] * 3)
    metadata = {f"img{i:03d}": {"caption": f"picture {i}", "tags": "t1, t2"} for i in range(3)}
    (piyo / "piyo_md.json").write_text(json.dumps(metadata), encoding="utf-8")
    masks = write_images(root / "masks", [(512, 512)] * 2, names=["f0", "f1"])
    alpha = root / "alpha"
    alpha.mkdir()
    Image.fromarray(np.full((64, 64, 4), 200, dtype=np.uint8)).save(alpha / "a.png")
    (alpha / "a.txt").write_text("transparent thing\n", encoding="utf-8")
    return {name: path.as_posix() for name, path in locals().items() if isinstance(path, Path) and name != "root"}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_guide_example_loads_and_inspects(tmp_path, capsys, folders, name):
    path = tmp_path / f"{name}.toml"
    path.write_text(EXAMPLES[name].format(**folders), encoding="utf-8")
    assert inspect.main(["--dataset_config", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    steps, train, reg, buckets = EXPECTED[name]
    assert (summary["steps_per_epoch"], summary["num_train_images"], summary["num_reg_images"]) == (steps, train, reg)
    assert summary["datasets"][0]["buckets"] == buckets
    assert all(dataset["sample_captions"] for dataset in summary["datasets"])
