"""Timing machinery and `profile` of the native family on tiny models (structure and behaviour,
not speed)."""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from mnm_search import profiler
from mnm_search.checkpoint import fingerprint
from mnm_search.config import ModelConfig
from mnm_search.errors import ConfigError, DeviceError, ProfileError
from mnm_search.families.matlm import MatLMFamily, make_runner, sample_configs, token_ids
from mnm_search.latency import LatencyModel, validation_metrics
from mnm_search.model import MatLM
from mnm_search.profiler import (
    STAGES,
    Clock,
    TimingStats,
    measure_latency,
    nondecreasing,
    pinned_threads,
    select_device,
    time_interleaved,
    write_profile,
)
from mnm_search.slicing import slice_model
from mnm_search.targets import HardwareTarget

TINY_PREFILL = HardwareTarget(
    name="tiny-prefill",
    phase="prefill",
    seq_len=8,
    repeats=3,
    warmup=1,
    calibration=6,
    validation=3,
)
TINY_DECODE = HardwareTarget(
    name="tiny-decode",
    phase="decode",
    context_len=12,
    repeats=3,
    warmup=1,
    calibration=6,
    validation=3,
)


def _family(model: MatLM) -> MatLMFamily:
    return MatLMFamily.from_model(model)


def test_timing_stats_are_robust() -> None:
    stats = TimingStats.from_samples([1.0, 2.0, 3.0, 4.0, 100.0])
    assert stats.median_ms == 3.0  # one outlier does not move the median
    assert stats.n == 5
    assert stats.p10_ms <= stats.median_ms <= stats.p90_ms < 100.0
    assert set(stats.to_dict()) == {"median_ms", "p10_ms", "p90_ms", "n"}


def test_select_device_cpu() -> None:
    assert select_device("cpu") == torch.device("cpu")


def test_cuda_requested_without_cuda_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="asks for device 'cuda:0', but CUDA is not available"):
        select_device("cuda:0")


@pytest.mark.parametrize(("device", "expected"), [("cuda", "cuda:0"), ("cuda:1", "cuda:1")])
def test_cuda_device_selection(monkeypatch: pytest.MonkeyPatch, device: str, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device(device) == torch.device(expected)


def test_cuda_index_beyond_the_devices_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"has 1 CUDA device\(s\)"):
        select_device("cuda:3")


def test_cuda_clock_uses_events_between_synchronisations(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    class FakeEvent:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.name = "start" if not any(c.startswith("new") for c in calls) else "end"
            calls.append(f"new {self.name}")

        def record(self) -> None:
            calls.append(f"record {self.name}")

        def elapsed_time(self, other: FakeEvent) -> float:
            calls.append("elapsed")
            return 1.25

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    ms = Clock(torch.device("cuda", 0)).time_ms(lambda: calls.append("run"))
    assert ms == 1.25
    assert calls == [
        "new start",
        "new end",
        "sync",
        "record start",
        "run",
        "record end",
        "sync",
        "elapsed",
    ]


def test_cpu_clock_never_touches_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("CUDA used on CPU")

    monkeypatch.setattr(torch.cuda, "synchronize", boom)
    monkeypatch.setattr(torch.cuda, "Event", boom)
    clock = Clock(torch.device("cpu"))
    clock.synchronize()
    assert clock.time_ms(lambda: time.sleep(0.002)) >= 2.0  # sleep never returns early


def test_repeats_are_interleaved_with_warmup_first() -> None:
    log: list[str] = []
    fns = [lambda name=name: log.append(name) for name in "abc"]
    stats = time_interleaved(fns, device=torch.device("cpu"), repeats=6, warmup=2, seed=3)
    assert [s.n for s in stats] == [6, 6, 6]
    assert log[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up
    timed = log[6:]
    assert len(timed) == 6 * 3 * 2  # each sample: one untimed re-warm call + the timed call
    rounds = [timed[i : i + 6] for i in range(0, len(timed), 6)]
    for calls in rounds:  # every configuration appears in every round, in pairs
        assert sorted(calls) == ["a", "a", "b", "b", "c", "c"]
        assert calls[0::2] == calls[1::2]
    assert len({tuple(r[0::2]) for r in rounds}) > 1  # the order is shuffled between rounds


def test_pinned_threads_sets_and_restores() -> None:
    torch.set_num_threads(2)
    with pinned_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pinned_threads(None):
        assert torch.get_num_threads() == 2
    torch.set_num_threads(1)


@torch.inference_mode()
def test_decode_runner_computes_the_next_token_logits(tiny_model: MatLM) -> None:
    widths = [8, 64, 16]
    runner = make_runner(tiny_model, TINY_DECODE, torch.device("cpu"), widths)
    first, second = runner(), runner()  # every call repeats the same decode step
    torch.testing.assert_close(first, second)
    context = token_ids(tiny_model.config, 1, 12, torch.device("cpu"))
    new = token_ids(tiny_model.config, 1, 1, torch.device("cpu"))
    full = tiny_model(torch.cat([context, new], dim=1), widths)
    torch.testing.assert_close(first, full[:, -1:], rtol=1e-4, atol=1e-5)


@torch.inference_mode()
def test_probe_runner_runs_the_sliced_model(tiny_model: MatLM) -> None:
    """What the probe times is the physically sliced model export ships, at the same output."""
    widths = [8, 64, 0]
    device = torch.device("cpu")
    probe = _family(tiny_model).latency_probe(TINY_DECODE, device)
    step = probe.runner(widths)
    context = token_ids(tiny_model.config, 1, 12, device)
    new = token_ids(tiny_model.config, 1, 1, device)
    full = tiny_model(torch.cat([context, new], dim=1), widths)
    torch.testing.assert_close(step(), full[:, -1:], rtol=1e-4, atol=1e-5)
    prefill = _family(tiny_model).latency_probe(TINY_PREFILL, device).runner(widths)
    ids = token_ids(tiny_model.config, 1, 8, device)
    torch.testing.assert_close(prefill(), tiny_model(ids, widths), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", [TINY_PREFILL, TINY_DECODE], ids=["prefill", "decode"])
def test_measure_latency(tiny_model: MatLM, target: HardwareTarget) -> None:
    rounds: list[int] = []
    configs = [[8, 16, 0], [64, 64, 64]]
    stats = measure_latency(_family(tiny_model), target, configs, on_round=rounds.append)
    assert len(stats) == 2 and rounds == list(range(1, target.repeats + 1))
    for s in stats:
        assert s.n == target.repeats
        assert 0 < s.p10_ms <= s.median_ms <= s.p90_ms


def test_measure_latency_in_bfloat16_keeps_the_model(tiny_model: MatLM) -> None:
    target = HardwareTarget(name="bf16", seq_len=4, repeats=3, warmup=0, dtype="bfloat16")
    family = _family(tiny_model)
    measure_latency(family, target, [[8, 8, 8]])
    assert next(tiny_model.parameters()).dtype == torch.float32  # measured on a copy
    prepared = family.prepare_for_target(target)
    assert next(prepared.model.parameters()).dtype == torch.bfloat16
    assert prepared.fingerprint == family.fingerprint  # the profile still matches
    assert next(tiny_model.parameters()).dtype == torch.float32
    assert family.prepare_for_target(TINY_PREFILL) is family  # nothing to change: no copy


def test_target_longer_than_the_context_is_refused(tiny_model: MatLM) -> None:
    target = HardwareTarget(name="long", phase="decode", context_len=40, repeats=3)
    with pytest.raises(ConfigError, match=r"context_len 40 \+ seq_len 1.*max_seq_len=32"):
        measure_latency(_family(tiny_model), target, [[8, 8, 8]])


def test_nondecreasing_pools_adjacent_violators() -> None:
    assert nondecreasing([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert nondecreasing([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0]
    assert nondecreasing([1.0, 5.0, 2.0, 2.0]) == [1.0, 3.0, 3.0, 3.0]
    assert nondecreasing([0.5, 0.7, 0.9]) == [0.5, 0.7, 0.9]


def test_sampled_configs_are_distinct_valid_and_spread(tiny_config: ModelConfig) -> None:
    uniform = [[g] * 3 for g in tiny_config.granularities]
    configs = sample_configs(tiny_config, 30, random.Random(0), exclude=uniform)
    assert len({tuple(c) for c in configs}) == 30
    assert not {tuple(c) for c in configs} & {tuple(u) for u in uniform}
    assert all(w in (0, 8, 16, 32, 64) for c in configs for w in c)
    totals = [sum(c) for c in configs]
    assert min(totals) <= 48 and max(totals) >= 150  # small and large models both sampled


@pytest.mark.parametrize("target", [TINY_PREFILL, TINY_DECODE], ids=["prefill", "decode"])
def test_profile_has_every_part(tiny_model: MatLM, target: HardwareTarget) -> None:
    events: list[dict[str, Any]] = []
    profile = profiler.profile(_family(tiny_model), target, on_progress=events.append)
    json.dumps(profile, allow_nan=False)  # strict JSON
    assert profile["target"] == target.to_dict()
    assert profile["checkpoint"]["fingerprint"] == fingerprint(tiny_model)
    assert profile["device"]["threads"] == 1
    assert profile["timing"]["statistic"] == "median"
    assert profile["ffn_table"]["widths"] == [8, 16, 32, 64]
    assert len(profile["ffn_table"]["per_layer"]) == 3
    assert set(profile["fixed_costs_ms"]) == {
        "embedding",
        "head",
        "attention.0",
        "attention.1",
        "attention.2",
    }
    calibration = profile["calibration"]["samples"]
    assert len(calibration) == 6
    assert [s["widths"] for s in calibration[:4]] == [[g] * 3 for g in (8, 16, 32, 64)]
    validation = profile["validation"]
    assert validation["n"] == 3 and len(validation["samples"]) == 3
    assert not {tuple(s["widths"]) for s in validation["samples"]} & {
        tuple(s["widths"]) for s in calibration
    }  # held out
    # The reported metrics are those of the reported samples (not just present).
    samples = validation["samples"]
    measured = [s["measured_ms"] for s in samples]
    expected = validation_metrics(measured, [s["predicted_ms"] for s in samples])
    assert validation["mape_pct"] == pytest.approx(expected["mape_pct"], abs=1e-2)
    naive = validation_metrics(measured, [s["naive_ms"] for s in samples])
    assert validation["naive"]["mape_pct"] == pytest.approx(naive["mape_pct"], abs=1e-2)
    noise = validation_metrics([s["pass1_ms"] for s in samples], [s["pass2_ms"] for s in samples])
    assert validation["noise_floor"]["mape_pct"] == pytest.approx(noise["mape_pct"], abs=1e-2)
    for s in samples:  # the median of both passes' samples lies between the two medians
        low, high = sorted((s["pass1_ms"], s["pass2_ms"]))
        assert low - 1e-5 <= s["measured_ms"] <= high + 1e-5
    assert list(dict.fromkeys(e["stage"] for e in events)) == list(STAGES)
    for stage in STAGES:  # one event per round, the table's two timed rounds counted as one
        assert [e["done"] for e in events if e["stage"] == stage] == [0, 1, 2, 3]
        assert {e["total"] for e in events if e["stage"] == stage} == {3}
    assert profile["timing"]["table_repeats"] == 6
    model = LatencyModel.from_profile(profile)
    for sample in validation["samples"]:
        assert model.predict_ms(sample["widths"]) == pytest.approx(sample["predicted_ms"], abs=1e-6)
    # The latency model's table is the measured medians, made non-decreasing in width.
    for layer, entry in enumerate(profile["ffn_table"]["per_layer"]):
        medians = [entry[str(w)]["median_ms"] for w in profile["ffn_table"]["widths"]]
        row = list(model.ffn_table[layer])
        assert row == pytest.approx(nondecreasing(medians), abs=1e-5) and row == sorted(row)
    fixed = sum(s["median_ms"] for s in profile["fixed_costs_ms"].values())
    assert model.fixed_ms == pytest.approx(fixed, abs=1e-5)
    assert set(profile["memory_uniform_bytes"]) == {"S", "M", "L", "XL"}
    assert profile["checkpoint"]["family"] == "matlm"


def test_quick_profile_uses_fewer_samples(tiny_model: MatLM) -> None:
    target = HardwareTarget(
        name="q", seq_len=4, repeats=10, warmup=0, calibration=14, validation=11
    )
    profile = profiler.profile(_family(tiny_model), target, quick=True)
    assert profile["quick"] is True
    assert profile["timing"]["repeats"] == 5
    assert profile["calibration"]["n"] == 12 and profile["validation"]["n"] == 10


def test_extra_widths_are_measured_not_interpolated(tiny_model: MatLM) -> None:
    profile = profiler.profile(_family(tiny_model), TINY_PREFILL, extra_widths=[24])
    assert profile["ffn_table"]["widths"] == [8, 16, 24, 32, 64]
    assert profile["ffn_table"]["extra_measured_widths"] == [24]
    model = LatencyModel.from_profile(profile)
    assert model.interpolated_layers([24, 24, 40]) == [2]


def test_exported_checkpoints_are_not_profiled(tiny_model: MatLM) -> None:
    with pytest.raises(ProfileError, match="universal checkpoint"):
        profiler.profile(_family(slice_model(tiny_model, [8, 8, 8])), TINY_PREFILL)


def test_cuda_target_without_cuda_fails_before_measuring(
    tiny_model: MatLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    target = HardwareTarget(name="gpu", device="cuda:0", threads=None, seq_len=8)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        profiler.profile(_family(tiny_model), target)


def test_write_profile_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "profile.json"
    write_profile({"format": "mnm-latency-profile", "n": 1}, path)
    assert json.loads(path.read_text())["n"] == 1

    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_profile({"format": "mnm-latency-profile", "n": 2}, path)
    assert json.loads(path.read_text())["n"] == 1  # the old profile survives intact
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]  # no temp file left


def test_write_profile_turns_nan_into_null(tmp_path: Path) -> None:
    path = write_profile({"spearman": float("nan")}, tmp_path / "p.json")
    assert json.loads(path.read_text()) == {"spearman": None}


@pytest.mark.parametrize("target", [TINY_PREFILL, TINY_DECODE], ids=["prefill", "decode"])
def test_profile_validates_in_fresh_processes(tiny_model: MatLM, target: HardwareTarget) -> None:
    """Both validations in one profile: the in-process held-out sample and another held-out
    sample exported and timed in fresh processes, with the reference re-timed between."""
    events: list[dict[str, Any]] = []
    profile = profiler.profile(
        _family(tiny_model), target, fresh=3, fresh_per_process=5, on_progress=events.append
    )
    json.dumps(profile, allow_nan=False)
    fresh, validation = profile["fresh_validation"], profile["validation"]
    assert fresh["n"] == 3 == len(fresh["samples"]) and validation["n"] == 3
    seen = {tuple(s["widths"]) for s in profile["calibration"]["samples"]}
    seen |= {tuple(s["widths"]) for s in validation["samples"]}
    assert not {tuple(s["widths"]) for s in fresh["samples"]} & seen  # held out from both
    samples = fresh["samples"]
    predicted = [s["predicted_ms"] for s in samples]
    for key, measured in (("", "measured_ms"), ("drift_corrected", "drift_corrected_ms")):
        expected = validation_metrics([s[measured] for s in samples], predicted)
        reported = fresh[key] if key else fresh
        assert reported["mape_pct"] == pytest.approx(expected["mape_pct"], abs=1e-2)
    model = LatencyModel.from_profile(profile)
    scale = fresh["fresh_scale"]
    assert profile["latency_model"]["fresh_scale"] == scale > 0
    reference = fresh["reference"]
    ratios = [ms / reference["in_process_ms"] for ms in reference["measured_ms"]]
    ratios += [s["measured_ms"] / s["in_process_fit_ms"] for s in samples]
    for i, s in enumerate(samples):
        # the profile predicts the in-process fit times the fresh-process scale ...
        assert model.predict_ms(s["widths"]) == pytest.approx(
            s["in_process_fit_ms"] * scale, rel=1e-5
        )
        # ... and validates each configuration with the scale of all the other timings
        others = ratios[: 2 + i] + ratios[3 + i :]
        assert s["predicted_ms"] == pytest.approx(
            s["in_process_fit_ms"] * statistics.median(others), rel=1e-4
        )
        assert s["measured_ms"] > 0 and s["p10_ms"] <= s["measured_ms"] <= s["p90_ms"]
    assert reference["widths"] == [64, 64, 64]
    assert len(reference["measured_ms"]) == fresh["noise_floor"]["n"] == 2  # before and after
    assert fresh["protocol"]["runs"] == 2 * target.repeats
    assert fresh["protocol"]["per_process"] == 5
    assert isinstance(fresh["warnings"], list)
    fresh_events = [e for e in events if e["stage"] == profiler.FRESH_STAGE]
    assert [e["done"] for e in fresh_events] == [0, 5] and fresh_events[0]["total"] == 5
    drift = profile["drift"]
    assert drift["reference_widths"] == [64, 64, 64]
    assert list(drift["reference_ms"]) == list(STAGES[1:])
    assert drift["pass2_factor"] > 0
    assert profile["version"] == 2


def test_profile_without_fresh_processes_says_so(tiny_model: MatLM) -> None:
    profile = profiler.profile(_family(tiny_model), TINY_PREFILL)
    assert profile["fresh_validation"]["n"] == 0
    assert "not requested" in profile["fresh_validation"]["skipped"]


def test_a_failed_fresh_validation_is_reported_not_raised(
    tiny_model: MatLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Minutes of in-process profiling are not thrown away when the exports cannot be timed."""

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ProfileError("timing an exported model in a fresh process failed (exit 1): boom")

    monkeypatch.setattr("mnm_search._fresh_process.measure_fresh", broken)
    profile = profiler.profile(_family(tiny_model), TINY_PREFILL, fresh=3)
    fresh = profile["fresh_validation"]
    assert fresh["n"] == 0 and "boom" in fresh["error"]
    assert any("boom" in w for w in fresh["warnings"])
    assert profile["validation"]["n"] == 3  # the in-process profile stands


@pytest.mark.parametrize(
    ("repeats", "warmup", "settle", "block"),
    [(3, 1, 1, 1), (15, 3, 3, 3), (25, 5, 5, 5), (7, 0, 1, 2), (2, 4, 4, 1)],
)
def test_end_to_end_timings_run_in_steady_blocks(
    repeats: int, warmup: int, settle: int, block: int
) -> None:
    target = HardwareTarget(name="s", seq_len=4, repeats=max(3, repeats), warmup=warmup)
    assert profiler.steady_blocks(target, repeats) == {"settle": settle, "block": block}


def test_steady_blocks_time_back_to_back_after_settling() -> None:
    log: list[str] = []
    fns = [lambda name=name: log.append(name) for name in "ab"]
    rounds: list[int] = []
    stats = time_interleaved(
        fns,
        device=torch.device("cpu"),
        repeats=5,
        warmup=0,
        settle=2,
        block=2,
        on_round=rounds.append,
    )
    assert [s.n for s in stats] == [5, 5]
    assert rounds == [2, 4, 5]  # samples per callable so far; the last block is shorter
    # every round: each callable settles twice, then is timed `block` times in a row
    assert len(log) == 2 * (3 * 2 + 5)
    for start, size in ((0, 4), (8, 4), (16, 3)):  # calls per callable in rounds 1, 2, 3
        first, second = log[start : start + size], log[start + size : start + 2 * size]
        assert len(set(first)) == len(set(second)) == 1 and first[0] != second[0], log


def test_time_interleaved_refuses_bad_blocks() -> None:
    with pytest.raises(ValueError, match="block >= 1"):
        time_interleaved([lambda: None], device=torch.device("cpu"), repeats=3, warmup=0, block=0)
