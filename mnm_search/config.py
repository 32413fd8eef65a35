"""Typed, validated model configuration and the widths syntax shared by every command.

Widths are always explicit: a list with one FFN hidden width per layer (0 = FFN skipped).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mnm_search.errors import ConfigError, WidthsError

Widths = list[int]

# Names for g=4 follow the paper (S, M, L, XL); `g0..g{n-1}` works for any g.
_PAPER_NAMES = ("S", "M", "L", "XL")

# Absolute caps on each size, far above any real model (Gemma 3n E4B: 35 layers, d_model
# 2048, d_ff 16384, vocab 262144). They refuse a tiny config.json that asks for astronomic
# tensors before anything is allocated; `check_fits_in_memory` then bounds the total.
MAX_LAYERS = 4096
SIZE_CAPS = {
    "d_model": 65_536,
    "n_layers": MAX_LAYERS,
    "n_heads": 4096,
    "d_ff": 1 << 20,
    "vocab_size": 1 << 22,
    "max_seq_len": 1 << 20,
}
MAX_GRANULARITIES = 64


def is_int(value: object) -> bool:
    """A real integer: `True` and `3.0` are not (JSON and YAML give both easily)."""
    return isinstance(value, int) and not isinstance(value, bool)


def physical_memory_bytes() -> int | None:
    """Total RAM of this machine, or None where the OS does not say."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(size) < 1024 or unit == "PiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} PiB"  # unreachable; keeps type checkers calm


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
        for name, cap in SIZE_CAPS.items():
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            if value > cap:
                raise ConfigError(
                    f"{name} is {value:,}, above the limit of {cap:,}; this config.json does "
                    f"not describe a model mnm can hold"
                )
        if (
            isinstance(self.norm_eps, bool)
            or not isinstance(self.norm_eps, (int, float))
            or not math.isfinite(self.norm_eps)
            or not 0 < self.norm_eps < 1
        ):
            raise ConfigError(
                f"norm_eps must be a finite number in (0, 1), e.g. 1e-5, got {self.norm_eps!r}"
            )
        object.__setattr__(self, "norm_eps", float(self.norm_eps))
        if not isinstance(self.family, str) or not self.family:
            raise ConfigError(f"family must be a non-empty string, got {self.family!r}")
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        grans = _int_tuple("granularities", self.granularities, limit=MAX_GRANULARITIES)
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
            widths = _int_tuple("ffn_widths", self.ffn_widths, limit=self.n_layers)
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
        try:
            return cls(**kwargs)
        except TypeError as exc:  # e.g. a field given twice; types are checked in the class
            raise ConfigError(f"invalid model config: {exc}") from exc


def _int_tuple(name: str, values: object, *, limit: int) -> tuple[int, ...]:
    """`values` as a tuple of integers; refuse strings, bools, floats, nested containers."""
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Sequence):
        raise ConfigError(f"{name} must be a list of integers, got {values!r:.200}")
    if len(values) > limit:
        raise ConfigError(f"{name} holds {len(values):,} entries, at most {limit:,} are allowed")
    for index, value in enumerate(values):
        if not is_int(value):
            raise ConfigError(f"{name}[{index}] must be an integer, got {value!r:.100}")
    return tuple(values)


def check_fits_in_memory(
    config: ModelConfig, *, bytes_per_param: int = 8, where: str = "the model config"
) -> int:
    """Refuse a config whose weights cannot fit in this machine's RAM; return the estimate.

    Computed from the config alone, before any tensor is allocated. The default 8 bytes per
    parameter counts the stored copy and the float32 copy that loading makes.
    """
    params = param_count(config)
    needed = params * bytes_per_param
    total = physical_memory_bytes()
    if total is not None and needed > total:
        largest = max(SIZE_CAPS, key=lambda name: getattr(config, name) / SIZE_CAPS[name])
        raise ConfigError(
            f"{where} describes {params:,} parameters ({largest} is "
            f"{getattr(config, largest):,}), about {format_bytes(needed)} to load, but this "
            f"machine has {format_bytes(total)} of memory; check the config's sizes or use a "
            f"larger machine"
        )
    return needed


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


def expand_widths_spec(
    spec: str | Sequence[int | str], *, max_entries: int = MAX_LAYERS
) -> list[str]:
    """Split `"S,M,L*2"` or `"S M L*2"` (or a list) into one entry per layer, repeats expanded.

    At most `max_entries` entries (pass the number of layers): a repeat count is checked
    before it is expanded, so `S*99999999999` is an error, not a memory exhaustion.
    """
    if isinstance(spec, str):
        # Commas or spaces separate entries, so the displayed form `S S M L` reads back.
        raw_items = []
        for part in spec.split(","):
            raw_items.extend(part.split() or [""])
    else:
        raw_items = [str(item).strip() for item in spec]
    items: list[str] = []
    for position, item in enumerate(raw_items):
        if not item:
            raise WidthsError(f"empty entry in widths {spec!r:.200}; write one width per layer")
        match = _REPEAT.match(item)
        count = 1
        if match:
            digits = match["count"]
            # int() of thousands of digits is itself slow/refused; any count this long is wrong.
            count = int(digits) if len(digits) <= 12 else max_entries + 1
            if count <= 0:
                raise WidthsError(f"repeat count must be positive in {item!r}")
        if len(items) + count > max_entries:
            raise WidthsError(
                f"widths give more than {max_entries:,} entries (at entry {position}, "
                f"{item[:40]!r}), but there are only {max_entries:,} layers; write one width "
                f"per layer"
            )
        items.extend([match["item"].strip() if match else item] * count)
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
    items = expand_widths_spec(spec, max_entries=config.n_layers)
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
