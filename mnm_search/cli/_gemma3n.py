"""The Gemma 3n side of `info`, `eval`, `profile` and `export`.

The commands detect the family from CKPT's `config.json` and call these for Gemma 3n; the
native commands stay as they are. Importing this module needs the `hf` extra (transformers),
which `families.load_gemma3n` reports clearly when it is missing.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from mnm_search.cli._common import (
    add_number_column,
    err,
    loss_label,
    out,
    print_eval_result,
    print_json,
)
from mnm_search.cli._profile import (
    load_profile_for,
    print_profile_header,
    print_validation,
    stage_progress,
)
from mnm_search.config import run_length_widths
from mnm_search.errors import ExportError
from mnm_search.evaluator import perplexity
from mnm_search.families import load_gemma3n
from mnm_search.targets import HardwareTarget

FAMILY_NAME = "Gemma 3n"


def info(ckpt: Path, *, as_json: bool, step: int | None) -> None:
    # The weights stay on disk: shapes and shard headers are all `info` needs.
    family = load_gemma3n(ckpt, step=step, weights=False)
    data = {"kind": "universal", **family.describe()}
    data["params_uniform"] = {
        name: family.param_count(widths) for name, widths in family.uniform_configs().items()
    }
    n_with_skips = family.n_configs
    n_without = math.prod(
        len([w for w in family.allowed_widths(i) if w]) for i in range(family.n_layers)
    )
    data["n_configs"] = {"mix_n_match": n_without, "with_skips": n_with_skips}
    data["tokenizer"] = "checkpoint" if _has_tokenizer(ckpt) else "bytes (no tokenizer files)"
    if as_json:
        print_json(data)
        return
    table = Table(title=f"{FAMILY_NAME} checkpoint {ckpt}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("family", f"{data['family']} (transformers Gemma3nForCausalLM), {data['dtype']}")
    table.add_row("fingerprint", str(data["fingerprint"]))
    table.add_row(
        "shape",
        f"{data['n_layers']} layers, hidden {data['hidden_size']}, vocab {data['vocab_size']}",
    )
    table.add_row("stored FFN widths", run_length_widths(data["stored_widths"]))
    table.add_row("width step", f"{data['step']} (widths are multiples of it; 0 drops a layer)")
    table.add_row(
        "KV producers",
        f"{data['kv_producer_layers']} (never skipped); {data['num_kv_shared_layers']} "
        f"layers reuse their KV",
    )
    table.add_row("skippable layers", str(data["skippable_layers"]))
    table.add_row("parameters", f"{data['params']:,} ({data['effective_params']:,} effective)")
    for name, count in data["params_uniform"].items():
        table.add_row(f"  {name}", f"{count:,}")
    table.add_row(
        "Mix'n'Match configs",
        f"{n_without:,} ({n_with_skips:,} with layer skips)",
    )
    table.add_row("tokenizer", data["tokenizer"])
    out.print(table)


def _has_tokenizer(ckpt: Path) -> bool:
    from mnm_search.families.gemma3n import TOKENIZER_FILES

    return any((ckpt / name).is_file() for name in TOKENIZER_FILES[:3])


def evaluate(
    ckpt: Path,
    *,
    widths: str | None,
    data: Path | None,
    max_tokens: int,
    profile: Path | None,
    as_json: bool,
    step: int | None,
) -> None:
    family = load_gemma3n(ckpt, step=step)
    resolved = family.parse_widths(widths) if widths is not None else family.full_widths()
    latency = load_profile_for(family, profile) if profile is not None else None
    eval_set = family.load_eval_set(data, seq_len=family.eval_seq_len, max_tokens=max_tokens)
    started = time.perf_counter()
    with err.status(f"evaluating on {eval_set.n_tokens:,} tokens"):
        loss = family.evaluate_loss(resolved, eval_set)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "family": family.name,
        "widths": resolved,
        "widths_compact": run_length_widths(resolved),
        "skipped_layers": [i for i, w in enumerate(resolved) if w == 0],
        "loss": round(loss, 6),
        "perplexity": round(perplexity(loss), 4),
        "params": family.param_count(resolved),
        "effective_params": family.effective_param_count(resolved),
        "n_tokens": eval_set.n_tokens,
        "tokenizer": "checkpoint" if family.tokenizer is not None else "bytes",
        "data": str(data) if data else "bundled validation text",
        "fingerprint": family.fingerprint,
        "eval_seconds": round(seconds, 3),
    }
    if latency is not None:
        result["latency_ms"] = round(latency.predict_ms(resolved), 4)
        result["latency_target"] = latency.target.name
    if as_json:
        print_json(result)
        return
    print_eval_result(result)


def load_for_target(ckpt: Path, target: HardwareTarget, *, step: int | None) -> Any:
    """The family loaded in the target's dtype and moved to its device (one copy only)."""
    from mnm_search.profiler import select_device

    device = select_device(target.device)
    family = load_gemma3n(ckpt, step=step, dtype=target.dtype)
    family.model.to(device)  # in place: parameters move, no second model
    return family


def profile(
    ckpt: Path,
    target: HardwareTarget,
    *,
    quick: bool,
    allow_skip: bool,
    step: int | None,
) -> tuple[Any, dict[str, Any]]:
    """Load, then profile with one progress bar per stage; (family, profile dict)."""
    family = load_for_target(ckpt, target, step=step)
    return family, profile_loaded(family, target, quick=quick, allow_skip=allow_skip)


def profile_loaded(
    family: Any, target: HardwareTarget, *, quick: bool, allow_skip: bool = True
) -> dict[str, Any]:
    from mnm_search.families.gemma3n_profile import profile_gemma3n

    with stage_progress() as on_progress:
        return profile_gemma3n(
            family, target, quick=quick, allow_skip=allow_skip, on_progress=on_progress
        )


def print_profile_summary(result: dict[str, Any]) -> None:
    print_profile_header(result)
    table_info = result["ffn_table"]
    widths = table_info["widths"]
    layers = Table(title="Decoder layer time (ms, median) at each FFN width")
    layers.add_column("layer", justify="right")
    for width in widths:
        layers.add_column(str(width), justify="right")
    for layer, entry in enumerate(table_info["per_layer"]):
        layers.add_row(str(layer), *(f"{entry[str(w)]['median_ms']:.3f}" for w in widths))
    out.print(layers)
    fixed = result["latency_model"]["fixed_ms"]
    out.print(f"outside the decoder layers (embeddings, PLE, head): {fixed:.3f} ms")
    print_validation(result)


def export(
    members: list[tuple[int | None, list[int]]],
    out_dir: Path,
    *,
    family: Any,
    data: Path | None,
    max_tokens: int,
    latency_model: Any,
    target: HardwareTarget,
    provenance: dict[str, Any],
    overwrite: bool,
    as_json: bool,
) -> None:
    from mnm_search.cli._export import export_progress
    from mnm_search.families.gemma3n_export import export_gemma3n

    eval_set = family.load_eval_set(data, seq_len=family.eval_seq_len, max_tokens=max_tokens)
    with export_progress() as on_progress:
        reports = export_gemma3n(
            family,
            members,
            out_dir,
            eval_set=eval_set,
            data_name=str(data) if data is not None else "bundled validation text",
            latency_model=latency_model,
            target=target,
            provenance=provenance,
            overwrite=overwrite,
            on_progress=on_progress,
        )
    if as_json:
        print_json({"out": str(out_dir), "exports": reports} if len(reports) > 1 else reports[0])
        return
    worst = max(r["verification"]["max_abs_logit_diff"] for r in reports)
    quality = reports[0].get("quality") or {}
    table = Table(
        title=f"exported to {out_dir} (reloaded with transformers; max |Δ logits| {worst:.1e})",
        caption=f"loss: {loss_label(quality.get('data'), quality.get('eval_tokens'))}"
        if quality
        else None,
    )
    add_number_column(table, "trial")
    table.add_column("widths")
    for column in ("params", "effective", "loss", "pred. ms", "meas. ms", "vs full"):
        add_number_column(table, column)
    for report in reports:
        quality = report.get("quality") or {}
        latency = report.get("latency") or {}
        table.add_row(
            str(report.get("trial") if report.get("trial") is not None else "-"),
            report["widths_compact"],
            f"{report['params']:,}",
            f"{report['effective_params']:,}",
            f"{quality['loss']:.4f}" if quality else "-",
            _ms(latency.get("predicted_ms")),
            _ms(latency.get("measured_ms")),
            f"{latency['speedup_vs_full']:.2f}x" if latency.get("speedup_vs_full") else "-",
        )
    out.print(table)
    latency = reports[0].get("latency") or {}
    if latency.get("not_measured"):
        out.print(f"latency not measured: {latency['not_measured']}", highlight=False)
    elif latency.get("measured_ms") is not None:
        out.print(
            f"measured on {latency['target']['name']} (median of {latency['repeats']} "
            "interleaved runs of the in-place sliced model, which computes what the export "
            "computes); vs full: speed-up over the full model, timed alongside",
            highlight=False,
        )


def _ms(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def check_ckpt_matches(family: Any, expected: str | None, results_dir: Path) -> None:
    if expected and expected != family.fingerprint:
        raise ExportError(
            f"{results_dir} was searched on checkpoint {expected}, but this one is "
            f"{family.fingerprint}; its widths and losses do not apply to it"
        )
