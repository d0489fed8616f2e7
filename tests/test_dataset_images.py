"""Image-side options: crops, face crops, colour, interpolation, loss masks, damaged images, cache_info."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.config.dataset_config import load_dataset_config
from library.data import scan
from library.data.metadata_cache import CACHE_FILE_NAME
from library.data.transforms import face_from_name, plan_crop, resize
from library.errors import ConfigError, DatasetError
from tests.dataset_helpers import group_of, one_dataset, rng, subset_lines, write_images


def _save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def test_random_crop_varies_the_offset_and_centre_crop_does_not(tmp_path):
    folder = write_images(tmp_path / "a", [(128, 64)] * 8)
    for extra, expected in (("random_crop = true", None), ("", {(0, 32)})):
        path = one_dataset(tmp_path, "resolution = 64\nbatch_size = 8", subset_lines(folder, extra))
        offsets = set(group_of(path)[0]["crop_top_lefts"])
        if expected is None:
            assert len(offsets) > 2 and all(top == 0 and 0 <= left <= 64 for top, left in offsets)
        else:
            assert offsets == expected


def test_face_crop_scales_and_centres_on_the_face():
    face = face_from_name("/data/girl_100_50_20_20.png")
    assert (face.center_x, face.center_y, face.width, face.height) == (100, 50, 20, 20)
    assert face_from_name("/data/girl_01.png") is None
    # Face 20 px, target 64: range [2, 2] wants scale 1.6, which is capped at 1 (never enlarge beyond covering).
    plan = plan_crop((200, 100), (64, 64), rng(), face=face, face_range=(2.0, 2.0))
    assert (plan.scaled, plan.top, plan.left) == ((200, 100), 18, 68)
    # Range [4, 4]: face spans a quarter of 64 -> scale 0.8, image 160x80, face centre (80, 40).
    plan = plan_crop((200, 100), (64, 64), rng(), face=face, face_range=(4.0, 4.0))
    assert (plan.scaled, plan.top, plan.left) == ((160, 80), 8, 48)


def test_face_crop_with_random_crop_keeps_the_face_inside():
    face = face_from_name("f_100_50_20_20.png")
    for seed in range(20):
        plan = plan_crop((200, 100), (64, 64), rng(seed), random_crop=True, face=face, face_range=(2.0, 2.0))
        assert plan.left <= 90 and plan.left + 64 >= 110 and plan.top <= 40 and plan.top + 64 >= 60


def test_face_crop_option_applies_to_named_images(tmp_path):
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)
    pixels[45:55, 95:105] = 255  # the face
    folder = tmp_path / "a"
    _save(folder / "girl_100_50_10_10.png", pixels)
    path = one_dataset(tmp_path, "resolution = 32", subset_lines(folder, "face_crop_aug_range = [1.6, 1.6]"))
    image = group_of(path)[0]["images"][0]  # (3, 32, 32)
    assert float(image[:, 14:18, 14:18].min()) > 0.9 and float(image[:, :4, :4].max()) < -0.9


def test_color_aug_shifts_hue_slightly(tmp_path):
    folder = tmp_path / "a"
    for index in range(12):
        _save(folder / f"{index}.png", np.full((32, 32, 3), (200, 60, 40), dtype=np.uint8))
    path = one_dataset(tmp_path, "resolution = 32\nbatch_size = 12", subset_lines(folder, "color_aug = true"))
    colours = ((group_of(path)[0]["images"][:, :, 0, 0] + 1) * 127.5).round()  # (12, 3)
    original = np.array([200, 60, 40])
    differences = np.abs(colours.numpy() - original).max(axis=1)
    assert (differences > 2).sum() >= 6 and differences.max() < 80


def test_resize_interpolation_nearest_keeps_original_values():
    checker = np.array([[0, 255], [255, 0]], dtype=np.uint8)[:, :, None].repeat(3, axis=2)
    assert set(np.unique(resize(checker, (16, 16), "nearest"))) == {0, 255}
    assert len(np.unique(resize(checker, (16, 16), None))) > 2  # default Lanczos when enlarging
    assert resize(checker, (16, 16), "box").shape == (16, 16, 3)


def test_resize_interpolation_is_validated(tmp_path):
    folder = write_images(tmp_path / "a", [(32, 32)])
    path = one_dataset(tmp_path, "resolution = 32", subset_lines(folder, "resize_interpolation = 'fancy'"))
    with pytest.raises(ConfigError, match=r'resize_interpolation = "fancy" is invalid: expected one of lanczos, near'):
        load_dataset_config(path)


def _rgba_halves(path: Path) -> None:
    pixels = np.full((32, 32, 4), 255, dtype=np.uint8)
    pixels[:, :, :3] = (10, 200, 10)
    pixels[:, :12, 3] = 0
    pixels[:, 12:20, 3] = 127
    _save(path, pixels)


def test_alpha_mask_gives_loss_weights_from_transparency(tmp_path):
    _rgba_halves(tmp_path / "a" / "img.png")
    path = one_dataset(tmp_path, "resolution = 32", subset_lines(tmp_path / "a", "alpha_mask = true"))
    masks = group_of(path)[0]["masks"]
    assert masks.shape == (1, 1, 32, 32)
    assert float(masks[0, 0, :, :12].max()) == 0.0 and float(masks[0, 0, :, 20:].min()) == 1.0
    assert abs(float(masks[0, 0, 5, 15]) - 127 / 255) < 1e-6


def test_alpha_mask_flips_with_the_image(tmp_path):
    for index in range(8):
        _rgba_halves(tmp_path / "a" / f"img{index}.png")
    extra = "alpha_mask = true\nflip_aug = true"
    path = one_dataset(tmp_path, "resolution = 32\nbatch_size = 8", subset_lines(tmp_path / "a", extra))
    masks = group_of(path)[0]["masks"][:, 0]
    flipped = masks[:, 0, 0] == 1.0
    assert 0 < int(flipped.sum()) < 8
    assert bool((masks[flipped] == masks[~flipped][0].flip(-1)).all())


def test_conditioning_mask_uses_red_channel_and_multiplies_alpha(tmp_path):
    _rgba_halves(tmp_path / "a" / "img.png")
    mask = np.zeros((16, 16, 3), dtype=np.uint8)  # half size: stretched to the image
    mask[:, :, 0] = 127
    _save(tmp_path / "masks" / "img.jpg", mask)
    extra = f"conditioning_data_dir = '{(tmp_path / 'masks').as_posix()}'"
    path = one_dataset(tmp_path, "resolution = 32", subset_lines(tmp_path / "a", extra))
    weights = group_of(path)[0]["masks"][0, 0]
    assert abs(float(weights.mean()) - 127 / 255) < 0.02  # the alpha is not used without alpha_mask
    path = one_dataset(tmp_path, "resolution = 32", subset_lines(tmp_path / "a", extra + "\nalpha_mask = true"))
    weights = group_of(path)[0]["masks"][0, 0]
    assert float(weights[:, :12].max()) == 0.0 and abs(float(weights[:, 24:].mean()) - 127 / 255) < 0.02


def test_missing_conditioning_mask_names_the_image(tmp_path):
    write_images(tmp_path / "a", [(32, 32)] * 2)
    write_images(tmp_path / "masks", [(32, 32)])
    extra = f"conditioning_data_dir = '{(tmp_path / 'masks').as_posix()}'"
    path = one_dataset(tmp_path, "resolution = 32", subset_lines(tmp_path / "a", extra))
    with pytest.raises(DatasetError, match=r"image img001\.png has no mask in conditioning_data_dir"):
        group_of(path)


def test_batches_have_no_masks_when_no_subset_asks(tmp_path):
    path = one_dataset(tmp_path, "resolution = 32", subset_lines(write_images(tmp_path / "a", [(32, 32)])))
    assert "masks" not in group_of(path)[0]


def _truncated(path: Path, fmt: str) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, fmt)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


@pytest.mark.parametrize(("name", "fmt"), [("cut.png", "PNG"), ("cut.jpg", "JPEG")])
def test_truncated_image_is_an_error_before_training_or_skipped_on_request(tmp_path, caplog, name, fmt):
    folder = write_images(tmp_path / "a", [(64, 64)])
    _truncated(folder / name, fmt)
    path = one_dataset(tmp_path, "resolution = 64", subset_lines(folder))
    with pytest.raises(DatasetError, match=rf"Image .*{name} is truncated or damaged .*skip_corrupt_images = true"):
        group_of(path)
    path = one_dataset(tmp_path, "resolution = 64", subset_lines(folder, "skip_corrupt_images = true"))
    with caplog.at_level(logging.WARNING):
        group = group_of(path)
    assert [Path(p).name for p in group.datasets[0].image_paths] == ["img000.png"]
    assert f"leaving out {folder / name}" in caplog.text


def test_jpeg_with_data_after_its_end_marker_is_accepted(tmp_path):
    folder = write_images(tmp_path / "a", [(64, 48)], ext=".jpg")
    with open(folder / "img000.jpg", "ab") as file:
        file.write(b"appended video or maker data")
    group = group_of(one_dataset(tmp_path, "resolution = 64", subset_lines(folder)))
    assert group.datasets[0].image_sizes.tolist() == [[64, 48]]


def test_unreadable_image_is_named_and_only_image_left_out_is_an_error(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"Cannot read image .*junk\.png"):
        group_of(one_dataset(tmp_path, "resolution = 64", subset_lines(folder)))
    path = one_dataset(tmp_path, "resolution = 64", subset_lines(folder, "skip_corrupt_images = true"))
    with pytest.raises(DatasetError, match=r"every image was left out as unreadable"):
        group_of(path)


def test_cache_info_reuses_sizes_and_captions_until_files_change(tmp_path, monkeypatch):
    folder = write_images(tmp_path / "a", [(64, 32), (32, 64)], captions={0: "first", 1: "second"})
    path = one_dataset(tmp_path, "resolution = 64", subset_lines(folder, "cache_info = true"))
    group_of(path)
    cache = json.loads((folder / CACHE_FILE_NAME).read_text(encoding="utf-8"))
    assert cache["files"]["img000.png"]["size"] == [64, 32] and cache["files"]["img001.txt"]["lines"] == ["second"]

    def no_probe(path: str):
        raise AssertionError(f"{path} was read although cached")

    monkeypatch.setattr(scan, "probe_image", no_probe)
    (folder / "img001.txt").write_text("changed caption, longer\n", encoding="utf-8")
    dataset = group_of(path).datasets[0]
    assert dataset.image_sizes.tolist() == [[64, 32], [32, 64]]
    assert dataset.captions == ["first", "changed caption, longer"]


def test_jpeg_header_beyond_the_first_read_is_still_found(tmp_path):
    path = tmp_path / "profile.jpg"
    Image.new("RGB", (80, 40)).save(path, icc_profile=b"\0" * 150_000)  # ICC segments push the frame past 64 KiB
    assert scan.probe_image(str(path)) == (80, 40)


def test_subsets_of_many_images_are_scanned_in_order(tmp_path):
    folder = write_images(tmp_path / "a", [(32 + 16 * (i % 3), 32) for i in range(300)])
    dataset = group_of(one_dataset(tmp_path, "resolution = 32", subset_lines(folder))).datasets[0]
    assert [Path(p).name for p in dataset.image_paths] == [f"img{i:03d}.png" for i in range(300)]
    assert dataset.image_sizes[:, 0].tolist() == [32 + 16 * (i % 3) for i in range(300)]
