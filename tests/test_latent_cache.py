"""Latent cache: content keys, reuse and rebuild of cache files, data equal to the pixel path, conflicts, and the
end-to-end runs that encode, reuse, and re-encode one changed image."""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from library.data.latent_cache import CACHE_SUFFIX, LatentCacheOptions
from library.errors import ConfigError
from library.training.loss import masked_mean
from tests.dataset_helpers import all_batches, group_of, one_dataset, subset_lines
from tests.test_train_network_e2e import train_args
from tests.training_helpers import train_in_process


class FakeVAE:
    """A deterministic per-image 'encoder' (8x average pooling plus a mean channel) that counts its images."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += images.shape[0]
        pooled = torch.nn.functional.avg_pool2d(images, 8)  # (B, 3, H/8, W/8)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)  # (B, 4, H/8, W/8)


def write_pictures(folder, count: int, size=(64, 64), alpha: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = np.zeros((size[1], size[0], 4 if alpha else 3), dtype=np.uint8)
        pixels[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]  # left-right gradient: flips show
        pixels[..., 1] = 40 * index % 256
        if alpha:
            pixels[..., 3] = 255
            pixels[:, : size[0] // 3, 3] = 0
        Image.fromarray(pixels).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"picture {index}\n")


def make_group(tmp_path, extra: str = "", dataset: str = "resolution = 64\nbatch_size = 2", seed: int = 0):
    return group_of(one_dataset(tmp_path, dataset, subset_lines(tmp_path / "img", extra)), seed=seed)


def test_disk_cache_reuses_entries_and_reencodes_only_a_changed_image(tmp_path):
    write_pictures(tmp_path / "img", 3)
    vae = FakeVAE()
    assert make_group(tmp_path).cache_latents(vae, "vae-a", to_disk=True) == (3, 0)
    files = sorted(name for name in os.listdir(tmp_path / "img") if name.endswith(CACHE_SUFFIX))
    assert files == [f"img{index}{CACHE_SUFFIX}" for index in range(3)]

    assert make_group(tmp_path).cache_latents(vae, "vae-a", to_disk=True) == (0, 3)
    assert vae.images == 3  # nothing encoded the second time
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "img" / "img1.png")
    group = make_group(tmp_path)
    assert group.cache_latents(vae, "vae-a", to_disk=True) == (1, 2)
    changed = group.datasets[0].latent_cache[group.datasets[0].image_paths.index(str(tmp_path / "img" / "img1.png"))]
    latents, _ = changed.load(flipped=False)
    np.testing.assert_allclose(latents[0], np.full((8, 8), 9 / 127.5 - 1), atol=1e-6)
    assert make_group(tmp_path).cache_latents(vae, "vae-b", to_disk=True) == (3, 0)  # another VAE: all again


def test_changed_bucket_reencodes(tmp_path):
    write_pictures(tmp_path / "img", 2)
    make_group(tmp_path).cache_latents(FakeVAE(), "vae", to_disk=True)
    group = make_group(tmp_path, dataset="resolution = 32\nbatch_size = 2")
    assert group.cache_latents(FakeVAE(), "vae", to_disk=True) == (2, 0)
    latents, _ = group.datasets[0].latent_cache[0].load(flipped=False)
    assert latents.shape == (4, 4, 4)


def test_damaged_cache_file_is_rebuilt_with_a_warning(tmp_path, caplog):
    write_pictures(tmp_path / "img", 2)
    make_group(tmp_path).cache_latents(FakeVAE(), "vae", to_disk=True)
    damaged = tmp_path / "img" / f"img0{CACHE_SUFFIX}"
    damaged.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING):
        assert make_group(tmp_path).cache_latents(FakeVAE(), "vae", to_disk=True) == (1, 1)
    assert "img0_latents.safetensors is damaged" in caplog.text
    assert make_group(tmp_path).cache_latents(FakeVAE(), "vae", to_disk=True) == (0, 2)  # whole again


def test_cached_batches_equal_encoding_the_pixel_batches_with_flips(tmp_path):
    write_pictures(tmp_path / "img", 6)
    vae = FakeVAE()
    cached = make_group(tmp_path, "flip_aug = true", seed=3)
    assert cached.cache_latents(vae, "vae", to_disk=False, batch_size=4) == (6, 0)
    assert vae.images == 12  # every image and its mirror image
    pixels = make_group(tmp_path, "flip_aug = true", seed=3)
    flips = 0
    for epoch in range(2):
        cached.set_epoch(epoch)
        pixels.set_epoch(epoch)
        for from_cache, from_pixels in zip(all_batches(cached), all_batches(pixels), strict=True):
            assert from_cache["images"] is None and from_cache["captions"] == from_pixels["captions"]
            torch.testing.assert_close(from_cache["latents"], vae(from_pixels["images"]), atol=1e-6, rtol=0)
            flips += int((from_pixels["images"][:, 0, 0, 0] > 0).sum())  # the gradient runs right to left
    assert 0 < flips < 12


def test_cached_alpha_masks_give_the_same_masked_loss(tmp_path):
    write_pictures(tmp_path / "img", 4, alpha=True)
    extra = "alpha_mask = true\nflip_aug = true"
    cached, pixels = make_group(tmp_path, extra), make_group(tmp_path, extra)
    cached.cache_latents(FakeVAE(), "vae", to_disk=True, batch_size=3)
    cached = make_group(tmp_path, extra)  # served from the files
    assert cached.cache_latents(FakeVAE(), "vae", to_disk=True) == (0, 4)
    losses = torch.rand(2, 4, 8, 8)
    for from_cache, from_pixels in zip(all_batches(cached), all_batches(pixels), strict=True):
        assert from_cache["masks"].shape == (2, 1, 8, 8) and from_pixels["masks"].shape == (2, 1, 64, 64)
        torch.testing.assert_close(masked_mean(losses, from_cache["masks"]), masked_mean(losses, from_pixels["masks"]))


@pytest.mark.parametrize(("extra", "named"), [("color_aug = true", "color_aug"), ("random_crop = true", "random_crop")])
def test_pixel_changing_options_conflict_with_the_cache(tmp_path, extra, named):
    import argparse

    write_pictures(tmp_path / "img", 1)
    options = LatentCacheOptions.from_args(argparse.Namespace(cache_latents=False, cache_latents_to_disk=True))
    assert options.enabled and options.to_disk
    message = rf"datasets\[0\]\.subsets\[0\] sets {named}, .* but --cache_latents_to_disk encodes each image once"
    with pytest.raises(ConfigError, match=message):
        options.check_dataset(make_group(tmp_path, extra))
    LatentCacheOptions(enabled=True).check_dataset(make_group(tmp_path, "flip_aug = true"))  # flips are fine
    with pytest.raises(ConfigError, match="--vae_batch_size must be 1 or more"):
        LatentCacheOptions.from_args(argparse.Namespace(cache_latents=True, vae_batch_size=0))


def cache_counts(log: str) -> tuple[int, int]:
    found = re.findall(r"latent cache: (\d+) images encoded, (\d+) reused", log)
    assert len(found) == 1, log
    return int(found[0][0]), int(found[0][1])


def test_train_network_encodes_then_reuses_then_reencodes_one_changed_image(
    tiny_models_dir, tokenizer_dir, tmp_path, caplog
):
    from library.testing.toy_data import write_toy_dataset

    dataset = write_toy_dataset(str(tmp_path / "data"), count=4, batch_size=2)
    model = os.path.join(tiny_models_dir, "sd1.safetensors")

    def run(name: str) -> tuple[int, int]:
        args = train_args(model, dataset, str(tmp_path / name), tokenizer_dir, "--cache_latents_to_disk")[1:]
        args[args.index("--max_train_steps") + 1] = "2"
        caplog.clear()
        with caplog.at_level(logging.INFO):
            train_in_process(args)
        return cache_counts(caplog.text)

    assert run("first") == (4, 0)
    assert run("second") == (0, 4)  # no VAE encode
    first, second = (load_file(str(tmp_path / name / "lora.safetensors")) for name in ("first", "second"))
    for key, value in first.items():  # the cached latents are the first run's: the same training
        torch.testing.assert_close(second[key], value, rtol=0, atol=0, msg=key)
    image = tmp_path / "data" / "images" / "img_0002.png"
    Image.new("RGB", Image.open(image).size, (250, 5, 5)).save(image)
    assert run("third") == (1, 3)
