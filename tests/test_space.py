"""The search space: per-layer choices, skips, interpolation, bounds, heuristic seeds."""

from __future__ import annotations

import itertools

import pytest

from mnm_search.config import ModelConfig
from mnm_search.errors import ConfigError, WidthsError
from mnm_search.space import SearchSpace, interpolated_widths


@pytest.mark.parametrize(
    ("kwargs", "choices"),
    [
        ({}, (8, 16, 32, 64)),
        ({"allow_skip": True}, (0, 8, 16, 32, 64)),
        ({"interpolate": 1}, (8, 12, 16, 24, 32, 48, 64)),
        ({"interpolate": 1, "allow_skip": True}, (0, 8, 12, 16, 24, 32, 48, 64)),
    ],
)
def test_choices_per_layer(tiny_config: ModelConfig, kwargs: dict, choices: tuple) -> None:
    space = SearchSpace.from_config(tiny_config, **kwargs)
    assert space.choices == (choices,) * tiny_config.n_layers
    assert space.size == len(choices) ** tiny_config.n_layers
    assert len(list(space.all_configs())) == space.size


def test_interpolated_widths_are_evenly_spaced() -> None:
    assert interpolated_widths((128, 256, 512), 3) == [128, 160, 192, 224, 256, 320, 384, 448, 512]
    with pytest.raises(ConfigError, match="interpolate"):
        interpolated_widths((8, 16), -1)


def test_bounds_restrict_each_layer(tiny_config: ModelConfig) -> None:
    space = SearchSpace.from_config(
        tiny_config, allow_skip=True, min_widths=[0, 16, 16], max_widths=[16, 64, 32]
    )
    assert space.choices == ((0, 8, 16), (16, 32, 64), (16, 32))
    assert space.smallest() == [0, 16, 16]
    assert space.largest() == [16, 64, 32]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"min_widths": [8, 8]}, WidthsError, "min_widths has 2 entries"),
        ({"min_widths": [32, 8, 8], "max_widths": [16, 64, 64]}, WidthsError, "layer 0"),
        ({"min_widths": [0, 40, 0], "max_widths": [64, 60, 64]}, ConfigError, "layer 1"),
    ],
)
def test_bad_bounds_are_clear_errors(
    tiny_config: ModelConfig, kwargs: dict, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        SearchSpace.from_config(tiny_config, **kwargs)


def test_exported_checkpoint_cannot_be_searched(tiny_config: ModelConfig) -> None:
    exported = ModelConfig(**{**tiny_config.to_dict(), "ffn_widths": (8, 16, 64)})
    with pytest.raises(ConfigError, match="universal"):
        SearchSpace.from_config(exported)


def test_params_round_trip_and_membership(tiny_config: ModelConfig) -> None:
    space = SearchSpace.from_config(tiny_config, allow_skip=True)
    for widths in itertools.islice(space.all_configs(), 0, None, 7):
        params = space.to_params(widths)
        assert params == {f"w{i}": w for i, w in enumerate(widths)}
        assert space.from_params(params) == widths
    assert not space.contains([8, 8])
    assert not space.contains([8, 8, 12])
    with pytest.raises(WidthsError, match="not in the search space"):
        space.to_params([8, 8, 12])


def test_uniform_and_min_slope_configs(tiny_config: ModelConfig) -> None:
    space = SearchSpace.from_config(tiny_config)
    assert space.uniform_configs(tiny_config) == {
        "S": [8, 8, 8],
        "M": [16, 16, 16],
        "L": [32, 32, 32],
        "XL": [64, 64, 64],
    }
    slopes = space.min_slope_configs()
    # (g-1) neighbouring pairs x (L-1) step positions, all distinct and non-uniform
    assert len(slopes) == 3 * 2
    assert len({tuple(w) for w in slopes}) == len(slopes)
    grans = list(tiny_config.granularities)
    for widths in slopes:
        assert widths == sorted(widths), "never shrinks with depth"
        assert len(set(widths)) == 2
        low, high = sorted(set(widths))
        assert grans.index(high) == grans.index(low) + 1, "changes by one step only"


def test_min_slope_respects_bounds(tiny_config: ModelConfig) -> None:
    space = SearchSpace.from_config(tiny_config, max_widths=[16, 64, 64])
    assert all(space.contains(w) for w in space.min_slope_configs())
    assert [16, 32, 32] in space.min_slope_configs()
    assert [32, 64, 64] not in space.min_slope_configs()


def test_dict_round_trip(tiny_config: ModelConfig) -> None:
    space = SearchSpace.from_config(tiny_config, allow_skip=True, interpolate=2)
    assert SearchSpace.from_dict(space.to_dict()) == space
