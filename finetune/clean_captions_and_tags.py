"""Clean the captions and tags of a metadata JSON with rules kept in an editable TOML file.

The default rules are finetune/clean_rules.toml; copy and edit it, then pass the copy with --rules.
Usage: python finetune/clean_captions_and_tags.py meta_cap_dd.json meta_clean.json [--rules my_rules.toml]
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from typing import Any

if __package__ in (None, ""):  # run as `python finetune/<tool>.py`: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm

from finetune.metadata_io import Metadata, read_metadata, write_metadata
from finetune.tool_entry import run_tool
from library.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_RULES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clean_rules.toml")
MAX_REPLACEMENT_ROUNDS = 10  # a caption still changing after this many rounds means two rules undo each other
SHORT_TAG_LENGTH = 3  # tags this short keep their underscores: they are emoticons such as "^_^"
_TABLE_KEYS = {
    "tags": ("remove_prefixes", "underscores_to_spaces", "keep_underscores", "remove", "replace", "remove_when"),
    "captions": ("replace", "tidy_spaces"),
    "tags.remove_when": ("if_any", "patterns"),
}


@dataclass(frozen=True)
class ConditionalRemoval:
    """Drop the tags matching any of `patterns` when the tag list holds one of `if_any`."""

    if_any: frozenset[str]
    patterns: tuple[re.Pattern[str], ...]


@dataclass(frozen=True)
class CleaningRules:
    """The rules of one rules file, validated and compiled."""

    source: str
    remove_prefixes: tuple[str, ...]
    underscores_to_spaces: bool
    keep_underscores: frozenset[str]
    remove: frozenset[str]
    tag_replacements: dict[str, str]
    remove_when: tuple[ConditionalRemoval, ...]
    caption_replacements: tuple[tuple[re.Pattern[str], str], ...]
    tidy_spaces: bool

    def spaced(self, tag: str) -> str:
        """The tag after the underscore rule."""
        return spaced_tag(tag, self.underscores_to_spaces, self.keep_underscores)


def spaced_tag(tag: str, enabled: bool, keep: frozenset[str]) -> str:
    """`tag` with underscores as spaces, except short tags (emoticons such as "^_^") and those in `keep`."""
    if not enabled or len(tag) <= SHORT_TAG_LENGTH or tag in keep:
        return tag
    return tag.replace("_", " ")


# ---- reading the rules file ------------------------------------------------------------------------------------


class _RulesReader:
    """Typed access to the parsed TOML with errors that name the file, the table and the key."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.source}: {where} = {value!r} is invalid: expected {expected}.")

    def check_keys(self, table: dict, kind: str, where: str) -> None:
        for key in table:
            if key not in _TABLE_KEYS[kind]:
                close = difflib.get_close_matches(key, _TABLE_KEYS[kind], n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(_TABLE_KEYS[kind])}."
                raise ConfigError(f"{self.source}: unknown key '{key}' in {where}; {hint}")

    def table(self, data: dict, key: str, where: str) -> dict:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(f"{where}{key}", value, "a table")
        return value

    def strings(self, table: dict, key: str, where: str) -> list[str]:
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.fail(f"{where}.{key}", value, "a list of strings")
        return value

    def boolean(self, table: dict, key: str, where: str, default: bool) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(f"{where}.{key}", value, "true or false")
        return value

    def pattern(self, text: str, where: str) -> re.Pattern[str]:
        try:
            return re.compile(text)
        except re.error as err:
            raise ConfigError(f"{self.source}: {where}: {text!r} is not a valid regular expression: {err}.") from None


def load_rules(path: str) -> CleaningRules:
    """Read and validate a rules file (see finetune/clean_rules.toml for the format)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--rules: rules file {path} does not exist.")
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--rules: {path} is not valid TOML: {err}.") from None
    reader = _RulesReader(path)
    for key in data:
        if key not in ("tags", "captions"):
            raise ConfigError(f"{path}: unknown table [{key}]; the rules file has [tags] and [captions].")
    tags, captions = reader.table(data, "tags", ""), reader.table(data, "captions", "")
    reader.check_keys(tags, "tags", "[tags]")
    reader.check_keys(captions, "captions", "[captions]")
    underscores = reader.boolean(tags, "underscores_to_spaces", "[tags]", True)
    keep = frozenset(reader.strings(tags, "keep_underscores", "[tags]"))
    removed = reader.strings(tags, "remove", "[tags]")
    replace = reader.table(tags, "replace", "[tags].")
    for old, new in replace.items():
        if not isinstance(new, str):
            raise reader.fail(f"[tags.replace].{old}", new, "a string")
    # Tags named in the rules match whether they are written with underscores or with spaces.
    return CleaningRules(
        source=path,
        remove_prefixes=tuple(reader.strings(tags, "remove_prefixes", "[tags]")),
        underscores_to_spaces=underscores,
        keep_underscores=keep,
        remove=frozenset(removed) | {spaced_tag(tag, underscores, keep) for tag in removed},
        tag_replacements=replace | {spaced_tag(old, underscores, keep): new for old, new in replace.items()},
        remove_when=_read_remove_when(reader, tags),
        caption_replacements=_read_caption_replacements(reader, captions),
        tidy_spaces=reader.boolean(captions, "tidy_spaces", "[captions]", True),
    )


def _read_remove_when(reader: _RulesReader, tags: dict) -> tuple[ConditionalRemoval, ...]:
    entries = tags.get("remove_when", [])
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise reader.fail("[tags].remove_when", entries, "an array of tables: [[tags.remove_when]]")
    removals = []
    for index, entry in enumerate(entries):
        where = f"[[tags.remove_when]] #{index + 1}"
        reader.check_keys(entry, "tags.remove_when", where)
        patterns = reader.strings(entry, "patterns", where)
        removals.append(
            ConditionalRemoval(
                if_any=frozenset(reader.strings(entry, "if_any", where)),
                patterns=tuple(reader.pattern(text, f"{where}.patterns") for text in patterns),
            )
        )
    return tuple(removals)


def _read_caption_replacements(reader: _RulesReader, captions: dict) -> tuple[tuple[re.Pattern[str], str], ...]:
    pairs = captions.get("replace", [])
    if not isinstance(pairs, list) or not all(_is_pair(item) for item in pairs):
        raise reader.fail("[captions].replace", pairs, 'a list of ["old phrase", "new phrase"] pairs')
    for old, _ in pairs:
        if not old.strip():
            raise reader.fail("[captions].replace", old, "a phrase that is not empty")
    return tuple((_whole_words(old), new) for old, new in pairs)


def _is_pair(item: Any) -> bool:
    return isinstance(item, list) and len(item) == 2 and all(isinstance(text, str) for text in item)


def _whole_words(phrase: str) -> re.Pattern[str]:
    """Match `phrase` in any letter case, not inside a longer word ("woman" must not match in "womanly")."""
    before = r"(?<!\w)" if re.match(r"\w", phrase[0]) else ""
    after = r"(?!\w)" if re.match(r"\w", phrase[-1]) else ""
    return re.compile(before + re.escape(phrase) + after, re.IGNORECASE)


# ---- applying the rules ----------------------------------------------------------------------------------------


def clean_tags(tags: str, rules: CleaningRules) -> str:
    """Apply the [tags] rules to a comma-separated tag list; duplicates and empty tags are dropped."""
    cleaned: list[str] = []
    for tag in (tag.strip() for tag in tags.split(",")):
        if not tag or tag.startswith(rules.remove_prefixes):
            continue
        tag = rules.spaced(tag)
        tag = rules.tag_replacements.get(tag, tag)
        if tag and tag not in rules.remove and tag not in cleaned:
            cleaned.append(tag)
    present = set(cleaned)
    for removal in rules.remove_when:
        if removal.if_any & present:
            cleaned = [tag for tag in cleaned if not any(pattern.search(tag) for pattern in removal.patterns)]
    return ", ".join(cleaned)


def clean_caption(caption: str, rules: CleaningRules) -> str:
    """Apply the [captions] replacements until the caption no longer changes, then tidy the spaces."""
    for _ in range(MAX_REPLACEMENT_ROUNDS):
        updated = caption
        for pattern, replacement in rules.caption_replacements:
            updated = pattern.sub(lambda _match, new=replacement: new, updated)
        if rules.tidy_spaces:
            updated = re.sub(r"\s+([,.])", r"\1", re.sub(r"[ \t]+", " ", updated)).strip()
        if updated == caption:
            return caption
        caption = updated
    raise ConfigError(
        f"{rules.source}: the [captions] replacements keep changing {caption!r}; two of them undo each other."
    )


def clean_metadata(metadata: Metadata, rules: CleaningRules) -> tuple[int, int]:
    """Clean every entry in place; returns how many captions and tag lists changed."""
    changed_captions = changed_tags = 0
    for entry in tqdm(metadata.values(), desc="cleaning", unit="image"):
        if isinstance(entry.get("caption"), str):
            cleaned = clean_caption(entry["caption"], rules)
            changed_captions += cleaned != entry["caption"]
            entry["caption"] = cleaned
        if isinstance(entry.get("tags"), str):
            cleaned = clean_tags(entry["tags"], rules)
            changed_tags += cleaned != entry["tags"]
            entry["tags"] = cleaned
    return changed_captions, changed_tags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("in_json", help="metadata file to read")
    parser.add_argument("out_json", help="metadata file to write (may be the same file; it is replaced atomically)")
    parser.add_argument("--rules", default=DEFAULT_RULES, help=f"cleaning rules file (default {DEFAULT_RULES})")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, clean, write."""
    args = build_parser().parse_args(argv)
    rules = load_rules(args.rules)
    metadata = read_metadata(args.in_json, "in_json")
    changed_captions, changed_tags = clean_metadata(metadata, rules)
    logger.info("%d captions and %d tag lists changed by the rules of %s", changed_captions, changed_tags, args.rules)
    write_metadata(args.out_json, metadata)


if __name__ == "__main__":
    run_tool(main)
