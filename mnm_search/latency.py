"""The latency model: predict any Mix'n'Match configuration's latency from a profile JSON.

A profile holds a per-layer, per-width table of FFN times measured in isolation, the fixed
costs (embedding, attention, norms, head) and a least-squares calibration fitted on measured
end-to-end latencies of physically sliced models:

    latency_ms = c0 + c1 * sum_i ffn_ms[i](w_i) + c2 * sum_i w_i / d_ff

The table alone ("naive": fixed costs + table) misses what isolation hides: weights that stay
in cache when one FFN runs alone but stream from memory in a whole model, and the glue
between ops. The second term scales the table; the third charges per weight streamed.
All three features are >= 0 for any widths, so the fit keeps c0, c1, c2 >= 0 (non-negative
least squares) and no configuration can be predicted to take negative time.
Widths between the measured ones are interpolated linearly (the JSON says which were measured).
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mnm_search.config import MAX_LAYERS, SIZE_CAPS
from mnm_search.errors import ConfigError, ProfileError, WidthsError
from mnm_search.targets import HardwareTarget, hardware_differences, machine_facts

PROFILE_FORMAT = "mnm-latency-profile"
# 2: end-to-end timings in steady state, the second validation pass corrected for drift by a
# reference configuration, and the `fresh_validation` and `drift` blocks. A version-1 profile
# loads as it is (the latency model's fields did not change); it lacks those blocks.
PROFILE_VERSION = 2
FEATURES = ("constant", "ffn_table_ms", "ffn_width_fraction")
# A profile of a 4096-layer model with a dozen widths is a few MB; far bigger is not ours.
MAX_PROFILE_BYTES = 64 * 1024 * 1024
RERUN = "re-run `mnm profile` to write a fresh one"
INTERPOLATION = (
    "linear in width between measured widths; below the smallest measured width, linear "
    "extrapolation of the two smallest (floored at 0); width 0 (skipped FFN) costs 0"
)


class LatencyModel:
    """Predicts end-to-end latency (ms) of a configuration on one target for one checkpoint."""

    def __init__(
        self,
        *,
        target: HardwareTarget,
        fingerprint: str,
        d_ff: int,
        measured_widths: Sequence[int],
        ffn_ms: Sequence[Sequence[float]],
        fixed_ms: float,
        coefficients: Sequence[float] | None = None,
    ) -> None:
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ProfileError(
                f"checkpoint fingerprint must be a non-empty string, got {fingerprint!r:.80}"
            )
        if not _is_integer(d_ff) or not 0 < d_ff <= SIZE_CAPS["d_ff"]:
            raise ProfileError(
                f"d_ff must be an integer from 1 to {SIZE_CAPS['d_ff']:,}, got {d_ff!r:.80}"
            )
        widths = _number_list("measured_widths", measured_widths, integers=True)
        if not widths or widths != sorted(set(widths)) or widths[0] <= 0 or widths[-1] > d_ff:
            raise ProfileError(
                f"measured_widths must be strictly increasing widths in [1, d_ff={d_ff}], "
                f"got {widths}"
            )
        if isinstance(ffn_ms, (str, bytes)) or not isinstance(ffn_ms, Sequence):
            raise ProfileError(f"ffn_ms must be a list of rows, got {ffn_ms!r:.80}")
        if not 0 < len(ffn_ms) <= MAX_LAYERS:
            raise ProfileError(
                f"ffn_ms must hold one row per layer (1 to {MAX_LAYERS:,}), got {len(ffn_ms)} rows"
            )
        table = [_number_list(f"ffn_ms[{i}]", row) for i, row in enumerate(ffn_ms)]
        if any(len(row) != len(widths) for row in table):
            raise ProfileError(
                f"ffn_ms must hold one row of {len(widths)} times per layer, got "
                f"{[len(row) for row in table]}"
            )
        for layer, row in enumerate(table):
            for j, value in enumerate(row):
                if value < 0:  # a time; also catches what NaN/inf checks in _number_list miss
                    raise ProfileError(
                        f"ffn_ms[{layer}][{j}] (layer {layer}, width {widths[j]}) must be a "
                        f"time >= 0 ms, got {value!r}"
                    )
        fixed = _number("fixed_ms", fixed_ms)
        if fixed < 0:
            raise ProfileError(f"fixed_ms must be a time >= 0 ms, got {fixed!r}")
        if coefficients is not None:
            coefficients = _number_list("coefficients", coefficients)
            if len(coefficients) != len(FEATURES):
                raise ProfileError(
                    f"coefficients must hold {len(FEATURES)} values ({', '.join(FEATURES)}), "
                    f"got {list(coefficients)}"
                )
        ffn_ms, fixed_ms = table, fixed
        self.target = target
        self.fingerprint = fingerprint
        self.d_ff = int(d_ff)
        self.measured_widths = widths
        self.ffn_table = np.asarray(ffn_ms, dtype=float)  # [n_layers, len(measured_widths)]
        self.fixed_ms = float(fixed_ms)
        self.coefficients = list(coefficients) if coefficients is not None else None

    @property
    def n_layers(self) -> int:
        return self.ffn_table.shape[0]

    def ffn_ms(self, layer: int, width: int) -> float:
        """Isolated FFN time of `layer` at `width` (interpolated between measured widths)."""
        if width == 0:
            return 0.0
        xs, ys = self.measured_widths, self.ffn_table[layer]
        if width >= xs[0] or len(xs) == 1:
            if len(xs) == 1:
                return float(ys[0]) * min(width / xs[0], 1.0)
            return float(np.interp(width, xs, ys))
        slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
        return max(0.0, float(ys[0] + slope * (width - xs[0])))

    def _check(self, widths: Sequence[int]) -> list[int]:
        widths = [int(w) for w in widths]
        if len(widths) != self.n_layers:
            raise WidthsError(
                f"got {len(widths)} widths, but the profile has {self.n_layers} layers"
            )
        for layer, width in enumerate(widths):
            if width < 0 or width > self.d_ff:
                raise WidthsError(f"layer {layer}: width {width} is outside [0, {self.d_ff}]")
        return widths

    def features(self, widths: Sequence[int]) -> list[float]:
        widths = self._check(widths)
        table = sum(self.ffn_ms(layer, w) for layer, w in enumerate(widths))
        return [1.0, table, sum(widths) / self.d_ff]

    def naive_ms(self, widths: Sequence[int]) -> float:
        """Fixed costs plus the isolated per-layer FFN times, without calibration."""
        return self.fixed_ms + self.features(widths)[1]

    def predict_ms(self, widths: Sequence[int]) -> float:
        """Calibrated end-to-end latency of `widths` in milliseconds."""
        if self.coefficients is None:
            return self.naive_ms(widths)
        return float(np.dot(self.coefficients, self.features(widths)))

    def interpolated_layers(self, widths: Sequence[int]) -> list[int]:
        """Layers whose width was not measured (their time is interpolated)."""
        return [
            layer
            for layer, w in enumerate(self._check(widths))
            if w != 0 and w not in self.measured_widths
        ]

    def fit(self, samples: Sequence[tuple[Sequence[int], float]]) -> LatencyModel:
        """Non-negative least-squares calibration on (widths, measured ms) pairs; sets and
        returns self.

        Rows are weighted by 1/measured so the fit minimises relative error, which is what
        MAPE and the ±10 % share report. Every feature (the constant, the table sum, the width
        sum) is >= 0, so coefficients >= 0 make every prediction >= 0. A free least-squares fit
        on noisy timings can trade a negative term for a larger other one and then predict a
        negative time for some configurations, uniform ones included (a busy CI machine once
        got -54.87 ms). Each coefficient is a cost (fixed time, table scale, per-weight time)
        that cannot be negative; where the free optimum is already >= 0 both fits agree.
        """
        if len(samples) < len(FEATURES) + 1:
            raise ProfileError(
                f"calibration needs at least {len(FEATURES) + 1} measured configurations, "
                f"got {len(samples)}"
            )
        x = np.array([self.features(widths) for widths, _ in samples])
        y = np.array([ms for _, ms in samples], dtype=float)
        bad = [i for i, ms in enumerate(y) if not (math.isfinite(ms) and ms > 0)]
        if bad:
            raise ProfileError(
                f"calibration sample {bad[0]} measured {y[bad[0]]!r} ms; a latency must be a "
                f"finite time > 0 ms"
            )
        # scipy.optimize takes seconds to import; only profiling fits, loading a profile doesn't.
        from scipy.optimize import nnls

        coef, _ = nnls(x / y[:, None], np.ones_like(y))
        self.coefficients = [float(c) for c in coef]
        return self

    def rescale(self, factor: float) -> LatencyModel:
        """Multiply every prediction by `factor` (> 0); sets and returns self.

        The profile puts its in-process fit on the scale of exported models timed in fresh
        processes this way: one factor, so the coefficients stay >= 0 and their ratios (what
        the fit learned about the configurations) stay as fitted.
        """
        factor = _number("factor", factor)
        if not factor > 0:
            raise ProfileError(f"a latency scale factor must be > 0, got {factor!r}")
        base = self.coefficients if self.coefficients is not None else [self.fixed_ms, 1.0, 0.0]
        self.coefficients = [float(c) * factor for c in base]
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "measured_widths": self.measured_widths,
            "ffn_ms": self.ffn_table.tolist(),
            "fixed_ms": self.fixed_ms,
            "features": list(FEATURES),
            "coefficients": self.coefficients,
            "interpolation": INTERPOLATION,
        }

    @classmethod
    def from_profile(cls, profile: dict[str, Any]) -> LatencyModel:
        """Build from a profile dict (as `profiler.profile` returns or the JSON holds)."""
        if not isinstance(profile, dict):
            raise ProfileError("a latency profile must be a JSON object")
        if profile.get("format") != PROFILE_FORMAT:
            raise ProfileError(
                f"not an mnm latency profile (format {profile.get('format')!r}, expected "
                f"{PROFILE_FORMAT!r}); write one with `mnm profile`"
            )
        try:
            model = profile["latency_model"]
            checkpoint = profile["checkpoint"]
            target = HardwareTarget.from_dict(profile["target"], source="profile target")
            if not isinstance(model, dict) or not isinstance(checkpoint, dict):
                raise ProfileError(
                    "fields 'latency_model' and 'checkpoint' must be JSON objects; " + RERUN
                )
            latency = cls(
                target=target,
                fingerprint=checkpoint["fingerprint"],
                d_ff=checkpoint["d_ff"],
                measured_widths=model["measured_widths"],
                ffn_ms=model["ffn_ms"],
                fixed_ms=model["fixed_ms"],
                coefficients=model["coefficients"],
            )
        except KeyError as exc:
            raise ProfileError(
                f"latency profile lacks {exc.args[0]!r}; re-run `mnm profile`"
            ) from None
        except ProfileError as exc:
            raise ProfileError(f"latency profile has an invalid value: {exc}; {RERUN}") from None
        except ConfigError as exc:
            raise ProfileError(f"latency profile has an invalid target: {exc}") from None
        n_layers = checkpoint.get("n_layers")
        if n_layers is not None and n_layers != latency.n_layers:
            raise ProfileError(
                f"latency profile: checkpoint.n_layers is {n_layers!r:.40}, but ffn_ms holds "
                f"{latency.n_layers} rows (one per layer); {RERUN}"
            )
        # `fit` keeps every coefficient >= 0, so a profile it wrote predicts a positive time
        # for every uniform model. A file that does not was damaged or hand-made. (Profiles
        # from mnm versions that fitted without bounds may hold a negative coefficient; they
        # still load while the uniform models, which that fit was anchored on, stay positive.)
        for width in latency.measured_widths:
            predicted = latency.predict_ms([width] * latency.n_layers)
            if not predicted > 0:
                raise ProfileError(
                    f"latency profile: the calibration (coefficients {latency.coefficients}) "
                    f"predicts {predicted:.4g} ms for the uniform model of width {width}, which "
                    f"it was fitted on; a latency must be positive: {RERUN}"
                )
        return latency

    @classmethod
    def load(cls, path: str | Path, *, fingerprint: str | None = None) -> LatencyModel:
        """Read a profile JSON; refuse another checkpoint's, warn about other hardware."""
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"latency profile {path} does not exist; create it: mnm profile")
        size = path.stat().st_size
        if size > MAX_PROFILE_BYTES:
            raise ProfileError(
                f"latency profile {path} is {size:,} bytes, more than a profile can be "
                f"({MAX_PROFILE_BYTES:,}); is it the right file? Otherwise {RERUN}"
            )
        try:
            profile = json.loads(path.read_text(encoding="utf-8"))
        # ValueError: bad JSON, bad UTF-8, and integers of more than 4300 digits.
        except ValueError as exc:
            raise ProfileError(
                f"latency profile {path} is corrupt (not valid JSON: {exc}); re-run mnm profile"
            ) from None
        except RecursionError:
            raise ProfileError(f"latency profile {path} is nested too deeply; {RERUN}") from None
        # Another checkpoint's profile is the likelier mistake: say so before judging its numbers.
        checkpoint = profile.get("checkpoint") if isinstance(profile, dict) else None
        recorded = checkpoint.get("fingerprint") if isinstance(checkpoint, dict) else None
        if fingerprint is not None and isinstance(recorded, str) and recorded != fingerprint:
            raise ProfileError(
                f"latency profile {path} was measured for another checkpoint (fingerprint "
                f"{recorded:.80}, not this one's {fingerprint}); profile this checkpoint "
                f"with `mnm profile`"
            )
        try:
            model = cls.from_profile(profile)
        except ProfileError as exc:
            raise ProfileError(f"{path}: {exc}") from None
        device = profile.get("device")
        recorded = device if isinstance(device, dict) else {}  # facts only inform a warning
        diffs = hardware_differences(recorded, machine_facts(model.target))
        if diffs:
            warnings.warn(
                f"latency profile {path} was measured on other hardware ({'; '.join(diffs)}); "
                f"predictions may not hold here",
                stacklevel=2,
            )
        return model


def _is_integer(value: Any) -> bool:
    """An integer, numpy's included; JSON's `true` and `3.0` are not."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(field: str, value: Any) -> float:
    """A finite JSON number (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ProfileError(f"{field} must be a number, got {value!r:.80}")
    if not math.isfinite(value):
        raise ProfileError(f"{field} must be finite, got {value!r}")
    return float(value)


def _number_list(field: str, values: Any, *, integers: bool = False) -> list[Any]:
    """A list of finite numbers (integers where `integers`), each checked by position."""
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Sequence):
        raise ProfileError(f"{field} must be a list of numbers, got {values!r:.80}")
    if integers:
        bad = [(i, v) for i, v in enumerate(values) if not _is_integer(v)]
        if bad:
            raise ProfileError(f"{field}[{bad[0][0]}] must be an integer, got {bad[0][1]!r:.80}")
        return [int(v) for v in values]
    return [_number(f"{field}[{i}]", v) for i, v in enumerate(values)]


def validation_metrics(
    measured: Sequence[float], predicted: Sequence[float]
) -> dict[str, float | int]:
    """MAPE (%), Spearman rank correlation, share within ±10 % and max error of predictions."""
    m = np.asarray(measured, dtype=float)
    p = np.asarray(predicted, dtype=float)
    rel = np.abs(p - m) / m
    return {
        "n": len(m),
        "mape_pct": round(float(rel.mean() * 100), 3),
        "spearman": round(spearman(m, p), 4),
        "within_10pct": round(float((rel <= 0.10).mean()), 4),
        "max_abs_pct_err": round(float(rel.max() * 100), 3),
    }


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than 2 points."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):  # average the ranks of ties
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks
