"""Timing on CPU/CUDA and the measured latency profile of a checkpoint on a hardware target.

Timing is done the careful way: threads pinned as the target says, warm-up calls, repeats
interleaved across everything being compared (so drift and background load hit every
configuration alike instead of one), an untimed call right before each timed one (the timed
call sees its own weights in cache, as in steady serving), the median as the statistic, and
CUDA events with synchronisation on GPU.

`profile_checkpoint` measures (1) per-layer, per-width FFN times and the fixed costs in
isolation, (2) end-to-end latencies of sampled configurations run as physically sliced models
(what export ships) to calibrate the `LatencyModel`, and (3) a held-out sample, measured twice,
to report accuracy next to the noise floor.
"""

from __future__ import annotations

import copy
import gc
import json
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from mnm_search._files import atomic_write_text
from mnm_search.checkpoint import Checkpoint
from mnm_search.config import ModelConfig
from mnm_search.errors import ConfigError, DeviceError, ProfileError
from mnm_search.latency import (
    PROFILE_FORMAT,
    PROFILE_VERSION,
    LatencyModel,
    validation_metrics,
)
from mnm_search.memory import memory_bytes
from mnm_search.model import KVCache, MatLM
from mnm_search.slicing import slice_model
from mnm_search.targets import HardwareTarget, machine_facts

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
) -> list[TimingStats]:
    """Median timings of every callable, the repeats interleaved in a shuffled order per round."""
    clock = Clock(device)
    rng = random.Random(seed)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed call is noise, as in timeit
    try:
        return _time_rounds(fns, clock, rng, repeats=repeats, warmup=warmup, on_round=on_round)
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
    on_round: Callable[[int], None] | None,
) -> list[TimingStats]:
    with torch.inference_mode():
        for fn in fns:
            for _ in range(warmup):
                fn()
        clock.synchronize()
        samples: list[list[float]] = [[] for _ in fns]
        for round_index in range(repeats):
            order = list(range(len(fns)))
            rng.shuffle(order)
            for i in order:
                fns[i]()  # untimed: the timed call then finds its own weights in cache
                samples[i].append(clock.time_ms(fns[i]))
            if on_round is not None:
                on_round(round_index + 1)
    return [TimingStats.from_samples(s) for s in samples]


def check_target_fits(config: ModelConfig, target: HardwareTarget) -> None:
    if target.total_len > config.max_seq_len:
        raise ConfigError(
            f"target {target.name!r} needs {target.total_len} positions (context_len "
            f"{target.context_len} + seq_len {target.seq_len}), but the checkpoint holds at "
            f"most max_seq_len={config.max_seq_len}"
        )


def prepare_model(model: MatLM, target: HardwareTarget, device: torch.device) -> MatLM:
    """The model on the target's device and dtype (a copy if anything must change)."""
    dtype = TORCH_DTYPES[target.dtype]
    param = next(model.parameters())
    if param.device != device or param.dtype != dtype:
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    return model.eval()


def _token_ids(config: ModelConfig, batch: int, length: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(length)
    return torch.randint(config.vocab_size, (batch, length), generator=generator).to(device)


def make_runner(
    model: MatLM,
    target: HardwareTarget,
    device: torch.device,
    widths: Sequence[int] | None = None,
) -> Callable[[], object]:
    """A no-argument callable running one forward of `model` at the target's phase.

    Decode: the KV cache is filled with `context_len` tokens once; every call then appends
    `seq_len` token(s) at the same position (resetting the cache length), so each call
    measures the same decode step.
    """
    config = model.config
    ids = _token_ids(config, target.batch, target.seq_len, device)
    widths = list(widths) if widths is not None else None
    if target.phase == "prefill":
        return lambda: model(ids, widths)
    cache = KVCache.empty(
        config, batch=target.batch, device=device, dtype=TORCH_DTYPES[target.dtype]
    )
    with torch.inference_mode():
        model(_token_ids(config, target.batch, target.context_len, device), widths, cache=cache)

    def step() -> torch.Tensor:
        cache.length = target.context_len
        return model(ids, widths, cache=cache)

    return step


def measure_latency_ms(
    model: MatLM, target: HardwareTarget, widths: Sequence[int] | None = None
) -> TimingStats:
    """End-to-end latency of one model (at `widths`) at the target's phase, on its device."""
    device = select_device(target.device)
    check_target_fits(model.config, target)
    with pinned_threads(target.threads), torch.inference_mode():
        prepared = prepare_model(model, target, device)
        runner = make_runner(prepared, target, device, widths)
        return time_interleaved(
            [runner], device=device, repeats=target.repeats, warmup=target.warmup
        )[0]


def sample_configs(
    config: ModelConfig,
    n: int,
    rng: random.Random,
    *,
    widths: Sequence[int] | None = None,
    skip_probability: float = 0.1,
    exclude: Sequence[Sequence[int]] = (),
) -> list[list[int]]:
    """`n` distinct configurations spread from small to large (plus occasional skipped FFNs).

    Each draws a size level, then every layer a width near it, so totals cover the whole
    range instead of clustering in the middle as independent uniform choices would.
    """
    choices = sorted(widths or config.granularities)
    seen = {tuple(w) for w in exclude}
    configs: list[list[int]] = []
    for _ in range(200 * n):
        if len(configs) == n:
            break
        level = rng.uniform(0, len(choices) - 1)
        candidate = [
            0
            if rng.random() < skip_probability
            else choices[min(len(choices) - 1, max(0, round(rng.gauss(level, 0.8))))]
            for _ in range(config.n_layers)
        ]
        if tuple(candidate) not in seen:
            seen.add(tuple(candidate))
            configs.append(candidate)
    return configs


class _Stage:
    """Progress reporting for one stage of the profile (rounds of interleaved timing)."""

    def __init__(self, on_progress: ProgressFn | None, stage: str, total: int) -> None:
        self.on_progress, self.stage, self.total = on_progress, stage, total
        self(0)

    def __call__(self, done: int) -> None:
        if self.on_progress is not None:
            self.on_progress({"stage": self.stage, "done": done, "total": self.total})


def _component_runners(
    model: MatLM, target: HardwareTarget, device: torch.device, widths: Sequence[int]
) -> tuple[dict[str, Callable[[], object]], list[list[Callable[[], object]]]]:
    """Isolated callables for the fixed costs and for every layer's FFN at every width."""
    config = model.config
    dtype = TORCH_DTYPES[target.dtype]
    batch, seq, context = target.batch, target.seq_len, target.context_len
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, seq, config.d_model, generator=generator).to(device, dtype)
    ids = _token_ids(config, batch, seq, device)
    positions = torch.arange(context, context + seq, device=device)
    full = prepare_model(slice_model(model, [config.d_ff] * config.n_layers), target, device)
    cache = None
    if target.phase == "decode":
        cache = KVCache.empty(config, batch=batch, device=device, dtype=dtype)
        with torch.inference_mode():
            full(_token_ids(config, batch, context, device), cache=cache)

    def attention(block: Any, layer: int) -> Callable[[], object]:
        # The cache length stays at `context`: every call writes the same new position.
        return lambda: x + block.attn(block.attn_norm(x), cache=cache, layer=layer)

    fixed: dict[str, Callable[[], object]] = {
        "embedding": lambda: full.wte(ids) + full.wpe(positions),
        "head": lambda: full.lm_head(full.norm(x)),
    }
    for layer, block in enumerate(full.blocks):
        fixed[f"attention.{layer}"] = attention(block, layer)

    def ffn(block: Any, width: int) -> Callable[[], object]:
        return lambda: x + block.ffn(block.ffn_norm(x), width)

    per_layer: list[list[Callable[[], object]]] = [[] for _ in range(config.n_layers)]
    for width in widths:
        sliced = prepare_model(slice_model(model, [width] * config.n_layers), target, device)
        for layer, block in enumerate(sliced.blocks):
            per_layer[layer].append(ffn(block, width))
    return fixed, per_layer


def measure_configs(
    model: MatLM,
    target: HardwareTarget,
    device: torch.device,
    configs: Sequence[Sequence[int]],
    *,
    repeats: int,
    seed: int,
    on_round: Callable[[int], None],
) -> list[TimingStats]:
    runners = [
        make_runner(prepare_model(slice_model(model, widths), target, device), target, device)
        for widths in configs
    ]
    return time_interleaved(
        runners,
        device=device,
        repeats=repeats,
        warmup=max(1, target.warmup),
        seed=seed,
        on_round=on_round,
    )


def profile_checkpoint(
    checkpoint: Checkpoint,
    target: HardwareTarget,
    *,
    quick: bool = False,
    on_progress: ProgressFn | None = None,
    extra_widths: Sequence[int] = (),
) -> dict[str, Any]:
    """Measure, calibrate and validate a latency model of `checkpoint` on `target`.

    `extra_widths` are measured in the table besides the trained granularities (others are
    interpolated). `quick` trims repeats and sample sizes for a first look (about 4x faster).
    Returns the profile JSON as a dict; write it with `write_profile`.
    """
    config, model = checkpoint.config, checkpoint.model
    if not config.is_universal:
        raise ProfileError(
            "profile the universal checkpoint, not an exported submodel: the profile must "
            "cover every width the search can choose"
        )
    for width in extra_widths:
        if not 0 < width <= config.d_ff:
            raise ConfigError(f"extra width {width} is outside (0, {config.d_ff}]")
    device = select_device(target.device)
    check_target_fits(config, target)
    facts = machine_facts(target)
    repeats = max(5, target.repeats // 2) if quick else target.repeats
    n_calibration = min(target.calibration, 12) if quick else target.calibration
    n_validation = min(target.validation, 10) if quick else target.validation
    table_widths = sorted(set(config.granularities) | {int(w) for w in extra_widths})
    rng = random.Random(target.seed)
    started = time.perf_counter()

    with pinned_threads(target.threads), torch.inference_mode():
        # 1. Isolated components: fixed costs and the per-layer FFN table, interleaved.
        fixed_fns, ffn_fns = _component_runners(model, target, device, table_widths)
        flat = list(fixed_fns.values()) + [fn for row in ffn_fns for fn in row]
        # Isolated ops are cheap: twice the repeats steady the table every prediction uses.
        stage = _Stage(on_progress, "per-layer table", 2 * repeats)
        stats = time_interleaved(
            flat,
            device=device,
            repeats=2 * repeats,
            warmup=target.warmup,
            seed=target.seed,
            on_round=stage,
        )
        fixed_stats = dict(zip(fixed_fns, stats[: len(fixed_fns)]))
        ffn_stats = stats[len(fixed_fns) :]
        ffn_ms = [
            [ffn_stats[layer * len(table_widths) + j].median_ms for j in range(len(table_widths))]
            for layer in range(config.n_layers)
        ]
        fixed_ms = sum(s.median_ms for s in fixed_stats.values())
        latency = LatencyModel(
            target=target,
            fingerprint=checkpoint.fingerprint,
            d_ff=config.d_ff,
            measured_widths=table_widths,
            ffn_ms=ffn_ms,
            fixed_ms=fixed_ms,
        )

        # 2. Calibration on sliced models: the uniform configurations anchor both ends.
        uniform = [config.uniform_widths(g) for g in config.granularities]
        calibration = uniform + sample_configs(
            config,
            max(0, n_calibration - len(uniform)),
            rng,
            widths=table_widths,
            exclude=uniform,
        )
        stage = _Stage(on_progress, "calibration", repeats)
        calibration_stats = measure_configs(
            model,
            target,
            device,
            calibration,
            repeats=repeats,
            seed=target.seed + 1,
            on_round=stage,
        )
        latency.fit([(w, s.median_ms) for w, s in zip(calibration, calibration_stats)])

        # 3. Held-out validation, measured in two independent passes for the noise floor.
        validation = sample_configs(
            config, n_validation, rng, widths=table_widths, exclude=calibration
        )
        passes = []
        for index in (1, 2):
            stage = _Stage(on_progress, f"validation pass {index}/2", repeats)
            passes.append(
                measure_configs(
                    model,
                    target,
                    device,
                    validation,
                    repeats=repeats,
                    seed=target.seed + 1 + index,
                    on_round=stage,
                )
            )

    validation_result = validation_block(latency, validation, passes)
    return _json_safe(
        {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "quick": quick,
            "target": target.to_dict(),
            "device": facts,
            "checkpoint": {
                "fingerprint": checkpoint.fingerprint,
                "path": str(checkpoint.path) if checkpoint.path else None,
                "n_layers": config.n_layers,
                "d_model": config.d_model,
                "d_ff": config.d_ff,
                "granularities": list(config.granularities),
            },
            "timing": {
                "statistic": "median",
                "repeats": repeats,
                "table_repeats": 2 * repeats,
                "warmup": target.warmup,
                "interleaved": True,
                "rewarm_before_each_sample": True,
                "clock": "cuda events + synchronize" if device.type == "cuda" else "perf_counter",
                "seconds": round(time.perf_counter() - started, 2),
            },
            "fixed_costs_ms": {k: s.to_dict() for k, s in fixed_stats.items()},
            "ffn_table": {
                "widths": table_widths,
                "trained_granularities": list(config.granularities),
                "extra_measured_widths": sorted(set(table_widths) - set(config.granularities)),
                "per_layer": [
                    {
                        str(w): ffn_stats[layer * len(table_widths) + j].to_dict()
                        for j, w in enumerate(table_widths)
                    }
                    for layer in range(config.n_layers)
                ],
            },
            "latency_model": latency.to_dict(),
            "calibration": calibration_block(latency, calibration, calibration_stats),
            "validation": validation_result,
            "warnings": latency_model_warnings(validation_result),
            "memory_uniform_bytes": {
                name: memory_bytes(config, config.uniform_widths(g), target).to_dict()
                for name, g in zip(config.granularity_names, config.granularities)
            },
        }
    )


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
            "definition": "pass 2 vs pass 1 median of the same configurations, as MAPE",
        },
        "measured": "median of both passes' samples",
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
