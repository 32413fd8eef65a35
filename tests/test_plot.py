"""Figures from Pareto tables, on a synthetic results table with the DESIGN §3 columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from mnm_search import plot as plot_module
from mnm_search.errors import ConfigError
from mnm_search.pareto import pareto_front
from mnm_search.plot import pareto_figure, save_figure, width_heatmap

GRANS = (128, 256, 512, 1024)
NAMES = dict(zip(GRANS, ("S", "M", "L", "XL")))


def synthetic_trials(n_random: int = 40, n_layers: int = 4, seed: int = 0) -> pd.DataFrame:
    """Uniform, min-slope and random configurations; later layers matter more for the loss."""
    rng = np.random.default_rng(seed)
    configs = [("uniform " + NAMES[g], [g] * n_layers) for g in GRANS]
    configs += [("min-slope", [128] * k + [256] * (n_layers - k)) for k in range(1, n_layers)]
    configs += [("sampler", [int(w) for w in rng.choice(GRANS, n_layers)]) for _ in range(n_random)]
    rows = []
    for trial, (source, widths) in enumerate(configs):
        rows.append(
            {
                "trial": trial,
                "widths": ",".join(map(str, widths)),
                "loss": 1.5
                + sum(0.05 * np.log2(1024 / w) * (1 + i) for i, w in enumerate(widths)) / n_layers
                + rng.normal(0, 0.002),
                "params": 1_000_000 + 512 * sum(widths),
                "latency_ms": 1.0 + sum(widths) / 1000 + rng.normal(0, 0.01),
                "memory_bytes": 4_000_000 + 2048 * sum(widths),
                "state": "COMPLETE",
                "feasible": True,
                "source": source,
            }
        )
    return pd.DataFrame(rows)


def _uniform(trials: pd.DataFrame) -> dict[str, pd.Series]:
    rows = trials[trials["source"].str.startswith("uniform")]
    return {row["source"].split()[1]: row for _, row in rows.iterrows()}


@pytest.mark.parametrize(
    ("cost", "unit", "scale"),
    [("latency_ms", "ms", 1.0), ("params", "millions", 1e-6), ("memory_bytes", "MiB", 2**-20)],
)
def test_pareto_figure(cost: str, unit: str, scale: float) -> None:
    trials = synthetic_trials()
    front = pareto_front(trials, ("loss", cost))
    heuristic = trials[trials["source"] == "min-slope"]
    fig = pareto_figure(
        trials,
        front,
        cost=cost,
        uniform=_uniform(trials),
        heuristic=heuristic,
        budget=float(trials[cost].median()),
        target="cpu-prefill",
    )
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert unit in ax.get_xlabel() and "nats/token" in ax.get_ylabel()
    (step,) = [line for line in ax.get_lines() if line.get_label().startswith("Pareto front")]
    ordered = front.sort_values(cost)
    np.testing.assert_allclose(step.get_xdata(), ordered[cost] * scale)
    np.testing.assert_allclose(step.get_ydata(), ordered["loss"])
    assert step.get_drawstyle() == "steps-post"
    assert [t.get_text() for t in ax.texts] == ["S", "M", "L", "XL"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == f"all trials ({len(trials)})"
    assert any(t.startswith("heuristic") for t in legend)
    assert any(t.startswith("budget") for t in legend)
    (budget,) = [line for line in ax.get_lines() if line.get_label().startswith("budget")]
    assert budget.get_xdata()[0] == pytest.approx(trials[cost].median() * scale)


def test_pareto_figure_leaves_out_unfinished_trials() -> None:
    trials = synthetic_trials(n_random=5)
    trials.loc[0, "state"] = "RUNNING"
    trials.loc[1, "loss"] = np.nan
    fig = pareto_figure(trials, pareto_front(trials), budget=None)
    (ax,) = fig.axes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == f"all trials ({len(trials) - 2})"
    assert not any(t.startswith("budget") for t in legend)


def test_unknown_cost_column() -> None:
    trials = synthetic_trials(n_random=2)
    with pytest.raises(ConfigError, match="cost must be one of"):
        pareto_figure(trials, trials, cost="flops")


def test_width_heatmap_rows_follow_cost() -> None:
    trials = synthetic_trials()
    front = pareto_front(trials, ("loss", "latency_ms"))
    fig = width_heatmap(front.sample(frac=1.0, random_state=1), names=NAMES)
    (ax, _colorbar) = fig.axes
    ordered = front.sort_values("latency_ms")
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert [int(label.split()[0][1:]) for label in labels] == ordered["trial"].tolist()
    (image,) = ax.get_images()
    widths = np.array([[int(w) for w in s.split(",")] for s in ordered["widths"]])
    levels = sorted(set(widths.flat) | set(GRANS))
    np.testing.assert_array_equal(np.asarray(image.get_array()), np.searchsorted(levels, widths))
    cells = [t.get_text() for t in ax.texts]
    assert cells[: widths.shape[1]] == [NAMES[w] for w in widths[0]]
    assert ax.get_xlabel() == "layer"


def test_width_heatmap_names_skips_and_odd_widths() -> None:
    front = pd.DataFrame(
        {"trial": [1, 2], "widths": ["0,128", "300,1024"], "loss": [2.0, 1.0], "latency_ms": [1, 2]}
    )
    fig = width_heatmap(front, names=NAMES)
    assert [t.get_text() for t in fig.axes[0].texts] == ["skip", "S", "300", "XL"]


def test_width_heatmap_of_an_empty_front() -> None:
    empty = synthetic_trials(n_random=0).iloc[0:0]
    with pytest.raises(ConfigError, match="no finished trial"):
        width_heatmap(empty)


def test_save_figure_writes_png(tmp_path: Path) -> None:
    trials = synthetic_trials(n_random=5)
    path = save_figure(pareto_figure(trials, pareto_front(trials)), tmp_path / "sub" / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["p.png"]


def test_failed_save_keeps_the_old_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.png"
    path.write_bytes(b"old")
    fig = pareto_figure(synthetic_trials(n_random=2), synthetic_trials(n_random=2))

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(OSError, match="No space left"):
        plot_module.save_figure(fig, path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]
