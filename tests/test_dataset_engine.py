"""The dataset engine: discovery, captions, buckets, repeats and reg images, batching order, loading, inspect CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.config.dataset_cli import DatasetSource
from library.config.dataset_config import load_dataset_config
from library.data import inspect
from library.data.buckets import bucket_sizes, no_upscale_sizes
from library.data.captions import CaptionOptions, make_caption
from library.data.dataset import DatasetGroup, add_dataset_arguments, build_dataset_group
from library.data.image_dataset import reg_sample_counts
from library.data.images import read_image_size, resize_and_crop
from library.errors import DatasetError


def _images(folder: Path, sizes: list[tuple[int, int]], captions: dict[int, str] | None = None, ext: str = ".png"):
    """Write solid images of the given (width, height) sizes and optional `.txt` captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (width, height) in enumerate(sizes):
        Image.new("RGB", (width, height), (index * 30 % 256, 90, 160)).save(folder / f"img{index:03d}{ext}")
    for index, caption in (captions or {}).items():
        (folder / f"img{index:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def _config(tmp_path: Path, dataset: str, *subsets: str) -> Path:
    text = "[[datasets]]\n" + dataset + "\n" + "".join(f"[[datasets.subsets]]\n{subset}\n" for subset in subsets)
    path = tmp_path / "data.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _group(path: Path, seed: int = 0, prior_loss_weight: float = 1.0) -> DatasetGroup:
    return DatasetGroup.from_config(load_dataset_config(path), seed, prior_loss_weight)


def _subset(folder: Path, extra: str = "class_tokens = 'sks dog'") -> str:
    return f"image_dir = '{folder.as_posix()}'\ncaption_extension = '.txt'\n{extra}"


def test_captions_come_from_file_else_class_tokens(tmp_path):
    folder = _images(tmp_path / "a", [(64, 64), (64, 64)], captions={0: "a photo, red"})
    group = _group(_config(tmp_path, "resolution = 64", _subset(folder)))
    assert group.datasets[0].captions == ["a photo, red", "sks dog"]


def test_missing_caption_and_class_tokens_names_the_image(tmp_path):
    folder = _images(tmp_path / "a", [(64, 64), (64, 64)], captions={0: "a photo"})
    path = _config(tmp_path, "resolution = 64", _subset(folder, extra=""))
    pattern = r"datasets\[0\]\.subsets\[0\]: image .*img001\.png has no caption: img001\.txt does not exist"
    with pytest.raises(DatasetError, match=pattern):
        _group(path)


def test_empty_caption_file_is_an_error_naming_it(tmp_path):
    folder = _images(tmp_path / "a", [(64, 64)], captions={0: ""})
    with pytest.raises(DatasetError, match=r"img000\.txt is empty"):
        _group(_config(tmp_path, "resolution = 64", _subset(folder)))


def test_empty_image_folder_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "empty"
    (folder / "5_cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"image_dir .*empty contains no images .*subfolders are not searched"):
        _group(_config(tmp_path, "resolution = 64", _subset(folder)))


def test_images_found_with_any_extension_case_and_others_ignored(tmp_path):
    folder = _images(tmp_path / "a", [(64, 64)], ext=".PNG")
    _images(folder, [(64, 64)], ext=".JpEg")
    Image.new("RGB", (8, 8)).save(folder / "x.webp")
    Image.new("RGB", (8, 8)).save(folder / "y.bmp")
    (folder / "notes.md").write_text("not an image")
    (folder / "._img000.PNG").write_bytes(b"macOS resource fork")
    group = _group(_config(tmp_path, "resolution = 64", _subset(folder)))
    assert [Path(p).name for p in group.datasets[0].image_paths] == ["img000.JpEg", "img000.PNG", "x.webp", "y.bmp"]


def test_image_size_applies_exif_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    Image.new("RGB", (80, 40)).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert read_image_size(str(tmp_path / "rotated.jpg")) == (40, 80)


def test_unreadable_image_names_the_file(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"Cannot read image .*broken\.png"):
        _group(_config(tmp_path, "resolution = 64", _subset(folder)))


def test_bucket_sizes_are_step_multiples_within_area_and_range():
    sizes = bucket_sizes((512, 512), min_reso=256, max_reso=1024, steps=64)
    assert (sizes % 64 == 0).all()
    assert (sizes[:, 0] * sizes[:, 1] <= 512 * 512).all()
    assert sizes.min() >= 256 and sizes.max() <= 1024
    assert {(512, 512), (256, 1024), (1024, 256), (384, 640), (640, 384)} <= set(map(tuple, sizes.tolist()))
    assert set(map(tuple, sizes.tolist())) == set(map(tuple, sizes[:, ::-1].tolist()))


def test_images_go_to_bucket_of_nearest_aspect_ratio(tmp_path):
    folder = _images(tmp_path / "a", [(1000, 1000), (1200, 800), (400, 1600), (300, 200)])
    group = _group(_config(tmp_path, "resolution = 512\nenable_bucket = true", _subset(folder)))
    dataset = group.datasets[0]
    chosen = [tuple(dataset.bucket_sizes[b].tolist()) for b in dataset.bucket_of_image]
    assert chosen == [(512, 512), (640, 384), (256, 1024), (640, 384)]


def test_bucket_no_upscale_keeps_small_images_and_shrinks_large_ones():
    sizes = no_upscale_sizes(np.array([[300, 200], [2000, 1000], [50, 30]]), (512, 512), max_reso=1024, steps=64)
    assert sizes.tolist()[0] == [256, 192]  # small: own size rounded down to steps
    width, height = sizes.tolist()[1]
    assert width * height <= 512 * 512 and width % 64 == 0 and height % 64 == 0 and width >= 2 * height - 64
    assert sizes.tolist()[2] == [64, 64]  # never below one step


def test_bucket_no_upscale_dataset_has_per_image_buckets(tmp_path):
    folder = _images(tmp_path / "a", [(300, 200), (300, 200), (200, 300)])
    group = _group(
        _config(tmp_path, "resolution = 512\nenable_bucket = true\nbucket_no_upscale = true", _subset(folder))
    )
    assert group.summary()["datasets"][0]["buckets"] == [[[192, 256], 1], [[256, 192], 2]]


def test_no_bucketing_uses_resolution_for_every_image(tmp_path):
    folder = _images(tmp_path / "a", [(300, 200), (200, 300)])
    group = _group(_config(tmp_path, "resolution = [96, 64]\nbatch_size = 2", _subset(folder)))
    batch = group[0]
    assert batch["images"].shape == (2, 3, 64, 96) and batch["target_size"] == (64, 96)


def test_batches_never_mix_buckets(tmp_path):
    sizes = [(512, 512)] * 5 + [(800, 400)] * 4 + [(400, 800)] * 3
    folder = _images(tmp_path / "a", [(w // 8, h // 8) for w, h in sizes])
    dataset_lines = "resolution = 64\nbatch_size = 3\nenable_bucket = true\nbucket_reso_steps = 16\n"
    dataset_lines += "min_bucket_reso = 32\nmax_bucket_reso = 128"
    group = _group(_config(tmp_path, dataset_lines, _subset(folder, "num_repeats = 2\nclass_tokens = 'x'")))
    dataset = group.datasets[0]
    for _, sample_ids in group.batch_plan():
        images = dataset.samples[sample_ids]
        assert len(set(dataset.bucket_of_image[images].tolist())) == 1
    # Buckets of 10, 8 and 6 samples in batches of 3: 4 + 3 + 2 batches.
    assert len(group) == len(group.batch_plan()) == 9


def test_steps_per_epoch_count_repeats_per_subset(tmp_path):
    a = _images(tmp_path / "a", [(64, 64)] * 3)
    b = _images(tmp_path / "b", [(64, 64)] * 2)
    subsets = _subset(a, "num_repeats = 5\nclass_tokens = 'x'"), _subset(b, "class_tokens = 'y'")
    group = _group(_config(tmp_path, "resolution = 64\nbatch_size = 4", *subsets))
    assert group.num_train_images == 17
    assert len(group) == 5  # ceil(17 / 4)
    assert group.summary()["steps_per_epoch"] == 5


def test_reg_sample_counts_follow_one_to_one_rule():
    assert reg_sample_counts(np.array([1, 1, 1]), 7).tolist() == [3, 2, 2]  # too few: repeated round-robin
    assert reg_sample_counts(np.array([2, 2, 2]), 3).tolist() == [2, 1, 0]  # too many: the rest is unused
    assert reg_sample_counts(np.array([1, 1]), 2).tolist() == [1, 1]


def test_reg_images_counted_and_weighted(tmp_path):
    train = _images(tmp_path / "train", [(64, 64)] * 2)
    reg = _images(tmp_path / "reg", [(64, 64)] * 10)
    subsets = (
        _subset(train, "num_repeats = 3\nclass_tokens = 'sks'"),
        _subset(reg, "is_reg = true\nclass_tokens = 'dog'"),
    )
    path = _config(tmp_path, "resolution = 64\nbatch_size = 2", *subsets)
    group = _group(path, prior_loss_weight=0.25)
    assert (group.num_train_images, group.num_reg_images) == (6, 10)
    assert group.summary()["datasets"][0]["num_reg_samples"] == 6
    assert len(group) == 6  # 6 train + 6 reg samples in batches of 2
    weights = {}
    for index in range(len(group)):
        batch = group[index]
        for caption, weight in zip(batch["captions"], batch["loss_weights"].tolist(), strict=True):
            weights.setdefault(caption, set()).add(weight)
    assert weights == {"sks": {1.0}, "dog": {0.25}}


def test_reg_only_dataset_is_an_error(tmp_path):
    reg = _images(tmp_path / "reg", [(64, 64)])
    with pytest.raises(DatasetError, match=r"datasets\[0\] has regularization subsets .* but no training images"):
        _group(_config(tmp_path, "resolution = 64", _subset(reg, "is_reg = true\nclass_tokens = 'dog'")))


def _order_config(tmp_path: Path) -> Path:
    folder = _images(tmp_path / "a", [(64, 64)] * 12 + [(96, 48)] * 6)
    dataset = "resolution = 64\nbatch_size = 2\nenable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 128\n"
    return _config(tmp_path, dataset + "bucket_reso_steps = 16", _subset(folder))


def test_same_seed_and_epoch_give_same_order(tmp_path):
    path = _order_config(tmp_path)
    first, second = _group(path, seed=7), _group(path, seed=7)
    first.set_epoch(3)
    second.set_epoch(3)
    assert first.batch_plan() == second.batch_plan()


def test_other_epoch_or_seed_gives_other_order(tmp_path):
    group = _group(_order_config(tmp_path), seed=7)
    epoch0 = group.batch_plan()
    group.set_epoch(1)
    assert group.batch_plan() != epoch0
    assert _group(_order_config(tmp_path), seed=8).batch_plan() != epoch0
    assert sorted(id for _, ids in group.batch_plan() for id in ids) == list(range(18))


def test_batch_contents_are_deterministic_per_seed_and_epoch(tmp_path):
    folder = _images(tmp_path / "a", [(64, 48)] * 4, captions={i: "a, b, c, d, e, f" for i in range(4)})
    path = _config(
        tmp_path, "resolution = 64\nbatch_size = 4", _subset(folder, "flip_aug = true\nshuffle_caption = true")
    )
    first, second = _group(path, seed=1), _group(path, seed=1)
    for epoch in (0, 5):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        a, b = first[0], second[0]
        assert a["captions"] == b["captions"] and a["image_paths"] == b["image_paths"]
        assert bool((a["images"] == b["images"]).all())


def test_getitem_returns_the_batch_contract(tmp_path):
    folder = _images(tmp_path / "a", [(100, 80), (100, 80)])
    group = _group(_config(tmp_path, "resolution = 64\nbatch_size = 2", _subset(folder)), prior_loss_weight=1.0)
    batch = group[0]
    assert batch["images"].shape == (2, 3, 64, 64) and batch["images"].dtype.is_floating_point
    assert -1.0 <= float(batch["images"].min()) and float(batch["images"].max()) <= 1.0
    assert batch["captions"] == ["sks dog", "sks dog"]
    assert batch["loss_weights"].tolist() == [1.0, 1.0]
    assert batch["original_sizes"] == [(80, 100), (80, 100)]
    assert batch["crop_top_lefts"] == [(0, 8), (0, 8)]  # 100x80 -> 80x64, centre 64 columns
    assert batch["target_size"] == (64, 64)
    assert sorted(Path(p).name for p in batch["image_paths"]) == ["img000.png", "img001.png"]


def test_resize_and_crop_covers_target_and_centres():
    image = np.zeros((40, 100, 3), dtype=np.uint8)
    image[:, 45:55] = 255
    crop, (top, left) = resize_and_crop(image, (32, 32))
    assert crop.shape == (32, 32, 3) and (top, left) == (0, 24)
    assert crop[:, 16].min() == 255 and crop[:, 0].max() == 0
    upscaled, _ = resize_and_crop(np.zeros((10, 20, 3), dtype=np.uint8), (64, 32))
    assert upscaled.shape == (32, 64, 3)


def test_flip_aug_flips_some_samples_only(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, :16] = 255  # left half white
    for index in range(16):
        Image.fromarray(pixels).save(folder / f"img{index:02d}.png")
    subset = _subset(folder, "flip_aug = true\nclass_tokens = 'x'")
    group = _group(_config(tmp_path, "resolution = 32\nbatch_size = 16", subset))
    left_is_white = (group[0]["images"][:, :, :, 0] > 0).flatten(1).all(dim=1).tolist()
    assert 0 < sum(left_is_white) < 16


def test_caption_prefix_suffix_and_shuffle_keep_tokens():
    rng = np.random.default_rng(0)
    options = CaptionOptions("pre, ", ", post", shuffle_caption=False, keep_tokens=0)
    assert make_caption("a, b", options, rng) == "pre, a, b, post"
    options = CaptionOptions("pre, ", None, shuffle_caption=True, keep_tokens=2)
    results = {make_caption("a, b, c, d, e", options, rng) for _ in range(30)}
    assert all(result.startswith("pre, a, ") for result in results) and len(results) > 1
    assert all(sorted(result.split(", ")) == ["a", "b", "c", "d", "e", "pre"] for result in results)


def test_dataset_arguments_defaults_and_build(tmp_path):
    folder = _images(tmp_path / "a", [(64, 64)])
    path = _config(tmp_path, "resolution = 64", _subset(folder))
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(["--dataset_config", str(path)])
    # None: min(8, CPU threads - 1) when the loader is made (library.data.dataset.default_loader_workers)
    assert (args.max_data_loader_n_workers, args.persistent_data_loader_workers, args.debug_dataset) == (
        None,
        False,
        False,
    )
    assert len(build_dataset_group(DatasetSource.from_args(args), seed=0, prior_loss_weight=1.0)) == 1


def test_dataloader_workers_follow_set_epoch(tmp_path):
    group = _group(_order_config(tmp_path), seed=3)
    loader = group.make_dataloader(num_workers=1, persistent=True)
    for epoch in (0, 1):
        group.set_epoch(epoch)
        expected = [
            group.datasets[0].image_paths[i] for _, ids in group.batch_plan() for i in group.datasets[0].samples[ids]
        ]
        assert [path for batch in loader for path in batch["image_paths"]] == expected


def test_inspect_json_summary(tmp_path, capsys):
    train = _images(tmp_path / "train", [(64, 64)] * 3)
    reg = _images(tmp_path / "reg", [(64, 64)] * 2)
    subsets = (
        _subset(train, "num_repeats = 2\nclass_tokens = 'sks'"),
        _subset(reg, "is_reg = true\nclass_tokens = 'dog'"),
    )
    path = _config(tmp_path, "resolution = 64\nbatch_size = 2", *subsets)
    assert inspect.main(["--dataset_config", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["steps_per_epoch"], summary["num_train_images"], summary["num_reg_images"]) == (6, 6, 2)
    dataset = summary["datasets"][0]
    assert dataset["buckets"] == [[[64, 64], 12]]
    assert [s["img_count"] for s in dataset["subsets"]] == [3, 2]
    assert dataset["subsets"][0]["num_repeats"] == 2 and dataset["subsets"][1]["is_reg"] is True


def test_inspect_reports_user_errors_without_traceback(tmp_path, caplog):
    assert inspect.main(["--dataset_config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml does not exist" in caplog.text and "Traceback" not in caplog.text
