"""Typed, validated model configuration and the widths syntax shared by every command.

Widths are always explicit: a list with one FFN hidden width per layer (0 = FFN skipped).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mnm_search.errors import ConfigError, WidthsError

Widths = list[int]

# Names for g=4 follow the paper (S, M, L, XL); `g0..g{n-1}` works for any g.
_PAPER_NAMES = ("S", "M", "L", "XL")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a native MatFormer decoder LM.

    `granularities` are the nested FFN widths trained jointly (ascending, the last equals
    `d_ff`). `ffn_widths` is the physical per-layer FFN width of the stored weights: `None`
    for a universal checkpoint (every layer holds `d_ff`), a list for a sliced, exported one.
    """

    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    granularities: tuple[int, ...]
    vocab_size: int = 256
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    ffn_widths: tuple[int, ...] | None = None
    family: str = field(default="matlm")

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        grans = tuple(self.granularities)
        if not grans or list(grans) != sorted(set(grans)) or grans[0] <= 0:
            raise ConfigError(
                f"granularities must be strictly increasing positive widths, got {list(grans)}"
            )
        if grans[-1] != self.d_ff:
            raise ConfigError(
                f"the largest granularity ({grans[-1]}) must equal d_ff ({self.d_ff})"
            )
        object.__setattr__(self, "granularities", grans)
        if self.ffn_widths is not None:
            widths = tuple(int(w) for w in self.ffn_widths)
            if len(widths) != self.n_layers or any(w < 0 or w > self.d_ff for w in widths):
                raise ConfigError(
                    f"ffn_widths must hold {self.n_layers} widths in [0, {self.d_ff}], "
                    f"got {list(widths)}"
                )
            object.__setattr__(self, "ffn_widths", widths)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_universal(self) -> bool:
        return self.ffn_widths is None

    @property
    def physical_widths(self) -> Widths:
        """FFN width actually stored for each layer."""
        return list(self.ffn_widths) if self.ffn_widths is not None else [self.d_ff] * self.n_layers

    @property
    def granularity_names(self) -> list[str]:
        if len(self.granularities) == len(_PAPER_NAMES):
            return list(_PAPER_NAMES)
        return [f"g{i}" for i in range(len(self.granularities))]

    def uniform_widths(self, granularity: int) -> Widths:
        return [granularity] * self.n_layers

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["granularities"] = list(self.granularities)
        data["ffn_widths"] = list(self.ffn_widths) if self.ffn_widths is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"model config is missing required field(s): {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["granularities"] = tuple(kwargs["granularities"])
        if kwargs.get("ffn_widths") is not None:
            kwargs["ffn_widths"] = tuple(kwargs["ffn_widths"])
        try:
            return cls(**kwargs)
        except TypeError as exc:  # wrong value types, e.g. a string where an int belongs
            raise ConfigError(f"invalid model config: {exc}") from exc


def param_count(config: ModelConfig, widths: Sequence[int] | None = None) -> int:
    """Parameters of the dense model that runs `widths` (default: the stored widths).

    Equal to the number of elements in the physically sliced checkpoint; tested against it.
    """
    widths = list(widths) if widths is not None else config.physical_widths
    d, v = config.d_model, config.vocab_size
    embeddings = v * d + config.max_seq_len * d
    attention = 4 * d * d + d  # qkv + output projection + its norm
    total = embeddings + d + v * d  # final norm + LM head
    for w in widths:
        total += attention
        if w > 0:
            total += 2 * d * w + d  # up + down projection + FFN norm
    return total


_REPEAT = re.compile(r"^(?P<item>[^*]+)\*(?P<count>\d+)$")


def expand_widths_spec(spec: str | Sequence[int | str]) -> list[str]:
    """Split `"S,M,L*2"` (or a list) into one stripped entry per layer, repeats expanded."""
    if isinstance(spec, str):
        raw_items = [item.strip() for item in spec.split(",")]
    else:
        raw_items = [str(item).strip() for item in spec]
    items: list[str] = []
    for item in raw_items:
        if not item:
            raise WidthsError(f"empty entry in widths {spec!r}; write one width per layer")
        match = _REPEAT.match(item)
        if match:
            count = int(match["count"])
            if count <= 0:
                raise WidthsError(f"repeat count must be positive in {item!r}")
            items.extend([match["item"].strip()] * count)
        else:
            items.append(item)
    return items


def run_length_widths(widths: Sequence[int]) -> str:
    """`[8192, 8192, 0, 16384]` -> `"8192*2,0,16384"`: short, and `expand_widths_spec` reads it."""
    parts = []
    for width, group in itertools.groupby(widths):
        count = len(list(group))
        parts.append(f"{width}*{count}" if count > 1 else str(width))
    return ",".join(parts)


def parse_widths(spec: str | Sequence[int | str], config: ModelConfig) -> Widths:
    """Turn `"S,M,L*2,XL,0,512"` (or a list) into one explicit width per layer.

    Names are the granularity names (`S M L XL` for g=4, `g0..g{n-1}` always), integers are raw
    FFN widths (any value up to the layer's stored width), `0` skips the FFN, and `X*N`
    repeats an entry. Errors name the offending layer.
    """
    items = expand_widths_spec(spec)
    if len(items) != config.n_layers:
        raise WidthsError(
            f"widths {spec!r} give {len(items)} entries, but the checkpoint has "
            f"{config.n_layers} layers; write one width per layer, e.g. "
            f"{config.granularity_names[-1]}*{config.n_layers}"
        )
    names = {name.upper(): g for name, g in zip(config.granularity_names, config.granularities)}
    names.update({f"G{i}": g for i, g in enumerate(config.granularities)})
    widths: Widths = []
    for layer, item in enumerate(items):
        if item.upper() in names:
            widths.append(names[item.upper()])
            continue
        try:
            width = int(item)
        except ValueError:
            allowed = ", ".join(config.granularity_names)
            raise WidthsError(
                f"layer {layer}: unknown width {item!r}; use an integer or one of {allowed}"
            ) from None
        widths.append(width)
    validate_widths(widths, config)
    return widths


def validate_widths(widths: Sequence[int], config: ModelConfig) -> Widths:
    """Check an explicit widths list against the checkpoint; return it as a list of ints."""
    widths = list(widths)
    if len(widths) != config.n_layers:
        raise WidthsError(
            f"got {len(widths)} widths, but the checkpoint has {config.n_layers} layers"
        )
    for layer, (width, stored) in enumerate(zip(widths, config.physical_widths)):
        if not isinstance(width, int) or isinstance(width, bool):
            raise WidthsError(f"layer {layer}: width must be an integer, got {width!r}")
        if width < 0 or width > stored:
            raise WidthsError(
                f"layer {layer}: width {width} is outside [0, {stored}] "
                f"(the widest FFN this checkpoint stores for that layer)"
            )
    return widths


def format_widths(widths: Sequence[int], config: ModelConfig) -> str:
    """Compact human form, e.g. `S S M L XL XL`; non-granularity widths stay numeric."""
    by_width = dict(zip(config.granularities, config.granularity_names))
    return " ".join(by_width.get(w, str(w)) for w in widths)
