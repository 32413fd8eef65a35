"""Pareto tables from search results (pure pandas/numpy; no plotting).

Every objective is minimised. Result directories (DESIGN §3) hold `trials.csv`, `pareto.csv`
and `run.json`; `widths` is a comma-separated string of ints, one per layer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from optuna._hypervolume import compute_hypervolume

from mnm_search._files import atomic_write_text
from mnm_search.errors import MnmError

TRIALS_FILE = "trials.csv"
PARETO_FILE = "pareto.csv"
RUN_FILE = "run.json"


class ResultsError(MnmError):
    """A results directory is missing or unreadable."""


def _usable(df: pd.DataFrame, objectives: Sequence[str]) -> pd.DataFrame:
    """Complete, feasible rows with every objective known."""
    missing = [c for c in objectives if c not in df.columns]
    if missing:
        raise ResultsError(
            f"objective column(s) {', '.join(missing)} not in the table "
            f"(columns: {', '.join(map(str, df.columns))})"
        )
    rows = df
    if "state" in rows.columns:
        rows = rows[rows["state"] == "COMPLETE"]
    if "feasible" in rows.columns:
        rows = rows[rows["feasible"].astype(bool)]
    return rows.dropna(subset=list(objectives))


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated rows of `points` [n, k] (minimising every column).

    Of several identical points only the first is kept.
    """
    n = points.shape[0]
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        if not keep[i]:
            continue
        others = points[keep]
        dominated = np.all(others <= points[i], axis=1) & np.any(others < points[i], axis=1)
        if dominated.any():
            keep[i] = False
            continue
        # Drop later duplicates of this point so the front lists each point once.
        same = np.all(points == points[i], axis=1)
        same[: i + 1] = False
        keep &= ~same
    return keep


def pareto_front(
    df: pd.DataFrame, objectives: Sequence[str] = ("loss", "latency_ms")
) -> pd.DataFrame:
    """Non-dominated rows of `df` (complete and feasible ones only), sorted by the 2nd objective."""
    objectives = list(objectives)
    rows = _usable(df, objectives)
    if rows.empty:
        return rows.copy()
    mask = pareto_mask(rows[objectives].to_numpy(dtype=float))
    front = rows[mask]
    order = objectives[1:] + objectives[:1] if len(objectives) > 1 else objectives
    return front.sort_values(order).reset_index(drop=True)


def hypervolume(
    df: pd.DataFrame,
    objectives: Sequence[str],
    *,
    ideal: Sequence[float],
    nadir: Sequence[float],
    margin: float = 0.1,
) -> float:
    """Hypervolume of the usable rows after scaling each objective to [0, 1] by ideal/nadir.

    The reference point sits `margin` beyond the nadir in every scaled objective, so the
    extreme points of a front still count. Comparable only under the same ideal/nadir.
    """
    rows = _usable(df, objectives)
    if rows.empty:
        return 0.0
    low = np.asarray(ideal, dtype=float)
    span = np.asarray(nadir, dtype=float) - low
    span[span <= 0] = 1.0
    scaled = (rows[list(objectives)].to_numpy(dtype=float) - low) / span
    reference = np.full(len(objectives), 1.0 + margin)
    inside = np.all(scaled < reference, axis=1)
    if not inside.any():
        return 0.0
    return float(compute_hypervolume(scaled[inside], reference))


def format_widths_column(widths: Sequence[int]) -> str:
    return ",".join(str(int(w)) for w in widths)


def parse_widths_column(text: str) -> list[int]:
    return [int(w) for w in str(text).split(",")]


def write_results(
    results_dir: str | Path,
    trials: pd.DataFrame,
    objectives: Sequence[str],
    run_info: dict[str, Any],
) -> pd.DataFrame:
    """Write trials.csv, pareto.csv (front over `objectives` columns) and run.json atomically."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    front = pareto_front(trials, objectives) if not trials.empty else trials
    atomic_write_text(results_dir / TRIALS_FILE, trials.to_csv(index=False))
    atomic_write_text(results_dir / PARETO_FILE, front.to_csv(index=False))
    atomic_write_text(results_dir / RUN_FILE, json.dumps(run_info, indent=2) + "\n")
    return front


def read_results(results_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(trials, pareto, run_info) of a results directory written by `mnm search`."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ResultsError(f"results directory {results_dir} does not exist")
    paths = [results_dir / name for name in (TRIALS_FILE, PARETO_FILE, RUN_FILE)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ResultsError(
            f"{results_dir} lacks {', '.join(missing)}; is it an `mnm search` results directory?"
        )
    try:
        trials = pd.read_csv(paths[0], dtype={"widths": str})
        front = pd.read_csv(paths[1], dtype={"widths": str})
        run_info = json.loads(paths[2].read_text())
    except (pd.errors.ParserError, pd.errors.EmptyDataError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{results_dir} holds a corrupt results file: {exc}") from exc
    return trials, front, run_info
