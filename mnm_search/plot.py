"""Matplotlib figures from Pareto tables: quality vs cost, and per-layer widths of the front;
and the speed-up of self-speculative decoding vs the draft's cost.

Pure functions of DataFrames (the DESIGN §3 columns: `trial`, `widths`, `loss`, `params`,
`latency_ms`, `memory_bytes`; `acceptance`, `speedup` for speculative-draft searches); they
return a `Figure` and never read results directories. The quality axis is the loss by
default; a search for drafts plots its predicted speed-up (or acceptance) vs cost instead,
where its front (a single best point when `speedup` was the only objective) rises with cost.
Figures are built without pyplot, so no global state and no display: PNGs render with Agg.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from mnm_search._files import atomic_write_bytes
from mnm_search.errors import ConfigError

# cost column -> (axis label, unit, scale from the column's unit to the displayed one)
COST_AXES: dict[str, tuple[str, str, float]] = {
    "latency_ms": ("predicted latency", "ms", 1.0),
    "params": ("parameters", "millions", 1e-6),
    "memory_bytes": ("memory", "MiB", 1.0 / 2**20),
}


# quality column -> (axis label, short name for titles)
QUALITY_AXES: dict[str, tuple[str, str]] = {
    "loss": ("validation loss (nats/token)", "validation loss"),
    "speedup": ("predicted speculative speed-up over the full model (x)", "predicted speed-up"),
    "acceptance": ("acceptance (top-1 agreement with the full model)", "acceptance"),
}


def quality_label(quality: str, *, short: bool = False) -> str:
    """Axis label (or, `short`, the name for titles) of a quality column."""
    label, name = QUALITY_AXES.get(quality, (quality, quality))
    return name if short else label


def cost_label(cost: str, target: str | None = None) -> str:
    """Axis label with units, e.g. `predicted latency (ms, cpu-prefill)`."""
    name, unit, _ = _axis(cost)
    return f"{name} ({unit}, {target})" if target else f"{name} ({unit})"


def _axis(cost: str) -> tuple[str, str, float]:
    if cost not in COST_AXES:
        raise ConfigError(f"cost must be one of {', '.join(COST_AXES)}, got {cost!r}")
    return COST_AXES[cost]


def _finished(df: pd.DataFrame, cost: str, quality: str = "loss") -> pd.DataFrame:
    if quality not in df.columns:
        raise ConfigError(f"the table has no {quality!r} column to plot")
    rows = df.dropna(subset=[quality, cost])
    if "state" in rows.columns:
        rows = rows[rows["state"].astype(str).str.upper() == "COMPLETE"]
    return rows


def pareto_figure(
    trials: pd.DataFrame,
    front: pd.DataFrame,
    *,
    cost: str = "latency_ms",
    quality: str = "loss",
    uniform: Mapping[str, pd.Series] | None = None,
    heuristic: pd.DataFrame | None = None,
    named: pd.DataFrame | None = None,
    budget: float | None = None,
    target: str | None = None,
    title: str | None = None,
) -> Figure:
    """Quality vs cost: every trial faint, the front as a step line, the reference models marked.

    `quality` is the y column: `loss` (lower is better), or a maximised one of a search for
    speculative drafts (`speedup`, `acceptance`); the front is drawn as given either way.

    `uniform` maps a label (`S`, `M`, ...) to the trial row of that uniform model; each is
    marked and labelled. `heuristic` holds the rows of the paper's minimum-slope
    configurations. `named` holds rows of named external configurations (e.g. MatFormer Lab's)
    with a `name` column; each is marked and labelled. `budget` (in the cost column's unit)
    draws a vertical line.
    """
    _, unit, scale = _axis(cost)
    trials = _finished(trials, cost, quality)
    front = _finished(front, cost, quality).sort_values(cost)
    fig = Figure(figsize=(7.5, 4.8), dpi=120, layout="constrained")
    ax = fig.subplots()
    ax.scatter(
        trials[cost] * scale,
        trials[quality],
        s=12,
        color="0.55",
        alpha=0.35,
        linewidths=0,
        label=f"all trials ({len(trials)})",
    )
    if len(front):
        # A step: at any budget, the best quality is that of the last front point within it.
        ax.step(
            front[cost] * scale,
            front[quality],
            where="post",
            color="tab:blue",
            linewidth=2,
            marker="o",
            markersize=4,
            label=f"Pareto front ({len(front)})",
        )
    if heuristic is not None and len(heuristic := _finished(heuristic, cost, quality)):
        ax.scatter(
            heuristic[cost] * scale,
            heuristic[quality],
            s=45,
            marker="^",
            facecolor="none",
            edgecolor="tab:green",
            linewidths=1.4,
            zorder=4,
            label=f"heuristic: min. slope ({len(heuristic)})",
        )
    for i, (label, row) in enumerate((uniform or {}).items()):
        ax.scatter(
            [row[cost] * scale],
            [row[quality]],
            s=70,
            marker="s",
            facecolor="none",
            edgecolor="tab:red",
            linewidths=1.8,
            zorder=5,
            label="uniform models" if i == 0 else None,
        )
        ax.annotate(
            label,
            (row[cost] * scale, row[quality]),
            xytext=(6, 6),
            textcoords="offset points",
            fontsize=9,
            fontweight="bold",
            color="tab:red",
        )
    if named is not None and len(named := _finished(named, cost, quality)):
        ax.scatter(
            named[cost] * scale,
            named[quality],
            s=60,
            marker="D",
            facecolor="none",
            edgecolor="tab:purple",
            linewidths=1.6,
            zorder=5,
            label=f"MatFormer Lab configs ({len(named)})",
        )
        for _, row in named.iterrows():
            ax.annotate(
                str(row["name"]),
                (row[cost] * scale, row[quality]),
                xytext=(6, -10),
                textcoords="offset points",
                fontsize=8,
                color="tab:purple",
            )
    if budget is not None:
        ax.axvline(
            budget * scale,
            color="tab:orange",
            linestyle="--",
            linewidth=1.5,
            label=f"budget {budget * scale:.3g} {unit}",
        )
    ax.set_xlabel(cost_label(cost, target))
    ax.set_ylabel(quality_label(quality))
    ax.set_title(title or "Mix'n'Match configurations: quality vs cost")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.06, y=0.1)  # room for the labels of the extreme models
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    return fig


def _width_matrix(front: pd.DataFrame) -> np.ndarray:
    rows = [[int(w) for w in str(spec).split(",")] for spec in front["widths"]]
    if len({len(r) for r in rows}) > 1:
        raise ConfigError("front members have different numbers of layers")
    return np.array(rows, dtype=int)


def width_heatmap(
    front: pd.DataFrame,
    *,
    cost: str = "latency_ms",
    names: Mapping[int, str] | None = None,
    target: str | None = None,
    title: str | None = None,
) -> Figure:
    """Per-layer FFN width of every front member (rows ordered by cost, cheapest on top).

    Shows which layers earn capacity as the budget grows. `names` maps a width to its
    granularity name (`{128: "S", ...}`); 0 reads as "skip".
    """
    _, unit, scale = _axis(cost)
    front = _finished(front, cost).sort_values(cost)
    if front.empty:
        raise ConfigError("the front has no finished trial to draw")
    matrix = _width_matrix(front)
    levels = sorted(set(matrix.flat) | set(names or {}))
    index = np.searchsorted(levels, matrix)
    names = dict(names or {})
    names.setdefault(0, "skip")
    cmap = ListedColormap(colormaps["viridis"](np.linspace(0.08, 0.95, len(levels))))
    norm = BoundaryNorm(np.arange(len(levels) + 1) - 0.5, len(levels))
    n_rows, n_layers = matrix.shape
    fig = Figure(
        figsize=(max(6.5, 2.5 + 0.6 * n_layers), min(14.0, 1.5 + 0.26 * n_rows)),
        dpi=120,
        layout="constrained",
    )
    ax = fig.subplots()
    image = ax.imshow(index, cmap=cmap, norm=norm, aspect="auto")
    if n_rows * n_layers <= 600:  # cell labels stay legible only up to a point
        for (r, c), width in np.ndenumerate(matrix):
            ax.text(
                c,
                r,
                names.get(int(width), str(width)),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if index[r, c] < len(levels) / 2 else "black",
            )
    ax.set_xticks(range(n_layers), [str(i) for i in range(n_layers)])
    ax.set_xlabel("layer")
    ax.set_yticks(
        range(n_rows),
        [f"#{int(t)}  {c * scale:.3g} {unit}" for t, c in zip(front["trial"], front[cost])],
        fontsize=7,
    )
    ax.set_ylabel(f"front member, cheapest first (trial, {unit})", fontsize=9)
    ax.set_title(title or "FFN width per layer along the Pareto front", fontsize=10)
    bar = fig.colorbar(image, ax=ax, ticks=range(len(levels)), shrink=0.8)
    bar.ax.set_yticklabels([f"{names.get(w, '')} {w}".strip() for w in levels], fontsize=7)
    bar.set_label("FFN width")
    return fig


def speculation_figure(
    points: Sequence[Mapping[str, Any]],
    *,
    target: str | None = None,
    title: str | None = None,
) -> Figure:
    """Speed-up of self-speculative decoding over plain decoding vs the draft's cost ratio.

    One point per draft at its best lookahead: `points` hold `cost_ratio` (c), `lookahead`,
    `measured_speedup`, `predicted_speedup` (expected tokens / (K c + v), v measured) and
    `predicted_speedup_paper` (v = 1), either may be None, and a `label` (the draft's widths).
    A thin line joins each measured point to its prediction; speed-up 1 is plain decoding.
    """
    if not points:
        raise ConfigError("no measured draft to draw")
    fig = Figure(figsize=(7.5, 4.8), dpi=120, layout="constrained")
    ax = fig.subplots()
    ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1, label="plain decoding")
    series: tuple[tuple[str, str, dict[str, Any]], ...] = (
        ("measured_speedup", "measured", {"marker": "o", "color": "tab:blue", "zorder": 4}),
        (
            "predicted_speedup",
            "predicted (v measured)",
            {"marker": "s", "facecolor": "none", "edgecolor": "tab:orange", "zorder": 3},
        ),
        (
            "predicted_speedup_paper",
            "predicted, paper's model (v = 1)",
            {"marker": "x", "color": "tab:green", "zorder": 3},
        ),
    )
    for key, label, style in series:
        shown = [p for p in points if p.get(key) is not None]
        if shown:
            ax.scatter(
                [float(p["cost_ratio"]) for p in shown],
                [float(p[key]) for p in shown],
                s=45,
                linewidths=1.4,
                label=label,
                **style,
            )
    for p in points:
        if p.get("measured_speedup") is None:
            continue
        x, y = float(p["cost_ratio"]), float(p["measured_speedup"])
        if p.get("predicted_speedup") is not None:
            ax.plot([x, x], [y, float(p["predicted_speedup"])], color="0.6", linewidth=0.8)
        ax.annotate(
            f"{p.get('label', '')}, K={p['lookahead']}",
            (x, y),
            xytext=(6, 4),
            textcoords="offset points",
            fontsize=7,
        )
    ax.set_xlabel(f"draft cost c (draft step / full step{', ' + target if target else ''})")
    ax.set_ylabel("speed-up over plain decoding")
    ax.set_title(title or "Self-speculative decoding: each draft at its best lookahead K")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.12, y=0.12)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a PNG atomically: a failed write leaves the previous image (or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())
