"""`mnm search`: the Pareto front of quality vs cost, found with an Optuna study."""

from __future__ import annotations

import logging
import math
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from mnm_search._files import refuse_overlap
from mnm_search.cli._common import (
    DEFAULT_EVAL_TOKENS,
    CkptArg,
    DataOpt,
    JsonOpt,
    StepOpt,
    add_number_column,
    err,
    loss_label,
    out,
    print_error,
    print_json,
    progress_bar,
    user_errors,
)
from mnm_search.errors import ConfigError, Terminated
from mnm_search.families import load_family
from mnm_search.families.base import Family
from mnm_search.options import (
    DEFAULT_SAMPLER,
    MAXIMISED,
    OBJECTIVES,
    SAMPLERS,
    SINGLE_OBJECTIVES,
)
from mnm_search.redact import redact, url_secrets

PROFILE_FILE = "profile.json"


class _NoTrialFailureLogs(logging.Filter):
    """Drop Optuna's "Trial N failed ..." warnings: `mnm search` reports a failed trial's
    reason itself, and an interrupt or error itself (Optuna logs them with a whole traceback
    before re-raising)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Trial ") and " failed " in message)


_TRIAL_FAILURE_FILTER = _NoTrialFailureLogs()


def quiet_optuna() -> None:
    """Optuna's logging, set by the command (a library must not set it): warnings only."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The logger Optuna's optimize loop writes "Trial N failed" to (addFilter is idempotent).
    logging.getLogger("optuna.study._optimize").addFilter(_TRIAL_FAILURE_FILTER)


def _objectives(spec: str) -> tuple[str, ...]:
    names = tuple(item.strip().lower() for item in spec.split(",") if item.strip())
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise ConfigError(
            f"unknown objective(s) in --objectives {spec!r}: {', '.join(unknown)}; "
            f"choose from {', '.join(OBJECTIVES)}"
        )
    return names


def _latency_model(
    family: Family,
    profile: Path | None,
    target: Path | None,
    results_dir: Path,
    *,
    quick_profile: bool,
) -> Any:
    """The latency model from --profile, or from profiling --target (kept for resuming)."""
    from mnm_search.cli._profile import (
        load_profile_for,
        print_latency_model_warnings,
        profile_loaded,
        resolve_target,
    )
    from mnm_search.profiler import write_profile

    if profile is not None:
        return load_profile_for(family, profile)
    saved = results_dir / PROFILE_FILE
    if saved.is_file():  # a resumed search keeps the latencies it started with
        err.print(f"using the latency profile measured for this study: {saved}")
        return load_profile_for(family, saved)
    hardware = resolve_target(target)
    err.print(
        f"no --profile given: profiling on target {hardware.name} first "
        f"({'quick' if quick_profile else 'full'}; pass --profile FILE.json to skip)"
    )
    data = profile_loaded(family, hardware, quick=quick_profile)
    results_dir.mkdir(parents=True, exist_ok=True)
    write_profile(data, saved)
    print_latency_model_warnings(data["warnings"])
    return load_profile_for(family, saved)


def _default_results_dir(study_name: str) -> Path:
    """`results/STUDY`; a name that is not one plain path component would write elsewhere."""
    if study_name in ("", ".", "..") or "/" in study_name or "\\" in study_name:
        raise ConfigError(
            f"--study {study_name!r} is not a plain name, and without --out it names the "
            f"results directory results/{study_name}: use a name without '/' and '..', or "
            f"choose the directory with --out"
        )
    return Path("results") / study_name


@user_errors
def search(
    ckpt: CkptArg = None,
    profile: Annotated[
        Path | None,
        typer.Option("--profile", "-p", help="Latency profile JSON from `mnm profile`."),
    ] = None,
    target: Annotated[
        Path | None,
        typer.Option(
            "--target",
            "-t",
            help="Hardware target YAML: profiled first when no --profile is given; also the "
            "target of the memory objective.",
        ),
    ] = None,
    trials: Annotated[
        int, typer.Option("--trials", "-n", min=1, help="Total complete trials in the study.")
    ] = 100,
    study: Annotated[
        str | None,
        typer.Option("--study", help="Study name (default: CHECKPOINT-OBJECTIVES)."),
    ] = None,
    objectives: Annotated[
        str,
        typer.Option(
            "--objectives",
            help=f"Comma-separated: {', '.join(OBJECTIVES)}. All are minimised but "
            f"{' and '.join(sorted(MAXIMISED))} (the configuration as a self-speculative draft "
            f"of the full model: agreement with it, and the predicted speed-up at the best "
            f"lookahead; both want a decode profile). {' or '.join(SINGLE_OBJECTIVES)} may "
            f"stand alone.",
        ),
    ] = "loss,latency",
    data: DataOpt = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Evaluate on at most this many tokens.")
    ] = DEFAULT_EVAL_TOKENS,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="Shared study storage URL, e.g. postgresql://user:pw@host/db, so that several "
            "`mnm search` processes or machines work on one study (default: a journal file "
            "in the results directory).",
        ),
    ] = None,
    sampler: Annotated[
        str,
        typer.Option(
            "--sampler",
            help=f"One of {', '.join(SAMPLERS)}. auto (the default) enumerates the whole space "
            "when that is estimated to take at most a minute or no longer than --trials sampled "
            "trials (then every "
            "configuration within the limits is decided, racing over chunks of the eval data), "
            "else uses the GP sampler, handing over to TPE once the GP's own time outgrows an "
            "evaluation's; it prints which and why. exhaustive evaluates every configuration.",
        ),
    ] = DEFAULT_SAMPLER,
    max_latency_ms: Annotated[
        float | None, typer.Option("--max-latency-ms", help="Constraint: predicted latency.")
    ] = None,
    max_params: Annotated[
        int | None, typer.Option("--max-params", help="Constraint: parameter count.")
    ] = None,
    max_memory: Annotated[
        int | None, typer.Option("--max-memory", help="Constraint: memory in bytes.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Sampler seed (reproducible runs).")] = 0,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Results directory (default: results/STUDY)."),
    ] = None,
    allow_skip: Annotated[
        bool, typer.Option("--allow-skip", help="Let layers skip their FFN (width 0).")
    ] = False,
    interpolate: Annotated[
        int,
        typer.Option(
            "--interpolate", min=0, help="Extra widths between neighbouring granularities."
        ),
    ] = 0,
    min_widths: Annotated[
        str | None,
        typer.Option("--min-widths", help="Per-layer lower bounds, widths syntax (S,S,M,...)."),
    ] = None,
    max_widths: Annotated[
        str | None,
        typer.Option("--max-widths", help="Per-layer upper bounds, widths syntax."),
    ] = None,
    cache_mb: Annotated[
        float,
        typer.Option("--cache-mb", min=0, help="Memory for cached hidden states (0 = off)."),
    ] = 1024.0,
    fidelity_tokens: Annotated[
        int,
        typer.Option(
            "--fidelity-tokens",
            min=0,
            help="Screen each configuration on this many tokens first; only those that can "
            "still reach the front get the full evaluation (0 = off).",
        ),
    ] = 0,
    quick_profile: Annotated[
        bool, typer.Option("--quick-profile", help="Quick profiling when --target profiles.")
    ] = False,
    lab_configs: Annotated[
        Path | None,
        typer.Option(
            "--lab-configs",
            help="MatFormer Lab slicing-config CSV (Gemma 3n): evaluate its named configurations "
            "too; they are marked on the Pareto plot.",
        ),
    ] = None,
    step: StepOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search Mix'n'Match configurations for the Pareto front of loss vs cost.

    Re-running the same command resumes the study up to --trials; several processes with
    the same --study and --storage share the work.

    Example: mnm search --profile profile-cpu-prefill.json --trials 200
    """
    from mnm_search.pareto import parse_widths_column
    from mnm_search.study import SearchProgress, SearchSettings, run_search

    names = _objectives(objectives)
    settings = SearchSettings(
        n_trials=trials,
        objectives=names,
        sampler=sampler.strip().lower(),
        seed=seed,
        max_latency_ms=max_latency_ms,
        max_params=max_params,
        max_memory=max_memory,
        cache_mb=cache_mb,
        fidelity_tokens=fidelity_tokens,
    )
    family = load_family(ckpt, step=step)
    if family.nesting_warning:
        print_error(f"Warning: {family.nesting_warning}", warn=True)
    space = family.search_space(
        allow_skip=allow_skip,
        interpolate=interpolate,
        min_widths=family.parse_widths(min_widths) if min_widths else None,
        max_widths=family.parse_widths(max_widths) if max_widths else None,
    )
    named = family.named_configs(lab_configs) if lab_configs is not None else []
    ckpt_name = family.path.name if family.path else "checkpoint"
    study_name = study or f"{ckpt_name}-{'-'.join(names)}"
    results_dir = out_dir if out_dir is not None else _default_results_dir(study_name)
    # Only the checkpoint: `--profile results/x/profile.json` inside --out is how a study
    # is resumed with the profile it measured.
    if family.path is not None:
        refuse_overlap(results_dir, {"the checkpoint": family.path})
    if (
        "speedup" in names
        and profile is None
        and target is None
        and not (results_dir / PROFILE_FILE).is_file()
    ):
        # The default target profiles prefill; a draft's cost is a decode step's.
        raise ConfigError(
            "the speedup objective needs a latency profile, ideally of decoding: pass "
            "--profile FILE.json (from mnm profile --target profiles/cpu-decode.yaml) or "
            "--target profiles/cpu-decode.yaml to profile first"
        )
    latency_model = None
    if settings.needs_latency:
        latency_model = _latency_model(
            family, profile, target, results_dir, quick_profile=quick_profile
        )
    memory_target = None
    if settings.needs_memory:
        from mnm_search.cli._profile import resolve_target

        memory_target = (
            latency_model.target if latency_model is not None and target is None else None
        ) or resolve_target(target)
    eval_set = family.load_eval_set(data, max_tokens=max_tokens)
    command = "mnm " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["search"] else ""
    # run.json is shared and kept: never with the storage password in it.
    command = redact(command, url_secrets(storage) if storage else ())
    run_info = {
        "command": command,
        "profile": str(profile)
        if profile
        else (str(results_dir / PROFILE_FILE) if latency_model is not None else None),
        "memory_target": memory_target.to_dict() if memory_target is not None else None,
        "data": str(data) if data else "bundled validation text",
        "lab_configs": str(lab_configs) if lab_configs is not None else None,
        "step": family.describe().get("step"),  # families with a width step: export checks it
    }

    with progress_bar(transient=False) as progress:
        # The bar appears once the study is open, not above a set-up error.
        tasks: list[Any] = []

        def on_ready(n_complete: int) -> None:
            tasks.append(progress.add_task("searching", total=settings.n_trials, status=""))
            if n_complete:
                progress.console.print(
                    f"resuming study {study_name!r}: {n_complete} of {settings.n_trials} "
                    f"trials complete"
                )
            progress.update(tasks[0], completed=n_complete)

        def on_warning(message: str) -> None:
            progress.console.print(f"[yellow]Warning:[/] {escape(message)}", soft_wrap=True)

        def on_progress(event: SearchProgress) -> None:
            if event.failure is not None:
                progress.console.print(
                    f"[yellow]a trial failed:[/] {escape(event.failure)} (failed trials count "
                    f"toward --trials; their reason is in trials.csv)",
                    soft_wrap=True,
                )
            if event.stage is not None:  # an enumeration's pass: no new trial yet
                progress.update(tasks[0], status=event.stage)
                return
            parts = [f"{event.trials_per_s:.2f} trials/s"]
            if event.n_failed:
                parts.append(f"{event.n_failed} failed")
            budget = " under the limits" if settings.constraints() else ""
            if event.best_speedup is not None and "speedup" in settings.objectives:
                parts.append(f"best speed-up{budget} {event.best_speedup:.3f}x")
            elif event.best_loss is not None:
                parts.append(f"best loss{budget} {event.best_loss:.4f}")
            if event.hypervolume is not None:
                parts.append(f"HV {event.hypervolume:.4f}")
            progress.update(
                tasks[0], completed=event.n_complete, total=event.n_target, status="  ".join(parts)
            )

        quiet_optuna()
        try:
            result = run_search(
                family,
                space,
                settings,
                eval_set,
                study_name=study_name,
                results_dir=results_dir,
                storage=storage,
                latency_model=latency_model,
                memory_target=memory_target,
                run_info=run_info,
                on_progress=on_progress,
                on_ready=on_ready,
                on_warning=on_warning,
                named_configs=named,
                handle_signals=True,
                on_strategy=lambda message: progress.console.print(escape(message), soft_wrap=True),
            )
        except KeyboardInterrupt as exc:  # SearchInterrupted, or Ctrl-C before the study ran
            progress.stop()
            default = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
            signum = getattr(exc, "signum", default)
            what = "Terminated" if signum == signal.SIGTERM else "Interrupted"
            err.print(
                f"[yellow]{what}: finished trials are saved in {results_dir} (trials.csv; only "
                f"the running one is lost). Re-run the same command to resume.[/]"
            )
            raise typer.Exit(code=128 + signum) from None

    front = result.pareto
    columns = [
        c
        for c in (
            "loss",
            "params",
            "latency_ms",
            "memory_bytes",
            "kl",
            "agreement",
            "acceptance",
            "speedup",
            "lookahead",
        )
        if c in front.columns
    ]

    if as_json:
        print_json(
            {
                "study": study_name,
                "results_dir": str(results_dir),
                "n_complete": result.run_info.get("n_complete"),
                "n_new": result.n_new,
                "seconds": round(result.seconds, 3),
                "objectives": list(settings.objectives),
                "objective_directions": settings.directions,
                "pareto": [
                    {
                        "trial": int(row["trial"]),
                        "widths": parse_widths_column(row["widths"]),
                        **{c: _plain(row[c]) for c in columns},
                    }
                    for _, row in front.iterrows()
                ],
            }
        )
        return
    info = result.run_info
    caption = f"loss: {loss_label(info.get('data'), info.get('eval_tokens'))}"
    if "speedup" in columns:
        caption += (
            "\nspeedup: predicted self-speculative decoding speed-up with this configuration "
            "drafting for the full model, at the best lookahead (acceptance: top-1 agreement "
            "with the full model; draft cost: predicted latency relative to the full model's)"
        )
    if "acceptance" in columns and "agreement" in columns:
        columns.remove("agreement")  # the same numbers, under the objective's name
    table = Table(
        title=f"Pareto front of study {study_name} ({', '.join(settings.objectives)})",
        caption=caption,
    )
    add_number_column(table, "trial")
    table.add_column("widths")
    for column in columns:
        add_number_column(table, column)
    table.add_column("source")
    for _, row in front.iterrows():
        widths = parse_widths_column(row["widths"])
        cells = [str(row["trial"]), family.format_widths(widths)]
        for column in columns:
            cells.append(_cell(column, row[column]))
        cells.append(str(row.get("source", "")))
        table.add_row(*cells)
    out.print(table)
    out.print(
        f"{result.run_info.get('n_complete')} trials complete ({result.n_new} new, "
        f"{result.seconds:.1f} s) -> {results_dir}/trials.csv, pareto.csv, run.json"
    )


def _plain(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def _cell(column: str, value: Any) -> str:
    value = _plain(value)
    if value is None:
        return "-"
    if column in ("params", "memory_bytes", "lookahead"):
        return f"{int(value):,}"
    if column == "latency_ms":
        return f"{value:.3f}"
    return f"{value:.4f}"
