"""finetune/make_captions.py with a tiny randomly initialised BLIP: files written, seeds, decoding, errors."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from finetune import make_captions
from library.errors import CheckpointError, ConfigError
from tests.finetune_models import BLIP_WORDS, write_broken_image, write_solid_images, write_tiny_blip

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> str:
    return write_tiny_blip(str(tmp_path_factory.mktemp("blip")))


@pytest.fixture
def folder(tmp_path) -> str:
    images = str(tmp_path / "train")
    write_solid_images(images, {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)})
    return images


def captions(folder: str, extension: str = ".caption") -> dict[str, str]:
    found = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(extension):
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                found[name] = handle.read()
    return found


def test_writes_one_caption_per_image_from_the_vocabulary(blip_dir, folder, caplog):
    write_broken_image(folder)
    make_captions.main([folder, "--caption_weights", blip_dir, "--batch_size", "2", "--max_length", "6",
                        "--min_length", "2"])
    written = captions(folder)
    assert sorted(written) == ["blue.caption", "green.caption", "red.caption"]
    for text in written.values():
        words = text.split()
        assert text.endswith("\n") and 1 <= len(words) <= 6 and set(words) <= set(BLIP_WORDS)
    assert "broken.png" in caplog.text and "skipped" in caplog.text


def test_same_seed_gives_same_captions(blip_dir, folder):
    arguments = [folder, "--caption_weights", blip_dir, "--max_length", "6", "--caption_extension", ".txt"]
    make_captions.main([*arguments, "--seed", "3"])
    first = captions(folder, ".txt")
    make_captions.main([*arguments, "--seed", "3"])
    assert captions(folder, ".txt") == first
    make_captions.main([*arguments, "--seed", "4"])
    assert captions(folder, ".txt") != first


def test_without_seed_each_run_samples_differently_and_logs_its_seed(blip_dir, folder, caplog, monkeypatch):
    arguments = [folder, "--caption_weights", blip_dir, "--max_length", "6", "--caption_extension", ".txt"]
    caplog.set_level(logging.INFO)
    seeds = iter([11, 12])
    monkeypatch.setattr(make_captions.random, "randint", lambda low, high: next(seeds))
    make_captions.main(arguments)
    first = captions(folder, ".txt")
    make_captions.main(arguments)
    assert captions(folder, ".txt") != first
    assert "sampling with seed 11 (pass --seed to repeat it)" in caplog.text and "seed 12" in caplog.text
    make_captions.main([*arguments, "--seed", "11"])  # the logged seed repeats the first run
    assert captions(folder, ".txt") == first


def test_beam_search_is_deterministic_and_drops_the_prompt(blip_dir):
    captioner = make_captions.load_captioner(blip_dir)
    options = make_captions.GenerationOptions(beam_search=True, num_beams=2, top_p=0.9, max_length=5, min_length=5)
    image = torch.zeros(40, 56, 3, dtype=torch.uint8).numpy()
    first = captioner.captions([image, image], options)
    assert first[0] == first[1] == captioner.captions([image], options)[0]
    pixels = captioner.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    prompt = captioner.tokenizer([make_captions.CAPTION_PROMPT], return_tensors="pt").input_ids
    full = captioner.model.generate(pixel_values=pixels, input_ids=prompt, **options.generate_kwargs())
    assert captioner.tokenizer.decode(full[0], skip_special_tokens=True) == f"a picture of {first[0]}".strip()


def test_original_blip_pth_and_missing_folder_are_refused(tmp_path):
    pth = tmp_path / "model_large_caption.pth"
    pth.write_bytes(b"")
    with pytest.raises(CheckpointError, match="transformers format"):
        make_captions.load_captioner(str(pth))
    with pytest.raises(CheckpointError, match="folder not found"):
        make_captions.load_captioner(str(tmp_path / "missing"))


def test_bad_lengths_are_refused(folder):
    with pytest.raises(ConfigError, match="--min_length 9 / --max_length 5"):
        make_captions.main([folder, "--min_length", "9", "--max_length", "5"])
