"""Export of Gemma 3n configurations as verified Hugging Face checkpoints, with measurements.

`Gemma3nFamily.export_hf` writes and verifies one directory; this adds what `mnm export`
records next to it (loss on the user's data, predicted latency, the search trial) and the
all-or-nothing export of a whole Pareto front.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from safetensors import SafetensorError

from mnm_search._files import atomic_directory, describe_os_error, finite, refuse_overlap
from mnm_search.config import run_length_widths
from mnm_search.data import EvalSet
from mnm_search.errors import ConfigError, DeviceError, ExportError, MnmError
from mnm_search.evaluator import perplexity
from mnm_search.families.gemma3n import EXPORT_INFO_FILE, Gemma3nFamily
from mnm_search.families.gemma3n_profile import measure_gemma3n_latency
from mnm_search.latency import LatencyModel
from mnm_search.targets import HardwareTarget

Progress = Callable[[str], None]


def export_gemma3n(
    family: Gemma3nFamily,
    members: Sequence[tuple[int | None, Sequence[int]]],
    out: str | Path,
    *,
    eval_set: EvalSet | None = None,
    data_name: str = "bundled validation text",
    latency_model: LatencyModel | None = None,
    target: HardwareTarget | None = None,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
    on_progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Export `(trial, widths)` members as HF checkpoints; one member goes to `out` itself,
    several to `out/trial-NNNN/` plus `out/front.csv` (all or nothing). Returns one report
    (what `mnm.json` records) per member.

    With a `target` (default: the latency model's), each member's in-place sliced model (which
    computes what the written checkpoint computes) is timed interleaved with the full model;
    a target the loaded model cannot run as is (another device or dtype) records why not.
    """
    if not members:
        raise ExportError("nothing to export: the front is empty")
    for _, widths in members:
        family.validate_widths(list(widths))
    out = Path(out)
    refuse_overlap(out, {"the source checkpoint": family.path})
    progress = on_progress or (lambda message: None)
    options: dict[str, Any] = {
        "eval_set": eval_set,
        "data_name": data_name,
        "latency_model": latency_model,
        "target": target if target is not None else getattr(latency_model, "target", None),
        "provenance": provenance,
        "max_shard_size": max_shard_size,
        "progress": progress,
    }
    if len(members) == 1:
        trial, widths = members[0]
        return [_export_one(family, trial, widths, out, overwrite=overwrite, **options)]
    reports = []
    try:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            for index, (trial, widths) in enumerate(members):
                name = f"trial-{trial:04d}" if trial is not None else f"member-{index}"
                progress(f"[{index + 1}/{len(members)}] {name}")
                report = _export_one(family, trial, widths, tmp / name, **options)
                reports.append({**report, "path": str(out / name)})
            pd.DataFrame([_summary_row(r) for r in reports]).to_csv(tmp / "front.csv", index=False)
    except MnmError:
        raise
    except OSError as exc:
        raise ExportError(f"{describe_os_error(exc, out)}; nothing was written") from exc
    return reports


def _export_one(
    family: Gemma3nFamily,
    trial: int | None,
    widths: Sequence[int],
    out: Path,
    *,
    eval_set: EvalSet | None,
    data_name: str,
    latency_model: LatencyModel | None,
    target: HardwareTarget | None,
    provenance: dict[str, Any] | None,
    max_shard_size: int | str,
    progress: Progress,
    overwrite: bool = False,
) -> dict[str, Any]:
    widths = list(widths)
    compact = run_length_widths(widths)
    metadata: dict[str, Any] = {"widths_compact": compact, "trial": trial, **(provenance or {})}
    # Measured on the in-place sliced model before writing: export_hf verifies that the
    # written checkpoint computes the same logits.
    if eval_set is not None:
        progress(f"evaluating {compact} on {eval_set.n_tokens:,} tokens")
        loss = family.evaluate_loss(widths, eval_set)
        if math.isfinite(loss):
            metadata["quality"] = {
                "loss": round(loss, 6),
                "perplexity": round(perplexity(loss), 4),
                "eval_tokens": eval_set.n_tokens,
                "data": data_name,
            }
        else:  # JSON has no NaN: say why there is no number instead
            metadata["quality"] = None
            metadata["quality_not_measured"] = (
                f"the loss on {eval_set.n_tokens:,} tokens of {data_name} is {loss} "
                "(overflow in this dtype, or a broken configuration)"
            )
    predicted = latency_model.predict_ms(widths) if latency_model is not None else None
    if target is not None:
        metadata["latency"] = {
            "target": target.to_dict(),
            "predicted_ms": _round(predicted),
            **_measured_latency(family, target, widths, predicted, progress),
        }
    elif latency_model is not None:
        metadata["latency"] = {
            "target": latency_model.target.to_dict(),
            "predicted_ms": _round(predicted),
        }
    progress(f"writing and verifying {compact}")
    try:
        family.export_hf(
            widths,
            out,
            overwrite=overwrite,
            # Strict JSON in mnm.json: a NaN loss or latency is recorded as null.
            metadata=finite(metadata),
            max_shard_size=max_shard_size,
        )
    except OSError as exc:
        raise ExportError(f"{describe_os_error(exc, out)}; nothing was written") from exc
    except SafetensorError as exc:
        # Shards are written by mnm's own writer (OSError); safetensors only reads the source.
        raise ExportError(
            f"reading the weights of {family.path} failed ({exc}): the checkpoint is corrupt "
            f"or truncated; re-copy it. Nothing was written to {out}"
        ) from exc
    return {"path": str(out), **json.loads((out / EXPORT_INFO_FILE).read_text())}


def _measured_latency(
    family: Gemma3nFamily,
    target: HardwareTarget,
    widths: list[int],
    predicted: float | None,
    progress: Progress,
) -> dict[str, Any]:
    dtype = str(family.dtype).removeprefix("torch.")
    if target.dtype != dtype:
        return {
            "measured_ms": None,
            "not_measured": f"target {target.name!r} runs in {target.dtype}, but the checkpoint "
            f"is {dtype} and export never converts it; time it with a {dtype} target",
        }
    full = family.full_widths()
    configs = [widths] if widths == full else [widths, full]
    label = f"timing {run_length_widths(widths)} and the full model on {target.name}"
    progress(label)
    try:
        stats = measure_gemma3n_latency(
            family,
            target,
            configs,
            on_round=lambda done: progress(f"{label}: round {done}/{target.repeats}"),
        )
    except (ConfigError, DeviceError) as exc:  # e.g. a CUDA target, the model on the CPU
        return {"measured_ms": None, "not_measured": str(exc)}
    member, whole = stats[0], stats[-1]
    return {
        "measured_ms": _round(member.median_ms),
        "measured_p10_ms": _round(member.p10_ms),
        "measured_p90_ms": _round(member.p90_ms),
        "error_pct": (
            _round(100.0 * (predicted - member.median_ms) / member.median_ms, 2)
            if predicted is not None
            else None
        ),
        "full_model_measured_ms": _round(whole.median_ms),
        "speedup_vs_full": _round(whole.median_ms / member.median_ms, 3),
        "repeats": member.n,
    }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _summary_row(report: dict[str, Any]) -> dict[str, Any]:
    quality = report.get("quality") or {}
    latency = report.get("latency") or {}
    return {
        "directory": Path(report["path"]).name,
        "trial": report.get("trial"),
        "widths": ",".join(map(str, report["widths"])),
        "loss": quality.get("loss"),
        "params": report["params"],
        "effective_params": report["effective_params"],
        "predicted_ms": latency.get("predicted_ms"),
        "measured_ms": latency.get("measured_ms"),
        "speedup_vs_full": latency.get("speedup_vs_full"),
        "max_abs_logit_diff": report["verification"].get("max_abs_logit_diff"),
    }
