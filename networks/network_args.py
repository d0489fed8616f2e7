"""`--network_args` of networks.lora: the options every family shares, the ones a family's target table declares
(library/adapters/targets.py `TargetArgs`), and the rule that turns them into a rank per target."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from library.adapters.targets import AdapterTarget, TargetArgs, TargetTable
from library.errors import ConfigError
from networks.adapters import DEFAULT_ALPHA

SAVE_FORMATS = ("kohya", "diffusers")
SHARED_KEYS = (
    "conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio", "network_reg_dims", "network_reg_lrs", "split_qkv", "save_format", "verbose",
)  # fmt: skip
Rules = tuple[tuple[re.Pattern, float], ...]


def text_value(value: object) -> str:
    """A network arg as text, whatever literal the command line parsed it into (tuple, list, number ...)."""
    if isinstance(value, (tuple, list)):
        return ",".join(str(item) for item in value)
    return str(value)


def parse_number(key: str, raw: object, kind: type) -> int | float | None:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() == "none"):
        return None
    try:
        return kind(raw)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"--network_args {key} must be {'an integer' if kind is int else 'a number'}, got '{raw}'."
        ) from err


def parse_flag(value: object) -> bool:
    return value is True or text_value(value).strip().lower() in ("true", "1", "yes")


def parse_indices(name: str, value: object) -> frozenset[int] | None:
    """`0,1,8-12` -> {0, 1, 8, ..., 12}; `all` (or unset) -> None (every block); `none` -> empty."""
    text = text_value(value).strip().lower()
    if text in ("all", ""):
        return None
    if text == "none":
        return frozenset()
    indices: set[int] = set()
    for part in text.split(","):
        try:
            if "-" in part:
                first, last = (int(number) for number in part.split("-", 1))
                indices.update(range(first, last + 1))
            else:
                indices.add(int(part))
        except ValueError as err:
            message = f"--network_args {name}: expected indices like 0,1,8-12, all or none, got {text!r}"
            raise ConfigError(message) from err
    return frozenset(indices)


def parse_dims(name: str, value: object) -> tuple[int, ...]:
    """`[4,0,2]` (or 4,0,2) -> (4, 0, 2)."""
    try:
        return tuple(int(item) for item in text_value(value).strip("[]() ").split(","))
    except ValueError as err:
        raise ConfigError(f"--network_args {name}: expected a list of integers like [4,0,2], got {value!r}") from err


def parse_regex_values(name: str, value: object, kind: type) -> Rules:
    """`regex=value,regex=value` -> compiled patterns with their values (the last matching one wins)."""
    rules = []
    for item in text_value(value).split(","):
        if not item.strip():
            continue
        pattern, separator, number = item.rpartition("=")
        try:
            if not separator:
                raise ValueError(item)
            rules.append((re.compile(pattern.strip()), kind(number.strip())))
        except (ValueError, re.error) as err:
            raise ConfigError(f"--network_args {name}: expected regex=value items, got {item!r} ({err})") from err
    return tuple(rules)


def last_match(rules: Sequence[tuple[re.Pattern, float]], name: str) -> float | None:
    """The value of the last rule whose regex matches anywhere in `name`."""
    value = None
    for pattern, rule_value in rules:
        if pattern.search(name):
            value = rule_value
    return value


@dataclass(frozen=True)
class NetworkOptions:
    """Parsed `--network_args`: shared options, then what the family's `TargetArgs` declare."""

    conv_dim: int | None = None
    conv_alpha: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    network_reg_dims: Rules = ()
    network_reg_lrs: Rules = ()
    split_qkv: bool = False
    save_format: str = "kohya"
    verbose: bool = False  # log every adapter's rank and alpha, and the layers left without one
    # family args, resolved: kind -> rank; list arg -> ranks; block list -> chosen indices; args given
    kind_dims: dict[str, int] = field(default_factory=dict)
    list_dims: dict[str, tuple[int, ...]] = field(default_factory=dict)
    block_choice: dict[str, frozenset[int] | None] = field(default_factory=dict)
    given: frozenset[str] = frozenset()

    @classmethod
    def parse(
        cls, network_args: dict[str, object], family: TargetArgs, module: str = "networks.lora",
        type_keys: tuple[str, ...] = (),
    ) -> NetworkOptions:  # fmt: skip
        """Parse `key=value` network args; unknown keys and bad values raise ConfigError naming them. `type_keys` are
        the adapter type's own keys: known, but parsed by the plugin."""
        known = [*SHARED_KEYS, *(name for name in family.names() if name not in SHARED_KEYS), *type_keys]
        for key in network_args:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"unknown --network_args {key}: '{key}' is not a key {module} knows.{hint} "
                                  f"Known keys: {', '.join(known)}.")  # fmt: skip
        shared = {key: cls._parse_shared(key, raw) for key, raw in network_args.items()
                  if key in SHARED_KEYS and key not in type_keys}  # fmt: skip
        options = cls(**shared, **cls._parse_family(network_args, family))
        options.validate()
        given = {key for key in SHARED_KEYS if options._is_set(key)}
        given |= {arg for arg in family.enables if arg in network_args and parse_flag(network_args[arg])}
        return replace(options, given=frozenset(given))

    @staticmethod
    def _parse_shared(key: str, raw: object) -> object:
        if key in ("network_reg_dims", "network_reg_lrs"):
            return parse_regex_values(key, raw, int if key.endswith("dims") else float)
        if key in ("split_qkv", "verbose"):
            return parse_flag(raw)
        if key == "save_format":
            return text_value(raw).strip().lower()
        return parse_number(key, raw, int if key == "conv_dim" else float)

    @staticmethod
    def _parse_family(values: dict[str, object], family: TargetArgs) -> dict:
        kind_dims, list_dims, choice = {}, {}, {}
        for arg, kinds in family.kind_dims.items():
            dim = parse_number(arg, values.get(arg), int)
            if dim is not None:
                kind_dims.update(dict.fromkeys(kinds, dim))
        for arg in family.list_dims:
            if values.get(arg) is not None:
                list_dims[arg] = parse_dims(arg, values[arg])
        for arg, blocks in family.block_indices.items():
            choice[blocks] = parse_indices(arg, values.get(arg, "all"))
        return {"kind_dims": kind_dims, "list_dims": list_dims, "block_choice": choice}

    def _is_set(self, key: str) -> bool:
        value = getattr(self, key, None)
        return value not in (None, False, (), "kohya")

    def validate(self) -> None:
        """Check value ranges; raise ConfigError naming the key."""
        if self.conv_dim is not None and self.conv_dim < 1:
            raise ConfigError(f"--network_args conv_dim must be a positive integer, got {self.conv_dim}.")
        for key in ("rank_dropout", "module_dropout"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"--network_args {key} must be in [0, 1), got {value}.")
        for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"--network_args {key} must be positive, got {value}.")
        if self.save_format not in SAVE_FORMATS:
            choices = ", ".join(SAVE_FORMATS)
            raise ConfigError(f"--network_args save_format must be one of {choices}, got {self.save_format!r}")
        for kind, dim in self.kind_dims.items():
            if dim < 0:
                raise ConfigError(f"--network_args dims must not be negative, got {dim} for {kind}")
        for arg, dims in self.list_dims.items():
            if any(dim < 0 for dim in dims):
                raise ConfigError(f"--network_args {arg} must not be negative, got {list(dims)}")

    def check_table(self, table: TargetTable) -> None:
        """Check the family args against the model: list lengths and block indices."""
        for arg, kinds in table.args.list_dims.items():
            dims = self.list_dims.get(arg)
            if dims is not None and len(dims) != len(kinds):
                raise ConfigError(f"--network_args {arg} needs {len(kinds)} dims ({', '.join(kinds)}), "
                                  f"got {list(dims)}")  # fmt: skip
        counts = table.block_counts()
        for arg, blocks in table.args.block_indices.items():
            chosen = self.block_choice.get(blocks)
            count = counts.get(blocks, 0)
            if chosen and max(chosen) >= count:
                raise ConfigError(f"--network_args {arg}: this model has blocks 0-{count - 1}, got {sorted(chosen)}")

    def rank_for(self, target: AdapterTarget, table: TargetTable, dim: int, alpha: float) -> tuple[int, float] | None:
        """The (rank, alpha) of a fresh adapter on `target`, or None for no adapter.

        Unchosen blocks have none; spatial convolutions take conv_dim / conv_alpha; kinds the family keeps off
        (or turns on only with an arg) follow it; kind dims and list dims replace network_dim; a network_reg_dims
        regex on the denoiser's original module path has the last word.
        """
        if target.block is not None:
            chosen = self.block_choice.get(target.block[0])
            if chosen is not None and target.block[1] not in chosen:
                return None
        rank = self._base_rank(target, table.args, dim, alpha)
        if target.encoder is None:
            override = last_match(self.network_reg_dims, target.path)
            if override is not None:
                rank = (int(override), alpha)
        return rank if rank is not None and rank[0] > 0 else None

    def _base_rank(self, target: AdapterTarget, args: TargetArgs, dim: int, alpha: float) -> tuple[int, float] | None:
        kind = target.kind
        for arg, kinds in args.enables.items():
            if kind in kinds and arg not in self.given:
                return None
        for arg, kinds in args.list_dims.items():  # a family's list ranks even a convolution (SD3's patch embedding)
            if kind in kinds:
                dims = self.list_dims.get(arg)
                return None if dims is None else (dims[kinds.index(kind)], alpha)
        if target.is_spatial_conv:
            conv_alpha = self.conv_alpha if self.conv_alpha is not None else DEFAULT_ALPHA
            return (self.conv_dim, conv_alpha) if self.conv_dim else None
        if kind in args.off_kinds:
            return None
        return (self.kind_dims.get(kind, dim), alpha)
