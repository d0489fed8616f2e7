"""Weighted-caption parsing, token weights and the mean-preserving application to hidden states."""

from __future__ import annotations

import argparse

import pytest
import torch

from library.text.weighted_captions import (
    add_weighted_caption_arguments,
    apply_token_weights,
    parse_weighted_caption,
    strip_weights,
    token_weights,
)

UP, DOWN = 1.1, 1 / 1.1


class WordTokenizer:
    """Splits on spaces; token id = running number of each new word (enough to check the weight alignment)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, texts: list[str], add_special_tokens: bool = True):
        assert not add_special_tokens
        ids = [[self.vocab.setdefault(word, len(self.vocab)) for word in text.split()] for text in texts]
        return argparse.Namespace(input_ids=ids)


def assert_segments(actual: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [text for text, _ in actual] == [text for text, _ in expected]
    assert [weight for _, weight in actual] == pytest.approx([weight for _, weight in expected])


def test_parse_weighted_caption_mixes_explicit_nested_and_square_weights():
    segments = parse_weighted_caption("a (red:1.5) ((big)) [dog]")
    assert_segments(segments, [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("big", UP * UP), (" ", 1.0), ("dog", DOWN)])


def test_parse_weighted_caption_multiplies_nested_weights():
    segments = parse_weighted_caption("((cat:1.5) on a [[mat]])")
    assert_segments(segments, [("cat", 1.5 * UP), (" on a ", UP), ("mat", DOWN * DOWN * UP)])


def test_parse_weighted_caption_keeps_plain_text_at_weight_one():
    assert parse_weighted_caption("a photo, of a dog") == [("a photo, of a dog", 1.0)]


def test_parse_weighted_caption_reads_escaped_brackets_as_text():
    segments = parse_weighted_caption(r"smiley \(face\) \[x\] back\\slash (hat)")
    assert_segments(segments, [(r"smiley (face) [x] back\slash ", 1.0), ("hat", UP)])


def test_parse_weighted_caption_treats_unmatched_closing_brackets_as_text():
    assert parse_weighted_caption("a) b] c:1.2)") == [("a) b] c:1.2)", 1.0)]


def test_parse_weighted_caption_applies_unclosed_brackets_to_the_end():
    assert_segments(parse_weighted_caption("a (b [c"), [("a ", 1.0), ("b ", UP), ("c", UP * DOWN)])


def test_parse_weighted_caption_keeps_a_colon_without_number_as_text():
    assert_segments(
        parse_weighted_caption("(ratio:wide) (x:.5) (y:-1)"),
        [("ratio:wide", UP), (" ", 1.0), ("x", 0.5), (" ", 1.0), ("y", -1.0)],
    )


def test_parse_weighted_caption_merges_neighbours_of_equal_weight():
    assert_segments(parse_weighted_caption("(a)(b) c"), [("ab", UP), (" c", 1.0)])


def test_parse_weighted_caption_gives_one_empty_segment_for_empty_input():
    assert parse_weighted_caption("") == [("", 1.0)]
    assert parse_weighted_caption("()") == [("", 1.0)]


def test_strip_weights_returns_plain_caption():
    assert strip_weights("a (red:1.5) ((big)) [dog], \\(x\\)") == "a red big dog, (x)"


def test_token_weights_aligns_every_token_with_its_segment_weight():
    ids, weights = token_weights(WordTokenizer(), "a photo of (red hat:1.3) [[blurry]]", max_length=75)
    assert ids == [0, 1, 2, 3, 4, 5]
    assert weights == pytest.approx([1.0, 1.0, 1.0, 1.3, 1.3, DOWN * DOWN])


def test_token_weights_cuts_ids_and_weights_to_max_length():
    ids, weights = token_weights(WordTokenizer(), "one two (three four:2)", max_length=3)
    assert ids == [0, 1, 2]
    assert weights == [1.0, 1.0, 2.0]


def test_token_weights_with_clip_tokenizer_matches_plain_tokenization(tokenizer_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    ids, weights = token_weights(tokenizer, "a (red:1.5) ((big)) [dog]", max_length=75)
    assert ids == tokenizer("a red big dog", add_special_tokens=False).input_ids
    assert weights == pytest.approx([1.0, 1.5, UP * UP, DOWN])


def test_apply_token_weights_scales_tokens_and_keeps_the_mean():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.rand(2, 5, 8, generator=generator) + 0.5  # (B, T, D), positive mean
    weights = torch.tensor([[1.0, 1.5, 1.0, 0.5, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    weighted = apply_token_weights(hidden, weights)
    assert torch.allclose(weighted.mean(dim=(1, 2)), hidden.mean(dim=(1, 2)), atol=1e-6)
    ratio = weighted[0] / hidden[0]  # each token scaled by weight * one common factor
    factor = ratio[0, 0]
    assert torch.allclose(ratio, (weights[0] * factor).unsqueeze(-1).expand(5, 8), atol=1e-5)
    assert torch.allclose(weighted[1], hidden[1], atol=1e-6)


def test_add_weighted_caption_arguments_defines_the_switch():
    parser = argparse.ArgumentParser()
    add_weighted_caption_arguments(parser)
    assert parser.parse_args(["--weighted_captions"]).weighted_captions is True
    assert parser.parse_args([]).weighted_captions is False
