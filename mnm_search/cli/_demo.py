"""`mnm demo`: the whole pipeline on the embedded default checkpoint, in a few minutes.

profile this machine -> search -> Pareto table, plot and heat-map -> export the best model
under a latency budget -> a summary of where everything is.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from mnm_search._files import refuse_overlap
from mnm_search.cli._common import err, loss_label, out, progress_bar, user_errors
from mnm_search.cli._export import default_measurement_target
from mnm_search.cli._pareto import Results, front_table, print_front, write_outputs
from mnm_search.cli._profile import print_latency_model_warnings, profile_loaded
from mnm_search.cli._search import quiet_optuna
from mnm_search.errors import ConfigError
from mnm_search.families import load_family

MARKER = "demo.json"  # marks a directory as the demo's own, so a re-run may replace it
BUDGET_SHARE = 0.7  # export the best model within 70 % of the full model's latency


@dataclass(frozen=True)
class DemoPlan:
    """How much work each stage does; sized for a 2-core CPU."""

    quick_profile: bool
    trials: int
    eval_tokens: int
    sampler: str = "auto"
    fresh: int | None = None  # configurations validated in fresh processes (None: default)


# Both stay within a minute / 20 s on an idle 2-core machine (docs/benchmarks.md). The full
# demo finds the exact front (`auto` enumerates the 4096 configurations, racing) and checks
# its quick profile against exported models timed in fresh processes; the quick one samples
# 30 configurations with TPE and leaves the fresh processes (~5-8 s) out.
FULL = DemoPlan(quick_profile=True, trials=100, eval_tokens=2_048)
QUICK = DemoPlan(quick_profile=True, trials=30, eval_tokens=2_048, sampler="tpe", fresh=0)


def _prepare(out_dir: Path, checkpoint_dir: Path | None) -> None:
    """Start from an empty directory; replace only a previous demo's output."""
    # Before anything is removed: a demo.json planted in the package must not make the
    # embedded checkpoint (or a directory holding it) look like a demo's own output.
    if checkpoint_dir is not None:
        refuse_overlap(out_dir, {"the embedded checkpoint": checkpoint_dir})
    if out_dir.exists():
        if not (out_dir / MARKER).is_file():
            raise ConfigError(
                f"{out_dir} exists but was not written by `mnm demo`; move it away or choose "
                f"another --out"
            )
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / MARKER).write_text(json.dumps({"status": "running"}) + "\n")


def _stage(number: int, text: str) -> None:
    err.print(f"[bold cyan][{number}/5][/] {text}", highlight=False)


@user_errors
def demo(
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="A sampled front (30 trials) and no fresh-process check of the profile "
            "(~20 s instead of ~1 min).",
        ),
    ] = False,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where the demo writes everything.")
    ] = Path("results/demo"),
) -> None:
    """Run the whole pipeline on the embedded default checkpoint.

    Profiles this machine, searches Mix'n'Match configurations, shows and plots the Pareto
    front, and exports the best submodel within 70% of the full model's latency.

    Example: mnm demo --quick
    """
    from mnm_search.export import export_submodel, pick_under_budget
    from mnm_search.latency import LatencyModel
    from mnm_search.profiler import write_profile
    from mnm_search.study import SearchProgress, SearchSettings, run_search

    plan = QUICK if quick else FULL
    started = time.perf_counter()
    family = load_family(None)  # the embedded default checkpoint
    _prepare(out_dir, family.path)

    target = default_measurement_target(family)
    kind = "quick profile" if plan.quick_profile else "profile"
    marks = {"set-up": time.perf_counter()}  # where each stage's time begins
    _stage(1, f"{kind} of {target.describe()}")
    profile = profile_loaded(family, target, quick=plan.quick_profile, fresh=plan.fresh)
    validation = profile.get("validation") or {}
    profile_path = write_profile(profile, out_dir / "profile.json")
    latency_model = LatencyModel.from_profile(profile)
    if validation.get("mape_pct") is not None:
        err.print(
            f"      latency model: {validation['mape_pct']:.1f}% MAPE on held-out sliced "
            f"models (noise floor {validation.get('noise_floor', {}).get('mape_pct', 0):.1f}%)",
            highlight=False,
        )
    print_latency_model_warnings(profile["warnings"])

    eval_set = family.load_eval_set(None, max_tokens=plan.eval_tokens)
    marks["profile"] = time.perf_counter()
    _stage(
        2,
        f"search for the front of loss vs latency (loss: {loss_label(None, eval_set.n_tokens)})",
    )
    settings = SearchSettings(
        n_trials=plan.trials, objectives=("loss", "latency"), seed=0, sampler=plan.sampler
    )
    full_ms = latency_model.predict_ms(family.full_widths())
    budget = BUDGET_SHARE * full_ms
    quiet_optuna()  # Optuna's per-trial INFO lines would bury the progress in a log
    with progress_bar() as progress:
        task = progress.add_task("searching", total=plan.trials, status="")

        def on_search(event: SearchProgress) -> None:
            if event.stage is not None:  # an enumeration's pass: no new trial yet
                progress.update(task, status=event.stage)
                return
            status = f"{event.trials_per_s:.1f} trials/s"
            if event.best_loss is not None:
                status += f"  best loss {event.best_loss:.4f}"
            progress.update(task, completed=event.n_complete, total=event.n_target, status=status)

        run_search(
            family,
            family.search_space(),
            settings,
            eval_set,
            study_name="demo",
            results_dir=out_dir,
            latency_model=latency_model,
            run_info={
                "command": "mnm demo" + (" --quick" if quick else ""),
                "profile": str(profile_path),
                "target": target.name,
                "data": "bundled validation text",
            },
            on_progress=on_search,
            on_strategy=lambda message: progress.console.print(
                f"      {escape(message)}", soft_wrap=True, highlight=False
            ),
        )

    marks["search"] = time.perf_counter()
    _stage(3, "Pareto front")
    results = Results(out_dir)
    print_front(results, front_table(results))
    _, plot_path, heatmap_path = write_outputs(results, budget=budget)

    marks["front"] = time.perf_counter()
    _stage(
        4,
        f"exporting the best model within {BUDGET_SHARE:.0%} of the full model's latency "
        f"({budget:.2f} of {full_ms:.2f} ms predicted)",
    )
    within = results.front[results.front["latency_ms"] <= budget]
    if within.empty:  # fixed costs dominate this model on this machine
        err.print("      nothing on the front meets the budget; exporting the fastest model")
        within = results.front.nsmallest(1, "latency_ms")
    member = pick_under_budget(within, float(within["latency_ms"].max()), results_dir=out_dir)
    export_dir = out_dir / "export"
    with err.status("exporting") as status:
        report = export_submodel(
            family,
            member,
            export_dir,
            eval_set=eval_set,
            latency_model=latency_model,
            target=target,
            provenance={"results_dir": str(out_dir), "budget_ms": round(budget, 4)},
            on_progress=status.update,
        )

    seconds = time.perf_counter() - started
    marks["export"] = time.perf_counter()
    starts = [started, *marks.values()]
    summary = {
        "status": "done",
        "quick": quick,
        "seconds": round(seconds, 1),
        # Each stage's wall time ("set-up": loading the checkpoint before the profile).
        "stage_seconds": {
            name: round(end - start, 1)
            for name, start, end in zip(marks, starts[:-1], starts[1:], strict=True)
        },
        "checkpoint": str(family.path),
        "profile": str(profile_path),
        "results_dir": str(out_dir),
        "plot": str(plot_path),
        "heatmap": str(heatmap_path),
        "export": report.to_dict(),
        "budget_ms": budget,
        "full_model_predicted_ms": full_ms,
    }
    (out_dir / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
    _stage(5, f"done in {seconds:.0f} s")
    _print_summary(summary, report.widths_compact)


def _print_summary(summary: dict[str, Any], compact: str) -> None:
    export = summary["export"]
    lines = [
        f"profile       {summary['profile']}",
        f"search        {summary['results_dir']}/trials.csv, pareto.csv, run.json",
        f"plot          {summary['plot']}",
        f"heat-map      {summary['heatmap']}",
        f"exported      {export['path']}  ({compact}, {export['params']:,} params)",
    ]
    if export.get("loss") is not None:
        where = loss_label(export.get("data"), export.get("eval_tokens"))
        lines.append(f"  loss        {export['loss']:.4f} ({where})")
    if export.get("measured_ms") is not None:
        lines.append(
            f"  latency     {export['measured_ms']:.2f} ms measured, "
            f"{export['predicted_ms']:.2f} ms predicted "
            f"({export['latency_error_pct']:+.1f}%), "
            f"{export['speedup_vs_full']:.2f}x faster than the full model"
        )
        error = abs(export["latency_error_pct"])
        if error > 20:
            lines.append(
                f"  note        prediction and measurement differ by {error:.0f}%: this "
                f"machine was probably busy while profiling; re-run when idle"
            )
    lines.append(
        f"next: mnm pareto {summary['results_dir']}  |  "
        f"mnm export --from {summary['results_dir']} --max-latency-ms X --out DIR"
    )
    out.print("\n".join(lines), highlight=False)
