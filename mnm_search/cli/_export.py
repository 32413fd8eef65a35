"""`mnm export`: sliced, verified submodels of any model family, from explicit widths or from
search results."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from mnm_search._files import refuse_overlap
from mnm_search.cli._common import (
    DEFAULT_EVAL_TOKENS,
    PROGRESS_LOG_SECONDS,
    CkptArg,
    DataOpt,
    JsonOpt,
    StepOpt,
    add_number_column,
    err,
    loss_label,
    out,
    print_json,
    user_errors,
)
from mnm_search.cli._pareto import Results
from mnm_search.cli._profile import load_profile_for
from mnm_search.errors import ConfigError, ExportError
from mnm_search.families import load_family
from mnm_search.options import DEFAULT_LOOKAHEAD
from mnm_search.targets import HardwareTarget, default_target, load_target

if TYPE_CHECKING:
    from mnm_search.export import ExportReport, Member
    from mnm_search.families.base import Family
    from mnm_search.latency import LatencyModel


def search_source_path(ckpt: Path | None, results: Results | None) -> Path | None:
    """CKPT, else the checkpoint the search ran on (None: the embedded default)."""
    if results is None or ckpt is not None:
        return ckpt
    from mnm_search.checkpoint import default_checkpoint_path

    searched = results.run_info.get("checkpoint")
    path = Path(searched) if searched else default_checkpoint_path()
    if not path.exists():
        raise ExportError(
            f"{results.dir} was searched on checkpoint {path}, which is no longer there; "
            f"pass the checkpoint directory as CKPT"
        )
    return path


def check_matches_search(family: Family, results: Results | None) -> None:
    """Refuse a checkpoint other than the one the search ran on (any family): the results'
    widths and losses apply only to that one."""
    if results is None:
        return
    expected = results.run_info.get("fingerprint")
    if expected and expected != family.fingerprint:
        # No CKPT: the search's own checkpoint (or the embedded default) was loaded.
        source = family.path or "the embedded default checkpoint"
        raise ExportError(
            f"{results.dir} was searched on checkpoint {expected}, but {source} is "
            f"{family.fingerprint}; its widths and losses do not apply to this checkpoint"
        )


def default_measurement_target(family: Family) -> HardwareTarget:
    """cpu-prefill in the checkpoint's own dtype (export never converts the model); a model
    shorter than its 128 tokens is timed at its own length."""
    dtype = family.describe().get("dtype")
    return cpu_prefill_target(
        max_len=family.eval_seq_len, dtype=str(dtype).removeprefix("torch.") if dtype else None
    )


def cpu_prefill_target(*, max_len: int, dtype: str | None = None) -> HardwareTarget:
    """cpu-prefill, at most `max_len` tokens long, in `dtype` (default: cpu-prefill's)."""
    fallback = default_target()
    seq_len = min(fallback.seq_len, max_len)
    dtype = dtype or fallback.dtype
    if seq_len == fallback.seq_len and dtype == fallback.dtype:
        return fallback
    in_dtype = "" if dtype == fallback.dtype else f", {dtype}"
    return dataclasses.replace(
        fallback,
        name=fallback.name if dtype == fallback.dtype else f"{fallback.name}-{dtype}",
        dtype=dtype,
        seq_len=seq_len,
        description=f"CPU prefill, batch 1, {seq_len} tokens{in_dtype}",
    )


def _latency_model(
    profile: Path | None, results: Results | None, family: Family
) -> LatencyModel | None:
    """--profile, else the profile the search used (if it is still there)."""
    if profile is None and results is not None:
        recorded = results.run_info.get("profile")
        if isinstance(recorded, dict):
            recorded = recorded.get("path")
        if recorded and Path(recorded).is_file():
            profile = Path(recorded)
    if profile is None:
        return None
    return load_profile_for(family, profile)


def _members(
    results: Results,
    *,
    trial: int | None,
    max_latency_ms: float | None,
    all_pareto: bool,
) -> list[Member]:
    from mnm_search.export import front_members, pick_trial, pick_under_budget

    chosen = sum([trial is not None, max_latency_ms is not None, all_pareto])
    if chosen != 1:
        raise ConfigError(
            "with --from, choose exactly one of --trial N, --max-latency-ms X or --all-pareto"
        )
    if trial is not None:
        return [pick_trial(results.trials, trial, results_dir=results.dir)]
    if max_latency_ms is not None:
        usable = results.finished
        if "feasible" in usable.columns:
            usable = usable[usable["feasible"].astype(bool)]
        return [pick_under_budget(usable, max_latency_ms, results_dir=results.dir)]
    return front_members(results.front, results_dir=results.dir)


def _show(reports: list[ExportReport], out_dir: Path, data_name: str) -> None:
    worst = max(r.logits_max_abs_diff for r in reports)
    table = Table(
        title=f"exported to {out_dir} (verified: max |Δ logits| {worst:.1e})",
        caption=f"loss: {loss_label(data_name, reports[0].eval_tokens)}",
    )
    several = len(reports) > 1
    if several:
        add_number_column(table, "trial")
    table.add_column("widths")  # wraps: a many-layer model's widths would push numbers off
    for column in ("params", "loss", "pred. ms", "meas. ms", "error", "vs full"):
        add_number_column(table, column)
    for r in reports:
        cells = [str(r.trial) if r.trial is not None else r.path.name] if several else []
        cells += [
            r.widths_compact,
            f"{r.params / 1e6:.2f}M",
            f"{r.loss:.4f}" if r.loss is not None else "-",
            f"{r.predicted_ms:.3f}" if r.predicted_ms is not None else "-",
            f"{r.measured_ms:.3f}" if r.measured_ms is not None else "-",
            f"{r.latency_error_pct:+.1f}%" if r.latency_error_pct is not None else "-",
            f"{r.speedup_vs_full:.2f}x" if r.speedup_vs_full is not None else "-",
        ]
        table.add_row(*cells)
    out.print(table)
    errors = [abs(r.latency_error_pct) for r in reports if r.latency_error_pct is not None]
    if len(errors) > 1:
        mape = sum(errors) / len(errors)
        out.print(f"latency prediction MAPE over {len(errors)} exports: {mape:.1f}%")
    spec = reports[0].speculative
    if spec is not None:
        rate = spec.get("acceptance_rate")
        seen = f", acceptance {rate:.2f} on the check's prompt" if rate is not None else ""
        out.print(
            f"draft {spec['draft_widths_compact']} (lookahead {spec['lookahead']}) shipped in "
            f"config.json `speculative`: greedy decoding with it equals plain greedy "
            f"decoding{seen}",
            highlight=False,
        )
    if reports[0].latency_not_measured:
        out.print(f"latency not measured: {reports[0].latency_not_measured}", highlight=False)
    elif reports[0].target and reports[0].measured_ms is not None:
        out.print(
            f"measured on {reports[0].target}; vs full: speed-up over the full model, timed "
            f"alongside (interleaved)",
            highlight=False,
        )


# The exporters announce each member of a front as `[3/42] trial-0003`.
_MEMBER_MESSAGE = re.compile(r"\[\d+/\d+\] ")


@contextmanager
def export_progress() -> Iterator[Callable[[str], None]]:
    """An `on_progress` for the exporters' messages (`[3/42] trial-0003`, `slicing ...`).

    On a terminal: a spinner showing the latest. Anywhere else (a log file, CI) a spinner
    prints nothing until the end, so plain lines instead, as `progress_bar` does: one per
    member of a front, and the current step once 30 s passed without a line (a Gemma 3n
    export takes minutes). A quick export prints none: a failure stays one line.
    """
    if err.is_terminal and not err.is_dumb_terminal:
        with err.status("exporting") as status:
            yield lambda message: status.update(message)
        return
    started = time.perf_counter()
    last_line = started

    def log(message: str) -> None:
        nonlocal last_line
        now = time.perf_counter()
        if _MEMBER_MESSAGE.match(message) or now - last_line >= PROGRESS_LOG_SECONDS:
            last_line = now
            err.print(
                f"exporting ({now - started:.0f} s): {message}", markup=False, highlight=False
            )

    yield log


@user_errors
def export(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write (must not exist).")],
    ckpt: CkptArg = None,
    widths: Annotated[
        str | None,
        typer.Option("--widths", "-w", help="One width per layer: S,M,L,XL, integers, 0, X*N."),
    ] = None,
    from_dir: Annotated[
        Path | None, typer.Option("--from", help="Results directory of `mnm search`.")
    ] = None,
    trial: Annotated[int | None, typer.Option("--trial", help="Export this trial.")] = None,
    max_latency_ms: Annotated[
        float | None,
        typer.Option("--max-latency-ms", help="Export the best trial within this latency."),
    ] = None,
    all_pareto: Annotated[
        bool,
        typer.Option("--all-pareto", help="Export every front member (one subdirectory each)."),
    ] = False,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="One of the family's export formats (default: its first): safetensors; onnx "
            "adds model.onnx (native MatLM, Llama-architecture); gguf adds model.gguf for "
            "llama.cpp (Llama-architecture); hf (Gemma 3n).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    profile: Annotated[
        Path | None,
        typer.Option("--profile", help="Latency profile for the predicted latency."),
    ] = None,
    target: Annotated[
        Path | None,
        typer.Option(
            "--target", help="Target YAML to measure on (default: the profile's, or cpu-prefill)."
        ),
    ] = None,
    data: DataOpt = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Evaluate on at most this many tokens.")
    ] = DEFAULT_EVAL_TOKENS,
    draft: Annotated[
        str | None,
        typer.Option(
            "--draft",
            help="Ship a self-speculative draft with the export: a narrower configuration of "
            "the same checkpoint (widths syntax, at most the export's width in every layer), "
            "recorded as `speculative` in config.json and checked to decode exactly.",
        ),
    ] = None,
    lookahead: Annotated[
        int | None,
        typer.Option(
            "--lookahead",
            help=f"Tokens the --draft proposes per verification (default {DEFAULT_LOOKAHEAD}).",
        ),
    ] = None,
    as_json: JsonOpt = False,
    step: StepOpt = None,
) -> None:
    """Write a physically sliced, verified submodel (config.json, safetensors, model card).

    Every family writes its own format (see --format), verified against the in-place forward
    before anything is published: a native checkpoint as config.json + model.safetensors
    (+ model.onnx), a Llama-architecture one as a transformers-style directory (+ model.onnx
    or model.gguf), a Gemma 3n one as a transformers directory (--format hf).

    With --draft the export ships with a narrower configuration of itself as a draft for
    self-speculative decoding (`mnm speculate`): greedy decoding with it is checked to equal
    plain greedy decoding on the written export before anything is published.

    Example: mnm export --from results/default --max-latency-ms 5 --out my-model
    """
    from mnm_search.checkpoint import default_checkpoint_path
    from mnm_search.export import (
        Draft,
        Member,
        check_draft_fits,
        check_format,
        export_front,
        export_submodel,
    )

    if (widths is None) == (from_dir is None):
        raise ConfigError("give either --widths W or --from RESULTS_DIR (exactly one)")
    if from_dir is None and (trial is not None or max_latency_ms is not None or all_pareto):
        raise ConfigError(
            "--trial, --max-latency-ms and --all-pareto choose from --from RESULTS_DIR"
        )
    if lookahead is not None and draft is None:
        raise ConfigError("--lookahead sets the lookahead of a --draft; give --draft W too")
    results = Results(from_dir) if from_dir is not None else None
    source = search_source_path(ckpt, results)
    # Before --force is considered: replacing --out must never delete what the export reads.
    refuse_overlap(
        out_dir,
        {
            "the checkpoint": source if source is not None else default_checkpoint_path(),
            "the --from results directory": from_dir,
            "the --profile file": profile,
            "the --data text": data,
            "the --target file": target,
        },
    )
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir} already exists; choose another --out or pass --force")
    if results is not None and step is None:
        step = results.run_info.get("step")  # the widths were chosen with the search's step
    # The structure first (instant): a real checkpoint's weights take minutes to read, and
    # a wrong format, checkpoint or widths is a clear error before that.
    structure = load_family(source, weights=False, step=step)
    fmt = check_format(structure, fmt)
    check_matches_search(structure, results)
    if results is None:
        members = [Member(widths=structure.parse_widths(widths or ""))]
    else:
        members = _members(
            results, trial=trial, max_latency_ms=max_latency_ms, all_pareto=all_pareto
        )
    for member in members:
        structure.validate_widths(member.widths)
    shipped = None
    if draft is not None:
        shipped = Draft(
            widths=structure.parse_widths(draft),
            lookahead=DEFAULT_LOOKAHEAD if lookahead is None else lookahead,
        )
        for member in members:  # before the weights are read
            check_draft_fits(structure, shipped.widths, member)
    family = structure if structure.has_weights else load_family(source, step=step)
    latency_model = _latency_model(profile, results, family)
    measure_on: HardwareTarget
    if target is not None:
        measure_on = load_target(target)
    elif latency_model is not None:
        measure_on = latency_model.target
    else:
        measure_on = default_measurement_target(family)
    eval_set = family.load_eval_set(data, max_tokens=max_tokens)
    options: dict[str, Any] = {
        "fmt": fmt,
        "eval_set": eval_set,
        "data_name": str(data) if data is not None else "bundled validation text",
        "latency_model": latency_model,
        "target": measure_on,
        "provenance": {"results_dir": str(from_dir)} if from_dir is not None else {},
        "overwrite": force,
        "draft": shipped,
    }
    with export_progress() as on_progress:
        options["on_progress"] = on_progress
        if all_pareto:
            reports = export_front(family, members, out_dir, **options)
        else:
            reports = [export_submodel(family, members[0], out_dir, **options)]
    if as_json:
        data_out = [r.to_dict() for r in reports]
        print_json({"out": str(out_dir), "exports": data_out} if all_pareto else data_out[0])
        return
    _show(reports, out_dir, options["data_name"])
