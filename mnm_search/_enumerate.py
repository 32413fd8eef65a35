"""Enumerating a search space instead of sampling it, and when that pays.

`Enumeration` visits every configuration in lexicographic order, so that the prefix-cached
evaluator reuses long prefixes and computes each layer's sibling widths in one pass. With loss
plus cost objectives the sweep is a race over chunks of the evaluation windows (1, 1, 2, 4...
times the first chunk):

1. every configuration still in the race is evaluated on the next chunk;
2. the front of the partial losses (with the costs), and after the first chunk a sample
   spread over the range of partial losses, are evaluated on every chunk: in full;
3. the rest of a configuration's loss is predicted from its partial loss by a line fitted on
   the fully evaluated configurations; one whose optimistic full loss (exact partial sum plus
   the prediction minus `RACE_SIGMAS` standard errors of that prediction) is still worse than
   that of a fully evaluated configuration that costs no more leaves the race with its
   predicted loss (fidelity "subset", as `--fidelity-tokens` screening marks it).

The spread sample keeps the fit honest: fitted on the front alone, a line extrapolates to
the rest of the space with a spread measured where it is smallest (a test model lost a
front member that way). The prediction's standard error widens with the distance from the
fitted configurations' partial losses and with fewer of them.

A full loss is a sum of exact chunk sums, so it equals the plain forward to fp32 rounding.
Objectives that need the full model's outputs (kl, agreement...) get one chunk: every
configuration in full, as `--sampler exhaustive` always does.

`estimate_strategy` decides what `--sampler auto` does: enumerate when the whole space is
estimated to cost no more than the trials asked for, else sample with a model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mnm_search.data import EvalSet
from mnm_search.evaluator import CachedEvaluator

if TYPE_CHECKING:
    from mnm_search.families.base import Family
    from mnm_search.space import SearchSpace

# Standard errors between a configuration's optimistic and predicted loss. 3 kept the exact
# front of the default checkpoint in a replay of its 4096 configurations; 4 leaves margin.
RACE_SIGMAS = 4.0
# Fully evaluated configurations needed before the fit may rule anything out.
MIN_FULL_FOR_FIT = 8
# Configurations spread over the first chunk's losses, evaluated in full for the fit.
SPREAD_SAMPLE = 12
# A race's time over that of the full sweep: 0.39-0.59 in replays of the default
# checkpoint's sweep, 0.57 measured (43 s vs 75 s estimated for the full sweep, 4096
# tokens); used only to estimate its cost.
RACE_COST_FRACTION = 0.6
# Layers a sampled trial recomputes on average: early trials share no prefix (all layers),
# late ones of a converged sampler about one; measured on the default checkpoint.
SAMPLED_LAYER_FRACTION = 1 / 3
# Tokens in the first chunk of a race.
FIRST_CHUNK_TOKENS = 256
# `auto` enumerates a space estimated to take at most this long even when sampling the
# trials asked for looks quicker: a minute is a fair wait for the exact front.
ENUMERATE_WITHIN_S = 60.0

Widths = tuple[int, ...]


@dataclass(frozen=True)
class Decision:
    """A configuration the enumeration is done with: evaluated in full, or ruled out."""

    widths: Widths
    metrics: dict[str, Any]  # loss (and kl/agreement/disagreement where computed), fidelity
    seconds: float  # evaluation time spent on it (its share of the shared passes)


@dataclass(frozen=True)
class Strategy:
    """What `mnm search` does: enumerate the space, or run one of Optuna's samplers."""

    name: str  # "enumerate" or a sampler name
    reason: str
    race: bool = False
    estimates: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "reason": self.reason, "race": self.race, **self.estimates}


def sweep_layer_passes(space: SearchSpace, *, cheap_siblings: bool) -> int:
    """Layer passes of a lexicographic sweep of `space` with an unbounded prefix cache.

    Layer `i` runs once per distinct prefix of layers `0..i-1`, for all its widths at once
    where siblings are cheap, else once per width."""
    passes, prefixes = 0, 1
    for options in space.choices:
        passes += prefixes * (1 if cheap_siblings else len(options))
        prefixes *= len(options)
    return passes


@torch.inference_mode()
def seconds_per_layer_pass(
    family: Family, eval_set: EvalSet, first_layer_widths: Sequence[int], *, batch_size: int
) -> float:
    """Time of one pass of the first layer (its widest width and, where cheap, the siblings
    `first_layer_widths`) over all of `eval_set`, timed on its first batch and scaled."""
    steps = family.layer_steps()
    state = steps.embed(eval_set.inputs[:batch_size])
    widths = sorted(set(first_layer_widths))
    if not steps.cheap_siblings:
        widths = widths[-1:]
    steps.layer(0, state, widths)  # warm-up: first calls allocate
    started = time.perf_counter()
    steps.layer(0, state, widths)
    windows = min(batch_size, eval_set.inputs.shape[0])  # in the timed batch
    return (time.perf_counter() - started) / windows * eval_set.inputs.shape[0]


def estimate_strategy(
    *,
    space: SearchSpace,
    n_trials: int,
    layer_pass_s: float,
    cheap_siblings: bool,
    race: bool,
    shared_storage: bool,
) -> Strategy:
    """`--sampler auto`: enumerate when the whole space costs no more than the trials asked
    for, or at most `ENUMERATE_WITHIN_S` (estimated from one timed layer pass), else the GP
    sampler (falling back to TPE when its own time outgrows an evaluation's)."""
    passes = sweep_layer_passes(space, cheap_siblings=cheap_siblings)
    enumerate_s = passes * layer_pass_s * (RACE_COST_FRACTION if race else 1.0)
    trial_passes = max(1.0, space.n_layers * SAMPLED_LAYER_FRACTION)
    sample_s = n_trials * trial_passes * layer_pass_s
    estimates = {"enumerate_s": round(enumerate_s, 1), "sample_s": round(sample_s, 1)}
    if shared_storage:
        return Strategy(
            "gp",
            "a shared --storage: workers share trials one at a time, so they sample",
            estimates=estimates,
        )
    if enumerate_s <= max(sample_s, ENUMERATE_WITHIN_S):
        how = "racing over chunks of the eval data" if race else "every one in full"
        than = (
            f"no more than {n_trials} sampled trials (~{_duration(sample_s)})"
            if enumerate_s <= sample_s
            else f"within a minute ({n_trials} sampled trials: ~{_duration(sample_s)})"
        )
        return Strategy(
            "enumerate",
            f"all {space.size:,} configurations ({how}) are estimated to take "
            f"~{_duration(enumerate_s)}, {than}: the exact front",
            race=race,
            estimates=estimates,
        )
    return Strategy(
        "gp",
        f"enumerating {space.size:,} configurations would take ~{_duration(enumerate_s)}, "
        f"more than a minute and than {n_trials} sampled trials (~{_duration(sample_s)}): "
        f"GP sampler, "
        f"switching to TPE if its own time outgrows an evaluation's",
        estimates=estimates,
    )


def _duration(seconds: float) -> str:
    if seconds > 100 * 365 * 86400:  # 30 layers of 8 widths: 10^27 configurations
        return "centuries"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:,.0f} h"


def chunk_bounds(n_windows: int, first: int) -> list[tuple[int, int]]:
    """Window ranges of a race: `first`, `first`, then each as large as all before it.

    (Capping the chunks at a quarter of the data, or completing the front after the first
    chunk only, changed the default checkpoint's race by less than its noise: 43-46 s.)"""
    bounds, start = [], 0
    while start < n_windows:
        end = min(n_windows, start + max(first, start))
        bounds.append((start, end))
        start = end
    return bounds


class Enumeration:
    """Evaluate the configurations of a space for their Pareto front (see the module doc).

    `costs(widths)` gives a configuration's cost metrics; `cost_columns` are those that are
    objectives (lower is better). `race=False` evaluates every configuration in full, with
    the agreement metrics when `agreement` is set.
    """

    def __init__(
        self,
        family: Family,
        eval_set: EvalSet,
        layer_widths: Sequence[Sequence[int]],
        *,
        cost_columns: Sequence[str],
        race: bool,
        agreement: bool = False,
        batch_size: int | None = None,
        cache_mb: float = 1024.0,
        first_chunk_tokens: int = FIRST_CHUNK_TOKENS,
    ) -> None:
        if race and agreement:
            raise ValueError("a race predicts losses only; agreement needs race=False")
        n_windows, seq_len = eval_set.inputs.shape
        first = max(1, first_chunk_tokens // seq_len)
        self.bounds = chunk_bounds(n_windows, first) if race else [(0, n_windows)]
        self.tokens = [(end - start) * seq_len for start, end in self.bounds]
        self.n_tokens = eval_set.n_tokens
        self.cost_columns = list(cost_columns)
        self.evaluators = [
            CachedEvaluator(
                family,
                EvalSet(eval_set.inputs[start:end], eval_set.targets[start:end]),
                batch_size=batch_size,
                # States scale with tokens: each chunk gets its share of the memory.
                cache_mb=cache_mb * (end - start) / n_windows,
                layer_widths=layer_widths,
                agreement=agreement,
                siblings="always",
            )
            for start, end in self.bounds
        ]
        self.sums: dict[Widths, list[float]] = {}  # per-chunk loss sums, known so far
        self.extra: dict[Widths, dict[str, float]] = {}  # kl/agreement (one chunk only)
        self.seconds: dict[Widths, float] = {}

    @property
    def n_chunks(self) -> int:
        return len(self.bounds)

    def run(
        self,
        configs: Sequence[Widths],
        costs: dict[Widths, Sequence[float]],
        *,
        known_full: dict[Widths, float],
        on_decided: Callable[[list[Decision]], None],
        on_stage: Callable[[str, int, int], None] | None = None,
        interruptible: Callable[[], Any] | None = None,
    ) -> None:
        """Decide every configuration of `configs` (each with its `costs` values in
        `cost_columns` order), reporting decisions as they are made. `known_full` holds
        full losses already known (a resumed study): they bound the front from the start."""
        guard = interruptible or _no_guard
        alive = sorted(set(configs) - set(known_full))
        full_loss = dict(known_full)
        for chunk in range(self.n_chunks):
            todo = [w for w in alive if len(self.sums.get(w, ())) <= chunk]
            label = "evaluating" if self.n_chunks == 1 else f"racing, chunk {chunk + 1}"
            self._evaluate(todo, chunk, guard, on_stage, label, on_decided, full_loss)
            if chunk == self.n_chunks - 1:
                break
            means = self._partial_means(alive)
            leaders = _front(alive, means, costs)
            if chunk == 0:  # the fit keeps every fully evaluated configuration: once is enough
                leaders += _spread(alive, means, SPREAD_SAMPLE)
            self._complete(sorted(set(leaders)), guard, on_stage, on_decided, full_loss)
            alive = [w for w in alive if w not in full_loss]
            out = self._rule_out(alive, chunk, costs, full_loss)
            if out:
                on_decided(out)
                gone = {d.widths for d in out}
                alive = [w for w in alive if w not in gone]

    # -- internals --------------------------------------------------------------------------

    def _evaluate(
        self,
        widths: Sequence[Widths],
        chunk: int,
        guard: Callable[[], Any],
        on_stage: Callable[[str, int, int], None] | None,
        label: str,
        on_decided: Callable[[list[Decision]], None],
        full_loss: dict[Widths, float],
    ) -> None:
        """Chunk `chunk` of each of `widths` (lexicographic: neighbours share prefixes);
        configurations complete with it are reported, in batches of about a second."""
        evaluator = self.evaluators[chunk]
        pending: list[Decision] = []
        last = time.monotonic()
        for done, w in enumerate(sorted(widths)):
            started = time.perf_counter()
            with guard():
                quality = evaluator.evaluate(w)
            self.seconds[w] = self.seconds.get(w, 0.0) + time.perf_counter() - started
            sums = self.sums.setdefault(w, [])
            sums.append(quality.loss * self.tokens[chunk])
            if quality.agreement is not None:
                self.extra[w] = {
                    "kl": quality.kl,
                    "agreement": quality.agreement,
                    "disagreement": 1.0 - quality.agreement,
                }
            if len(sums) == self.n_chunks:
                pending.append(self._full(w, full_loss))
            if time.monotonic() - last > 1.0:
                last = time.monotonic()
                if pending:
                    on_decided(pending)
                    pending = []
                if on_stage is not None:
                    on_stage(label, done + 1, len(widths))
        if pending:
            on_decided(pending)

    def _complete(
        self,
        widths: Sequence[Widths],
        guard: Callable[[], Any],
        on_stage: Callable[[str, int, int], None] | None,
        on_decided: Callable[[list[Decision]], None],
        full_loss: dict[Widths, float],
    ) -> None:
        """Every remaining chunk of `widths`, chunk by chunk (prefix reuse within each)."""
        first = min((len(self.sums[w]) for w in widths), default=self.n_chunks)
        for chunk in range(first, self.n_chunks):
            todo = [w for w in widths if len(self.sums[w]) == chunk]
            self._evaluate(todo, chunk, guard, on_stage, "front", on_decided, full_loss)

    def _full(self, widths: Widths, full_loss: dict[Widths, float]) -> Decision:
        loss = math.fsum(self.sums[widths]) / self.n_tokens
        full_loss[widths] = loss
        metrics = {"loss": loss, "fidelity": "full", **self.extra.get(widths, {})}
        return Decision(widths, metrics, self.seconds[widths])

    def _partial_means(self, widths: Sequence[Widths]) -> list[float]:
        return [math.fsum(self.sums[w]) / sum(self.tokens[: len(self.sums[w])]) for w in widths]

    def _rule_out(
        self,
        alive: Sequence[Widths],
        chunk: int,
        costs: dict[Widths, Sequence[float]],
        full_loss: dict[Widths, float],
    ) -> list[Decision]:
        """The configurations that cannot reach the front after `chunk` (see module doc)."""
        fitted = [w for w in full_loss if w in self.sums and len(self.sums[w]) == self.n_chunks]
        if len(fitted) < MIN_FULL_FOR_FIT or not alive:
            return []
        known = sum(self.tokens[: chunk + 1])
        rest = self.n_tokens - known
        x = np.array([math.fsum(self.sums[w][: chunk + 1]) / known for w in fitted])
        y = np.array([math.fsum(self.sums[w][chunk + 1 :]) / rest for w in fitted])
        n, x_mean = len(x), float(x.mean())
        sxx = float(((x - x_mean) ** 2).sum())
        slope = float(((x - x_mean) * (y - y.mean())).sum() / sxx) if sxx > 0 else 0.0
        intercept = float(y.mean()) - slope * x_mean
        sigma = math.sqrt(float(((y - (slope * x + intercept)) ** 2).sum()) / (n - 2)) + 1e-6
        front_loss = np.array(list(full_loss.values()))
        front_costs = np.array([costs[w] for w in full_loss], dtype=float).reshape(
            len(full_loss), len(self.cost_columns)
        )
        out = []
        for w in alive:
            known_sum = math.fsum(self.sums[w][: chunk + 1])
            x_w = known_sum / known
            predicted_rest = slope * x_w + intercept
            # The standard error of a new prediction from a fitted line.
            error = sigma * math.sqrt(1 + 1 / n + ((x_w - x_mean) ** 2 / sxx if sxx > 0 else 0))
            optimistic = (known_sum + (predicted_rest - RACE_SIGMAS * error) * rest) / (
                self.n_tokens
            )
            cheaper = np.all(front_costs <= np.asarray(costs[w], dtype=float), axis=1)
            if np.any(cheaper & (front_loss < optimistic)):
                predicted = (known_sum + predicted_rest * rest) / self.n_tokens
                out.append(Decision(w, {"loss": predicted, "fidelity": "subset"}, self.seconds[w]))
        return out


def _front(
    widths: Sequence[Widths], losses: Sequence[float], costs: dict[Widths, Sequence[float]]
) -> list[Widths]:
    """The non-dominated members of `widths` by (loss, costs...), all lower-is-better."""
    if not widths:
        return []
    values = np.column_stack([np.asarray(losses), np.array([costs[w] for w in widths])])
    kept = []
    for i, row in enumerate(values):
        no_worse = np.all(values <= row, axis=1)
        better = np.any(values < row, axis=1)
        if not np.any(no_worse & better):
            kept.append(widths[i])
    return kept


def _spread(widths: Sequence[Widths], losses: Sequence[float], n: int) -> list[Widths]:
    """`n` members of `widths` evenly spaced in the order of their losses (ends included)."""
    if len(widths) <= n:
        return list(widths)
    order = sorted(range(len(widths)), key=lambda i: losses[i])
    return [widths[order[round(k * (len(order) - 1) / (n - 1))]] for k in range(n)]


class _NoGuard:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _no_guard() -> _NoGuard:
    return _NoGuard()
