"""DESIGN §2 widths syntax: names, integers, skips, repetition, errors naming the layer."""

from __future__ import annotations

import pytest

from mnm_search.config import ModelConfig, format_widths, parse_widths
from mnm_search.errors import WidthsError

G4 = ModelConfig(
    d_model=32, n_layers=4, n_heads=2, d_ff=64, granularities=(8, 16, 32, 64), max_seq_len=32
)
G3 = ModelConfig(d_model=32, n_layers=3, n_heads=2, d_ff=48, granularities=(12, 24, 48))


@pytest.mark.parametrize(
    ("spec", "config", "expected"),
    [
        ("S,M,L,XL", G4, [8, 16, 32, 64]),
        ("s, m ,l,xl", G4, [8, 16, 32, 64]),
        ("XL*4", G4, [64, 64, 64, 64]),
        ("S M 40 0", G4, [8, 16, 40, 0]),  # the displayed form reads back
        ("S M, L*2", G4, [8, 16, 32, 32]),
        ("S*2,L*2", G4, [8, 8, 32, 32]),
        ("0,S,40,XL", G4, [0, 8, 40, 64]),
        ("g0,g1,g2,g3", G4, [8, 16, 32, 64]),
        ("g0,g1,g2", G3, [12, 24, 48]),
        ("g2*3", G3, [48, 48, 48]),
        (["S", 16, "L", 64], G4, [8, 16, 32, 64]),
    ],
)
def test_parse_widths(spec: str, config: ModelConfig, expected: list[int]) -> None:
    assert parse_widths(spec, config) == expected


@pytest.mark.parametrize(
    ("spec", "config", "message"),
    [
        ("S,M,L", G4, "give 3 entries, but the checkpoint has 4 layers"),
        ("S*5", G4, r"more than 4 entries \(at entry 0, .S\*5.\), but there are only 4 layers"),
        ("S,M,Q,XL", G4, "layer 2: unknown width 'Q'; use an integer or one of S, M, L, XL"),
        ("S,M,L,65", G4, r"layer 3: width 65 is outside \[0, 64\]"),
        ("S,-1,L,XL", G4, r"layer 1: width -1 is outside"),
        ("S,,L,XL", G4, "empty entry"),
        ("S,M,L", G3, "layer 0: unknown width 'S'; use an integer or one of g0, g1, g2"),
        ("S*0,M*4", G4, "repeat count must be positive"),
    ],
)
def test_parse_widths_errors_name_the_problem(spec: str, config: ModelConfig, message: str) -> None:
    with pytest.raises(WidthsError, match=message):
        parse_widths(spec, config)


def test_format_widths_uses_names_where_it_can() -> None:
    assert format_widths([8, 16, 40, 0], G4) == "S M 40 0"
    assert parse_widths(format_widths([8, 16, 40, 0], G4), G4) == [8, 16, 40, 0]
