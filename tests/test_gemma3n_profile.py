"""Gemma 3n latency profile (`profiler.profile` with `Gemma3nProbe`): the same JSON as the native
family, whole decoder layers per width.

Tiny random models (nothing downloaded); each profile takes about a second on one CPU thread.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
from gemma3n_models import PRODUCERS, random_model, tiny_config  # noqa: E402

from mnm_search import profiler  # noqa: E402
from mnm_search.errors import ConfigError, ProfileError  # noqa: E402
from mnm_search.families import gemma3n_profile  # noqa: E402
from mnm_search.families.gemma3n import Gemma3nFamily  # noqa: E402
from mnm_search.families.gemma3n_profile import (  # noqa: E402
    Gemma3nProbe,
    sample_gemma3n_configs,
    skip_anchors,
)
from mnm_search.latency import LatencyModel, validation_metrics  # noqa: E402
from mnm_search.profiler import STAGES, measure_latency, write_profile  # noqa: E402
from mnm_search.targets import HardwareTarget  # noqa: E402

# Wide FFNs (a coarse step keeps the table at 4 widths) so that width visibly costs time, and
# per-layer widths, so layers 2 and 4 store less than the widest layer.
STORED = [4096, 4096, 2048, 4096, 2048, 4096]
STEP = 1024
PREFILL = HardwareTarget(
    name="t", repeats=5, warmup=1, calibration=8, validation=4, seq_len=32, seed=1
)
DECODE = HardwareTarget(
    name="t-decode",
    phase="decode",
    context_len=12,  # longer than the sliding window (8): the window must roll back too
    seq_len=1,
    repeats=3,
    warmup=1,
    calibration=8,
    validation=4,
)


def make_family(**overrides: Any) -> Gemma3nFamily:
    config = tiny_config(intermediate_size=STORED, **overrides)
    return Gemma3nFamily(model=random_model(config), step=STEP)


@pytest.fixture(scope="module")
def family() -> Gemma3nFamily:
    return make_family()


@pytest.fixture(scope="module")
def profiled(family: Gemma3nFamily) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    torch.set_num_threads(1)
    events: list[dict[str, Any]] = []
    return profiler.profile(family, PREFILL, on_progress=events.append), events


def test_profile_loads_as_a_latency_model(
    family: Gemma3nFamily, profiled: tuple[dict[str, Any], list[dict[str, Any]]]
) -> None:
    profile, _ = profiled
    model = LatencyModel.from_profile(profile)
    assert model.measured_widths == [1024, 2048, 3072, 4096]
    assert profile["ffn_table"]["widths"] == [1024, 2048, 3072, 4096]
    assert model.n_layers == 6 and len(profile["ffn_table"]["per_layer"]) == 6
    assert model.d_ff == 4096 and model.fingerprint == family.fingerprint
    assert model.coefficients is not None
    checkpoint = profile["checkpoint"]
    assert checkpoint["family"] == "gemma3n" and checkpoint["stored_widths"] == STORED
    assert checkpoint["kv_producer_layers"] == PRODUCERS and checkpoint["step"] == STEP
    assert profile["target"]["name"] == "t" and profile["device"]["threads"] == 1

    # Layers storing 2048 are never asked for more: their row repeats the 2048 entry.
    for layer in (2, 4):
        row = model.ffn_table[layer]
        assert row[1] == row[2] == row[3]
    assert model.ffn_table[0][3] > model.ffn_table[0][0]  # a 4096-wide layer is measured

    # What is outside the layers is, per timed call, the whole forward minus its layers: so
    # its median is positive and below the whole forward's, and it is the model's fixed cost.
    fixed = profile["fixed_costs_ms"]
    assert set(fixed) == {"outside_layers", "full_forward"}
    assert model.fixed_ms == pytest.approx(fixed["outside_layers"]["median_ms"], abs=1e-5)
    assert 0 < model.fixed_ms < fixed["full_forward"]["median_ms"]
    assert model.ffn_ms(0, 0) == 0.0
    table = profile["ffn_table"]
    assert table["meaning"] == gemma3n_profile.TABLE_MEANING
    for layer, row in enumerate(model.ffn_table):  # the medians, made non-decreasing
        medians = [table["per_layer"][layer][str(w)]["median_ms"] for w in table["widths"]]
        assert list(row) == pytest.approx(profiler.nondecreasing(medians), abs=1e-5)
        assert list(row) == sorted(row)  # a wider FFN never costs less


def test_predictions_grow_with_width_and_shrink_with_dropped_layers(
    family: Gemma3nFamily, profiled: tuple[dict[str, Any], list[dict[str, Any]]]
) -> None:
    model = LatencyModel.from_profile(profiled[0])
    uniform = [model.predict_ms([min(w, s) for s in STORED]) for w in (1024, 2048, 3072, 4096)]
    assert all(ms > 0 for ms in uniform)
    # Non-decreasing rows and non-negative coefficients: wider never predicts faster.
    assert uniform == sorted(uniform) and uniform[-1] > uniform[0]
    full = family.full_widths()
    for layer in family.skippable_layers:
        dropped = [0 if i == layer else w for i, w in enumerate(full)]
        assert model.predict_ms(dropped) < model.predict_ms(full)


def test_validation_block_matches_the_native_profile(
    profiled: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    profile, _ = profiled
    validation = profile["validation"]
    assert validation["n"] == 4 == len(validation["samples"])
    # The reported metrics are those of the reported samples (the bench reports accuracy).
    samples = validation["samples"]
    measured = [s["measured_ms"] for s in samples]
    for key, predicted in (("", "predicted_ms"), ("naive", "naive_ms")):
        expected = validation_metrics(measured, [s[predicted] for s in samples])
        reported = validation[key] if key else validation
        for metric in ("mape_pct", "within_10pct", "max_abs_pct_err"):
            assert reported[metric] == pytest.approx(expected[metric], abs=1e-2)
    noise = validation_metrics([s["pass1_ms"] for s in samples], [s["pass2_ms"] for s in samples])
    assert validation["noise_floor"]["mape_pct"] == pytest.approx(noise["mape_pct"], abs=1e-2)
    sample = validation["samples"][0]
    assert set(sample) == {
        "widths",
        "measured_ms",
        "pass1_ms",
        "pass2_ms",
        "predicted_ms",
        "naive_ms",
    }
    calibration = [s["widths"] for s in profile["calibration"]["samples"]]
    assert profile["calibration"]["n"] == 8 == len(calibration)
    assert calibration[:4] == [[min(w, s) for s in STORED] for w in (1024, 2048, 3072, 4096)]
    assert calibration[4:6] == [  # layers 0 and 4 dropped: every other skippable layer
        [0, 1024, 1024, 1024, 0, 1024],
        [0, 4096, 2048, 4096, 0, 4096],
    ]
    assert not {tuple(w) for w in calibration} & {tuple(s["widths"]) for s in validation["samples"]}
    assert profile["timing"]["repeats"] == 5 and profile["quick"] is False


def test_progress_events_per_stage(
    profiled: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, events = profiled
    stages = list(dict.fromkeys(e["stage"] for e in events))
    assert stages == list(STAGES)
    for stage in STAGES:
        mine = [e for e in events if e["stage"] == stage]
        assert [e["done"] for e in mine] == [0, 1, 2, 3, 4, 5]
        assert {e["total"] for e in mine} == {5}


def test_write_and_load_round_trip(
    tmp_path: Path,
    family: Gemma3nFamily,
    profiled: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    profile, _ = profiled
    path = write_profile(profile, tmp_path / "gemma.json")
    json.loads(path.read_text())  # strict JSON
    loaded = LatencyModel.load(path, fingerprint=family.fingerprint)
    widths = [2048, 1024, 2048, 4096, 0, 3072]
    assert loaded.predict_ms(widths) == pytest.approx(
        LatencyModel.from_profile(profile).predict_ms(widths)
    )
    with pytest.raises(ProfileError, match="measured for another checkpoint"):
        LatencyModel.load(path, fingerprint="0123456789abcdef")


def test_skip_anchors_drop_every_other_skippable_layer(family: Gemma3nFamily) -> None:
    assert family.skippable_layers == [0, 1, 4, 5]
    assert skip_anchors(family) == [
        [0, 1024, 1024, 1024, 0, 1024],
        [0, 4096, 2048, 4096, 0, 4096],
    ]
    for widths in skip_anchors(family):
        family.validate_widths(widths)
    no_sharing = make_family(num_kv_shared_layers=0)  # every layer skippable
    assert skip_anchors(no_sharing)[0] == [0, 1024, 0, 1024, 0, 1024]


def test_probe_anchors_and_samples(family: Gemma3nFamily) -> None:
    probe = Gemma3nProbe(family, PREFILL, torch.device("cpu"))
    assert probe.table_widths() == [1024, 2048, 3072, 4096]
    uniform = [[min(w, s) for s in STORED] for w in (1024, 2048, 3072, 4096)]
    assert probe.anchors(allow_skip=False) == uniform
    assert probe.anchors(allow_skip=True) == uniform + skip_anchors(family)
    sampled = probe.sample(20, random.Random(0), allow_skip=True, exclude=uniform)
    assert sampled == sample_gemma3n_configs(family, 20, random.Random(0), exclude=uniform)


def test_measure_latency_times_each_configuration(family: Gemma3nFamily) -> None:
    target = HardwareTarget(name="m", repeats=3, warmup=0, seq_len=4)
    rounds: list[int] = []
    configs = [family.full_widths(), [0, 1024, 1024, 1024, 0, 1024]]
    stats = measure_latency(family, target, configs, on_round=rounds.append)
    assert rounds == [1, 2, 3] and [s.n for s in stats] == [3, 3]
    assert all(0 < s.p10_ms <= s.median_ms <= s.p90_ms for s in stats)


def test_sampled_configs_respect_the_allowed_widths(family: Gemma3nFamily) -> None:
    configs = sample_gemma3n_configs(family, 200, random.Random(0))
    assert len({tuple(c) for c in configs}) == 200
    for widths in configs:
        for layer, width in enumerate(widths):
            assert width in family.allowed_widths(layer)
    dropped = {layer for widths in configs for layer, w in enumerate(widths) if w == 0}
    assert dropped and dropped <= set(family.skippable_layers)
    share = sum(w == 0 for c in configs for w in c) / (200 * 6)
    assert 0.03 < share < 0.12  # ~0.1 of the 4 skippable layers out of 6
    totals = sorted(sum(c) for c in configs)  # spread from small to large
    assert totals[10] < 0.4 * sum(STORED) and totals[-10] > 0.8 * sum(STORED)
    kept = sample_gemma3n_configs(family, 100, random.Random(0), allow_skip=False)
    assert all(all(widths) for widths in kept)


def test_allow_skip_false_never_drops_a_layer(family: Gemma3nFamily) -> None:
    target = HardwareTarget(
        name="noskip", repeats=3, warmup=0, calibration=10, validation=6, seq_len=4, seed=3
    )
    profile = profiler.profile(family, target, quick=True, allow_skip=False)
    sampled = [s["widths"] for s in profile["calibration"]["samples"]]
    sampled += [s["widths"] for s in profile["validation"]["samples"]]
    assert len(sampled) == 16 and all(all(widths) for widths in sampled)
    assert profile["quick"] is True and profile["timing"]["repeats"] == 5  # max(5, 3 // 2)


def test_decode_profile_rolls_the_cache_back(family: Gemma3nFamily) -> None:
    profile = profiler.profile(family, DECODE)
    check = profile["decode_check"]
    assert check["compared_with_full_forward"] is True
    assert check["max_abs_logit_diff_vs_full_forward"] < 1e-4
    assert check["max_abs_logit_diff_between_steps"] < 1e-5
    model = LatencyModel.from_profile(profile)
    assert model.predict_ms(family.full_widths()) > 0
    assert profile["target"]["phase"] == "decode"


@pytest.mark.parametrize(
    "widths", [[4096, 1024, 2048, 3072, 2048, 0], [0, 2048, 1024, 1024, 0, 1024]]
)
@torch.inference_mode()
def test_decode_step_equals_a_full_forward(family: Gemma3nFamily, widths: list[int]) -> None:
    """Every call is the same step after `context_len` cached tokens, for sliced models too."""
    device = torch.device("cpu")
    target = HardwareTarget(name="d", phase="decode", context_len=12, seq_len=2)
    view = family.view_model(widths)
    step = gemma3n_profile._runner(view, family, target, device)
    ids = gemma3n_profile._token_ids(family, 1, 14, device)
    reference = view(input_ids=ids, use_cache=True).logits[:, 12:]
    for _ in range(3):
        torch.testing.assert_close(step(), reference, rtol=1e-4, atol=1e-4)


def test_a_cache_that_does_not_roll_back_is_refused(
    family: Gemma3nFamily, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import DynamicCache

    monkeypatch.setattr(DynamicCache, "crop", lambda self, tokens: None)
    with pytest.raises(ConfigError, match=r"does not roll back.*phase: prefill"):
        profiler.profile(family, DECODE)


def test_too_long_target_is_refused(family: Gemma3nFamily) -> None:
    target = HardwareTarget(name="long", seq_len=100, context_len=60, phase="decode")
    with pytest.raises(ConfigError, match=r"160 positions.*max_position_embeddings=128"):
        profiler.profile(family, target)


def test_dtype_mismatch_is_refused_without_copying(family: Gemma3nFamily) -> None:
    target = HardwareTarget(name="bf16", dtype="bfloat16", seq_len=4)
    with pytest.raises(ConfigError, match=r"dtype 'bfloat16'.*loaded as float32.*dtype="):
        profiler.profile(family, target)
    assert family.dtype == torch.float32


def test_device_mismatch_is_refused(family: Gemma3nFamily, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profiler, "select_device", lambda device: torch.device("cuda", 0))
    target = HardwareTarget(name="gpu", device="cuda:0", seq_len=4)
    with pytest.raises(ConfigError, match=r"'cuda:0'.*is on cpu.*prepare_for_target"):
        profiler.profile(family, target)


def test_prepare_for_target_converts_in_place() -> None:
    fresh = make_family()
    target = HardwareTarget(name="bf16", dtype="bfloat16", seq_len=4, repeats=3)
    weight = fresh.model.model.embed_tokens.weight
    assert fresh.prepare_for_target(target) is fresh
    assert fresh.dtype == torch.bfloat16
    assert fresh.model.model.embed_tokens.weight is weight  # converted, never a second model
    widths = [0, 1024, 2048, 1024, 0, 1024]
    logits = fresh.logits(torch.tensor([[1, 2, 3, 4]]), widths)  # slices the converted weights
    assert torch.isfinite(logits).all()
    stats = measure_latency(fresh, target, [widths])  # the probe accepts it now
    assert stats[0].n == 3
