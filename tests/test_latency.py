"""The latency model: interpolation, least-squares calibration, metrics, and its JSON file."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest

from mnm_search.errors import ProfileError, WidthsError
from mnm_search.latency import (
    PROFILE_FORMAT,
    LatencyModel,
    spearman,
    validation_metrics,
)
from mnm_search.targets import HardwareTarget, machine_facts

TARGET = HardwareTarget(name="unit", device="cpu", phase="prefill", seq_len=8)


def _model(coefficients: list[float] | None = None) -> LatencyModel:
    # Layer 1 is slower than layer 0, so per-layer lookups are visible.
    return LatencyModel(
        target=TARGET,
        fingerprint="abc",
        d_ff=64,
        measured_widths=[8, 16, 32, 64],
        ffn_ms=[[1.0, 2.0, 4.0, 8.0], [2.0, 3.0, 5.0, 9.0]],
        fixed_ms=10.0,
        coefficients=coefficients,
    )


@pytest.mark.parametrize(
    ("layer", "width", "expected"),
    [
        (0, 0, 0.0),  # skipped FFN
        (0, 8, 1.0),
        (0, 64, 8.0),
        (1, 16, 3.0),
        (0, 24, 3.0),  # halfway between 16 and 32
        (1, 48, 7.0),
        (0, 4, 0.5),  # below the smallest: the 8..16 line extended
        (1, 1, 1.125),
    ],
)
def test_ffn_time_lookup_and_interpolation(layer: int, width: int, expected: float) -> None:
    assert _model().ffn_ms(layer, width) == pytest.approx(expected)


def test_extrapolation_below_the_smallest_width_is_floored_at_zero() -> None:
    model = LatencyModel(
        target=TARGET,
        fingerprint="x",
        d_ff=64,
        measured_widths=[8, 16],
        ffn_ms=[[1.0, 9.0]],
        fixed_ms=0.0,
    )
    assert model.ffn_ms(0, 1) == 0.0


def test_uncalibrated_prediction_is_the_naive_sum() -> None:
    model = _model()
    assert model.naive_ms([8, 64]) == pytest.approx(10.0 + 1.0 + 9.0)
    assert model.predict_ms([8, 64]) == model.naive_ms([8, 64])
    assert model.predict_ms([0, 0]) == pytest.approx(10.0)


def test_calibrated_prediction_applies_the_coefficients() -> None:
    model = _model([3.0, 2.0, 0.5])
    # features: 1, table = 2 + 9 = 11, width fraction = (16 + 64) / 64
    assert model.predict_ms([16, 64]) == pytest.approx(3.0 + 2.0 * 11 + 0.5 * 80 / 64)


def test_fit_recovers_known_coefficients() -> None:
    def model(coefficients: list[float] | None = None) -> LatencyModel:
        # Per-op overhead bends the table away from proportional (else the features collide).
        return LatencyModel(
            target=TARGET,
            fingerprint="x",
            d_ff=64,
            measured_widths=[8, 16, 32, 64],
            ffn_ms=[[1.0, 1.3, 2.0, 4.0], [1.1, 1.4, 2.2, 4.1]],
            fixed_ms=1.0,
            coefficients=coefficients,
        )

    truth = model([4.0, 1.5, 2.0])
    configs = [[a, b] for a in (0, 8, 16, 32, 64) for b in (8, 24, 64)]
    samples = [(w, truth.predict_ms(w)) for w in configs]
    fitted = model().fit(samples)
    assert fitted.coefficients == pytest.approx([4.0, 1.5, 2.0], rel=1e-6)


def test_fit_needs_enough_samples() -> None:
    with pytest.raises(ProfileError, match="at least 4"):
        _model().fit([([8, 8], 1.0), ([16, 16], 2.0)])


def test_interpolated_layers_are_reported() -> None:
    assert _model().interpolated_layers([8, 64]) == []
    assert _model().interpolated_layers([0, 40]) == [1]


@pytest.mark.parametrize(
    ("widths", "message"),
    [([8], "got 1 widths, but the profile has 2 layers"), ([8, 65], "layer 1: width 65")],
)
def test_bad_widths_are_refused(widths: list[int], message: str) -> None:
    with pytest.raises(WidthsError, match=message):
        _model().predict_ms(widths)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"measured_widths": [16, 8]}, "strictly increasing"),
        ({"ffn_ms": [[1.0, 2.0]]}, "one row of 4 times per layer"),
        ({"coefficients": [1.0]}, "coefficients must hold 3 values"),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {
        "target": TARGET,
        "fingerprint": "x",
        "d_ff": 64,
        "measured_widths": [8, 16, 32, 64],
        "ffn_ms": [[1.0, 2.0, 3.0, 4.0]],
        "fixed_ms": 1.0,
    }
    with pytest.raises(ProfileError, match=message):
        LatencyModel(**{**base, **kwargs})


def test_validation_metrics() -> None:
    metrics = validation_metrics([10.0, 20.0, 40.0, 80.0], [11.0, 19.0, 40.0, 100.0])
    assert metrics["mape_pct"] == pytest.approx((10 + 5 + 0 + 25) / 4)
    assert metrics["within_10pct"] == 0.75
    assert metrics["max_abs_pct_err"] == pytest.approx(25.0)
    assert metrics["spearman"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
        ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
        ([1, 2, 3], [1, 1, 2], 0.8660254),  # ties get average ranks
    ],
)
def test_spearman(a: list[float], b: list[float], expected: float) -> None:
    assert spearman(a, b) == pytest.approx(expected)


def test_spearman_of_constant_values_is_nan() -> None:
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def _profile(model: LatencyModel, **device: Any) -> dict[str, Any]:
    facts = {**machine_facts(model.target), **device}
    return {
        "format": PROFILE_FORMAT,
        "target": model.target.to_dict(),
        "device": facts,
        "checkpoint": {"fingerprint": model.fingerprint, "d_ff": model.d_ff},
        "latency_model": model.to_dict(),
    }


def test_from_profile_round_trips() -> None:
    model = _model([1.0, 2.0, 3.0])
    restored = LatencyModel.from_profile(json.loads(json.dumps(_profile(model))))
    assert restored.target == TARGET
    assert restored.fingerprint == "abc"
    for widths in ([8, 8], [0, 64], [24, 40]):
        assert restored.predict_ms(widths) == pytest.approx(model.predict_ms(widths))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p.pop("latency_model"), "lacks 'latency_model'"),
        (lambda p: p["checkpoint"].pop("fingerprint"), "lacks 'fingerprint'"),
        (lambda p: p.update(format="something-else"), "not an mnm latency profile"),
        (lambda p: p["target"].update(phase="train"), "'phase' must be one of"),
        (lambda p: p["latency_model"].update(fixed_ms="fast"), "invalid value"),
    ],
)
def test_from_profile_names_what_is_wrong(mutate: Any, message: str) -> None:
    profile = _profile(_model([1.0, 2.0, 3.0]))
    mutate(profile)
    with pytest.raises(ProfileError, match=message):
        LatencyModel.from_profile(profile)


def _write(tmp_path: Path, profile: dict[str, Any]) -> Path:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    return path


def test_load_checks_the_checkpoint(tmp_path: Path) -> None:
    path = _write(tmp_path, _profile(_model([1.0, 2.0, 3.0])))
    assert LatencyModel.load(path, fingerprint="abc").fingerprint == "abc"
    with pytest.raises(ProfileError, match="another checkpoint \\(fingerprint abc, not this one's"):
        LatencyModel.load(path, fingerprint="def")


def test_another_checkpoints_profile_is_named_before_its_numbers_are_judged(
    tmp_path: Path,
) -> None:
    # Coefficients a noisy least-squares fit once wrote: negative at the uniform models.
    path = _write(tmp_path, _profile(_model([24.05, -39.09, -2.04])))
    with pytest.raises(ProfileError, match="another checkpoint"):
        LatencyModel.load(path, fingerprint="def")


def test_load_warns_about_other_hardware_only(tmp_path: Path) -> None:
    same = _write(tmp_path, _profile(_model([1.0, 2.0, 3.0])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LatencyModel.load(same)
    other = _write(tmp_path, _profile(_model([1.0, 2.0, 3.0]), cpu_model="Imaginary CPU 9000"))
    with pytest.warns(UserWarning, match="other hardware.*Imaginary CPU 9000"):
        LatencyModel.load(other)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"format": "mnm-latency-profile", "target": ', "corrupt"),
        ("\x00\xff", "corrupt"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_load_refuses_corrupt_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=message):
        LatencyModel.load(path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        LatencyModel.load(tmp_path / "none.json")
