"""Pareto tables: non-dominated rows, hypervolume, results files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mnm_search.pareto import (
    ResultsError,
    hypervolume,
    pareto_front,
    pareto_mask,
    read_results,
    write_results,
)


def _table(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["trial", "widths", "loss", "latency_ms", "state"])


@pytest.mark.parametrize(
    ("rows", "front_trials"),
    [
        # a clean trade-off: all on the front, sorted by latency
        ([(0, "1", 3.0, 1.0, "COMPLETE"), (1, "2", 2.0, 2.0, "COMPLETE")], [0, 1]),
        # trial 2 is dominated by trial 1 (worse in both)
        (
            [
                (0, "1", 3.0, 1.0, "COMPLETE"),
                (1, "2", 2.0, 2.0, "COMPLETE"),
                (2, "3", 2.5, 2.5, "COMPLETE"),
            ],
            [0, 1],
        ),
        # equal latency, worse loss: dominated; exact duplicates: listed once
        (
            [
                (0, "1", 3.0, 1.0, "COMPLETE"),
                (1, "2", 3.5, 1.0, "COMPLETE"),
                (2, "1", 3.0, 1.0, "COMPLETE"),
            ],
            [0],
        ),
        # failed, running and NaN rows never count
        (
            [
                (0, "1", 3.0, 1.0, "COMPLETE"),
                (1, "2", 1.0, 0.5, "FAIL"),
                (2, "3", np.nan, 0.1, "COMPLETE"),
                (3, "4", 0.1, 0.1, "RUNNING"),
            ],
            [0],
        ),
    ],
)
def test_pareto_front(rows: list[tuple], front_trials: list[int]) -> None:
    front = pareto_front(_table(rows), ("loss", "latency_ms"))
    assert front["trial"].tolist() == front_trials


def test_infeasible_rows_are_not_on_the_front() -> None:
    df = _table([(0, "1", 3.0, 1.0, "COMPLETE"), (1, "2", 1.0, 5.0, "COMPLETE")])
    df["feasible"] = [True, False]
    assert pareto_front(df)["trial"].tolist() == [0]


def test_three_objectives_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    points = rng.random((60, 3))
    mask = pareto_mask(points)
    for i, p in enumerate(points):
        dominated = any(np.all(q <= p) and np.any(q < p) for q in points)
        assert mask[i] == (not dominated)


def test_unknown_objective_column() -> None:
    with pytest.raises(ResultsError, match="memory_bytes"):
        pareto_front(_table([(0, "1", 3.0, 1.0, "COMPLETE")]), ("loss", "memory_bytes"))


def test_hypervolume_2d() -> None:
    df = _table(
        [
            (0, "1", 0.0, 1.0, "COMPLETE"),
            (1, "2", 1.0, 0.0, "COMPLETE"),
            (2, "3", 0.5, 0.5, "COMPLETE"),
        ]
    )
    # scaled to [0, 1], reference (1.1, 1.1): the staircase left to right
    expected = 0.5 * 0.1 + 0.5 * 0.6 + 0.1 * 1.1
    value = hypervolume(df, ["loss", "latency_ms"], ideal=[0, 0], nadir=[1, 1])
    assert value == pytest.approx(expected)
    # dropping the middle point loses exactly its exclusive box
    assert hypervolume(df.iloc[:2], ["loss", "latency_ms"], ideal=[0, 0], nadir=[1, 1]) == (
        pytest.approx(expected - 0.5 * 0.5)
    )
    assert hypervolume(df.iloc[:0], ["loss", "latency_ms"], ideal=[0, 0], nadir=[1, 1]) == 0.0


def test_results_round_trip(tmp_path: Path) -> None:
    trials = _table([(0, "8,16,16", 3.0, 1.0, "COMPLETE"), (1, "8,8,8", 3.5, 1.5, "COMPLETE")])
    trials["params"] = [100, 90]
    front = write_results(tmp_path / "r", trials, ["loss", "latency_ms"], {"seed": 3})
    assert front["trial"].tolist() == [0]
    got_trials, got_front, info = read_results(tmp_path / "r")
    assert got_trials["widths"].tolist() == ["8,16,16", "8,8,8"]
    assert got_front["trial"].tolist() == [0]
    assert info == {"seed": 3}
    assert json.loads((tmp_path / "r" / "run.json").read_text()) == {"seed": 3}
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".")]


def test_read_results_errors(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="does not exist"):
        read_results(tmp_path / "missing")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "trials.csv").write_text("trial\n")
    with pytest.raises(ResultsError, match=r"pareto\.csv, run\.json"):
        read_results(tmp_path / "partial")
