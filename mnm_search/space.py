"""The search space: which FFN widths each layer may take, and its Optuna-neutral params.

A configuration is one width per layer (0 = FFN skipped). The space maps a configuration to a
params dict `{"w0": 128, "w1": 512, ...}` (one categorical choice per layer) and back, so that
every Optuna sampler, the exhaustive one included, can search it. Optuna itself is imported
only by `study.py`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mnm_search.config import ModelConfig, Widths
from mnm_search.errors import ConfigError, WidthsError

# Depths per width pair at which the minimum-slope heuristic steps up (see min_slope_configs).
MIN_SLOPE_SPLITS = 3


def param_name(layer: int) -> str:
    return f"w{layer}"


def interpolated_widths(granularities: Sequence[int], interpolate: int) -> list[int]:
    """The granularities plus `interpolate` evenly spaced widths between each neighbouring pair."""
    if interpolate < 0:
        raise ConfigError(f"interpolate must be >= 0, got {interpolate}")
    widths = set(granularities)
    for low, high in itertools.pairwise(granularities):
        for j in range(1, interpolate + 1):
            widths.add(round(low + (high - low) * j / (interpolate + 1)))
    return sorted(widths)


@dataclass(frozen=True)
class SearchSpace:
    """Allowed widths per layer (ascending tuples); `n_layers = len(choices)`."""

    choices: tuple[tuple[int, ...], ...]
    granularities: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.choices:
            raise ConfigError("a search space needs at least one layer")
        for layer, options in enumerate(self.choices):
            if not options:
                raise ConfigError(
                    f"layer {layer} has no allowed width; widen its bounds (--min-widths/"
                    f"--max-widths) or allow skips"
                )
            if list(options) != sorted(set(options)) or options[0] < 0:
                raise ConfigError(
                    f"layer {layer}: allowed widths must be ascending and >= 0, got {options}"
                )

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        *,
        allow_skip: bool = False,
        interpolate: int = 0,
        min_widths: Sequence[int] | None = None,
        max_widths: Sequence[int] | None = None,
    ) -> SearchSpace:
        """Space of a universal checkpoint: its granularities (+ interpolated, + 0) per layer.

        `min_widths`/`max_widths` (one entry per layer) bound each layer's choices inclusively;
        a lower bound above 0 also rules out skipping that layer.
        """
        if not config.is_universal:
            raise ConfigError(
                "search needs a universal checkpoint; this one is an exported submodel with "
                f"fixed widths {list(config.physical_widths)}"
            )
        base = interpolated_widths(config.granularities, interpolate)
        if allow_skip:
            base = [0, *base]
        lows = list(min_widths) if min_widths is not None else [0] * config.n_layers
        highs = list(max_widths) if max_widths is not None else [config.d_ff] * config.n_layers
        for name, bounds in (("min_widths", lows), ("max_widths", highs)):
            if len(bounds) != config.n_layers:
                raise WidthsError(
                    f"{name} has {len(bounds)} entries, but the checkpoint has "
                    f"{config.n_layers} layers"
                )
        choices = []
        for layer, (low, high) in enumerate(zip(lows, highs)):
            if low > high:
                raise WidthsError(f"layer {layer}: lower bound {low} is above upper bound {high}")
            choices.append(tuple(w for w in base if low <= w <= high))
        return cls(choices=tuple(choices), granularities=tuple(config.granularities))

    @property
    def n_layers(self) -> int:
        return len(self.choices)

    @property
    def size(self) -> int:
        return math.prod(len(options) for options in self.choices)

    def contains(self, widths: Sequence[int]) -> bool:
        return len(widths) == self.n_layers and all(
            w in options for w, options in zip(widths, self.choices)
        )

    def to_params(self, widths: Sequence[int]) -> dict[str, int]:
        if not self.contains(widths):
            raise WidthsError(
                f"widths {list(widths)} are not in the search space {self.describe()}"
            )
        return {param_name(layer): int(w) for layer, w in enumerate(widths)}

    def from_params(self, params: Mapping[str, Any]) -> Widths:
        return [int(params[param_name(layer)]) for layer in range(self.n_layers)]

    def smallest(self) -> Widths:
        return [options[0] for options in self.choices]

    def largest(self) -> Widths:
        return [options[-1] for options in self.choices]

    def all_configs(self) -> Iterator[Widths]:
        """Every configuration, in lexicographic order (neighbours share long prefixes)."""
        for combo in itertools.product(*self.choices):
            yield list(combo)

    def uniform_configs(self, config: ModelConfig) -> dict[str, Widths]:
        """The uniform S/M/L/XL (g0..) models that this space contains, by name."""
        uniform = {
            name: [g] * self.n_layers
            for name, g in zip(config.granularity_names, config.granularities)
        }
        return {name: widths for name, widths in uniform.items() if self.contains(widths)}

    def min_slope_configs(self, *, max_splits: int = MIN_SLOPE_SPLITS) -> list[Widths]:
        """The paper's heuristic: widths that change slowly and never shrink with depth.

        For each pair of neighbouring widths (a, b), the first k layers use a and the rest b:
        one step of the smallest possible size, at up to `max_splits` depths k spread evenly
        over 1..L-1 (every depth in shallow models). Without that cap a deep model's seeds
        would be the whole budget: SmolLM2's 30 layers and 8 widths give 203 of them, and a
        100-trial search never reached its sampler. Only configs in the space are returned;
        uniform configs are not repeated here.
        """
        widths = sorted({w for options in self.choices for w in options if w > 0})
        depths = range(1, self.n_layers)
        if len(depths) > max_splits:
            step = self.n_layers / (max_splits + 1)
            depths = sorted({round(step * (i + 1)) for i in range(max_splits)})
        configs: list[Widths] = []
        for low, high in itertools.pairwise(widths):
            for k in depths:
                candidate = [low] * k + [high] * (self.n_layers - k)
                if self.contains(candidate):
                    configs.append(candidate)
        return configs

    def describe(self) -> str:
        if all(options == self.choices[0] for options in self.choices):
            return f"{self.n_layers} layers x {list(self.choices[0])}"
        return "; ".join(f"layer {i}: {list(o)}" for i, o in enumerate(self.choices))

    def to_dict(self) -> dict[str, Any]:
        return {
            "choices": [list(options) for options in self.choices],
            "granularities": list(self.granularities),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        return cls(
            choices=tuple(tuple(int(w) for w in options) for options in data["choices"]),
            granularities=tuple(int(g) for g in data["granularities"]),
        )
