"""Pareto tables from search results (pure pandas/numpy; no plotting).

Objectives are minimised, except the columns in `MAXIMISED_COLUMNS` (speculative decoding's
acceptance and predicted speed-up), which are maximised wherever a front is computed (pass
`maximise=` to override). A front of one objective is its best row. Result directories
(DESIGN §3) hold `trials.csv`, `pareto.csv` and `run.json`; `widths` is a comma-separated
string of ints, one per layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mnm_search._files import atomic_write_text, json_text
from mnm_search.errors import MnmError
from mnm_search.options import MAXIMISED_COLUMNS

TRIALS_FILE = "trials.csv"
PARETO_FILE = "pareto.csv"
RUN_FILE = "run.json"


class ResultsError(MnmError):
    """A results directory is missing, or one of its files is unreadable or malformed."""


# Columns every results table has, and the numeric ones it may have (DESIGN §3).
_REQUIRED_COLUMNS = ("trial", "widths", "loss", "state")
# What a trial can measure (trials.csv and pareto.csv columns, in this order).
METRIC_COLUMNS = (
    "loss",
    "params",
    "latency_ms",
    "memory_bytes",
    "kl",
    "agreement",
    "disagreement",
    "acceptance",
    "speedup",
    "lookahead",
)
DIRECTIONS = ("minimize", "maximize")  # Optuna's spelling, as run.json records them
_NUMERIC_COLUMNS = (*METRIC_COLUMNS, "seconds")
_STATES = ("COMPLETE", "FAIL", "PRUNED", "RUNNING", "WAITING")
_FIX = "re-run the same `mnm search` command to rewrite it from the study's storage"


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

    Of several identical points only the first is kept. Rows are visited in lexicographic
    order, where whatever dominates (or repeats) a point comes before it; by transitivity some
    kept point then dominates it too, so each point is checked against the front found so far
    only: O(n * front) instead of O(n^2) (an enumerated study has thousands of trials).
    """
    keep = np.zeros(points.shape[0], dtype=bool)
    front = np.empty((0, points.shape[1]), dtype=points.dtype)
    # lexsort sorts by its last key first, and stably: equal points keep their row order.
    for i in np.lexsort(points.T[::-1]):
        if np.all(front <= points[i], axis=1).any():  # dominated by, or equal to, a kept one
            continue
        keep[i] = True
        front = np.vstack([front, points[i]])
    return keep


def maximised(objectives: Sequence[str], maximise: Collection[str] | None = None) -> set[str]:
    """The objective columns to maximise: `maximise`, or by default those of
    `MAXIMISED_COLUMNS` among `objectives`."""
    chosen = MAXIMISED_COLUMNS if maximise is None else frozenset(maximise)
    return {c for c in objectives if c in chosen}


def _signs(objectives: Sequence[str], maximise: Collection[str] | None) -> np.ndarray:
    """+1 per minimised objective, -1 per maximised one: points * signs are all minimised."""
    up = maximised(objectives, maximise)
    return np.array([-1.0 if c in up else 1.0 for c in objectives])


def pareto_front(
    df: pd.DataFrame,
    objectives: Sequence[str] = ("loss", "latency_ms"),
    *,
    maximise: Collection[str] | None = None,
) -> pd.DataFrame:
    """Non-dominated rows of `df` (complete and feasible ones only), sorted by the 2nd objective
    (then the 1st); a maximised column sorts best first.

    `maximise`: the objective columns where higher is better (default: `MAXIMISED_COLUMNS`).
    With one objective the front is its best row (the first of equal ones).
    """
    objectives = list(objectives)
    rows = _usable(df, objectives)
    if rows.empty:
        return rows.copy()
    signs = _signs(objectives, maximise)
    mask = pareto_mask(rows[objectives].to_numpy(dtype=float) * signs)
    front = rows[mask]
    order = objectives[1:] + objectives[:1] if len(objectives) > 1 else objectives
    up = maximised(objectives, maximise)
    return front.sort_values(order, ascending=[c not in up for c in order]).reset_index(drop=True)


def hypervolume(
    df: pd.DataFrame,
    objectives: Sequence[str],
    *,
    ideal: Sequence[float],
    nadir: Sequence[float],
    margin: float = 0.1,
    maximise: Collection[str] | None = None,
) -> float:
    """Hypervolume of the usable rows after scaling each objective to [0, 1] by ideal/nadir.

    `ideal` is the best value of each objective (the highest for a maximised one, see
    `pareto_front`), `nadir` the worst. The reference point sits `margin` beyond the nadir
    in every scaled objective, so the extreme points of a front still count. Comparable only
    under the same ideal/nadir.
    """
    rows = _usable(df, objectives)
    if rows.empty:
        return 0.0
    signs = _signs(objectives, maximise)
    low = np.asarray(ideal, dtype=float) * signs
    span = np.asarray(nadir, dtype=float) * signs - low
    span[span <= 0] = 1.0
    scaled = (rows[list(objectives)].to_numpy(dtype=float) * signs - low) / span
    reference = np.full(len(objectives), 1.0 + margin)
    inside = np.all(scaled < reference, axis=1)
    if not inside.any():
        return 0.0
    return exact_hypervolume(scaled[inside], reference)


def exact_hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by `points` [n, k] (minimising) and bounded by `reference` [k].

    Exact, by slicing along the last objective (HSO): a 2-objective front is one sorted
    sweep, each further objective multiplies the work by n. Search fronts have a few
    objectives and at most hundreds of points, so this is instant; it replaces Optuna's
    private `optuna._hypervolume`. Points not below the reference in every objective add
    nothing.
    """
    points = np.asarray(points, dtype=float)
    reference = np.asarray(reference, dtype=float)
    if points.ndim != 2 or points.shape[1] != reference.shape[0]:
        raise ValueError(f"points {points.shape} do not match the reference {reference.shape}")
    points = points[np.all(points < reference, axis=1)]
    if points.shape[0] == 0:
        return 0.0
    return float(_hso(points[pareto_mask(points)], reference))


def _hso(points: np.ndarray, reference: np.ndarray) -> float:
    """Hypervolume of `points`, all strictly below `reference` (dominated ones add nothing)."""
    n, k = points.shape
    if n == 0:
        return 0.0
    if k == 1:
        return float(reference[0] - points[:, 0].min())
    if k == 2:
        order = np.argsort(points[:, 0], kind="stable")
        xs, ys = points[order, 0], points[order, 1]
        edges = np.append(xs[1:], reference[0])
        heights = reference[1] - np.minimum.accumulate(ys)
        return float(np.sum((edges - xs) * heights))
    # Slabs between consecutive values of the last objective: in each, the points at or
    # below it dominate a (k-1)-dimensional cross-section.
    order = np.argsort(points[:, -1], kind="stable")
    ordered = points[order]
    levels = np.append(ordered[1:, -1], reference[-1])
    total = 0.0
    for i in range(n):
        depth = levels[i] - ordered[i, -1]
        if depth <= 0:
            continue
        below = ordered[: i + 1, :-1]
        if k > 3:  # the 2-objective sweep needs no filtering; deeper slicing is cheaper with it
            below = below[pareto_mask(below)]
        total += depth * _hso(below, reference[:-1])
    return total


def format_widths_column(widths: Sequence[int]) -> str:
    return ",".join(str(int(w)) for w in widths)


def parse_widths_column(text: str) -> list[int]:
    return [int(w) for w in str(text).split(",")]


def objective_maximise(run_info: dict[str, Any], columns: Sequence[str]) -> set[str]:
    """The maximised ones of `columns` (objective columns of a search): as run.json's
    `objective_directions` records them, else (results of an older mnm) by column name."""
    recorded = run_info.get("objective_columns")
    directions = run_info.get("objective_directions")
    if isinstance(recorded, list) and isinstance(directions, list):
        up = {c for c, d in zip(recorded, directions) if d == "maximize"}
        return {c for c in columns if c in up}
    return maximised(columns)


def write_results(
    results_dir: str | Path,
    trials: pd.DataFrame,
    objectives: Sequence[str],
    run_info: dict[str, Any],
    *,
    maximise: Collection[str] | None = None,
) -> pd.DataFrame:
    """Write trials.csv, pareto.csv (front over `objectives` columns) and run.json atomically."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    front = pareto_front(trials, objectives, maximise=maximise) if not trials.empty else trials
    atomic_write_text(results_dir / TRIALS_FILE, trials.to_csv(index=False))
    atomic_write_text(results_dir / PARETO_FILE, front.to_csv(index=False))
    atomic_write_text(results_dir / RUN_FILE, json_text(run_info) + "\n")
    return front


def read_results(results_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(trials, pareto, run_info) of a results directory written by `mnm search`, validated."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ResultsError(f"results directory {results_dir} does not exist")
    paths = [results_dir / name for name in (TRIALS_FILE, PARETO_FILE, RUN_FILE)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ResultsError(
            f"{results_dir} lacks {', '.join(missing)}; is it an `mnm search` results directory?"
        )
    return read_trials(paths[0]), read_trials(paths[1]), read_run_info(paths[2])


def read_trials(path: str | Path) -> pd.DataFrame:
    """A trials.csv or pareto.csv, validated: required columns, unique integer trial numbers,
    widths of one length, finite numeric metrics, a loss for every COMPLETE trial."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype={"widths": str, "state": str})
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        # ValueError covers a bad encoding and a failed dtype conversion.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ResultsError(f"{path} is not a readable table ({first}); {_FIX}") from None
    missing = [c for c in _REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ResultsError(
            f"{path} lacks the column(s) {', '.join(missing)} (it has "
            f"{', '.join(map(str, frame.columns)) or 'none'}); {_FIX}"
        )

    def bad(row: Any, column: str, value: Any, expected: str) -> ResultsError:
        if isinstance(value, np.generic):
            value = value.item()
        shown = "empty" if pd.isna(value) else repr(str(value))
        # Line numbers as an editor shows them: the header is line 1.
        return ResultsError(
            f"{path}, line {int(row) + 2}: {column} is {shown}, expected {expected}; {_FIX}"
        )

    for column in (c for c in _NUMERIC_COLUMNS if c in frame.columns):
        numbers = pd.to_numeric(frame[column], errors="coerce")
        wrong = (numbers.isna() & frame[column].notna()) | numbers.abs().eq(math.inf)
        for row in frame.index[wrong]:
            raise bad(row, column, frame[column][row], "a finite number")
        frame[column] = numbers
    trials = pd.to_numeric(frame["trial"], errors="coerce")
    for row in frame.index[trials.isna() | (trials != trials.round())]:
        raise bad(row, "trial", frame["trial"][row], "a trial number")
    frame["trial"] = trials.astype(int)
    duplicated = frame["trial"][frame["trial"].duplicated()]
    if not duplicated.empty:
        raise ResultsError(f"{path}: trial {duplicated.iloc[0]} appears twice; {_FIX}")
    lengths = set()
    for row, text in frame["widths"].items():
        widths = _parse_widths_cell(text)
        if widths is None:
            raise bad(row, "widths", text, "comma-separated integer widths >= 0")
        lengths.add(len(widths))
    if len(lengths) > 1:
        raise ResultsError(f"{path}: the widths column mixes {sorted(lengths)} layers; {_FIX}")
    for row, state in frame["state"].items():
        if state not in _STATES:
            raise bad(row, "state", state, f"one of {', '.join(_STATES)}")
    for row in frame.index[frame["loss"].isna() & (frame["state"] == "COMPLETE")]:
        raise bad(row, "loss", frame["loss"][row], "a finite number for a COMPLETE trial")
    if "feasible" in frame.columns:
        flags = frame["feasible"].map(_as_bool)
        for row in frame.index[flags.isna()]:
            raise bad(row, "feasible", frame["feasible"][row], "True or False")
        frame["feasible"] = flags.astype(bool)
    return frame


def _parse_widths_cell(text: Any) -> list[int] | None:
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        return None
    return widths if all(w >= 0 for w in widths) else None


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    return {"true": True, "false": False}.get(str(value).strip().lower())


# run.json keys that readers use -> the types they must have (each may also be null).
_RUN_KEYS: dict[str, tuple[type, ...]] = {
    "study": (str,),
    "command": (str,),
    "checkpoint": (str,),
    "fingerprint": (str,),
    "profile": (str,),
    "family": (str,),
    "target": (str, dict),
    "objectives": (list,),
    "objective_columns": (list,),
    "objective_directions": (list,),
    "constraints": (dict,),
    "space": (dict,),
    "step": (int,),
    "n_complete": (int,),
}


def read_run_info(path: str | Path) -> dict[str, Any]:
    """run.json, validated: a JSON object whose known keys have the types readers expect."""
    path = Path(path)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{path} is not readable JSON ({exc}); {_FIX}") from None
    if not isinstance(info, dict):
        raise ResultsError(f"{path} holds a JSON {type(info).__name__}, not an object; {_FIX}")
    for key, types in _RUN_KEYS.items():
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            names = " or ".join(t.__name__ for t in types)
            raise ResultsError(f"{path}: {key} is {_short(value)}, expected {names}; {_FIX}")
    for key in ("objectives", "objective_columns"):
        items = info.get(key)
        if items is not None and (not items or not all(isinstance(i, str) for i in items)):
            raise ResultsError(
                f"{path}: {key} is {_short(items)}, expected a list of names; {_FIX}"
            )
    directions = info.get("objective_directions")
    columns = info.get("objective_columns")
    if directions is not None and (
        not all(d in DIRECTIONS for d in directions)
        or (columns is not None and len(directions) != len(columns))
    ):
        raise ResultsError(
            f"{path}: objective_directions is {_short(directions)}, expected one of "
            f"{' or '.join(DIRECTIONS)} per objective column; {_FIX}"
        )
    for name, limit in (info.get("constraints") or {}).items():
        if (
            isinstance(limit, bool)
            or not isinstance(limit, (int, float))
            or not math.isfinite(limit)
        ):
            raise ResultsError(
                f"{path}: constraint {name} is {_short(limit)}, expected a finite number; {_FIX}"
            )
    grans = (info.get("space") or {}).get("granularities")
    if grans is not None and (
        not isinstance(grans, list)
        or not grans
        or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grans)
    ):
        raise ResultsError(
            f"{path}: space.granularities is {_short(grans)}, expected positive integers; {_FIX}"
        )
    return info


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
