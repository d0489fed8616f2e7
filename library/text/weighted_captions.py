"""Weighted captions in the AUTOMATIC1111 web UI syntax: `(text)` x1.1, `[text]` /1.1, `(text:1.3)`, nesting
multiplies, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal characters. Parsed into (text, weight) segments, turned into
per-token weights, and applied to text-encoder hidden states keeping their mean."""

from __future__ import annotations

import argparse
import re

import torch

ROUND_FACTOR = 1.1  # `(text)`
SQUARE_FACTOR = 1 / 1.1  # `[text]`
# The mean-preserving rescale is skipped for a sample whose mean is below this fraction of its mean magnitude.
MEAN_RESCALE_FLOOR = 1e-3
ESCAPABLE = "()[]\\"
# `:1.23)` closes the innermost round bracket with an explicit weight (no spaces, as in the web UI).
EXPLICIT_WEIGHT = re.compile(r":([+-]?(?:\d+(?:\.\d*)?|\.\d+))\)")


def add_weighted_caption_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--weighted_captions` switch."""
    parser.add_argument(
        "--weighted_captions",
        action="store_true",
        help="read (text), [text] and (text:1.2) in captions as attention weights, as the AUTOMATIC1111 web UI "
        "does; avoid commas inside brackets when captions are shuffled",
    )


def parse_weighted_caption(caption: str) -> list[tuple[str, float]]:
    """`"a (red:1.5) ((big)) [dog]"` -> `[("a ", 1.0), ("red", 1.5), (" ", 1.0), ("big", 1.21), (" ", 1.0),
    ("dog", 0.909...)]`. Unmatched closing brackets are text; brackets left open apply up to the end.
    Neighbouring segments of equal weight are merged; an empty caption gives `[("", 1.0)]`."""
    segments: list[list] = []  # [text, weight], mutable so a closing bracket can scale its span
    round_starts: list[int] = []  # segment index where each open `(` began
    square_starts: list[int] = []
    text: list[str] = []  # plain characters not yet stored as a segment

    def flush() -> None:
        if text:
            segments.append(["".join(text), 1.0])
            text.clear()

    def close(start: int, factor: float) -> None:
        flush()
        for segment in segments[start:]:
            segment[1] *= factor

    position = 0
    while position < len(caption):
        char = caption[position]
        explicit = EXPLICIT_WEIGHT.match(caption, position) if char == ":" and round_starts else None
        if char == "\\" and caption[position + 1 : position + 2] in tuple(ESCAPABLE):
            text.append(caption[position + 1])
            position += 1
        elif char in "([":
            flush()
            (round_starts if char == "(" else square_starts).append(len(segments))
        elif explicit is not None:
            close(round_starts.pop(), float(explicit.group(1)))
            position = explicit.end() - 1
        elif char == ")" and round_starts:
            close(round_starts.pop(), ROUND_FACTOR)
        elif char == "]" and square_starts:
            close(square_starts.pop(), SQUARE_FACTOR)
        else:
            text.append(char)
        position += 1
    flush()
    for start in round_starts:
        close(start, ROUND_FACTOR)
    for start in square_starts:
        close(start, SQUARE_FACTOR)
    return _merge_equal_weights(segments)


def _merge_equal_weights(segments: list[list]) -> list[tuple[str, float]]:
    merged: list[tuple[str, float]] = []
    for text, weight in segments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged or [("", 1.0)]


def strip_weights(caption: str) -> str:
    """The caption's plain text, brackets and weights removed."""
    return "".join(text for text, _ in parse_weighted_caption(caption))


def token_weights(tokenizer, caption: str, max_length: int) -> tuple[list[int], list[float]]:
    """Token ids of a weighted caption without BOS/EOS, cut to `max_length`, and the weight of each token.

    Each segment is tokenized on its own, so a weight never spreads to a neighbouring word.
    """
    segments = parse_weighted_caption(caption)
    encoded = tokenizer([text for text, _ in segments], add_special_tokens=False).input_ids
    ids: list[int] = []
    weights: list[float] = []
    for (_, weight), segment_ids in zip(segments, encoded):
        ids += segment_ids
        weights += [weight] * len(segment_ids)
    return ids[:max_length], weights[:max_length]


def apply_token_weights(hidden_states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's hidden state (B, T, D) by its weight (B, T), then rescale every sample so the mean
    over tokens and features is what it was before weighting (the web UI's rule, so emphasis shifts the balance
    between tokens without changing the overall magnitude the denoiser was trained on)."""
    hidden = hidden_states.float()
    weights = weights.to(hidden.device, torch.float32)
    original_mean = hidden.mean(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    weighted = hidden * weights.unsqueeze(-1)
    weighted_mean = weighted.mean(dim=(1, 2), keepdim=True)
    # A sample without emphasis keeps its states exactly; a mean near zero (hidden states centred on 0, as in small
    # or fresh models) has no magnitude to restore, and dividing by it would give inf / NaN: leave those unscaled.
    tiny = hidden.abs().mean(dim=(1, 2), keepdim=True) * MEAN_RESCALE_FLOOR
    unweighted = (weights == 1).all(dim=1).view(-1, 1, 1)
    usable = ~unweighted & (weighted_mean.abs() > tiny) & (original_mean.abs() > tiny)
    scale = torch.where(usable, original_mean / torch.where(usable, weighted_mean, 1.0), 1.0)
    return (weighted * scale).to(hidden_states.dtype)
