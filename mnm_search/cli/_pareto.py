"""`mnm pareto`: the front of a results directory as a table, pareto.csv, a plot and a heat-map."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from mnm_search._files import atomic_write_text, refuse_overlap
from mnm_search.cli._common import (
    JsonOpt,
    add_number_column,
    err,
    loss_label,
    out,
    print_json,
    user_errors,
)
from mnm_search.config import run_length_widths
from mnm_search.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

LAB_PREFIX = "lab: "  # trial source of MatFormer Lab configurations (set by `mnm search`)
PLOT_FILE = "pareto.png"
HEATMAP_FILE = "heatmap.png"


class Results:
    """A results directory, read once: trials, the current front, and what they mean."""

    def __init__(self, results_dir: Path) -> None:
        from mnm_search.export import finished_trials
        from mnm_search.pareto import objective_maximise, pareto_front, read_results
        from mnm_search.plot import COST_AXES

        self.dir = results_dir
        trials, _, self.run_info = read_results(results_dir)
        self.trials = trials
        self.finished = finished_trials(trials, results_dir)
        self.objectives = list(self.run_info.get("objective_columns") or ["loss", "latency_ms"])
        self.objectives = [c for c in self.objectives if c in trials.columns] or ["loss", "params"]
        # Maximised objectives (speculative acceptance, speed-up); the rest are minimised.
        self.maximise = objective_maximise(self.run_info, self.objectives)
        costs = [c for c in self.objectives if c in COST_AXES]
        if costs:
            self.cost = costs[0]
        else:
            self.cost = "latency_ms" if _has(trials, "latency_ms") else "params"
        # The plot's quality axis: a maximised objective where the search had one (a speed-up
        # search plots speed-up vs cost), else the loss.
        self.quality = next((c for c in self.objectives if c in self.maximise), "loss")
        self.front = pareto_front(trials, self.objectives, maximise=self.maximise)
        if self.front.empty:  # e.g. every finished trial broke a constraint
            self.front = pareto_front(
                self.finished.assign(feasible=True), self.objectives, maximise=self.maximise
            )
        # Display names of widths ("S", "M"... for the native family); none for families
        # whose widths are plain numbers.
        self.names: dict[int, str] = {
            width: name for width, name in width_names(self.run_info).items() if name != str(width)
        }
        self.budget = (self.run_info.get("constraints") or {}).get(self.cost)

    def compact(self, widths: str) -> str:
        values = [int(w) for w in str(widths).split(",")]
        if not self.names:
            return run_length_widths(values)
        return " ".join(self.names.get(w, str(w)) for w in values)

    def _seed_kind(self, rows: pd.DataFrame) -> pd.Series:
        """What each row's seed is ("uniform", "min-slope", "named", or empty): the
        `seed_kind` column; results written before it existed had only the label."""
        import pandas as pd

        if "seed_kind" in rows.columns:
            return rows["seed_kind"].fillna("").astype(str)
        if "source" not in rows.columns:
            return pd.Series("", index=rows.index)
        labels = rows["source"].fillna("").astype(str)
        kinds = pd.Series("", index=rows.index)
        kinds[labels.str.startswith("uniform ")] = "uniform"
        kinds[labels == "min-slope"] = "min-slope"
        kinds[labels.str.startswith(LAB_PREFIX)] = "named"
        return kinds

    def named(self) -> pd.DataFrame:
        """Finished rows of named external configurations (MatFormer Lab), with a `name`."""
        rows = self.finished.dropna(subset=[self.cost])
        rows = rows[self._seed_kind(rows) == "named"]
        return rows.assign(name=rows["source"].astype(str).str.removeprefix(LAB_PREFIX))

    def labelled(self) -> tuple[dict[str, pd.Series], pd.DataFrame]:
        """Uniform models by name, and the heuristic (min-slope) rows, among finished trials."""
        rows = self.finished.dropna(subset=[self.cost])
        kinds = self._seed_kind(rows)
        uniform: dict[str, pd.Series] = {}
        for index, row in rows.iterrows():
            values = {int(w) for w in str(row["widths"]).split(",")}
            if len(values) != 1 or 0 in values:
                continue
            width = values.pop()
            # Every layer at one width: a uniform model, seeded or found by the sampler.
            if width in self.names or kinds[index] == "uniform":
                uniform.setdefault(self.names.get(width, str(width)), row)
        order = {name: i for i, name in enumerate(self.names.values())}
        uniform = dict(
            sorted(
                uniform.items(),
                key=lambda item: (order.get(item[0], len(order)), float(item[1][self.cost])),
            )
        )
        return uniform, rows[kinds == "min-slope"]


def _has(df: pd.DataFrame, column: str) -> bool:
    return column in df.columns and not df[column].isna().all()


def width_names(run_info: dict[str, Any]) -> dict[int, str]:
    """Display names of the searched model's uniform widths, e.g. {128: "S", 256: "M"}.

    `mnm search` records them in run.json (`width_names`); for results written before it
    did, they are read from the searched checkpoint's uniform configurations (structure
    only), and widths stay numbers when that checkpoint is gone.
    """
    recorded = run_info.get("width_names")
    if isinstance(recorded, dict):
        try:
            return {int(width): str(name) for width, name in recorded.items()}
        except (TypeError, ValueError):
            return {}
    from mnm_search.errors import MnmError
    from mnm_search.families import load_family

    try:
        family = load_family(run_info.get("checkpoint"), weights=False)
        uniform = family.uniform_configs()
    except (MnmError, OSError, ValueError):
        return {}
    return {widths[0]: name for name, widths in uniform.items() if len(set(widths)) == 1}


def front_table(results: Results) -> pd.DataFrame:
    """The front with perplexity and the comparison with the nearest uniform model (by cost)."""
    import pandas as pd

    from mnm_search.evaluator import perplexity

    front = results.front.sort_values(results.cost).reset_index(drop=True)
    uniform, _ = results.labelled()
    rows = []
    for _, row in front.iterrows():
        data: dict[str, Any] = {
            "trial": int(row["trial"]),
            "widths": [int(w) for w in str(row["widths"]).split(",")],
            "widths_compact": results.compact(row["widths"]),
            "loss": float(row["loss"]),
            "perplexity": perplexity(float(row["loss"])),
        }
        for column in ("latency_ms", "params", "memory_bytes", "acceptance", "speedup"):
            if _has(front, column):
                value = row[column]
                data[column] = None if pd.isna(value) else _number(value)
        if _has(front, "lookahead"):
            data["lookahead"] = None if pd.isna(row["lookahead"]) else int(row["lookahead"])
        # The gain over the best uniform model that costs no more than this member.
        cost = float(row[results.cost])
        affordable = [
            (name, ref) for name, ref in uniform.items() if float(ref[results.cost]) <= cost
        ]
        if affordable:
            name, ref = max(affordable, key=lambda item: float(item[1][results.cost]))
            data["nearest_uniform"] = name
            data["loss_vs_uniform"] = float(row["loss"]) - float(ref["loss"])
            data["cost_vs_uniform_pct"] = 100.0 * (cost / float(ref[results.cost]) - 1.0)
        elif uniform:
            data["nearest_uniform"] = None
            data["loss_vs_uniform"] = None
            data["cost_vs_uniform_pct"] = None
        rows.append(data)
    return pd.DataFrame(rows)


def named_table(results: Results) -> pd.DataFrame:
    """Each named configuration next to the best front member that costs no more."""
    import pandas as pd

    front = results.front
    rows = []
    for _, row in results.named().iterrows():
        cost = float(row[results.cost])
        data: dict[str, Any] = {
            "name": row["name"],
            "trial": int(row["trial"]),
            "widths_compact": results.compact(row["widths"]),
            "loss": float(row["loss"]),
            results.cost: _number(row[results.cost]),
            "on_front": bool((front["trial"] == row["trial"]).any()),
        }
        cheaper = front[front[results.cost].astype(float) <= cost]
        if not cheaper.empty:
            best = cheaper.loc[cheaper["loss"].astype(float).idxmin()]
            data["best_front_trial"] = int(best["trial"])
            data["best_front_loss"] = float(best["loss"])
            data["loss_gain"] = float(row["loss"]) - float(best["loss"])
        rows.append(data)
    return pd.DataFrame(rows)


def _number(value: Any) -> int | float:
    """Counts (params, bytes) as ints, latencies as floats."""
    number = float(value)
    return int(number) if number.is_integer() and abs(number) >= 1000 else number


def write_outputs(
    results: Results,
    *,
    plot: Path | None = None,
    heatmap: Path | None = None,
    budget: float | None = None,
) -> tuple[Path, Path, Path]:
    """Refresh pareto.csv and draw the plot and heat-map; return their paths.

    `budget` (in the cost column's unit) overrides the search's own constraint, if any.
    """
    from mnm_search.pareto import PARETO_FILE
    from mnm_search.plot import COST_AXES, pareto_figure, quality_label, save_figure, width_heatmap

    csv = results.dir / PARETO_FILE
    atomic_write_text(csv, results.front.to_csv(index=False))
    uniform, heuristic = results.labelled()
    target = _target_name(results.run_info)
    study = results.run_info.get("study") or results.dir.name
    plot = plot or results.dir / PLOT_FILE
    figure = pareto_figure(
        results.finished,
        results.front,
        cost=results.cost,
        uniform=uniform,
        heuristic=heuristic,
        named=results.named(),
        budget=budget if budget is not None else results.budget,
        target=target,
        quality=results.quality,
        title=f"{study}: {quality_label(results.quality, short=True)} vs "
        f"{COST_AXES[results.cost][0]}",
    )
    save_figure(figure, plot)
    heatmap = heatmap or results.dir / HEATMAP_FILE
    save_figure(
        width_heatmap(results.front, cost=results.cost, names=results.names, target=target),
        heatmap,
    )
    return csv, plot, heatmap


def refuse_overwriting_inputs(results: Results, figure: Path | None, option: str) -> None:
    """A figure path must not replace the search's own files or the searched checkpoint."""
    if figure is None:
        return
    from mnm_search.checkpoint import default_checkpoint_path
    from mnm_search.pareto import PARETO_FILE, RUN_FILE, TRIALS_FILE
    from mnm_search.study import JOURNAL_FILE

    info = results.run_info
    inputs: dict[str, str | Path | None] = {
        f"the results file {name}": results.dir / name
        for name in (TRIALS_FILE, PARETO_FILE, RUN_FILE, JOURNAL_FILE)
    }
    storage = info.get("storage")
    if isinstance(storage, str) and "://" not in storage:  # a journal file elsewhere
        inputs["the study journal"] = storage
    profile = info.get("profile")
    if isinstance(profile, str):
        inputs["the search's profile"] = profile
    inputs["the searched checkpoint"] = info.get("checkpoint") or default_checkpoint_path()
    refuse_overlap(figure, inputs, option=option)
    if figure.suffix.lower() != ".png":
        # Figures are PNG. Another name is more likely a mistyped input (weights of a copied
        # checkpoint that run.json does not name, a CSV) than a wish to overwrite it.
        raise ConfigError(f"{option} {figure} must name a .png file (figures are written as PNG)")


def _target_name(run_info: dict[str, Any]) -> str | None:
    target = run_info.get("target")
    if isinstance(target, dict):
        return target.get("name")
    return target if isinstance(target, str) else None


def print_front(results: Results, table: pd.DataFrame) -> None:
    import pandas as pd

    unit = {"latency_ms": "ms", "params": "params", "memory_bytes": "MiB"}[results.cost]
    title = (
        f"Pareto front of {results.dir}: {len(table)} of {len(results.finished)} finished "
        f"trials (objectives {', '.join(results.objectives)})"
    )
    info = results.run_info
    notes = [f"loss: {loss_label(info.get('data'), info.get('eval_tokens'))}"]
    view = Table(title=title)
    add_number_column(view, "trial")
    view.add_column("widths")  # wraps: a many-layer model's widths would push numbers off
    for column in ("loss", "ppl"):
        add_number_column(view, column)
    if "latency_ms" in table.columns:
        add_number_column(view, "ms")
    add_number_column(view, "params")
    if "memory_bytes" in table.columns:
        add_number_column(view, "memory MiB")
    speculative = [c for c in ("acceptance", "speedup", "lookahead") if c in table.columns]
    for column in speculative:
        add_number_column(view, column)
    if "speedup" in speculative:
        notes.append(
            "speedup: predicted self-speculative decoding speed-up with this configuration "
            "drafting for the full model, at the best lookahead"
        )
    if "nearest_uniform" in table.columns:
        add_number_column(view, "vs uniform")
        notes.append(
            f"vs uniform: loss minus that of the best uniform model costing no more "
            f"(negative = better), and how much more this one costs in {unit}"
        )
    view.caption = "\n".join(notes)
    for _, row in table.iterrows():
        cells = [str(row["trial"]), row["widths_compact"], f"{row['loss']:.4f}"]
        cells.append(f"{row['perplexity']:.3f}")
        if "latency_ms" in table.columns:
            cells.append(f"{row['latency_ms']:.2f}")
        cells.append(f"{row['params'] / 1e6:.2f}M")
        if "memory_bytes" in table.columns:
            cells.append(f"{row['memory_bytes'] / 2**20:.1f}")
        for column in speculative:
            value = row[column]
            if pd.isna(value):
                cells.append("-")
            elif column == "lookahead":
                cells.append(str(int(value)))
            else:
                cells.append(f"{value:.3f}x" if column == "speedup" else f"{value:.4f}")
        if "nearest_uniform" in table.columns and pd.isna(row["nearest_uniform"]):
            cells.append("-")  # no uniform model is this cheap
        elif "nearest_uniform" in table.columns:
            delta = row["loss_vs_uniform"]
            colour = "green" if delta < -5e-4 else ("red" if delta > 5e-4 else "white")
            cells.append(
                f"[{colour}]{delta:+.4f}[/] {row['nearest_uniform']} "
                f"{row['cost_vs_uniform_pct']:+.0f}%"
            )
        view.add_row(*cells)
    out.print(view)


def print_named(results: Results, named: pd.DataFrame) -> None:
    import pandas as pd

    view = Table(title="Named configurations (MatFormer Lab) under this profile")
    view.add_column("name")
    for column in ("trial", "loss", results.cost, "on front", "best front ≤ cost"):
        add_number_column(view, column)
    for _, row in named.iterrows():
        best = "-"
        if not pd.isna(row.get("best_front_trial")):
            best = (
                f"trial {int(row['best_front_trial'])}: loss {row['best_front_loss']:.4f} "
                f"({-row['loss_gain']:+.4f})"
            )
        view.add_row(
            str(row["name"]),
            str(row["trial"]),
            f"{row['loss']:.4f}",
            f"{float(row[results.cost]):,.3f}"
            if results.cost == "latency_ms"
            else f"{int(row[results.cost]):,}",
            "yes" if row["on_front"] else "no",
            best,
        )
    out.print(view)


@user_errors
def pareto(
    results_dir: Annotated[Path, typer.Argument(help="Results directory of `mnm search`.")],
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Where to write the plot (default: RESULTS_DIR/pareto.png)."),
    ] = None,
    heatmap: Annotated[
        Path | None,
        typer.Option(
            "--heatmap", help="Per-layer width heat-map (default: RESULTS_DIR/heatmap.png)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the Pareto front of a search: table, pareto.csv, plot and width heat-map.

    Example: mnm pareto results/default --plot front.png
    """
    results = Results(results_dir)
    refuse_overwriting_inputs(results, plot, "--plot")
    refuse_overwriting_inputs(results, heatmap, "--heatmap")
    table = front_table(results)
    named = named_table(results)
    csv, plot_path, heatmap_path = write_outputs(results, plot=plot, heatmap=heatmap)
    if as_json:
        print_json(
            {
                "results_dir": str(results.dir),
                "objectives": results.objectives,
                "cost": results.cost,
                "n_trials": len(results.trials),
                "n_finished": len(results.finished),
                "budget": results.budget,
                "front": json.loads(table.to_json(orient="records")),
                "named_configs": json.loads(named.to_json(orient="records")),
                "pareto_csv": str(csv),
                "plot": str(plot_path),
                "heatmap": str(heatmap_path),
            }
        )
        return
    print_front(results, table)
    if not named.empty:
        print_named(results, named)
    err.print(f"wrote {csv}, {plot_path} and {heatmap_path}")
