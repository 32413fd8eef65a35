"""Export Mix'n'Match submodels as physically sliced, verified, deployable checkpoints.

An export is a checkpoint directory (`config.json` + `model.safetensors`, optionally
`model.onnx`) plus a model card (`README.md`). It is written into a temporary directory,
verified there, and only then renamed into place, so a failed or interrupted export leaves
nothing half-written. Verification: the reloaded files compute the universal model's logits
at those widths (max abs difference <= 1e-5 in fp32), hold exactly `param_count` parameters,
and (with a target) run at a measured latency reported next to the predicted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mnm_search import __version__
from mnm_search._files import (
    atomic_directory,
    atomic_write_text,
    describe_os_error,
    finite,
    json_text,
    refuse_overlap,
    user_path,
)
from mnm_search.checkpoint import (
    CONFIG_FILE,
    Checkpoint,
    load_checkpoint,
    write_checkpoint_files,
)
from mnm_search.config import format_widths, param_count, validate_widths
from mnm_search.data import EvalSet
from mnm_search.errors import CheckpointError, DeviceError, ExportError, MnmError
from mnm_search.evaluator import evaluate_loss, perplexity
from mnm_search.latency import LatencyModel
from mnm_search.model import MatLM
from mnm_search.profiler import measure_latency_ms
from mnm_search.slicing import slice_model
from mnm_search.targets import HardwareTarget

FORMATS = ("safetensors", "onnx", "hf")
LOGITS_TOLERANCE = 1e-5  # exported vs universal, fp32: the same arithmetic, up to op order
ONNX_TOLERANCE = 1e-4  # onnxruntime fuses and reorders ops; differences stay ~1e-7 in practice
ONNX_FILE = "model.onnx"
CARD_FILE = "README.md"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportReport:
    """What was written and what verification found."""

    path: Path
    widths: list[int]
    widths_compact: str
    params: int
    loss: float | None
    eval_tokens: int | None
    logits_max_abs_diff: float
    onnx_max_abs_diff: float | None = None
    predicted_ms: float | None = None
    measured_ms: float | None = None
    measured_p10_ms: float | None = None
    measured_p90_ms: float | None = None
    full_model_ms: float | None = None
    target: str | None = None
    trial: int | None = None
    files: list[str] = field(default_factory=list)

    @property
    def latency_error_pct(self) -> float | None:
        """Measured vs predicted, signed, in percent of the measured latency."""
        if self.predicted_ms is None or self.measured_ms is None:
            return None
        return 100.0 * (self.predicted_ms - self.measured_ms) / self.measured_ms

    @property
    def speedup_vs_full(self) -> float | None:
        if self.measured_ms is None or self.full_model_ms is None:
            return None
        return self.full_model_ms / self.measured_ms

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["latency_error_pct"] = self.latency_error_pct
        data["speedup_vs_full"] = self.speedup_vs_full
        return data


@dataclass(frozen=True)
class Member:
    """One configuration to export: its widths, and where it came from (if a search)."""

    widths: list[int]
    trial: int | None = None
    predicted_ms: float | None = None
    search_loss: float | None = None


def check_format(fmt: str) -> str:
    if fmt == "hf":
        raise ExportError(
            "--format hf writes a transformers directory and needs a checkpoint of the Gemma 3n "
            "family (Gemma3nForCausalLM); this checkpoint is a native MatLM, which exports as "
            "safetensors or onnx"
        )
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of safetensors, onnx, hf; got {fmt!r}")
    return fmt


# ---------------------------------------------------------------------------------------------
# Choosing configurations from a results directory (pure pandas)


def _widths_of(row: pd.Series) -> list[int]:
    return [int(w) for w in str(row["widths"]).split(",")]


def _member(row: pd.Series) -> Member:
    latency = row.get("latency_ms")
    return Member(
        widths=_widths_of(row),
        trial=int(row["trial"]),
        predicted_ms=float(latency) if latency is not None and not pd.isna(latency) else None,
        search_loss=float(row["loss"]),
    )


def finished_trials(trials: pd.DataFrame, results_dir: str | Path) -> pd.DataFrame:
    """Rows of finished trials; an error when there are none (nothing to export or plot)."""
    done = trials
    if "state" in done.columns:
        done = done[done["state"].astype(str).str.upper() == "COMPLETE"]
    done = done.dropna(subset=["loss"])
    if done.empty:
        raise ExportError(
            f"{results_dir} has no finished trial yet ({len(trials)} recorded); run or resume "
            f"`mnm search` until at least one trial completes"
        )
    return done


def pick_trial(trials: pd.DataFrame, trial: int, *, results_dir: str | Path) -> Member:
    done = finished_trials(trials, results_dir)
    rows = done[done["trial"] == trial]
    if rows.empty:
        numbers = sorted(int(t) for t in done["trial"])
        state = ""
        if "state" in trials.columns:
            others = trials[trials["trial"] == trial]
            if not others.empty:
                state = f" (trial {trial} is {others['state'].iloc[0]}, not finished)"
        raise ExportError(
            f"trial {trial} does not exist in {results_dir}{state}; finished trials are "
            f"{_ranges(numbers)}"
        )
    return _member(rows.iloc[0])


def pick_under_budget(
    front: pd.DataFrame, max_latency_ms: float, *, results_dir: str | Path
) -> Member:
    """The lowest-loss front member whose predicted latency is within the budget."""
    front = finished_trials(front, results_dir)
    if "latency_ms" not in front.columns or front["latency_ms"].isna().all():
        raise ExportError(
            f"{results_dir} has no latency_ms column (the search ran without a latency "
            f"profile); choose a configuration with --trial N instead"
        )
    front = front.dropna(subset=["latency_ms"])
    fitting = front[front["latency_ms"] <= max_latency_ms]
    if fitting.empty:
        fastest = front.sort_values(["latency_ms", "loss"]).iloc[0]
        raise ExportError(
            f"no configuration on the front of {results_dir} meets --max-latency-ms "
            f"{max_latency_ms:g}; the fastest available is trial {int(fastest['trial'])} at "
            f"{fastest['latency_ms']:.3f} ms (loss {fastest['loss']:.4f})"
        )
    return _member(fitting.sort_values(["loss", "latency_ms"]).iloc[0])


def front_members(front: pd.DataFrame, *, results_dir: str | Path) -> list[Member]:
    front = finished_trials(front, results_dir)
    order = [c for c in ("latency_ms", "params", "loss") if c in front.columns]
    return [_member(row) for _, row in front.sort_values(order).iterrows()]


def _ranges(numbers: Sequence[int]) -> str:
    """`0-5, 7, 9-12` for a sorted list of ints."""
    parts: list[str] = []
    start = prev = None
    for n in [*numbers, None]:
        if n is not None and prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = n
    return ", ".join(parts) or "none"


# ---------------------------------------------------------------------------------------------
# Writing and verifying


@contextlib.contextmanager
def _quiet_exporter():  # type: ignore[no-untyped-def]
    """The ONNX exporter logs and warns on stdout/stderr; keep `--json` stdout clean."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def write_onnx(model: MatLM, path: Path) -> None:
    """`input_ids` int64 [batch, seq] -> `logits` float32 [batch, seq, vocab], dynamic axes."""
    config = model.config
    example = torch.zeros((2, min(8, config.max_seq_len)), dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=config.max_seq_len)
    with _quiet_exporter():
        try:
            program = torch.onnx.export(
                model,
                (example,),
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_shapes={"input_ids": {0: batch, 1: seq}},
                dynamo=True,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many internal types
            raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
        program.save(str(path))


def verify_onnx(path: Path, model: MatLM) -> float:
    """Max abs difference between onnxruntime and torch logits on two input shapes."""
    import onnxruntime as ort  # optional dependency, needed only here

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types (Fail, InvalidGraph, ...)
        raise ExportError(
            f"onnxruntime cannot load the {ONNX_FILE} just written for {user_path(path.parent)} "
            f"({type(exc).__name__}: {exc}); the ONNX file was not written"
        ) from exc
    names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if names != (["input_ids"], ["logits"]):
        raise ExportError(
            f"{user_path(path)} has inputs/outputs {names}, expected input_ids -> logits"
        )
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    # Two shapes: proves the batch and sequence axes are really dynamic.
    for shape in ((2, min(16, model.config.max_seq_len)), (1, min(5, model.config.max_seq_len))):
        ids = torch.randint(0, model.config.vocab_size, shape, generator=generator)
        (logits,) = session.run(["logits"], {"input_ids": ids.numpy()})
        with torch.inference_mode():
            expected = model(ids)
        if logits.dtype.name != "float32" or tuple(logits.shape) != tuple(expected.shape):
            raise ExportError(
                f"{path} returned {logits.dtype} {list(logits.shape)}, expected float32 "
                f"{list(expected.shape)}"
            )
        worst = max(worst, float((torch.from_numpy(logits) - expected).abs().max()))
    if not worst <= ONNX_TOLERANCE:
        raise ExportError(
            f"onnxruntime logits differ from torch by {worst:.3g} (> {ONNX_TOLERANCE:g}); "
            f"the ONNX file was not written"
        )
    return worst


@torch.inference_mode()
def _logits_difference(universal: MatLM, widths: list[int], exported: MatLM) -> float:
    config = universal.config
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, min(64, config.max_seq_len)), generator=generator)
    return float((exported(ids) - universal(ids, widths)).abs().max())


def _measure(model: MatLM, target: HardwareTarget) -> Any:
    return measure_latency_ms(model, target)


class _Exporter:
    """Exports members of one checkpoint, each verified and timed next to the full model."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        fmt: str,
        eval_set: EvalSet | None,
        data_name: str,
        latency_model: LatencyModel | None,
        target: HardwareTarget | None,
        provenance: dict[str, Any],
        on_progress: Progress | None,
    ) -> None:
        self.checkpoint = checkpoint
        self.fmt = check_format(fmt)
        self.eval_set = eval_set
        self.data_name = data_name
        self.latency_model = latency_model
        self.target = target if target is not None else getattr(latency_model, "target", None)
        self.provenance = provenance
        self.on_progress = on_progress or (lambda message: None)

    def _timed(self, model: MatLM) -> tuple[float | None, float | None, float | None]:
        if self.target is None:
            return None, None, None
        try:
            stats = _measure(model, self.target)
        except DeviceError as exc:  # e.g. a CUDA profile used on a CPU-only machine
            self.on_progress(f"latency not measured: {exc}")
            return None, None, None
        return float(stats.median_ms), float(stats.p10_ms), float(stats.p90_ms)

    def write(self, directory: Path, member: Member) -> ExportReport:
        """Write one export into an existing (temporary) directory and verify it there."""
        universal, config = self.checkpoint.model, self.checkpoint.config
        widths = validate_widths(member.widths, config)
        compact = format_widths(widths, config)
        self.on_progress(f"slicing {compact}")
        sliced = slice_model(universal, widths)
        predicted = member.predicted_ms
        if self.latency_model is not None:
            predicted = self.latency_model.predict_ms(widths)
        metadata: dict[str, Any] = {
            "source_fingerprint": self.checkpoint.fingerprint,
            "source_path": str(self.checkpoint.path) if self.checkpoint.path else None,
            "mnm_version": __version__,
            "export": {"format": self.fmt, "widths_compact": compact, **self.provenance},
        }
        if member.trial is not None:
            metadata["export"]["trial"] = member.trial
        try:
            write_checkpoint_files(directory, sliced, metadata=metadata)
        except CheckpointError as exc:  # e.g. disk full; the message names the file
            raise ExportError(str(exc)) from exc

        self.on_progress(f"verifying {compact}")
        try:
            exported = load_checkpoint(directory).model
        except CheckpointError as exc:  # written a moment ago: the disk or a library failed
            raise ExportError(
                f"the export does not read back ({user_path(str(exc))}); nothing was written"
            ) from exc
        diff = _logits_difference(universal, widths, exported)
        if not diff <= LOGITS_TOLERANCE:
            raise ExportError(
                f"exported {compact} differs from the universal model by {diff:.3g} "
                f"(> {LOGITS_TOLERANCE:g}); nothing was written"
            )
        params = sum(p.numel() for p in exported.parameters())
        expected_params = param_count(config, widths)
        if params != expected_params:
            raise ExportError(
                f"exported {compact} holds {params:,} parameters, expected {expected_params:,}; "
                f"nothing was written"
            )
        onnx_diff = None
        files = [CONFIG_FILE, "model.safetensors"]
        if self.fmt == "onnx":
            self.on_progress(f"writing and checking {ONNX_FILE}")
            write_onnx(exported, directory / ONNX_FILE)
            onnx_diff = verify_onnx(directory / ONNX_FILE, exported)
            files.append(ONNX_FILE)

        loss = None
        if self.eval_set is not None:
            self.on_progress(f"evaluating {compact} on {self.eval_set.n_tokens:,} tokens")
            loss = evaluate_loss(exported, self.eval_set)
        if self.target is not None:
            self.on_progress(f"timing {compact} and the full model on {self.target.name}")
        measured, p10, p90 = self._timed(exported)
        # Timed right after the export, so that both see the same machine load.
        full_ms = self._timed(universal)[0] if measured is not None else None
        report = ExportReport(
            path=directory,
            widths=widths,
            widths_compact=compact,
            params=params,
            loss=loss,
            eval_tokens=self.eval_set.n_tokens if self.eval_set is not None else None,
            logits_max_abs_diff=diff,
            onnx_max_abs_diff=onnx_diff,
            predicted_ms=predicted,
            measured_ms=measured,
            measured_p10_ms=p10,
            measured_p90_ms=p90,
            full_model_ms=full_ms,
            target=self.target.describe() if self.target is not None else None,
            trial=member.trial,
            files=[*files, CARD_FILE],
        )
        metadata.update(self._measurements(report, member))
        _rewrite_config(directory, metadata)
        atomic_write_text(directory / CARD_FILE, model_card(report, self.checkpoint, metadata))
        return report

    def _measurements(self, report: ExportReport, member: Member) -> dict[str, Any]:
        quality = None
        if report.loss is not None:
            quality = {
                "loss": round(report.loss, 6),
                "perplexity": round(perplexity(report.loss), 4),
                "eval_tokens": report.eval_tokens,
                "data": self.data_name,
                "search_loss": member.search_loss,
            }
        return {
            "params": report.params,
            "quality": quality,
            "latency": {
                "target": self.target.to_dict() if self.target is not None else None,
                "predicted_ms": _round(report.predicted_ms),
                "measured_ms": _round(report.measured_ms),
                "measured_p10_ms": _round(report.measured_p10_ms),
                "measured_p90_ms": _round(report.measured_p90_ms),
                "error_pct": _round(report.latency_error_pct, 2),
                "full_model_measured_ms": _round(report.full_model_ms),
                "speedup_vs_full": _round(report.speedup_vs_full, 3),
            },
            "verification": {
                "logits_max_abs_diff": report.logits_max_abs_diff,
                "logits_tolerance": LOGITS_TOLERANCE,
                "params_expected": param_count(self.checkpoint.config, report.widths),
                "onnx_max_abs_diff": report.onnx_max_abs_diff,
            },
        }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _rewrite_config(directory: Path, metadata: dict[str, Any]) -> None:
    path = directory / CONFIG_FILE
    config = json.loads(path.read_text())
    config.update(metadata)
    # Strict JSON: a NaN loss or latency is recorded as null, which every parser reads.
    atomic_write_text(path, json_text(config) + "\n")


_CARD_NUMBERS = (
    "loss",
    "predicted_ms",
    "measured_ms",
    "measured_p10_ms",
    "measured_p90_ms",
    "full_model_ms",
)


def model_card(report: ExportReport, source: Checkpoint, metadata: dict[str, Any]) -> str:
    """README.md of an export: what it is, how good and fast it is, how to load it."""
    config = source.config
    # A NaN loss or latency (a diverged model, a failed timing) reads as "not measured".
    report = dataclasses.replace(
        report,
        **{key: finite(getattr(report, key)) for key in _CARD_NUMBERS},
    )
    name = f"MatLM Mix'n'Match submodel {report.widths_compact}"
    lines = [f"# {name}", ""]
    lines += [
        f"Physically sliced from the universal MatFormer checkpoint `{source.fingerprint}` "
        f"({config.n_layers} layers, d_model {config.d_model}, d_ff {config.d_ff}) by "
        f"`mnm export` {__version__}.",
        "",
        "| | |",
        "|---|---|",
        f"| FFN widths per layer | `{','.join(map(str, report.widths))}` "
        f"({report.widths_compact}) |",
        f"| parameters | {report.params:,} (full model: {param_count(config):,}) |",
    ]
    if report.trial is not None:
        lines.append(f"| search trial | {report.trial} |")
    if report.loss is not None:
        lines.append(
            f"| validation loss | {report.loss:.4f} nats/token (perplexity "
            f"{perplexity(report.loss):.3f}) on {report.eval_tokens:,} tokens of "
            f"{metadata['quality']['data']} |"
        )
    if report.target:
        lines.append(f"| target | {report.target} |")
    if report.predicted_ms is not None:
        lines.append(f"| predicted latency | {report.predicted_ms:.3f} ms |")
    if report.measured_ms is not None:
        lines.append(
            f"| measured latency | {report.measured_ms:.3f} ms (p10 {report.measured_p10_ms:.3f}"
            f", p90 {report.measured_p90_ms:.3f}) |"
        )
    if report.latency_error_pct is not None:
        lines.append(f"| prediction error | {report.latency_error_pct:+.1f} % |")
    if report.speedup_vs_full is not None:
        lines.append(
            f"| vs full model | {report.speedup_vs_full:.2f}x faster "
            f"({report.full_model_ms:.3f} ms measured) |"
        )
    lines += [
        f"| verified | logits max abs diff {report.logits_max_abs_diff:.2e} vs the universal "
        f"model at these widths (tolerance {LOGITS_TOLERANCE:g}); exact parameter count |",
    ]
    if report.onnx_max_abs_diff is not None:
        lines.append(
            f"| ONNX | `{ONNX_FILE}` checked with onnxruntime: max abs diff "
            f"{report.onnx_max_abs_diff:.2e} |"
        )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        "from mnm_search import load_model",
        "",
        'model = load_model("path/to/this/directory")  # dense: no widths needed',
        "logits = model(torch.tensor([list(b'Hello')]))  # [batch, seq, 256], byte tokens",
        "```",
    ]
    if report.onnx_max_abs_diff is not None:
        lines += [
            "",
            "```python",
            "import numpy as np, onnxruntime as ort",
            "",
            f'session = ort.InferenceSession("{ONNX_FILE}")',
            'ids = np.frombuffer(b"Hello", dtype=np.uint8).astype(np.int64)[None]',
            '(logits,) = session.run(["logits"], {"input_ids": ids})',
            "```",
        ]
    lines += [
        "",
        "All numbers above are also in `config.json` (`quality`, `latency`, `verification`).",
        "",
    ]
    return "\n".join(lines)


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another --out or pass --force")


def export_submodel(
    checkpoint: Checkpoint,
    member: Member | Sequence[int],
    out: str | Path,
    *,
    fmt: str = "safetensors",
    eval_set: EvalSet | None = None,
    data_name: str = "bundled validation text",
    latency_model: LatencyModel | None = None,
    target: HardwareTarget | None = None,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
    on_progress: Progress | None = None,
) -> ExportReport:
    """Slice, write, verify and atomically publish one configuration at `out`."""
    out = Path(out)
    member = member if isinstance(member, Member) else Member(widths=list(member))
    exporter = _Exporter(
        checkpoint,
        fmt=fmt,
        eval_set=eval_set,
        data_name=data_name,
        latency_model=latency_model,
        target=target,
        provenance=provenance or {},
        on_progress=on_progress,
    )
    validate_widths(member.widths, checkpoint.config)
    refuse_overlap(out, {"the source checkpoint": checkpoint.path})
    _refuse_existing(out, overwrite)
    with _atomic(out, overwrite) as tmp:
        report = exporter.write(tmp, member)
    return _moved(report, out)


def export_front(
    checkpoint: Checkpoint,
    members: Sequence[Member],
    out: str | Path,
    *,
    fmt: str = "safetensors",
    eval_set: EvalSet | None = None,
    data_name: str = "bundled validation text",
    latency_model: LatencyModel | None = None,
    target: HardwareTarget | None = None,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
    on_progress: Progress | None = None,
) -> list[ExportReport]:
    """Export several configurations as `out/trial-NNNN/` (all or nothing) plus `front.csv`."""
    out = Path(out)
    if not members:
        raise ExportError("nothing to export: the front is empty")
    exporter = _Exporter(
        checkpoint,
        fmt=fmt,
        eval_set=eval_set,
        data_name=data_name,
        latency_model=latency_model,
        target=target,
        provenance=provenance or {},
        on_progress=on_progress,
    )
    for member in members:
        validate_widths(member.widths, checkpoint.config)
    refuse_overlap(out, {"the source checkpoint": checkpoint.path})
    _refuse_existing(out, overwrite)
    reports = []
    with _atomic(out, overwrite) as tmp:
        for index, member in enumerate(members):
            name = f"trial-{member.trial:04d}" if member.trial is not None else f"member-{index}"
            (tmp / name).mkdir()
            if on_progress:
                on_progress(f"[{index + 1}/{len(members)}] {name}")
            reports.append(exporter.write(tmp / name, member))
        summary = pd.DataFrame([_summary_row(r) for r in reports])
        summary.to_csv(tmp / "front.csv", index=False)
    return [_moved(r, out / r.path.name) for r in reports]


def _summary_row(report: ExportReport) -> dict[str, Any]:
    return {
        "directory": report.path.name,
        "trial": report.trial,
        "widths": ",".join(map(str, report.widths)),
        "loss": report.loss,
        "params": report.params,
        "predicted_ms": report.predicted_ms,
        "measured_ms": report.measured_ms,
        "error_pct": report.latency_error_pct,
        "speedup_vs_full": report.speedup_vs_full,
    }


@contextlib.contextmanager
def _atomic(out: Path, overwrite: bool):  # type: ignore[no-untyped-def]
    """atomic_directory, with OS failures (disk full, permissions) as one clear error."""
    try:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            yield tmp
    except MnmError:
        raise
    except OSError as exc:
        raise ExportError(f"{describe_os_error(exc, out)}; nothing was written") from exc


def _moved(report: ExportReport, path: Path) -> ExportReport:
    return dataclasses.replace(report, path=path)
