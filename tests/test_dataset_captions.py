"""Caption processing: the config guide's worked examples, wildcards, fixed parts, dropout, metadata merging."""

from __future__ import annotations

import numpy as np

from library.data.captions import CaptionOptions, make_caption, merge_caption_and_tags, read_caption_file
from tests.dataset_helpers import all_batches, group_of, one_dataset, rng, subset_lines, write_images

MIKU = "1girl, hatsune miku, vocaloid"


def _many(stored: str, options: CaptionOptions, count: int = 200, epoch: int = 1) -> list[str]:
    generator = rng(1)
    return [make_caption(stored, options, generator, epoch) for _ in range(count)]


def test_guide_keep_tokens_separator_example_keeps_head_and_tail_fixed():
    stored = f"{MIKU} ||| stage, microphone, white shirt, smile ||| best quality, rating: general"
    options = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||")
    results = _many(stored, options)
    head, tail = MIKU + ", ", ", best quality, rating: general"
    assert all(r.startswith(head) and r.endswith(tail) for r in results)
    middles = {r[len(head) : -len(tail)] for r in results}
    assert all(sorted(m.split(", ")) == ["microphone", "smile", "stage", "white shirt"] for m in middles)
    assert len(middles) > 10  # 24 orders exist


def test_keep_tokens_separator_without_shuffle_removes_the_marks():
    options = CaptionOptions(keep_tokens_separator="|||")
    assert make_caption("aaa, bbb ||| ccc, ddd ||| eee", options, rng()) == "aaa, bbb, ccc, ddd, eee"


def test_keep_tokens_separator_tag_dropout_only_drops_middle_tags():
    stored = "aaa, bbb ||| ccc, ddd, eee, fff ||| ggg, hhh"
    options = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||", caption_tag_dropout_rate=0.5)
    results = _many(stored, options)
    assert all(r.startswith("aaa, bbb") and r.endswith("ggg, hhh") for r in results)
    lengths = {len(r.split(", ")) for r in results}
    assert min(lengths) == 4 and max(lengths) == 8


def test_guide_secondary_separator_example_moves_and_drops_as_one_tag():
    stored = f"{MIKU}, upper body, looking at viewer, sky;;;cloud;;;day, outdoors"
    plain = make_caption(stored, CaptionOptions(secondary_separator=";;;"), rng())
    assert plain == f"{MIKU}, upper body, looking at viewer, sky,cloud,day, outdoors"
    options = CaptionOptions(shuffle_caption=True, secondary_separator=";;;", caption_tag_dropout_rate=0.3)
    for result in _many(stored, options):
        assert ("sky,cloud,day" in result) != ("sky" not in result)  # the group is whole or gone
        assert "cloud" not in result.replace("sky,cloud,day", "")


def test_guide_wildcard_example_picks_each_choice():
    stored = f"{MIKU}, upper body, looking at viewer, {{simple|white}} background"
    results = set(_many(stored, CaptionOptions(enable_wildcard=True), count=50))
    assert results == {f"{MIKU}, upper body, looking at viewer, {c} background" for c in ("simple", "white")}


def test_guide_double_braces_are_literal_braces():
    stored = f"{MIKU}, {{{{retro style}}}}"
    assert make_caption(stored, CaptionOptions(enable_wildcard=True), rng()) == f"{MIKU}, {{retro style}}"


def test_wildcards_are_left_alone_without_enable_wildcard():
    assert make_caption("a {b|c}", CaptionOptions(), rng()) == "a {b|c}"


def test_multi_line_caption_picks_one_line_per_use_with_wildcards_else_first():
    stored = "line one\nline two\nline three"
    assert set(_many(stored, CaptionOptions(enable_wildcard=True), count=60)) == set(stored.split("\n"))
    assert set(_many(stored, CaptionOptions(), count=10)) == {"line one"}


def test_guide_prefix_suffix_example_with_fixed_parts():
    options = CaptionOptions(
        caption_prefix=f"{MIKU} |||",
        caption_suffix=", anime screencap ||| masterpiece, rating: general",
        shuffle_caption=True,
        keep_tokens_separator="|||",
    )
    results = _many("stage, smile", options, count=40)
    assert all(r.startswith(MIKU + ", ") and r.endswith(", masterpiece, rating: general") for r in results)
    middle = {frozenset(r[len(MIKU) + 2 : -len(", masterpiece, rating: general")].split(", ")) for r in results}
    assert middle == {frozenset({"stage", "smile", "anime screencap"})}


def test_prefix_and_suffix_are_shuffled_with_the_caption():
    options = CaptionOptions(caption_prefix="pre, ", caption_suffix=", post", shuffle_caption=True)
    assert {r.split(", ")[0] for r in _many("a, b, c", options)} == {"pre", "a", "b", "c", "post"}


def test_caption_dropout_rate_empties_about_that_share():
    results = _many("a, b", CaptionOptions(caption_dropout_rate=0.25), count=400)
    assert 60 < results.count("") < 140 and set(results) == {"", "a, b"}


def test_caption_dropout_every_n_epochs_drops_whole_epochs():
    options = CaptionOptions(caption_dropout_every_n_epochs=3)
    dropped = [epoch for epoch in range(1, 10) if make_caption("a, b", options, rng(), epoch) == ""]
    assert dropped == [3, 6, 9]


def test_caption_tag_dropout_without_shuffle_keeps_order_and_kept_tokens():
    options = CaptionOptions(keep_tokens=1, caption_tag_dropout_rate=0.5)
    for result in _many("k, a, b, c, d", options):
        tags = result.split(", ")
        assert tags[0] == "k" and tags[1:] == sorted(tags[1:])


def test_custom_caption_separator_splits_and_joins():
    options = CaptionOptions(caption_separator=";", shuffle_caption=True, keep_tokens=1)
    results = _many("first; b; c", options, count=30)
    assert {r for r in results} == {"first; b; c", "first; c; b"}


def test_metadata_caption_and_tags_merge_on_every_line():
    merged = merge_caption_and_tags("a frog\nline two", "open mouth, frog", ",")
    assert merged == "a frog, open mouth, frog\nline two, open mouth, frog"
    assert merge_caption_and_tags(None, "x, y", ",") == "x, y"
    assert merge_caption_and_tags("only caption", None, ",") == "only caption"
    assert merge_caption_and_tags("", "", ",") is None


def test_caption_file_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\ufefffirst\n\nsecond\n", encoding="utf-8")
    assert read_caption_file(str(path), all_lines=False) == "first"
    assert read_caption_file(str(path), all_lines=True) == "first\nsecond"


def test_guide_worked_config_example_processes_captions_end_to_end(tmp_path):
    caption = "stage, microphone, white shirt, smile, sky;;;cloud;;;day, {simple|white} background"
    folder = write_images(tmp_path / "img", [(64, 64)] * 4, captions={i: caption for i in range(4)})
    path = one_dataset(
        tmp_path,
        "resolution = 64\nbatch_size = 4\nshuffle_caption = true\nkeep_tokens_separator = '|||'\n"
        "caption_tag_dropout_rate = 0.1\nsecondary_separator = ';;;'\nenable_wildcard = true",
        subset_lines(folder, f"caption_prefix = '{MIKU} |||'\ncaption_suffix = ', anime screencap ||| masterpiece'"),
    )
    captions = [c for epoch in range(5) for c in _epoch_captions(path, epoch)]
    assert all(c.startswith(MIKU + ", ") and c.endswith(", masterpiece") for c in captions)
    assert all("{" not in c and ";;;" not in c and "|||" not in c for c in captions)
    assert any("sky,cloud,day" in c for c in captions)
    assert {"simple background", "white background"} <= {t for c in captions for t in c.split(", ")}


def _epoch_captions(path, epoch: int) -> list[str]:
    group = group_of(path, seed=3)
    group.set_epoch(epoch)
    return [c for batch in all_batches(group) for c in batch["captions"]]


def test_captions_are_reproducible_per_seed_and_epoch_and_vary_between_epochs(tmp_path):
    folder = write_images(tmp_path / "img", [(32, 32)] * 4, captions={i: "a, b, c, d, e, f, g" for i in range(4)})
    path = one_dataset(tmp_path, "resolution = 32\nbatch_size = 4", subset_lines(folder, "shuffle_caption = true"))
    assert _epoch_captions(path, 2) == _epoch_captions(path, 2)
    assert _epoch_captions(path, 2) != _epoch_captions(path, 3)
    assert np.all([sorted(c.split(", ")) == list("abcdefg") for c in _epoch_captions(path, 1)])
