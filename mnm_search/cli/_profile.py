"""`mnm profile`: measure a latency model of a checkpoint on a hardware target.

One path for every model family: load it (`load_family`), put it on the target
(`Family.prepare_for_target`), and run the one profiler (`mnm_search.profiler.profile`), whose
JSON every family shares.
"""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from mnm_search._files import refuse_overlap
from mnm_search.cli._common import (
    CkptArg,
    JsonOpt,
    StepOpt,
    TargetOpt,
    add_number_column,
    err,
    out,
    print_json,
    progress_bar,
    user_errors,
)
from mnm_search.errors import ConfigError
from mnm_search.families import load_family
from mnm_search.targets import HardwareTarget, default_target, load_target

if TYPE_CHECKING:
    from mnm_search.families.base import Family
    from mnm_search.latency import LatencyModel


# Held-out configurations timed in fresh processes by default (`--fresh`): each such process
# costs 1-4 s of start-up (importing torch), so the quick profile times fewer.
FRESH_CONFIGS = 8
FRESH_CONFIGS_QUICK = 4


def resolve_target(path: Path | None) -> HardwareTarget:
    return default_target() if path is None else load_target(path)


def load_profile_for(family: Family, path: Path) -> LatencyModel:
    """The latency model in `path`, refused unless it was measured for this checkpoint.

    An exported submodel (not universal) may use its source checkpoint's profile, named in its
    metadata. A hardware mismatch is printed as a warning on stderr.
    """
    from mnm_search.latency import LatencyModel

    expected = family.fingerprint
    if not family.is_universal:
        metadata = family.describe().get("metadata") or {}
        if metadata.get("source_fingerprint"):
            expected = str(metadata["source_fingerprint"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = LatencyModel.load(path, fingerprint=expected)
    for warning in caught:
        err.print(f"[yellow]Warning:[/] {warning.message}", highlight=False)
    return model


def load_for_target(ckpt: Path | None, target: HardwareTarget, *, step: int | None) -> Family:
    """The checkpoint loaded and put on the target's device and dtype (`prepare_for_target`:
    a copy for small native models, in place for big ones such as Gemma 3n)."""
    return load_family(ckpt, step=step).prepare_for_target(target)


def _parse_extra_widths(spec: str | None) -> list[int]:
    if not spec:
        return []
    try:
        return [int(item) for item in spec.split(",") if item.strip()]
    except ValueError:
        raise ConfigError(
            f"--measure-widths takes comma-separated integers, e.g. 384,768; got {spec!r}"
        ) from None


def check_writable(path: Path) -> None:
    """Raise the OSError that writing PATH would raise, before minutes of profiling.

    Creates nothing: the nearest existing ancestor must be a writable directory (a file
    there, as in `--out notes.txt/p.json`, or a read-only file system would otherwise fail
    only once the profile is measured).
    """
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    if os.statvfs(ancestor).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(ancestor))


@user_errors
def profile(
    ckpt: CkptArg = None,
    target_path: TargetOpt = None,
    out_path: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Profile JSON to write (default: profile-TARGET.json)."),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Fewer repeats and samples: a first look in < 1 min.")
    ] = False,
    measure_widths: Annotated[
        str | None,
        typer.Option(
            "--measure-widths",
            help="Also measure these FFN widths (comma-separated) instead of interpolating "
            "(native checkpoints; others measure every width they can take).",
        ),
    ] = None,
    fresh: Annotated[
        int | None,
        typer.Option(
            "--fresh",
            min=0,
            help=f"Held-out configurations to export and time in fresh processes, loaded "
            f"with load_model as a deployment does (default {FRESH_CONFIGS}, --quick "
            f"{FRESH_CONFIGS_QUICK}, at most the target's validation; 0 skips).",
        ),
    ] = None,
    as_json: JsonOpt = False,
    step: StepOpt = None,
) -> None:
    """Measure per-layer latency on a hardware target and fit a validated latency model.

    Times every layer at every table width and the fixed costs in isolation (native: each
    layer's FFN at every trained width; Gemma 3n: each whole decoder layer at every width
    step, so a dropped layer costs nothing), calibrates on sampled configurations run as
    export ships them, and validates on held-out ones next to the noise floor (the same
    configurations measured twice), then on other held-out ones exported and timed in fresh
    processes, as a deployment runs them.

    Example: mnm profile --target profiles/cpu-decode.yaml --out decode.json --quick
    """
    from mnm_search.checkpoint import default_checkpoint_path
    from mnm_search.profiler import write_profile

    target = resolve_target(target_path)
    extra = _parse_extra_widths(measure_widths)
    destination = out_path or Path(f"profile-{target.name}.json")
    refuse_overlap(
        destination,
        {"the checkpoint": ckpt or default_checkpoint_path(), "the --target file": target_path},
    )
    check_writable(destination)
    family = load_for_target(ckpt, target, step=step)
    err.print(f"Profiling {target.describe()}", highlight=False)
    result = profile_loaded(family, target, quick=quick, extra_widths=extra, fresh=fresh)
    write_profile(result, destination)
    print_latency_model_warnings(result["warnings"])  # stderr: --json stays one object
    print_fresh_warnings(result["fresh_validation"].get("warnings") or [])
    if as_json:
        print_json(
            {
                "profile": str(destination),
                "target": result["target"],
                "validation": {k: v for k, v in result["validation"].items() if k != "samples"},
                "fresh_validation": {
                    k: v for k, v in result["fresh_validation"].items() if k != "samples"
                },
                "warnings": result["warnings"],
                "seconds": result["timing"]["seconds"],
            }
        )
        return
    print_summary(result, family)
    out.print(f"Wrote {destination} ({result['timing']['seconds']:.1f} s of measurement)")


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} %"


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_profile_header(result: dict[str, Any]) -> None:
    """One line: the target and the machine a profile was measured on."""
    target, device = result["target"], result["device"]
    hardware = device.get("gpu_name") or device.get("cpu_model")
    out.print(
        f"[bold]{target['name']}[/]: {target['device']} {target['dtype']} on {hardware}, "
        f"torch {device['torch_version']}, threads {device['threads']}",
        highlight=False,
    )


def print_summary(result: dict[str, Any], family: Family) -> None:
    """Rich tables: per-layer times, fixed costs, uniform models, validation."""
    print_profile_header(result)
    table_info = result["ffn_table"]
    widths = table_info["widths"]
    extra = set(table_info.get("extra_measured_widths") or ())
    names = {
        max(config): name
        for name, config in family.uniform_configs().items()
        if len(set(config)) == 1 and name != str(max(config))
    }
    meaning = table_info.get("meaning") or "FFN time at that width"
    layers = Table(title=f"Time per layer (ms, median): {meaning}")
    add_number_column(layers, "layer")
    for w in widths:
        label = f"{names[w]} ({w})" if w in names else str(w)
        add_number_column(layers, f"{label} (extra)" if w in extra else label)
    rows = [[entry[str(w)]["median_ms"] for w in widths] for entry in table_info["per_layer"]]
    for layer, row in enumerate(rows):
        layers.add_row(str(layer), *(f"{v:.4f}" for v in row))
    means = [sum(col) / len(col) for col in zip(*rows)]
    layers.add_row("mean", *(f"{v:.4f}" for v in means), style="bold")
    if means and means[-1] > 0:
        layers.add_row("÷ widest", *(f"{v / means[-1]:.3f}" for v in means), style="dim")
    out.print(layers)

    fixed = Table(title="Fixed costs (ms, median)")
    fixed.add_column("component")
    add_number_column(fixed, "ms")
    for component, ms in _grouped_costs(result["fixed_costs_ms"]):
        fixed.add_row(component, f"{ms:.4f}")
    fixed.add_row(
        "fixed cost in the latency model",
        f"{result['latency_model']['fixed_ms']:.4f}",
        style="bold",
    )
    out.print(fixed)

    uniform = Table(title="Uniform models (calibration samples)")
    for column in ("model", "params", "measured ms", "predicted ms", "error", "memory MB"):
        add_number_column(uniform, column)
    samples = {tuple(s["widths"]): s for s in result["calibration"]["samples"]}
    memory = result.get("memory_uniform_bytes") or {}
    for name, config in family.uniform_configs().items():
        sample = samples.get(tuple(config))
        if sample is None:
            continue
        error = (sample["predicted_ms"] / sample["measured_ms"] - 1) * 100
        uniform.add_row(
            name,
            f"{family.param_count(config):,}",
            f"{sample['measured_ms']:.3f}",
            f"{sample['predicted_ms']:.3f}",
            f"{error:+.2f} %",
            f"{memory[name]['total'] / 2**20:.1f}" if name in memory else "-",
        )
    out.print(uniform)
    print_validation(result)


def _grouped_costs(costs: dict[str, Any]) -> list[tuple[str, float]]:
    """`attention.0`, `attention.1`... summed into one `attention (x2 layers)` row."""
    groups: dict[str, list[float]] = {}
    for name, stats in costs.items():
        prefix, _, index = name.rpartition(".")
        key = prefix if prefix and index.isdigit() else name
        groups.setdefault(key, []).append(stats["median_ms"])
    return [
        (
            f"{key} (x{len(values)} layers)" if len(values) > 1 else key.replace("_", " "),
            sum(values),
        )
        for key, values in groups.items()
    ]


def print_validation(result: dict[str, Any]) -> None:
    """The held-out accuracy of a profile next to the naive table and the noise floor, in
    this process and in fresh processes (each exported model loaded on its own)."""
    validation = result["validation"]
    naive, noise = validation["naive"], validation["noise_floor"]
    quality = Table(title=f"Held-out validation, in this process ({validation['n']} sliced models)")
    quality.add_column("metric")
    for column in ("calibrated model", "naive table", "noise floor"):
        add_number_column(quality, column)
    quality.add_row(
        "MAPE", _pct(validation["mape_pct"]), _pct(naive["mape_pct"]), _pct(noise["mape_pct"])
    )
    quality.add_row(
        "Spearman",
        _num(validation["spearman"]),
        _num(naive["spearman"]),
        _num(noise["spearman"]),
    )
    quality.add_row(
        "within ±10 %",
        f"{validation['within_10pct']:.0%}",
        f"{naive['within_10pct']:.0%}",
        "",
    )
    quality.add_row(
        "max error",
        _pct(validation["max_abs_pct_err"]),
        _pct(naive["max_abs_pct_err"]),
        _pct(noise["max_abs_pct_err"]),
    )
    out.print(quality)
    print_fresh_validation(result.get("fresh_validation"))


def print_fresh_validation(fresh: dict[str, Any] | None) -> None:
    """The fresh-process validation block, or why a profile has none."""
    if not fresh or not fresh.get("n"):
        why = (fresh or {}).get("error") or (fresh or {}).get("skipped")
        why = why or "this profile predates it; re-run `mnm profile`"
        out.print(f"Fresh-process validation: none ({escape(str(why))})", highlight=False)
        return
    protocol, noise = fresh["protocol"], fresh["noise_floor"]
    corrected, alone = fresh["drift_corrected"], fresh["in_process_fit"]
    table = Table(
        title=f"Held-out validation, fresh processes ({fresh['n']} exported models, "
        f"load_model, {protocol['warmup']} warm-ups, median of {protocol['runs']})"
    )
    table.add_column("metric")
    for column in (
        "profile",
        "drift-corrected",
        "in-process fit",
        f"noise floor ({noise['n']}x reference)",
    ):
        add_number_column(table, column)
    rows = [(fresh, "mape_pct"), (corrected, "mape_pct"), (alone, "mape_pct")]
    table.add_row("MAPE", *(_pct(block[key]) for block, key in rows), _pct(noise["mape_pct"]))
    table.add_row("Spearman", *(_num(block["spearman"]) for block, _ in rows), "")
    table.add_row("within ±10 %", *(f"{block['within_10pct']:.0%}" for block, _ in rows), "")
    table.add_row(
        "max error",
        *(_pct(block["max_abs_pct_err"]) for block, _ in rows),
        _pct(noise["max_abs_pct_err"]),
    )
    out.print(table)
    out.print(
        f"Fresh-process scale {fresh['fresh_scale']:.3f} (deployed over profiled time, median; "
        f"the full model alone: {fresh['reference']['fresh_over_in_process']:.3f}x) is in the "
        f"profile's predictions, each held-out one scaled without its own timing; the "
        f"in-process fit is unscaled.",
        highlight=False,
    )


def print_latency_model_warnings(problems: Sequence[str]) -> None:
    """A prominent box on stderr saying what a bad validation means and what to do."""
    _warning_box(
        problems,
        "Search fronts and export latency budgets built on this profile may be wrong. To "
        "measure a usable one: stop other jobs (check `uptime`), use a target with "
        "`threads: 1`, raise `repeats` in the target YAML, and re-run `mnm profile` without "
        "--quick.",
        title="Warning: this latency model is unreliable",
    )


def print_fresh_warnings(problems: Sequence[str]) -> None:
    """A box on stderr when exported models in their own processes miss the predictions."""
    _warning_box(
        problems,
        "In-process timings and deployed models disagree: latency budgets may not hold after "
        "export. Re-run `mnm profile` on an idle machine; if it persists, compare with "
        "`mnm export` measured latencies.",
        title="Warning: predictions may not hold in a deployment",
    )


def _warning_box(problems: Sequence[str], advice: str, *, title: str) -> None:
    if not problems:
        return
    lines = "\n".join(f"- {escape(text)}" for text in problems)
    err.print(
        Panel(f"{lines}\n\n{advice}", title=f"[bold]{title}[/]", border_style="yellow"),
        highlight=False,
    )


@contextmanager
def stage_progress() -> Iterator[Callable[[dict[str, Any]], None]]:
    """A profiler `on_progress` callback that shows one rich progress bar per stage."""
    with progress_bar() as progress:
        tasks: dict[str, Any] = {}

        def on_progress(event: dict[str, Any]) -> None:
            stage = event["stage"]
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=event["total"], status="")
            progress.update(tasks[stage], completed=event["done"])

        yield on_progress


def profile_loaded(
    family: Family,
    target: HardwareTarget,
    *,
    quick: bool,
    allow_skip: bool = True,
    extra_widths: Sequence[int] = (),
    fresh: int | None = None,
) -> dict[str, Any]:
    """Put `family` on the target (`prepare_for_target`) and profile it, one rich progress
    bar per stage. `fresh`: held-out configurations timed in fresh processes (None: the
    default for `quick`). Returns the profile JSON as a dict (`write_profile` writes it)."""
    from mnm_search import profiler

    if fresh is None:  # never more than the target's in-process held-out sample
        fresh = min(FRESH_CONFIGS_QUICK if quick else FRESH_CONFIGS, target.validation)
    prepared = family.prepare_for_target(target)
    with stage_progress() as on_progress:
        return profiler.profile(
            prepared,
            target,
            quick=quick,
            allow_skip=allow_skip,
            on_progress=on_progress,
            extra_widths=extra_widths,
            fresh=fresh,
        )
