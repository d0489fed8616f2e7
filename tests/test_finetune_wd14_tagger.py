"""finetune/tag_images_by_wd14_tagger.py with a tiny ONNX tagger: thresholds, ordering rules, files written."""

from __future__ import annotations

import os

import numpy as np
import pytest

from finetune import tag_images_by_wd14_tagger as tagger_tool
from finetune.wd14_tags import TagOptions, TagTable, append_to_existing, select_tags
from library.errors import CheckpointError, ConfigError
from tests.finetune_models import TAGGER_TAGS, write_broken_image, write_solid_images, write_tiny_tagger

pytest.importorskip("onnxruntime", reason="the tagger needs onnxruntime (optional extra)")
pytest.importorskip("onnx", reason="the tiny tagger is exported with torch.onnx, which needs onnx")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait


TABLE = TagTable(names=[name for name, _, _ in TAGGER_TAGS], categories=np.array([c for _, c, _ in TAGGER_TAGS]))
PROBABILITIES = np.array([p for _, _, p in TAGGER_TAGS])


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory) -> str:
    return write_tiny_tagger(str(tmp_path_factory.mktemp("wd14_tagger_model")))


def tags(**options) -> list[str]:
    thresholds = {"general_threshold": 0.35, "character_threshold": 0.35}
    return select_tags(PROBABILITIES, TABLE, TagOptions(**(thresholds | options)))


def read(path) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def test_tags_pass_their_threshold_most_confident_first():
    assert tags() == ["1girl", "^_^", "long_hair", "blue_eyes", "solo", "hatsune_miku", "kaname_madoka_(mahou_shoujo)"]
    assert tags(general_threshold=0.5, character_threshold=0.6) == ["1girl", "^_^", "long_hair", "hatsune_miku"]


def test_character_tags_first_and_expand():
    chosen = tags(general_threshold=0.9, character_tags_first=True, character_tag_expand=True, remove_underscore=True)
    assert chosen == ["hatsune miku", "kaname madoka", "mahou shoujo", "1girl"]


def test_rating_tag_first_or_last():
    assert tags(general_threshold=0.9, character_threshold=1.0, use_rating_tags=True) == ["general", "1girl"]
    assert tags(general_threshold=0.9, character_threshold=1.0, use_rating_tags=True,
                use_rating_tags_as_last_tag=True) == ["1girl", "general"]


def test_remove_underscore_keeps_short_emoticons():
    assert tags(general_threshold=0.5, character_threshold=1.0, remove_underscore=True) == ["1girl", "^_^", "long hair"]


def test_undesired_tags_match_with_underscores_or_spaces():
    assert tags(general_threshold=0.5, character_threshold=1.0, undesired_tags=frozenset({"long hair", "^_^"})) == [
        "1girl"
    ]
    kept = tags(general_threshold=0.5, character_threshold=1.0, remove_underscore=True,
                undesired_tags=frozenset({"long_hair"}))
    assert kept == ["1girl", "^_^"]


def test_always_first_tags_lead_in_the_given_order():
    assert tags(general_threshold=0.5, character_threshold=1.0, always_first_tags=("long_hair", "absent", "^_^")) == [
        "long_hair", "^_^", "1girl"
    ]
    # named with an underscore, written with a space
    options = {"general_threshold": 0.5, "character_threshold": 1.0, "remove_underscore": True}
    assert tags(**options, always_first_tags=("long_hair",)) == ["long hair", "1girl", "^_^"]


def test_append_keeps_existing_tags_first_once():
    options = TagOptions(general_threshold=0.35, character_threshold=0.35)
    assert append_to_existing(["solo", "1girl"], ["1girl", "smile"], options) == ["solo", "1girl", "smile"]
    options = TagOptions(general_threshold=0.35, character_threshold=0.35, always_first_tags=("1girl",))
    assert append_to_existing(["solo", "1girl"], ["smile"], options) == ["1girl", "solo", "smile"]


def test_tagger_input_is_square_white_padded_bgr(tmp_path):
    (path,) = write_solid_images(str(tmp_path), {"red": (255, 0, 0)}, size=(32, 16))
    pixels = tagger_tool.tagger_image(path, (8, 8))
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.float32
    assert pixels[4, 4].tolist() == [0.0, 0.0, 255.0]  # red, in BGR order
    assert pixels[0, 4].tolist() == [255.0, 255.0, 255.0]  # padding above the wide image is white


def test_tool_writes_tag_files_and_skips_broken_images(tagger_dir, tmp_path, caplog):
    folder = str(tmp_path / "train")
    write_solid_images(folder, {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)})
    write_broken_image(folder)
    tagger_tool.main([folder, "--model_dir", tagger_dir, "--batch_size", "2", "--thresh", "0.5",
                      "--character_threshold", "0.6", "--remove_underscore", "--use_rating_tags"])
    assert sorted(name for name in os.listdir(folder) if name.endswith(".txt")) == ["blue.txt", "green.txt", "red.txt"]
    assert read(os.path.join(folder, "red.txt")) == "general, red theme, 1girl, ^_^, long hair, hatsune miku\n"
    assert read(os.path.join(folder, "blue.txt")) == "general, 1girl, ^_^, long hair, hatsune miku\n"
    assert "broken.png" in caplog.text and "skipped" in caplog.text


def test_tool_appends_and_counts_frequencies(tagger_dir, tmp_path, capsys):
    folder = str(tmp_path / "train")
    write_solid_images(folder, {"red": (255, 0, 0), "blue": (0, 0, 255)})
    with open(os.path.join(folder, "red.tags"), "w", encoding="utf-8") as handle:
        handle.write("my_tag | 1girl\n")
    tagger_tool.main([folder, "--model_dir", tagger_dir, "--caption_extension", ".tags", "--thresh", "0.9",
                      "--append_tags", "--caption_separator", " | ", "--frequency_tags",
                      "--undesired_tags", "red_theme"])
    assert read(os.path.join(folder, "red.tags")) == "my_tag | 1girl\n"
    assert read(os.path.join(folder, "blue.tags")) == "1girl\n"
    output = capsys.readouterr().out
    assert "  1girl: 2\n  my_tag: 1\n" in output


def test_missing_model_is_a_clear_error_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_solid_images(str(tmp_path / "train"), {"red": (255, 0, 0)})
    with pytest.raises(CheckpointError, match=r"--model_dir .*no model\.onnx and selected_tags\.csv.*downloading"):
        tagger_tool.main([str(tmp_path / "train"), "--model_dir", str(tmp_path / "no_model")])


def test_bad_threshold_is_refused_before_loading(tmp_path):
    with pytest.raises(ConfigError, match=r"--general_threshold = 1\.5"):
        tagger_tool.main([str(tmp_path), "--general_threshold", "1.5"])
