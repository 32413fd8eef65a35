"""Timing on CPU/CUDA and the measured latency profile of a model family on a hardware target.

Timing is done the careful way: threads pinned as the target says, warm-up calls, repeats
interleaved across everything being compared (so drift and background load hit every
configuration alike instead of one), an untimed call right before each timed one (the timed
call sees its own weights in cache, as in steady serving), the median as the statistic, and
CUDA events with synchronisation on GPU.

`profile(family, target)` is the one profiler for every family: the family's `LatencyProbe`
(`mnm_search.families.base`) builds what is timed; this module owns the stages, sampling,
calibration, validation and the profile JSON. It measures (1) per-layer, per-width times and
the fixed costs in isolation, (2) end-to-end latencies of sampled configurations run as
export ships them to calibrate the `LatencyModel`, and (3) a held-out sample, measured twice,
to report accuracy next to the noise floor. `measure_latency` times configurations end to
end (export's measured latency).
"""

from __future__ import annotations

import gc
import itertools
import json
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mnm_search._files import atomic_write_text
from mnm_search.errors import ConfigError, DeviceError, MnmError, ProfileError
from mnm_search.latency import (
    PROFILE_FORMAT,
    PROFILE_VERSION,
    LatencyModel,
    validation_metrics,
)
from mnm_search.targets import HardwareTarget, machine_facts

if TYPE_CHECKING:
    from mnm_search.families.base import Family, LatencyProbe

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TimingStats:
    """Robust summary of repeated timings of one callable, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int
    samples_ms: tuple[float, ...] = ()

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> TimingStats:
        if not samples_ms:
            raise ValueError("no timing samples")
        ordered = sorted(samples_ms)
        if len(ordered) > 1:
            deciles = statistics.quantiles(ordered, n=10, method="inclusive")
            p10, p90 = deciles[0], deciles[-1]
        else:
            p10 = p90 = ordered[0]
        return cls(
            median_ms=statistics.median(ordered),
            p10_ms=p10,
            p90_ms=p90,
            n=len(ordered),
            samples_ms=tuple(samples_ms),
        )

    def to_dict(self) -> dict[str, float | int]:
        return {
            "median_ms": round(self.median_ms, 6),
            "p10_ms": round(self.p10_ms, 6),
            "p90_ms": round(self.p90_ms, 6),
            "n": self.n,
        }


def select_device(device: str) -> torch.device:
    """The torch device for a target's `device` string; DeviceError if it is not here."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = (
                "without CUDA" if torch.version.cuda is None else f"with CUDA {torch.version.cuda}"
            )
            raise DeviceError(
                f"the target asks for device {device!r}, but CUDA is not available here "
                f"(torch {torch.__version__} built {built}, no GPU visible); use a cpu-* "
                f"target such as profiles/cpu-prefill.yaml, or run on a machine with a GPU"
            )
        count = torch.cuda.device_count()
        index = 0 if dev.index is None else dev.index
        if index >= count:
            raise DeviceError(
                f"the target asks for device {device!r}, but this machine has {count} CUDA "
                f"device(s) (cuda:0..cuda:{count - 1})"
            )
        return torch.device("cuda", index)
    return dev


@contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """Run with `threads` intra-op CPU threads (None: leave as is), then restore."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Clock:
    """Times one call: CUDA events between two synchronisations on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            self.synchronize()  # nothing queued before may leak into this measurement
            start.record()
            fn()
            end.record()
            self.synchronize()
            return float(start.elapsed_time(end))
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3


def time_interleaved(
    fns: Sequence[Callable[[], object]],
    *,
    device: torch.device,
    repeats: int,
    warmup: int,
    seed: int = 0,
    on_round: Callable[[int], None] | None = None,
    settle: int = 1,
    block: int = 1,
) -> list[TimingStats]:
    """Median timings of every callable, the repeats interleaved in a shuffled order per round.

    Each round runs every callable in turn: `settle` untimed calls, then `block` timed calls
    back to back (the last round fewer, so each gets `repeats` samples). `on_round` receives
    the samples taken per callable so far after each round.
    """
    if settle < 0 or block < 1:
        raise ValueError(f"need settle >= 0 and block >= 1, got settle={settle}, block={block}")
    clock = Clock(device)
    rng = random.Random(seed)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed call is noise, as in timeit
    try:
        return _time_rounds(
            fns,
            clock,
            rng,
            repeats=repeats,
            warmup=warmup,
            settle=settle,
            block=block,
            on_round=on_round,
        )
    finally:
        if gc_was_enabled:
            gc.enable()


def _time_rounds(
    fns: Sequence[Callable[[], object]],
    clock: Clock,
    rng: random.Random,
    *,
    repeats: int,
    warmup: int,
    settle: int,
    block: int,
    on_round: Callable[[int], None] | None,
) -> list[TimingStats]:
    with torch.inference_mode():
        for fn in fns:
            for _ in range(warmup):
                fn()
        clock.synchronize()
        samples: list[list[float]] = [[] for _ in fns]
        done = 0
        while done < repeats:
            timed = min(block, repeats - done)
            order = list(range(len(fns)))
            rng.shuffle(order)
            for i in order:
                for _ in range(settle):  # untimed: the timed calls find their state warm
                    fns[i]()
                samples[i] += [clock.time_ms(fns[i]) for _ in range(timed)]
            done += timed
            if on_round is not None:
                on_round(done)
    return [TimingStats.from_samples(s) for s in samples]


# End-to-end timings run in the steady state a deployment reaches after its warm-up: every
# configuration, in each of (at most) this many interleaved rounds, gets `target.warmup`
# untimed calls and then a block of timed ones. One untimed call before each timed one (the
# table's way) is not enough: on a 2-core EPYC a decode step measured that way took 1.2-1.7x
# its time after five calls in a row, which is what an exported model in its own process runs.
STEADY_ROUNDS = 5


def steady_blocks(target: HardwareTarget, repeats: int) -> dict[str, int]:
    """`settle` and `block` of `time_interleaved` for end-to-end timings on `target`."""
    rounds = min(repeats, STEADY_ROUNDS)
    return {"settle": max(1, target.warmup), "block": -(-repeats // rounds)}


# Stage names of the progress events, in order (`on_progress` receives them; the CLI shows them).
STAGES = ("per-layer table", "calibration + validation pass 1/2", "validation pass 2/2")
# The last, optional stage: progress counts exported configurations timed, not rounds.
FRESH_STAGE = "fresh processes"
# Held-out configurations below this many say nothing about a latency model.
MIN_VALIDATION = 3


class _Stage:
    """Progress reporting for one stage of the profile (rounds of interleaved timing)."""

    def __init__(self, on_progress: ProgressFn | None, stage: str, total: int) -> None:
        self.on_progress, self.stage, self.total = on_progress, stage, total
        self(0)

    def __call__(self, done: int) -> None:
        if self.on_progress is not None:
            self.on_progress({"stage": self.stage, "done": done, "total": self.total})


# Share of skippable layers dropped in sampled configurations: enough for the calibration to
# see dropped layers, few enough that most samples stay close to a real sub-model.
SKIP_PROBABILITY = 0.1


def spread_configs(
    widths: Sequence[int],
    layer_caps: Sequence[int],
    n: int,
    rng: random.Random,
    *,
    skippable: Sequence[int] = (),
    skip_probability: float = SKIP_PROBABILITY,
    exclude: Sequence[Sequence[int]] = (),
) -> list[list[int]]:
    """Up to `n` distinct configurations spread from small to large, for calibration and
    validation of any family.

    Each draws a size level among `widths`, then every layer a width near it (capped at that
    layer's `layer_caps` entry), so totals cover the whole range instead of clustering in the
    middle as independent uniform choices would. Layers in `skippable` are dropped (0) with
    `skip_probability`; a configuration keeps at least one layer.
    """
    choices = sorted(widths)
    skip = set(skippable)
    seen = {tuple(w) for w in exclude}
    configs: list[list[int]] = []
    for _ in range(200 * n):
        if len(configs) == n:
            break
        level = rng.uniform(0, len(choices) - 1)
        candidate = []
        for layer, cap in enumerate(layer_caps):
            if layer in skip and rng.random() < skip_probability:
                candidate.append(0)
                continue
            index = min(len(choices) - 1, max(0, round(rng.gauss(level, 0.8))))
            candidate.append(min(choices[index], cap))
        if any(candidate) and tuple(candidate) not in seen:
            seen.add(tuple(candidate))
            configs.append(candidate)
    return configs


def nondecreasing(values: Sequence[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [sum, count] of runs pooled to their mean
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


def _measure(
    probe: LatencyProbe,
    target: HardwareTarget,
    device: torch.device,
    configs: Sequence[Sequence[int]],
    *,
    repeats: int,
    seed: int,
    on_round: Callable[[int], None] | None,
) -> list[TimingStats]:
    """End-to-end latency of each configuration at the target's phase, interleaved, each
    timed in its steady state (`steady_blocks`)."""
    return time_interleaved(
        [probe.runner(widths) for widths in configs],
        device=device,
        repeats=repeats,
        warmup=max(1, target.warmup),  # the first call of a fresh model is never representative
        seed=seed,
        on_round=on_round,
        **steady_blocks(target, repeats),
    )


def measure_latency(
    family: Family,
    target: HardwareTarget,
    configs: Sequence[Sequence[int]],
    on_round: Callable[[int], None] | None = None,
) -> list[TimingStats]:
    """End-to-end latency of each configuration of `family` on `target`, as export ships it.

    The configurations are timed interleaved (`target.repeats` rounds), so their ratios hold
    even while the machine drifts. Put the family on the target first
    (`family.prepare_for_target(target)`); a family that never copies its weights (Gemma 3n)
    refuses otherwise, with the fix.
    """
    device = select_device(target.device)
    with pinned_threads(target.threads), torch.inference_mode():
        probe = family.latency_probe(target, device)
        return _measure(
            probe,
            target,
            device,
            configs,
            repeats=target.repeats,
            seed=target.seed,
            on_round=on_round,
        )


def profile(
    family: Family,
    target: HardwareTarget,
    *,
    quick: bool = False,
    allow_skip: bool = True,
    on_progress: ProgressFn | None = None,
    extra_widths: Sequence[int] = (),
    fresh: int = 0,
    fresh_per_process: int | None = None,
) -> dict[str, Any]:
    """Measure, calibrate and validate a latency model of `family` on `target`.

    Stages: (1) the family's probe times its fixed costs and every layer at every table width
    in isolation; (2) the anchor configurations and a spread sample, which calibrate the
    `LatencyModel`, are timed end to end in the same interleaved rounds as a held-out sample
    and a reference configuration (the full model); (3) the held-out sample and the reference
    are timed again, for the noise floor, and this second pass is corrected for drift by the
    reference (its time in pass 2 vs pass 1); (4) with `fresh` > 0, that many other held-out
    configurations are exported and timed each in its own new Python process, loaded with
    `load_model` as a deployment does (`mnm_search._fresh_process`), the reference re-timed
    the same way between them; the `fresh_validation` block reports how well the predictions
    hold there. Put the family on the target first (`family.prepare_for_target(target)`).

    `quick` trims repeats and sample sizes for a first look (about 4x faster). `allow_skip`
    lets sampled configurations drop layers (off when the search keeps every layer).
    `extra_widths` are measured in the table besides the family's own widths (where the
    family's probe supports it). `fresh_per_process` times that many exports per child
    process, one after another (1: the deployment's way, a process each; None: the
    reference and the configurations up to its next re-timing, `FRESH_REFERENCE_EVERY` + 1,
    which measured the same within the noise at a quarter of the start-ups).
    `on_progress` receives `{"stage", "done", "total"}` events (stages in `STAGES`, then
    `FRESH_STAGE`). Returns the profile JSON as a dict; write it with `write_profile`.
    """
    if fresh_per_process is None:
        fresh_per_process = FRESH_REFERENCE_EVERY + 1
    if fresh < 0 or fresh_per_process < 1:
        raise ConfigError(
            f"fresh must be >= 0 and fresh_per_process >= 1, got fresh={fresh}, "
            f"fresh_per_process={fresh_per_process}"
        )
    device = select_device(target.device)
    facts = machine_facts(target)
    repeats = max(5, target.repeats // 2) if quick else target.repeats
    n_calibration = min(target.calibration, 12) if quick else target.calibration
    n_validation = min(target.validation, 10) if quick else target.validation
    warmup = max(1, target.warmup)
    rng = random.Random(target.seed)
    started = time.perf_counter()
    reference = [int(w) for w in family.full_widths()]

    with pinned_threads(target.threads), torch.inference_mode():
        probe = family.latency_probe(target, device)
        if extra_widths:
            probe.measure_extra_widths([int(w) for w in extra_widths])

        # 1. Fixed costs and every layer at every table width, interleaved.
        stage = _Stage(on_progress, STAGES[0], repeats)
        table = probe.measure_table(
            repeats=repeats, warmup=warmup, seed=target.seed, on_round=stage
        )
        latency = LatencyModel(
            target=target,
            fingerprint=family.fingerprint,
            d_ff=max(family.full_widths()),
            measured_widths=table.widths,
            # More FFN neurons never cost less: noise that says otherwise would let the search
            # take a wider layer for free, so each row is made non-decreasing.
            ffn_ms=[nondecreasing([s.median_ms for s in row]) for row in table.per_layer],
            fixed_ms=max(0.0, table.fixed_ms),
        )

        # 2. Calibration (the anchors: uniform models and what else the family needs pinned
        # down, then a sample spread from small to large) and the held-out sample, timed in
        # the same rounds so that both see the same machine; the reference joins them.
        anchors = [list(w) for w in probe.anchors(allow_skip=allow_skip)]
        calibration = anchors + probe.sample(
            max(0, n_calibration - len(anchors)), rng, allow_skip=allow_skip, exclude=anchors
        )
        validation = probe.sample(n_validation, rng, allow_skip=allow_skip, exclude=calibration)
        if len(validation) < MIN_VALIDATION:
            raise ProfileError(
                f"only {len(validation)} configuration(s) of this checkpoint are left for "
                f"validation after {len(calibration)} calibration ones; lower the target's "
                f"'calibration' ({target.calibration}) or profile a model with more choices"
            )
        stage = _Stage(on_progress, STAGES[1], repeats)
        first = _measure(
            probe,
            target,
            device,
            [*calibration, *validation, reference],
            repeats=repeats,
            seed=target.seed + 1,
            on_round=stage,
        )
        calibration_stats = first[: len(calibration)]
        latency.fit([(w, s.median_ms) for w, s in zip(calibration, calibration_stats)])

        # 3. The held-out sample again, for the noise floor, with the reference.
        stage = _Stage(on_progress, STAGES[2], repeats)
        second = _measure(
            probe,
            target,
            device,
            [*validation, reference],
            repeats=repeats,
            seed=target.seed + 2,
            on_round=stage,
        )
    references = [first[-1].median_ms, second[-1].median_ms]
    # The machine may have sped up or slowed down between the passes; the reference says by
    # how much, and pass 2 is put back on pass 1's (the calibration's) scale.
    factor = references[0] / references[1]
    passes = [first[len(calibration) : -1], [_scaled(s, factor) for s in second[:-1]]]
    validation_result = validation_block(latency, validation, passes)
    calibration_result = calibration_block(latency, calibration, calibration_stats)
    drift = {
        "reference_widths": reference,
        "reference_ms": dict(zip(STAGES[1:], (round(ms, 6) for ms in references))),
        "pass2_factor": round(factor, 6),
        "definition": "pass 2 timings are multiplied by pass2_factor, the reference's "
        "pass-1 time over its pass-2 time, before the noise floor and the pooled median",
    }
    if fresh:
        held_out = [*calibration, *validation, reference]
        fresh_configs = probe.sample(fresh, rng, allow_skip=allow_skip, exclude=held_out)
        fresh_result = validate_in_fresh_processes(
            family,
            target,
            latency,
            fresh_configs,
            reference=reference,
            reference_in_process_ms=references[0],
            warmup=warmup,
            runs=2 * repeats,  # as many samples as both in-process passes together
            per_process=fresh_per_process,
            on_progress=on_progress,
        )
    else:
        fresh_result = {"n": 0, "skipped": "not requested (fresh=0)"}
    # Apart from the in-process `warnings`, which say whether the model is usable at all.
    fresh_result["warnings"] = fresh_validation_warnings(fresh_result)
    return _json_safe(
        {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "quick": quick,
            "target": target.to_dict(),
            "device": facts,
            "checkpoint": {
                "family": family.name,
                "fingerprint": family.fingerprint,
                "path": str(family.path) if family.path else None,
                "n_layers": family.n_layers,
                **probe.checkpoint_info(),
            },
            "timing": {
                "statistic": "median",
                "repeats": repeats,
                "table_repeats": repeats,
                "warmup": warmup,
                "interleaved": True,
                "rewarm_before_each_sample": True,
                "end_to_end": {
                    **steady_blocks(target, repeats),
                    "meaning": "each round runs every configuration `settle` times untimed, "
                    "then `block` timed calls back to back (its steady state)",
                },
                "clock": "cuda events + synchronize" if device.type == "cuda" else "perf_counter",
                "allow_skip": allow_skip,
                **probe.timing_info(),
                "seconds": round(time.perf_counter() - started, 2),
            },
            "fixed_costs_ms": {name: s.to_dict() for name, s in table.fixed.items()},
            "ffn_table": {
                "widths": table.widths,
                "per_layer": [
                    {str(w): s.to_dict() for w, s in zip(table.widths, row)}
                    for row in table.per_layer
                ],
                "meaning": table.meaning,
                "latency_model_rows": "these medians made non-decreasing in width (pool "
                "adjacent violators)",
                **table.extra,
            },
            "latency_model": {
                **latency.to_dict(),
                # 1: predictions as fitted in this process (no fresh-process timing).
                "fresh_scale": fresh_result.get("fresh_scale", 1.0),
            },
            "calibration": calibration_result,
            "validation": validation_result,
            "fresh_validation": fresh_result,
            "drift": drift,
            "warnings": latency_model_warnings(validation_result),
            **probe.extra_blocks(),
        }
    )


def _scaled(stats: TimingStats, factor: float) -> TimingStats:
    return TimingStats.from_samples([ms * factor for ms in stats.samples_ms])


def drift_corrected(
    measured_ms: Sequence[float],
    *,
    at: Sequence[float],
    reference_at: Sequence[float],
    reference_ms: Sequence[float],
) -> list[float]:
    """Timings taken while the machine drifted, put on one scale by a reference configuration
    re-timed through the session: each divided by the reference's time when it was taken
    (linear between the reference's timings, flat beyond them) and multiplied by the
    reference's median. `at` and `reference_at` are when (any increasing clock, e.g. the
    order of measurement)."""
    if not reference_ms or len(reference_at) != len(reference_ms) or len(at) != len(measured_ms):
        raise ValueError("need one time per measurement and at least one reference timing")
    if any(b <= a for a, b in itertools.pairwise(reference_at)):
        raise ValueError(f"reference_at must increase, got {list(reference_at)}")
    level = statistics.median(reference_ms)
    at_reference = np.interp(at, reference_at, reference_ms)
    return [float(ms * level / ref) for ms, ref in zip(measured_ms, at_reference)]


def with_reference(
    configs: Sequence[Sequence[int]], reference: Sequence[int], *, every: int
) -> tuple[list[list[int]], list[int]]:
    """`configs` with `reference` before the first, after every `every` and after the last;
    and the reference's positions in that sequence."""
    sequence: list[list[int]] = [list(reference)]
    positions = [0]
    for start in range(0, len(configs), every):
        sequence += [list(c) for c in configs[start : start + every]]
        positions.append(len(sequence))
        sequence.append(list(reference))
    return sequence, positions


def calibration_block(
    latency: LatencyModel,
    calibration: Sequence[Sequence[int]],
    stats: Sequence[TimingStats],
) -> dict[str, Any]:
    """The profile's calibration block: how well the fit matches the configurations it saw."""
    predicted = [latency.predict_ms(w) for w in calibration]
    return {
        "n": len(calibration),
        "fit": validation_metrics([s.median_ms for s in stats], predicted),
        "samples": [
            {
                "widths": list(w),
                "measured_ms": round(s.median_ms, 6),
                "predicted_ms": round(p, 6),
                "p10_ms": round(s.p10_ms, 6),
                "p90_ms": round(s.p90_ms, 6),
            }
            for w, s, p in zip(calibration, stats, predicted)
        ],
    }


def validation_block(
    latency: LatencyModel,
    validation: Sequence[Sequence[int]],
    passes: Sequence[Sequence[TimingStats]],
) -> dict[str, Any]:
    """The profile's validation block: held-out accuracy next to the naive table and the
    noise floor (the same configurations measured in two passes)."""
    first = [s.median_ms for s in passes[0]]
    second = [s.median_ms for s in passes[1]]
    measured = [
        TimingStats.from_samples(a.samples_ms + b.samples_ms).median_ms for a, b in zip(*passes)
    ]
    predicted = [latency.predict_ms(w) for w in validation]
    naive = [latency.naive_ms(w) for w in validation]
    noise = validation_metrics(first, second)
    return {
        **validation_metrics(measured, predicted),
        "naive": validation_metrics(measured, naive),
        "noise_floor": {
            "mape_pct": noise["mape_pct"],
            "spearman": noise["spearman"],
            "max_abs_pct_err": noise["max_abs_pct_err"],
            "definition": "pass 2 vs pass 1 median of the same configurations, as MAPE "
            "(pass 2 corrected for drift by the reference)",
        },
        "measured": "median of both passes' samples",
        "predicted": "by the in-process fit (before any fresh-process scale)",
        "samples": [
            {
                "widths": list(w),
                "measured_ms": round(m, 6),
                "pass1_ms": round(a, 6),
                "pass2_ms": round(b, 6),
                "predicted_ms": round(p, 6),
                "naive_ms": round(nv, 6),
            }
            for w, m, a, b, p, nv in zip(validation, measured, first, second, predicted, naive)
        ],
    }


# A latency model is only as good as the timings it was fitted on. Past these limits its
# predictions (search fronts, export budgets) are not to be trusted: a profile measured on a
# busy 2-core machine reached 49 % MAPE, where an idle one gets ~2-3 %.
MAX_MAPE_PCT = 15.0  # held-out prediction error of the calibrated model
MAX_NOISE_PCT = 10.0  # the same configurations measured twice
MIN_SPEARMAN = 0.8  # does the model at least rank configurations like the measurements?


def latency_model_warnings(validation: dict[str, Any]) -> list[str]:
    """Why a profile's held-out validation says not to trust its latency model (or [])."""
    problems: list[str] = []
    mape = validation.get("mape_pct")
    if mape is not None and mape > MAX_MAPE_PCT:
        problems.append(
            f"held-out MAPE {mape:.1f} % > {MAX_MAPE_PCT:.0f} %: predicted latencies are off "
            f"by that much on average"
        )
    noise = (validation.get("noise_floor") or {}).get("mape_pct")
    if noise is not None and noise > MAX_NOISE_PCT:
        problems.append(
            f"noise floor {noise:.1f} % > {MAX_NOISE_PCT:.0f} %: the same configurations "
            f"measured twice differed by that much, so the machine was busy or its clock varied"
        )
    spearman = validation.get("spearman")
    if spearman is not None and spearman < MIN_SPEARMAN:
        problems.append(
            f"Spearman {spearman:.2f} < {MIN_SPEARMAN}: the model does not rank configurations "
            f"by speed the way the measurements do"
        )
    return problems


# The fresh-process stage re-times the reference after every this many configurations.
FRESH_REFERENCE_EVERY = 4


def validate_in_fresh_processes(
    family: Family,
    target: HardwareTarget,
    latency: LatencyModel,
    configs: Sequence[Sequence[int]],
    *,
    reference: Sequence[int],
    reference_in_process_ms: float,
    warmup: int,
    runs: int,
    per_process: int = 1,
    calibrate: bool = True,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """The profile's fresh-process validation block: `configs` exported and each timed in
    its own new process (`mnm_search._fresh_process.measure_fresh`), the reference re-timed
    the same way before, between and after them.

    With `calibrate`, `latency` is rescaled to the deployed timings (`fresh_scale`: the
    median over the reference and the configurations of deployed over profiled time), which
    corrects whatever sets the two apart (the machine since profiling, a process holding one
    model instead of dozens) with one factor. Each configuration is then validated with the
    factor from all the other timings (leave one out), so none is predicted from its own
    measurement. The block reports predicted vs measured as timed and corrected for drift
    by the reference, and the in-process fit's own accuracy there. A failure to time them
    (e.g. a family that a fresh interpreter cannot load) is reported in the block, not
    raised: the in-process profile stands on its own.
    """
    from mnm_search._fresh_process import measure_fresh

    if not configs:
        return {
            "n": 0,
            "skipped": "no configuration left that calibration and validation did not use",
        }
    sequence, reference_at = with_reference(configs, reference, every=FRESH_REFERENCE_EVERY)
    stage = _Stage(on_progress, FRESH_STAGE, len(sequence))
    started = time.perf_counter()
    try:
        stats = measure_fresh(
            family,
            target,
            sequence,
            warmup=warmup,
            runs=runs,
            per_process=per_process,
            on_done=stage,
        )
    except MnmError as exc:
        return {"n": 0, "error": str(exc)}
    seconds = time.perf_counter() - started
    reference_ms = [stats[i].median_ms for i in reference_at]
    level = statistics.median(reference_ms)
    measured = [stats[i] for i in range(len(sequence)) if i not in set(reference_at)]
    in_process = [latency.predict_ms(w) for w in configs]
    # Deployed over profiled time, for the reference (as measured in this process) and for
    # every configuration (as the fit predicts it); their median is robust to one slow
    # process. Each held-out configuration is predicted with the median of the others'.
    ratios = [ms / reference_in_process_ms for ms in reference_ms]
    ratios += [s.median_ms / p for s, p in zip(measured, in_process)]
    others = [
        ratios[: len(reference_ms) + i] + ratios[len(reference_ms) + i + 1 :]
        for i in range(len(configs))
    ]
    scale = statistics.median(ratios) if calibrate else 1.0
    latency.rescale(scale)
    block = fresh_validation_block(
        configs,
        measured,
        predicted=[
            p * (statistics.median(rest) if calibrate else 1.0)
            for p, rest in zip(in_process, others)
        ],
        in_process_predicted=in_process,
        reference_ms=reference_ms,
        reference_at=reference_at,
    )
    spread = validation_metrics(reference_ms, [level] * len(reference_ms))
    one_each = per_process == 1
    return {
        **block,
        "fresh_scale": round(scale, 6),
        "noise_floor": {
            "mape_pct": spread["mape_pct"],
            "max_abs_pct_err": spread["max_abs_pct_err"],
            "n": len(reference_ms),
            "definition": "the reference timed in that many fresh processes through this "
            "stage, each vs their median, as MAPE",
        },
        "reference": {
            "widths": list(reference),
            "measured_ms": [round(ms, 6) for ms in reference_ms],
            "in_process_ms": round(reference_in_process_ms, 6),
            "fresh_over_in_process": round(level / reference_in_process_ms, 6),
        },
        "protocol": {
            "process": (
                "one new Python process per configuration"
                if one_each
                else f"{per_process} configurations per new Python process, one after another"
            )
            + ": exported with the family's write_export, loaded with load_model, threads "
            "pinned as the target says",
            "per_process": per_process,
            "warmup": warmup,
            "runs": runs,
            "statistic": "median of the runs, back to back after the warm-up",
            "reference_every": FRESH_REFERENCE_EVERY,
            "calibrated": calibrate,
        },
        "seconds": round(seconds, 2),
    }


def fresh_validation_block(
    configs: Sequence[Sequence[int]],
    measured: Sequence[TimingStats],
    *,
    predicted: Sequence[float],
    in_process_predicted: Sequence[float],
    reference_ms: Sequence[float],
    reference_at: Sequence[int],
) -> dict[str, Any]:
    """Metrics and samples of configurations timed in fresh processes: as timed, corrected
    for drift by the reference (timed at `reference_at` in the same sequence), and as the
    in-process fit alone (before the fresh-process scale) predicts them."""
    at = [i for i in range(len(configs) + len(reference_at)) if i not in set(reference_at)]
    timed = [s.median_ms for s in measured]
    corrected = drift_corrected(timed, at=at, reference_at=reference_at, reference_ms=reference_ms)
    return {
        **validation_metrics(timed, predicted),
        "drift_corrected": validation_metrics(corrected, predicted),
        "in_process_fit": validation_metrics(timed, in_process_predicted),
        "samples": [
            {
                "widths": list(w),
                "measured_ms": round(s.median_ms, 6),
                "drift_corrected_ms": round(c, 6),
                "predicted_ms": round(p, 6),  # scaled by the others' factor
                "in_process_fit_ms": round(q, 6),
                "p10_ms": round(s.p10_ms, 6),
                "p90_ms": round(s.p90_ms, 6),
            }
            for w, s, c, p, q in zip(configs, measured, corrected, predicted, in_process_predicted)
        ],
    }


def fresh_validation_warnings(fresh: dict[str, Any]) -> list[str]:
    """Why the fresh-process validation says not to trust the predictions in deployment."""
    if fresh.get("error"):
        return [f"the fresh-process validation failed: {fresh['error']}"]
    problems: list[str] = []
    mape = fresh.get("mape_pct")
    if mape is not None and mape > MAX_MAPE_PCT:
        problems.append(
            f"fresh-process MAPE {mape:.1f} % > {MAX_MAPE_PCT:.0f} %: exported models timed "
            f"in their own processes ran that far from the predictions"
        )
    spearman = fresh.get("spearman")
    if spearman is not None and spearman < MIN_SPEARMAN:
        problems.append(
            f"fresh-process Spearman {spearman:.2f} < {MIN_SPEARMAN}: exported models in "
            f"their own processes do not rank as predicted"
        )
    return problems


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None so the profile is strict JSON."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_profile(profile: dict[str, Any], path: str | Path) -> Path:
    """Write the profile JSON atomically: a temp file in the same directory, then rename.

    An interrupted or failed write leaves the old file (or nothing), never half a JSON.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe(profile), indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text)
    return path
