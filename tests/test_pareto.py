"""Pareto tables: non-dominated rows, hypervolume, results files."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mnm_search.pareto import (
    ResultsError,
    exact_hypervolume,
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


def _grid_hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Independent exact reference: the grid of every coordinate, each cell tested."""
    axes = [np.unique(np.append(points[:, j], reference[j])) for j in range(points.shape[1])]
    total = 0.0
    for cell in itertools.product(*(range(len(a) - 1) for a in axes)):
        low = np.array([a[i] for a, i in zip(axes, cell)])
        if np.any(np.all(points <= low, axis=1)):
            total += float(np.prod([a[i + 1] - a[i] for a, i in zip(axes, cell)]))
    return total


@pytest.mark.parametrize(
    ("k", "n", "seed"), [(1, 5, 0), (2, 9, 1), (3, 8, 2), (3, 12, 3), (4, 7, 4)]
)
def test_exact_hypervolume_matches_a_brute_force_grid(k: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    points = rng.random((n, k))
    points[1] = points[0]  # a duplicate
    if n > 3:
        points[3] = points[2] + 0.05  # a dominated point
    reference = np.full(k, 1.1)
    assert exact_hypervolume(points, reference) == pytest.approx(
        _grid_hypervolume(points, reference), rel=1e-12
    )


def test_exact_hypervolume_edge_cases() -> None:
    reference = np.array([1.0, 1.0, 1.0])
    assert exact_hypervolume(np.empty((0, 3)), reference) == 0.0
    # points on or beyond the reference add nothing
    assert exact_hypervolume(np.array([[1.0, 0.0, 0.0], [2.0, 2.0, 2.0]]), reference) == 0.0
    assert exact_hypervolume(np.array([[0.5, 0.5, 0.5]]), reference) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="do not match"):
        exact_hypervolume(np.zeros((2, 2)), reference)


def test_pareto_tables_need_no_optuna() -> None:
    """The hypervolume is computed here, not with Optuna's private `optuna._hypervolume`."""
    code = "import sys, mnm_search.pareto; print('optuna' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(("n", "k", "levels"), [(200, 2, 5), (300, 3, 4), (50, 2, 1000), (1, 2, 3)])
def test_pareto_mask_matches_the_definition(n: int, k: int, levels: int) -> None:
    """The front-only scan equals the O(n^2) definition, ties and duplicates included
    (few `levels` make many of them)."""
    points = np.random.default_rng(n + k).integers(0, levels, size=(n, k)).astype(float)
    expected = np.zeros(n, dtype=bool)
    for i, p in enumerate(points):
        dominated = (np.all(points <= p, axis=1) & np.any(points < p, axis=1)).any()
        earlier_copy = np.all(points[:i] == p, axis=1).any()
        expected[i] = not dominated and not earlier_copy
    assert pareto_mask(points).tolist() == expected.tolist()
