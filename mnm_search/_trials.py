"""The parts of a search that decide what a trial does, knowing no model family.

- what a trial stores (its metrics and, for a failed one, why) and how to read it back;
- `TrialClaims`: which trials count toward the requested total, when a new trial is surplus,
  and whether a configuration was already evaluated (samplers propose repeats);
- `FidelityScreen`: `--fidelity-tokens` screening, which skips the full evaluation of a
  configuration that cannot reach the Pareto front.
"""

from __future__ import annotations

import contextlib
import math
import socket
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnm_search._files import pid_alive

# Every metric of a trial goes into one user attr: each storage write costs an fsync.
METRICS_ATTR = "metrics"
# Why a trial failed (a non-finite loss or cost); such trials count toward the budget.
FAIL_ATTR = "fail_reason"
# The label and kind of a seeded trial (`SeedConfig.label`, `SeedConfig.kind`).
SEED_ATTR = "seed"
SEED_KIND_ATTR = "seed_kind"
# A worker tags its trial milliseconds after Optuna creates it; a trial still untagged after
# this long belongs to a worker killed in between.
STALE_WITHOUT_OWNER = timedelta(seconds=10)
# The quality metrics a duplicate configuration copies from its earlier evaluation.
QUALITY_COLUMNS = ("loss", "kl", "agreement", "disagreement")


def trial_metrics(trial: FrozenTrial) -> dict[str, Any]:
    """The metrics a trial stored (empty for one that never got that far)."""
    return trial.user_attrs.get(METRICS_ATTR, {})


def eval_failed(trial: FrozenTrial) -> bool:
    """A trial that failed on a non-finite value (not one of a killed worker)."""
    return trial.state == TrialState.FAIL and FAIL_ATTR in trial.user_attrs


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials whose worker process on this host is gone; return their numbers."""
    host = socket.gethostname()
    now = datetime.now()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker")
        dead = False
        if owner is None:
            started = trial.datetime_start
            if started is not None:
                current = now if started.tzinfo is None else datetime.now(started.tzinfo)
                dead = current - started > STALE_WITHOUT_OWNER
        else:
            owner_host, _, pid = str(owner).rpartition(":")
            dead = owner_host == host and pid.isdigit() and not pid_alive(int(pid))
        if dead:
            try:
                study.tell(trial.number, state=TrialState.FAIL)
                failed.append(trial.number)
            except (RuntimeError, ValueError):
                pass  # another worker got there first
    return failed


def fail_running(study: optuna.Study, worker: str) -> None:
    """Fail this worker's RUNNING trials: an interrupt that hits sampling or a storage write
    escapes Optuna's own handling and would leave the trial RUNNING for good."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("worker") == worker:
            with contextlib.suppress(RuntimeError, ValueError):  # finished meanwhile
                study.tell(trial.number, state=TrialState.FAIL)


class TrialClaims:
    """Which trials of a (possibly shared) study count toward its total of `n_target`.

    A trial counts once it is complete, or failed on a non-finite value; trials of killed
    workers are failed (and do not count) so that a re-run fills the gap. Each new trial
    claims its place before it is evaluated: when the trials numbered before it already make
    up the total (several workers raced for the last places), it is marked surplus and the
    study stops. `known` finds a configuration some trial already evaluated in full.
    """

    def __init__(self, study: optuna.Study, n_target: int) -> None:
        self.study = study
        self.n_target = n_target

    def complete_count(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def done_count(self) -> int:
        """Trials that used up budget: complete ones and those that failed on a bad value."""
        trials = self.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)
        )
        return sum(t.state == TrialState.COMPLETE or eval_failed(t) for t in trials)

    def claim(self, trial: optuna.Trial) -> None:
        """Claim a place for `trial`; raise TrialPruned (and stop the study) if none is left."""
        ahead = self._claimed_ahead(trial.number)
        # Before calling this trial surplus, make sure no claim ahead of it is an orphan of a
        # killed worker: owned orphans fail at once, untagged ones once they are stale.
        deadline = time.monotonic() + STALE_WITHOUT_OWNER.total_seconds() + 2
        while len(ahead) >= self.n_target and any(t.state == TrialState.RUNNING for t in ahead):
            if fail_dead_trials(self.study):
                ahead = self._claimed_ahead(trial.number)
                continue
            untagged = any(
                t.state == TrialState.RUNNING and "worker" not in t.user_attrs for t in ahead
            )
            if not untagged or time.monotonic() > deadline:
                break
            time.sleep(0.5)
            ahead = self._claimed_ahead(trial.number)
        if len(ahead) >= self.n_target:
            trial.set_user_attr("surplus", True)
            self.study.stop()
            raise optuna.TrialPruned("surplus trial: the study already has its total")

    def _claimed_ahead(self, number: int) -> list[FrozenTrial]:
        """The trials numbered before `number` that are done, or running (claimed)."""
        return [
            t
            for t in self.study.get_trials(
                deepcopy=False,
                states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL),
            )
            if t.number < number
            and not t.user_attrs.get("surplus")
            and (t.state != TrialState.FAIL or eval_failed(t))
        ]

    def known(self, params: dict[str, Any]) -> dict[str, Any] | None:
        """The quality metrics (and `duplicate_of`) of a full evaluation of `params`, if any."""
        for other in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            metrics = trial_metrics(other)
            if other.params == params and metrics.get("fidelity") == "full":
                known = {c: metrics.get(c) for c in QUALITY_COLUMNS}
                return {**known, "fidelity": "full", "duplicate_of": other.number}
        return None


class FidelityScreen:
    """Multi-fidelity screening (`--fidelity-tokens`): a cheap loss on a few tokens first.

    `screener` evaluates on the small subset; the gap between full and subset loss is learnt
    from the configurations evaluated in full (`record`). Once five gaps are known, a
    configuration whose optimistic loss (subset loss + mean gap - 3 spreads) would still be
    dominated by a feasible, fully evaluated trial on `columns` cannot reach the front: it
    keeps the predicted loss (fidelity "subset") instead of a full evaluation.
    """

    MIN_GAPS = 5

    def __init__(self, screener: Any, study: optuna.Study, columns: Sequence[str]) -> None:
        self.screener = screener
        self.study = study
        self.columns = list(columns)
        self.gaps: list[float] = []  # full - subset loss of fully evaluated configurations

    def screen(
        self,
        widths: Sequence[int],
        metrics: dict[str, Any],
        interruptible: Callable[[], contextlib.AbstractContextManager[Any]],
    ) -> tuple[float, float | None]:
        """(subset loss, predicted loss or None when the configuration needs a full
        evaluation). `metrics` holds the configuration's costs; `interruptible()` wraps the
        evaluation (signals may raise there)."""
        with interruptible():
            loss_low = self.screener.evaluate(widths).loss
        if self.can_reach_front(metrics, loss_low):
            return loss_low, None
        return loss_low, loss_low + self._mean()  # predicted; dominated either way

    def record(self, full_loss: float, loss_low: float) -> None:
        """Learn the gap from a configuration evaluated both ways."""
        if math.isfinite(full_loss - loss_low):
            self.gaps.append(full_loss - loss_low)

    def can_reach_front(self, metrics: dict[str, float], loss_low: float) -> bool:
        if len(self.gaps) < self.MIN_GAPS:
            return True
        mean = self._mean()
        spread = (sum((g - mean) ** 2 for g in self.gaps) / len(self.gaps)) ** 0.5
        optimistic = {**metrics, "loss": loss_low + mean - 3 * spread - 1e-3}
        columns = self.columns
        for other in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            attrs = trial_metrics(other)
            if attrs.get("fidelity") != "full" or any(v > 0 for v in other.constraints.values()):
                continue
            if all(attrs[c] <= optimistic[c] for c in columns) and any(
                attrs[c] < optimistic[c] for c in columns
            ):
                return False
        return True

    def _mean(self) -> float:
        return sum(self.gaps) / len(self.gaps)
