"""The latency calibration is non-negative: no noisy sample set makes it predict a time <= 0.

A free least-squares fit of `c0 + c1 * table + c2 * width_fraction` on noisy timings could
return a negative coefficient and predict negative milliseconds (issue 11: the tiny profile
fixture once failed with "calibration predicts -54.87 ms" on a loaded machine).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from mnm_search.errors import ProfileError
from mnm_search.latency import PROFILE_FORMAT, LatencyModel
from mnm_search.targets import HardwareTarget

TARGET = HardwareTarget(name="unit", device="cpu", phase="prefill", seq_len=8)
N_LAYERS = 6
D_FF = 64
WIDTHS = [8, 16, 32, 64]


def _model(coefficients: list[float] | None = None) -> LatencyModel:
    # Each layer's time is a per-op overhead plus a slope, both varying by layer, so the
    # table sum is not a linear function of the width sum (else the features collide).
    table = [
        [0.2 + 0.05 * layer + (0.01 + 0.002 * layer) * w for w in WIDTHS]
        for layer in range(N_LAYERS)
    ]
    return LatencyModel(
        target=TARGET,
        fingerprint="fit",
        d_ff=D_FF,
        measured_widths=WIDTHS,
        ffn_ms=table,
        fixed_ms=1.0,
        coefficients=coefficients,
    )


def _configs(n: int, seed: int, *, choices: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    options = choices if choices is not None else [0, *WIDTHS]
    return [[rng.choice(options) for _ in range(N_LAYERS)] for _ in range(n)]


def _uniform() -> list[list[int]]:
    return [[w] * N_LAYERS for w in WIDTHS]


def _samples(
    truth: list[float], configs: list[list[int]], *, noise: float, seed: int
) -> list[tuple[list[int], float]]:
    """(widths, ms) with multiplicative log-normal noise around the true model."""
    model, rng = _model(truth), np.random.default_rng(seed)
    return [(w, model.predict_ms(w) * float(np.exp(rng.normal(0.0, noise)))) for w in configs]


def _plain_least_squares(samples: list[tuple[list[int], float]]) -> np.ndarray:
    """What `fit` did before: the same weighted system, without bounds."""
    model = _model()
    x = np.array([model.features(w) for w, _ in samples])
    y = np.array([ms for _, ms in samples])
    coef, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
    return coef


def _check_configs() -> list[list[int]]:
    """Uniform models at measured and in-between widths, and random mixes of any widths."""
    between = [[w] * N_LAYERS for w in (1, 4, 12, 24, 48, 63)]
    return _uniform() + between + _configs(300, seed=99, choices=list(range(D_FF + 1)))


def _check_positive(fitted: LatencyModel) -> None:
    assert fitted.coefficients is not None
    assert all(c >= 0 for c in fitted.coefficients), fitted.coefficients
    for widths in _check_configs():
        if any(widths):
            assert fitted.predict_ms(widths) > 0, (widths, fitted.coefficients)
    # Every FFN skipped leaves only the intercept, which is a time, not a debt.
    assert fitted.predict_ms([0] * N_LAYERS) >= 0


def test_clean_data_recovers_the_true_coefficients() -> None:
    truth = [3.0, 1.2, 0.8]
    samples = _samples(truth, _uniform() + _configs(20, seed=1), noise=0.0, seed=0)
    assert _model().fit(samples).coefficients == pytest.approx(truth, rel=1e-6)


def test_clean_data_with_a_zero_coefficient_recovers_it() -> None:
    truth = [2.0, 1.0, 0.0]  # the table alone explains the time: c2 must come out 0, not < 0
    samples = _samples(truth, _uniform() + _configs(20, seed=2), noise=0.0, seed=0)
    assert _model().fit(samples).coefficients == pytest.approx(truth, rel=1e-6, abs=1e-9)


def test_a_superlinear_machine_gets_no_negative_intercept() -> None:
    # End-to-end time that grows faster than the table (weights spilling out of cache) is
    # fitted exactly by a negative intercept, which then predicts negative time for narrow
    # configurations. The bounded fit gives the best non-negative one instead.
    truth = [-4.0, 2.0, 0.0]
    configs = _uniform() + _configs(20, seed=3, choices=WIDTHS)
    samples = [(w, _model(truth).predict_ms(w)) for w in configs]
    assert all(ms > 0 for _, ms in samples)
    plain = _plain_least_squares(samples)
    assert plain[0] == pytest.approx(-4.0)
    assert _model(list(plain)).predict_ms([8] + [0] * (N_LAYERS - 1)) < 0
    fitted = _model().fit(samples)
    _check_positive(fitted)


NOISY = [
    # (truth, noise sigma, number of random configs besides the uniform ones, seed)
    pytest.param([3.0, 1.2, 0.8], 0.02, 20, 10, id="steady-machine"),
    pytest.param([3.0, 1.2, 0.8], 0.20, 20, 11, id="busy-machine"),
    pytest.param([0.5, 1.0, 0.0], 0.10, 8, 12, id="table-explains-all"),
    pytest.param([0.0, 1.0, 2.0], 0.15, 8, 13, id="no-fixed-cost"),
    pytest.param([5.0, 0.0, 0.0], 0.30, 0, 14, id="flat-uniform-only"),
    pytest.param([0.1, 0.05, 0.0], 0.50, 4, 15, id="tiny-and-very-noisy"),
    pytest.param([1.0, 2.0, 1.0], 0.80, 2, 16, id="wild"),
    pytest.param([1.0, 2.0, 1.0], 0.50, 2, 0, id="busy-few-samples"),
]


@pytest.mark.parametrize(("truth", "noise", "n_random", "seed"), NOISY)
def test_noisy_samples_never_fit_a_negative_time(
    truth: list[float], noise: float, n_random: int, seed: int
) -> None:
    samples = _samples(truth, _uniform() + _configs(n_random, seed), noise=noise, seed=seed)
    fitted = _model().fit(samples)
    _check_positive(fitted)
    plain = _plain_least_squares(samples)
    if (plain >= 0).all():  # the bound is inactive: the same optimum as before
        assert fitted.coefficients == pytest.approx(list(plain), rel=1e-6, abs=1e-9)


def test_the_noisy_table_holds_sets_where_plain_least_squares_goes_negative() -> None:
    """The table above is not vacuous: plain least squares fits a negative coefficient on some
    of its sets, and on some predicts a negative time for a configuration."""
    negative_coefficient, negative_time = [], []
    for param in NOISY:
        truth, noise, n_random, seed = param.values
        samples = _samples(truth, _uniform() + _configs(n_random, seed), noise=noise, seed=seed)
        plain = _plain_least_squares(samples)
        if (plain < 0).any():
            negative_coefficient.append(param.id)
        model = _model(list(plain))
        if min(model.predict_ms(w) for w in _check_configs() if any(w)) <= 0:
            negative_time.append(param.id)
    assert len(negative_coefficient) >= 3, negative_coefficient
    assert negative_time, "no set where plain least squares predicts a negative time"


def test_many_random_noisy_sets() -> None:
    for seed in range(40):
        rng = random.Random(seed)
        truth = [rng.choice([0.0, rng.uniform(0, 5)]) for _ in range(2)] + [rng.uniform(0, 3)]
        configs = _uniform() + _configs(rng.randint(0, 12), seed)
        samples = _samples(truth, configs, noise=rng.uniform(0.0, 0.6), seed=seed)
        _check_positive(_model().fit(samples))


def test_a_fitted_noisy_profile_loads() -> None:
    truth, noise, n_random, seed = NOISY[-1].values
    fitted = _model().fit(
        _samples(truth, _uniform() + _configs(n_random, seed), noise=noise, seed=seed)
    )
    profile = {
        "format": PROFILE_FORMAT,
        "target": TARGET.to_dict(),
        "checkpoint": {"fingerprint": "fit", "d_ff": D_FF, "n_layers": N_LAYERS},
        "latency_model": fitted.to_dict(),
    }
    restored = LatencyModel.from_profile(json.loads(json.dumps(profile)))
    assert restored.coefficients == fitted.coefficients


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_fit_refuses_impossible_measurements(bad: float) -> None:
    samples = [*_samples([1.0, 1.0, 1.0], _uniform(), noise=0.0, seed=0), ([8] * N_LAYERS, bad)]
    with pytest.raises(ProfileError, match="a latency must be a finite time > 0 ms"):
        _model().fit(samples)


@pytest.mark.parametrize("factor", [0.5, 0.935, 1.0, 1.23, 3.0])
@pytest.mark.parametrize("coefficients", [[3.0, 1.2, 0.8], [0.0, 1.0, 0.0], None])
def test_rescale_multiplies_every_prediction_and_keeps_coefficients_non_negative(
    factor: float, coefficients: list[float] | None
) -> None:
    """The fresh-process calibration: one factor on top of the fit, ratios kept."""
    model = _model(coefficients)
    configs = _check_configs()
    before = [model.predict_ms(w) for w in configs]
    model.rescale(factor)
    assert model.coefficients is not None and all(c >= 0 for c in model.coefficients)
    assert [model.predict_ms(w) for w in configs] == pytest.approx([b * factor for b in before])


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "2"])
def test_rescale_refuses_a_factor_that_is_not_a_positive_number(bad: object) -> None:
    with pytest.raises(ProfileError, match="factor"):
        _model([1.0, 1.0, 0.0]).rescale(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("truth", "noise", "seed"),
    [
        ([3.0, 1.2, 0.8], 0.0, 0),
        ([6.5, 1.1, 0.0], 0.01, 1),
        ([0.9, 1.45, 0.07], 0.03, 2),
        ([7.5, 0.05, 1.6], 0.02, 3),
    ],
)
def test_fit_on_drift_corrected_samples_predicts_like_the_truth(
    truth: list[float], noise: float, seed: int
) -> None:
    """Calibration timings on a common scale (what the drift correction provides) fit a
    model whose predictions match the true ones within the noise, whatever split between
    the collinear table and width terms the fit picks."""
    configs = _uniform() + _configs(28, seed)
    fitted = _model().fit(_samples(truth, configs, noise=noise, seed=seed))
    assert fitted.coefficients is not None and min(fitted.coefficients) >= 0
    true_model = _model(truth)
    held_out = _configs(50, seed + 100, choices=WIDTHS)
    errors = [abs(fitted.predict_ms(w) / true_model.predict_ms(w) - 1) for w in held_out]
    assert np.mean(errors) <= 2 * noise + 1e-9
