"""`mnm speculate`: measure self-speculative decoding with nested drafts on a target.

The measuring lives in `mnm_search._speculate_sweep`; this module picks the candidates,
reads the options and shows the result (table, JSON, plot).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from mnm_search._files import atomic_write_text, json_text, refuse_overlap
from mnm_search.cli._common import (
    CkptArg,
    JsonOpt,
    StepOpt,
    add_number_column,
    err,
    out,
    print_json,
    progress_bar,
    user_errors,
)
from mnm_search.cli._export import check_matches_search, search_source_path
from mnm_search.cli._pareto import Results, refuse_overwriting_inputs
from mnm_search.cli._profile import load_profile_for
from mnm_search.errors import ConfigError
from mnm_search.families import load_family
from mnm_search.options import DEFAULT_LOOKAHEADS, DEFAULT_N_PROMPTS, DEFAULT_PROMPT_TOKENS
from mnm_search.targets import HardwareTarget, load_target

if TYPE_CHECKING:
    from mnm_search import _speculate_sweep as sweep
    from mnm_search.families.base import Family

DEFAULT_TARGET = "cpu-decode"
PLOT_FILE = "speculate.png"
JSON_FILE = "speculate.json"


def _candidates(
    family: Family, draft: str | None, results: Results | None
) -> tuple[list[sweep.Candidate], int | None]:
    """The drafts to measure, and the shipped lookahead (if the checkpoint ships a draft)."""
    from mnm_search import _speculate_sweep as sweep
    from mnm_search.pareto import parse_widths_column

    if draft is not None:
        widths = tuple(family.parse_widths(draft))
        if widths == tuple(family.full_widths()):
            raise ConfigError(
                f"--draft {draft} is the full model itself; a draft must be a narrower "
                f"configuration of it (e.g. a narrower uniform one)"
            )
        return [sweep.Candidate(widths, "--draft")], None
    if results is not None:
        front = [
            sweep.Candidate(
                tuple(family.validate_widths(parse_widths_column(row["widths"]))),
                f"trial {int(row['trial'])}",
            )
            for _, row in results.front.iterrows()
        ]
        # Uniform ones first: on the front too, they keep their readable name.
        candidates = sweep.distinct_drafts(family, [*sweep.uniform_candidates(family), *front])
        return candidates, None
    shipped = sweep.shipped_draft(family)
    if shipped is not None:
        widths, lookahead = shipped
        return [sweep.Candidate(tuple(widths), "shipped with the checkpoint")], lookahead
    return sweep.distinct_drafts(family, sweep.uniform_candidates(family)), None


def _lookaheads(spec: str | None, shipped: int | None, max_new_tokens: int) -> list[int]:
    """--lookahead, else the shipped one, else the default sweep (those a run can use)."""
    from mnm_search import _speculate_sweep as sweep

    if spec is not None:
        values = sweep.parse_lookaheads(spec)
        too_long = [k for k in values if k > max(1, max_new_tokens - 1)]
        if too_long:
            raise ConfigError(
                f"--lookahead {too_long[0]} drafts more tokens than --max-new-tokens "
                f"{max_new_tokens} leaves to draft (at most {max(1, max_new_tokens - 1)}); "
                f"raise --max-new-tokens to at least {too_long[-1] + 1}"
            )
        return values
    if shipped is not None:
        return [shipped]
    usable = [k for k in DEFAULT_LOOKAHEADS if k <= max(1, max_new_tokens - 1)]
    return usable or [1]


def _check_figure_path(
    plot: Path | None, results: Results | None, inputs: dict[str, Path | None]
) -> None:
    if plot is None:
        return
    if results is not None:
        refuse_overwriting_inputs(results, plot, "--plot")
    refuse_overlap(plot, inputs, option="--plot")
    if plot.suffix.lower() != ".png":
        raise ConfigError(f"--plot {plot} must name a .png file (figures are written as PNG)")


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _show(report: dict[str, Any], result: sweep.SweepResult, target: HardwareTarget) -> None:
    plain = result.plain
    if plain is None:
        return
    settings = report["settings"]
    spread = (
        f"; median of {len(plain.seconds)} runs, which spread {plain.spread_pct:.0f} %: the "
        f"noise of these timings"
        if len(plain.seconds) > 1
        else ""
    )
    temperature = settings["temperature"]
    decoding = "greedy" if temperature == 0 else f"sampling at temperature {temperature}"
    out.print(
        f"[bold]Self-speculative decoding[/] on {_where(target)}, batch 1: "
        f"{settings['n_prompts']} prompt{'s' if settings['n_prompts'] != 1 else ''} "
        f"({report['prompts']['source']}) x "
        f"{settings['max_new_tokens']} new tokens, {decoding}, median of "
        f"{settings['repeats']} run(s).\n"
        f"Plain decoding with the full model: {plain.tokens_per_s:,.1f} tok/s "
        f"({1e3 * plain.median_s / plain.tokens:.2f} ms/token{spread}).",
        highlight=False,
    )
    if not result.rows:
        return
    best = result.best
    cost_note = (
        "c: draft step / full step, measured (each draft decoding alone)"
        if result.cost_source == "measured"
        else f"c: draft step / full step, predicted by {result.cost_source}"
    )
    verify = ", ".join(f"K={k}: {v:.2f}" for k, v in result.verify_ratios.items())
    table = Table(
        title="Drafts (narrower configurations of the same weights) x lookahead K",
        caption="\n".join(
            [
                cost_note,
                "accept: per-token acceptance rate; tok/rnd: tokens per verification",
                "plain tok/s: the full model decoding alone, timed beside each draft",
                "meas., pred.: speed-up over plain decoding, measured (spec / plain tok/s) and "
                "predicted = "
                f"E\\[tokens] / (K c + v), v = full step over K+1 tokens / over 1 ({verify})",
            ]
        ),
    )
    longest = max(len(row.draft_compact) for row in result.rows)
    table.add_column("draft", min_width=min(longest, 24))  # wraps only long (many-layer) ones
    headers = ("c", "K", "accept", "tok/rnd", "plain\ntok/s", "spec\ntok/s")
    for column in (*headers, "meas.", "pred."):
        add_number_column(table, column)
    for row in result.rows:
        table.add_row(
            row.draft_compact,
            f"{row.cost_ratio:.2f}",
            str(row.lookahead),
            _fmt(_finite(row.stats.acceptance_rate), ".2f"),
            _fmt(_finite(row.stats.tokens_per_round), ".2f"),
            f"{row.plain.tokens_per_s:,.1f}",
            f"{row.speculative.tokens_per_s:,.1f}",
            f"{row.measured_speedup:.2f}x",
            _fmt(row.predicted_speedup, ".2f", "x"),
            style="bold green" if row is best else None,
        )
    out.print(table)
    if best is not None:
        acceptance = _fmt(_finite(best.stats.acceptance_rate), ".2f")
        # Differences within the timings' own spread (at least 5 %) are noise, not speed-up.
        noise = max(0.05, best.plain.spread_pct / 100, best.speculative.spread_pct / 100)
        if best.measured_speedup > 1 + noise:
            verdict = "[green]faster than plain decoding[/]"
        elif best.measured_speedup >= 1 - noise:
            verdict = (
                f"[yellow]no clear gain[/]: within the timing noise (±{noise:.0%}) of plain "
                f"decoding; more --repeats and a quieter machine tell them apart"
            )
        else:
            verdict = (
                "[yellow]no draft beats plain decoding on this target[/]: speculation pays "
                f"when a draft step costs little of a full step (c = {best.cost_ratio:.2f} "
                f"here) and most drafted tokens are accepted (here {acceptance})"
            )
        out.print(
            f"Best: draft {best.draft_compact} ({best.draft.source}), K={best.lookahead}: "
            f"{best.measured_speedup:.2f}x measured, "
            f"{_fmt(best.predicted_speedup, '.2f', 'x')} predicted "
            f"({_fmt(best.predicted_speedup_paper, '.2f', 'x')} by the paper's model, v = 1); "
            f"{verdict}.",
            highlight=False,
        )
    memory = report.get("memory")
    if memory:
        out.print(
            f"Memory: the draft shares the model's {memory['weights_bytes'] / 2**20:,.1f} MiB "
            f"of weights (extra weights: 0 bytes); its own KV cache is the only extra memory: "
            f"{memory['draft_kv_cache_bytes'] / 2**20:,.2f} MiB at {memory['positions']} "
            f"positions ({memory['dtype']}).",
            highlight=False,
        )
    diverged = sum(len(r.divergences) for r in result.rows)
    if diverged:
        err.print(
            f"[yellow]Note:[/] greedy speculative output left plain greedy output at "
            f"{diverged} near-tie token(s) (the two best logits equal up to rounding; details "
            f"under `divergences` in --json)",
            highlight=False,
        )


def _where(target: HardwareTarget) -> str:
    threads = "" if target.is_cuda else f", {target.threads or 'default'} thread(s)"
    return f"{target.name} ({target.device} {target.dtype}{threads})"


def _finite(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


@user_errors
def speculate(
    ckpt: CkptArg = None,
    draft: Annotated[
        str | None,
        typer.Option("--draft", "-d", help="Draft widths, one per layer: S,M,L,XL, integers, X*N."),
    ] = None,
    from_dir: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Results directory of `mnm search`: its Pareto front and the uniform "
            "configurations are the drafts.",
        ),
    ] = None,
    lookahead: Annotated[
        str | None,
        typer.Option(
            "--lookahead",
            "-k",
            help="Tokens drafted per round: one or comma-separated (default: the shipped "
            f"draft's, else {','.join(map(str, DEFAULT_LOOKAHEADS))}).",
        ),
    ] = None,
    target_path: Annotated[
        Path | None,
        typer.Option(
            "--target",
            "-t",
            help=f"Hardware target to decode on (default: {DEFAULT_TARGET}; its device, "
            f"dtype and threads are used, batch is 1).",
            metavar="TARGET",
        ),
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(
            "--profile",
            help="Decode latency profile (mnm profile --target cpu-decode): the draft cost "
            "c from its predictions instead of timing each draft.",
        ),
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option(
            "--prompts", help="Text file of prompts, one per paragraph (blank-line separated)."
        ),
    ] = None,
    n_prompts: Annotated[
        int | None,
        typer.Option(
            "--n-prompts",
            min=1,
            help=f"Prompts to decode (default {DEFAULT_N_PROMPTS}; with --prompts: "
            "every paragraph, or the first N).",
        ),
    ] = None,
    prompt_tokens: Annotated[
        int | None,
        typer.Option(
            "--prompt-tokens",
            min=1,
            help="Tokens per prompt taken from the bundled validation text (default "
            f"{DEFAULT_PROMPT_TOKENS}, at most half the model's evaluation window).",
        ),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="New tokens per prompt.")
    ] = 64,
    temperature: Annotated[
        float,
        typer.Option("--temperature", min=0.0, help="0: greedy (default); > 0: sampling."),
    ] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampling.")] = 0,
    repeats: Annotated[
        int,
        typer.Option("--repeats", min=1, help="Timed runs over every prompt (median)."),
    ] = 3,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Speed-up vs draft cost PNG (default with --from: RESULTS_DIR/speculate.png).",
        ),
    ] = None,
    as_json: JsonOpt = False,
    step: StepOpt = None,
) -> None:
    """Measure self-speculative decoding: a narrower configuration of the same weights drafts
    K tokens, the full model verifies them in one pass (greedy: token-identical output).

    Times plain decoding, each draft's step cost c and the verification cost v on the
    target, then every (draft, K) pair: acceptance, tokens per round, tokens/s and the
    measured speed-up next to the predicted one. The draft adds no weight memory, only its
    KV cache. Drafts: --draft W; or --from RESULTS_DIR (its front and the uniform models);
    or the draft the checkpoint ships (mnm export --draft), else the narrower uniform models.

    Example: mnm speculate --draft S*6 --lookahead 2,4 --max-new-tokens 32 --n-prompts 2
    """
    from mnm_search import _speculate_sweep as sweep
    from mnm_search.checkpoint import default_checkpoint_path
    from mnm_search.profiler import select_device

    if draft is not None and from_dir is not None:
        raise ConfigError("give --draft W or --from RESULTS_DIR, not both")
    if prompts_file is not None and prompt_tokens is not None:
        raise ConfigError(
            "--prompt-tokens cuts prompts from the bundled text; --prompts FILE gives whole "
            "prompts: use one of them"
        )
    results = Results(from_dir) if from_dir is not None else None
    if results is not None and step is None:
        step = results.run_info.get("step")  # the front's widths were chosen with this step
    source = search_source_path(ckpt, results)
    if plot is None and from_dir is not None:
        plot = from_dir / PLOT_FILE
    _check_figure_path(
        plot,
        results,
        {
            "the checkpoint": source if source is not None else default_checkpoint_path(),
            "the --prompts file": prompts_file,
            "the --profile file": profile,
            "the --target file": target_path,
        },
    )
    target = load_target(target_path if target_path is not None else Path(DEFAULT_TARGET))
    select_device(target.device)  # no CUDA here is an error before the weights load
    # The structure first (instant): wrong widths or results are clear errors before the
    # weights are read.
    structure = load_family(source, weights=False, step=step)
    if results is not None:
        check_matches_search(structure, results)
    candidates, shipped_lookahead = _candidates(structure, draft, results)
    if not candidates:
        raise ConfigError(
            "no draft to measure: this checkpoint has no configuration narrower than the full "
            "model; pass --draft W"
        )
    lookaheads = _lookaheads(lookahead, shipped_lookahead, max_new_tokens)
    latency_model = load_profile_for(structure, profile) if profile is not None else None
    family = structure if structure.has_weights else load_family(source, step=step)
    family = family.prepare_for_target(target)
    if latency_model is not None and latency_model.target.phase != "decode":
        err.print(
            f"[yellow]Warning:[/] {profile} was measured for phase "
            f"{latency_model.target.phase!r}; draft costs in decoding follow a decode profile "
            f"(mnm profile --target cpu-decode)",
            highlight=False,
        )
    prompts = sweep.load_prompts(
        family,
        prompts_file=prompts_file,
        n_prompts=n_prompts,
        prompt_tokens=prompt_tokens,
    )
    bench = sweep.SpeculationBench(
        family,
        prompts,
        max_new_tokens=max_new_tokens,
        repeats=repeats,
        temperature=temperature,
        seed=seed,
        target=target,
    )
    result = sweep.SweepResult(
        cost_source="measured" if profile is None else f"profile {profile}",
    )
    positions = prompts.longest + max_new_tokens
    report: dict[str, Any] = {
        "checkpoint": str(family.path) if family.path else None,
        "fingerprint": family.fingerprint,
        "family": family.name,
        "target": target.to_dict(),
        "settings": {
            "lookaheads": lookaheads,
            "max_new_tokens": max_new_tokens,
            "n_prompts": len(prompts.tokens),
            "temperature": temperature,
            "seed": seed,
            "repeats": repeats,
        },
        "prompts": {"source": prompts.source, "tokens": [len(p) for p in prompts.tokens]},
        "memory": sweep.memory_facts(family, target, candidates, positions),
    }
    total = sweep.sweep_steps(len(candidates), len(lookaheads), timed_drafts=profile is None)
    try:
        with progress_bar() as progress:
            task = progress.add_task("measuring", total=total, status="")

            def on_progress(done: int, total: int, what: str) -> None:
                progress.update(task, completed=done, status=what)

            sweep.run_sweep(
                bench,
                candidates,
                lookaheads,
                result,
                latency_model=latency_model,
                on_progress=on_progress,
            )
    except KeyboardInterrupt:
        # What was measured so far is still worth seeing; files are not written (a partial
        # sweep must not replace a complete speculate.json). The boundary then exits 130.
        report |= result.to_dict()
        report["interrupted"] = True
        if as_json:
            print_json(report)
        else:
            _show(report, result, target)
            err.print(
                f"Interrupted after {len(result.rows)} of "
                f"{len(candidates) * len(lookaheads)} (draft, K) pairs."
            )
        raise
    report |= result.to_dict()
    report["interrupted"] = False
    if plot is not None:
        from mnm_search.plot import save_figure, speculation_figure

        points = [{**row.to_dict(), "label": row.draft_compact} for row in result.best_per_draft()]
        save_figure(speculation_figure(points, target=target.name), plot)
    report["plot"] = str(plot) if plot is not None else None
    report["json_file"] = str(from_dir / JSON_FILE) if from_dir is not None else None
    if from_dir is not None:
        atomic_write_text(from_dir / JSON_FILE, json_text(report) + "\n")
    if as_json:
        print_json(report)
        return
    _show(report, result, target)
    written = [str(p) for p in (plot, report["json_file"]) if p is not None]
    if written:
        err.print(f"wrote {' and '.join(written)}", highlight=False)
