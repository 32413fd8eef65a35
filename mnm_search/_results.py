"""The results of a search as files: trials.csv, pareto.csv and run.json, kept current.

`trials_frame` turns a study's trials into the trials table; `ResultsSink` is what a search
calls after each trial: it keeps the files current (throttled only where writing is slow),
reports progress, and stops the study once its total is reached or every trial fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from mnm_search._trials import (
    FAIL_ATTR,
    METRICS_ATTR,
    SEED_ATTR,
    SEED_KIND_ATTR,
    eval_failed,
)
from mnm_search.pareto import (
    METRIC_COLUMNS,
    format_widths_column,
    hypervolume,
    maximised,
    write_results,
)
from mnm_search.space import SearchSpace

# A study whose first this-many trials in a row all failed will not do better: stop it.
MAX_FAILURES_WITHOUT_SUCCESS = 10


@dataclass
class SearchProgress:
    """Reported after every trial this process finishes."""

    n_complete: int
    n_target: int
    n_new: int  # trials finished by this process
    trials_per_s: float
    best_loss: float | None  # best feasible loss so far
    hypervolume: float | None  # of the feasible front, objectives scaled to the ranges seen
    n_failed: int = 0  # trials whose evaluation gave a non-finite value (count to the budget)
    failure: str | None = None  # why the latest failed trial failed, when it is new
    best_speedup: float | None = None  # best feasible predicted speculative speed-up so far
    stage: str | None = None  # what an enumeration is doing, e.g. "racing, chunk 1 812/4096"


def trials_frame(
    trials: Sequence[FrozenTrial], space: SearchSpace, keep: Sequence[str] = ()
) -> pd.DataFrame:
    """One row per trial (surplus claims left out), DESIGN §3 columns first.

    `source` is a seeded trial's label ("uniform M", "min-slope", "lab: E2B") or "sampler";
    `seed_kind` what the seed is ("uniform", "min-slope", "named"; empty for the sampler's).
    Metric columns no trial has are left out, except `loss` and those in `keep` (the
    objectives: readers need them even when every trial failed)."""
    rows = []
    for trial in trials:
        attrs = trial.user_attrs
        metrics = attrs.get(METRICS_ATTR, {})
        # Surplus claims are not part of the study's result; a trial another worker is
        # still sampling has only some of its params yet.
        if attrs.get("surplus") or len(trial.params) != space.n_layers:
            continue
        row: dict[str, Any] = {
            "trial": trial.number,
            "widths": format_widths_column(space.from_params(trial.params)),
        }
        for column in METRIC_COLUMNS:
            row[column] = metrics.get(column)
        row["state"] = trial.state.name
        row["feasible"] = bool(all(v <= 0 for v in trial.constraints.values()))
        row["fidelity"] = metrics.get("fidelity")
        row["source"] = attrs.get(SEED_ATTR, "sampler")
        row["seed_kind"] = _seed_kind(attrs)
        row["worker"] = attrs.get("worker")
        row["fail_reason"] = attrs.get(FAIL_ATTR)
        duration = trial.duration
        row["seconds"] = round(duration.total_seconds(), 4) if duration is not None else None
        rows.append(row)
    columns = ["trial", "widths", *METRIC_COLUMNS, "state", "feasible", "fidelity", "source"]
    columns += ["seed_kind", "worker", "seconds", "fail_reason"]
    frame = pd.DataFrame(rows, columns=columns)
    # Drop metric columns this search never computed (e.g. latency without a profile).
    kept = {"loss", *keep}
    empty = [c for c in METRIC_COLUMNS if c not in kept and frame[c].isna().all()]
    if frame["fail_reason"].isna().all():
        empty.append("fail_reason")
    frame = frame.drop(columns=empty)
    if "params" in frame.columns:  # absent when every trial failed before counting params
        frame["params"] = frame["params"].astype("Int64")
    for column in ("memory_bytes", "lookahead"):
        if column in frame.columns:
            frame[column] = frame[column].astype("Int64")
    return frame.sort_values("trial").reset_index(drop=True)


def _seed_kind(attrs: dict[str, Any]) -> str | None:
    """The seed kind of a trial; studies created before the kind was stored get it from the
    label they stored instead (the one place a label is read back)."""
    if SEED_KIND_ATTR in attrs:
        return attrs[SEED_KIND_ATTR]
    label = attrs.get(SEED_ATTR)
    if label is None:
        return None
    if label == "min-slope":
        return "min-slope"
    if str(label).startswith("uniform "):
        return "uniform"
    return "named" if str(label).startswith("lab: ") else None


def front_hypervolume(
    frame: pd.DataFrame, columns: list[str], maximise: set[str] | None = None
) -> float | None:
    """Hypervolume of the feasible front, each objective scaled to the range seen
    (`maximise`: the maximised columns, default as `pareto_front` has them)."""
    usable = frame[(frame["state"] == "COMPLETE") & frame["feasible"]].dropna(subset=columns)
    if usable.empty:
        return None
    values = usable[columns].astype(float)
    up = maximised(columns, maximise)
    ideal = [values[c].max() if c in up else values[c].min() for c in columns]
    nadir = [values[c].min() if c in up else values[c].max() for c in columns]
    return hypervolume(usable, columns, ideal=ideal, nadir=nadir, maximise=up)


class ResultsSink:
    """Keeps trials.csv, pareto.csv and run.json current while a study runs.

    `after_trial` is the study callback: each finished trial reaches trials.csv at once, so
    a crash loses none; only where a write is slow (huge studies) are writes spaced to take
    at most a tenth of the time (`fast_write_s`: what counts as fast). It also reports
    progress (at most once a second, a new failure at once) and stops the study once it
    holds `n_target` trials, or when its first trials all fail. `write` is the final write.
    """

    def __init__(
        self,
        results_dir: Path,
        space: SearchSpace,
        columns: Sequence[str],
        info: dict[str, Any],
        *,
        n_target: int,
        maximise: set[str] | None = None,
        on_progress: Callable[[SearchProgress], None] | None = None,
        fast_write_s: float = 0.05,
    ) -> None:
        self.results_dir = results_dir
        self.space = space
        self.columns = list(columns)
        self.maximise = maximised(self.columns, maximise)
        self.info = info
        self.n_target = n_target
        self.on_progress = on_progress
        self.fast_write_s = fast_write_s
        self.started = time.monotonic()
        self.n_new = 0  # trials this process completed
        self.consecutive_failures = 0
        self.failures_seen: set[str] = set()
        self.last_write = 0.0
        self.write_seconds = 0.0
        self.last_progress = 0.0

    def frame(self, trials: Sequence[FrozenTrial]) -> pd.DataFrame:
        return trials_frame(trials, self.space, self.columns)

    def write(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Write the three files for `frame` (run.json gets the counts); the Pareto front."""
        info = self.info
        info["n_complete"] = int((frame["state"] == "COMPLETE").sum()) if not frame.empty else 0
        info["n_failed"] = int(frame["fail_reason"].notna().sum()) if "fail_reason" in frame else 0
        info["seed_trials"] = {
            str(row.trial): row.source for row in frame.itertuples() if row.source != "sampler"
        }
        return write_results(self.results_dir, frame, self.columns, info, maximise=self.maximise)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        finished = trial.state in (TrialState.COMPLETE, TrialState.FAIL)  # not a surplus claim
        self._report(study, self._count(trial), in_optimize=True, decided=finished)

    def after_trials(self, study: optuna.Study, trials: Sequence[FrozenTrial]) -> None:
        """`after_trial` for trials added in one batch, outside `study.optimize` (an
        enumeration decides many configurations at once)."""
        reasons = [self._count(trial) for trial in trials]
        reason = next((r for r in reversed(reasons) if r), None)
        self._report(study, reason, in_optimize=False, decided=True)

    def stage(self, study: optuna.Study, text: str) -> None:
        """Progress of work that decides no trial yet (an enumeration's pass)."""
        if self.on_progress is None or time.monotonic() - self.last_progress < 1:
            return
        self.last_progress = time.monotonic()
        n_done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        self.on_progress(
            SearchProgress(
                n_complete=n_done,
                n_target=self.n_target,
                n_new=self.n_new,
                trials_per_s=self.n_new / max(time.monotonic() - self.started, 1e-9),
                best_loss=None,
                hypervolume=None,
                stage=text,
            )
        )

    def _count(self, trial: FrozenTrial) -> str | None:
        """Count a finished trial; the reason it failed, if it did."""
        reason = trial.user_attrs.get(FAIL_ATTR) if trial.state == TrialState.FAIL else None
        if trial.state == TrialState.COMPLETE:
            self.n_new += 1
            self.consecutive_failures = 0
        elif reason is not None:
            self.consecutive_failures += 1
        return reason

    def _report(
        self, study: optuna.Study, reason: str | None, *, in_optimize: bool, decided: bool
    ) -> None:
        trials = study.get_trials(deepcopy=False)
        n_complete = sum(t.state == TrialState.COMPLETE for t in trials)
        n_failed = sum(eval_failed(t) for t in trials)
        finished = n_complete + n_failed >= self.n_target
        # Study.stop works only inside optimize; an enumeration ends by itself.
        if finished and in_optimize:
            study.stop()
        if (
            in_optimize
            and n_complete == 0
            and self.consecutive_failures >= MAX_FAILURES_WITHOUT_SUCCESS
        ):
            study.stop()  # run_search raises once the files are written
        new_failure = reason if reason is not None and reason not in self.failures_seen else None
        if new_failure is not None:
            self.failures_seen.add(new_failure)
        now = time.monotonic()
        show = self.on_progress is not None and (
            now - self.last_progress > 1 or finished or new_failure is not None
        )
        due = decided and (
            self.write_seconds < self.fast_write_s
            or now - self.last_write >= 10 * self.write_seconds
        )
        if not (show or due):
            return
        frame = self.frame(trials)
        if due:
            self.write(frame)
            self.write_seconds = time.monotonic() - now
            self.last_write = time.monotonic()
        if show and self.on_progress is not None:
            self.last_progress = now
            feasible = frame[(frame["state"] == "COMPLETE") & frame["feasible"]]
            best_speedup = feasible["speedup"].max() if "speedup" in feasible else None
            self.on_progress(
                SearchProgress(
                    n_complete=n_complete,
                    n_target=self.n_target,
                    n_new=self.n_new,
                    trials_per_s=self.n_new / max(now - self.started, 1e-9),
                    best_loss=float(feasible["loss"].min()) if not feasible.empty else None,
                    hypervolume=front_hypervolume(frame, self.columns, self.maximise),
                    n_failed=n_failed,
                    failure=new_failure,
                    best_speedup=None if pd.isna(best_speedup) else float(best_speedup),
                )
            )
