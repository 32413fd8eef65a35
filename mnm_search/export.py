"""Export Mix'n'Match submodels of any model family as verified, deployable directories.

One exporter for every `Family`: it picks the configurations (a trial, the best one within a
latency budget, or the whole front), evaluates each in place on the eval set, times it next to
the full model on the target, and then lets the family write and verify its own files
(`Family.write_export`: a native checkpoint with optional ONNX, a Hugging Face directory for
Gemma 3n...) into a temporary directory, which is renamed into place only once everything
succeeded: a failed or interrupted export leaves nothing half-written. Each export gets a
model card (`README.md`), a front gets `front.csv`, and every member one `ExportReport`.

What `write_export` returns (facts for the report and the card; only the first is required):

- `verified_max_abs_diff`: max abs difference of the written files' logits vs the in-place
  forward at those widths;
- `verification`: the family's verification record (also in its metadata file);
- `files`: the files written; `metadata_file`: the one holding `metadata` (`config.json`);
- `card`: `front_matter`, `title`, `about`, `rows` ([label, value] pairs), `verified` and
  `usage` for the model card;
- any extra number the family checked (e.g. `onnx_max_abs_diff`).

With a `draft` (a narrower configuration of the same checkpoint, at most the export's width
in every layer) the export ships with it for self-speculative decoding: its `config.json`
gets `"speculative": {"draft_widths": [...], "lookahead": K}` (the draft as widths of the
export itself, for every family), and the written export is loaded back to check that
greedy decoding with that draft equals plain greedy decoding before anything is published.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
)
from mnm_search.data import EvalSet
from mnm_search.errors import ConfigError, DeviceError, ExportError, MnmError
from mnm_search.evaluator import evaluate_loss, perplexity
from mnm_search.latency import LatencyModel
from mnm_search.options import DEFAULT_LOOKAHEAD
from mnm_search.targets import HardwareTarget

if TYPE_CHECKING:
    from mnm_search.families.base import Family
    from mnm_search.profiler import TimingStats

CARD_FILE = "README.md"
DEFAULT_METADATA_FILE = "config.json"
CONFIG_FILE = "config.json"  # every family's export has one; the draft block goes there
SPECULATIVE_KEY = "speculative"  # config.json: {"draft_widths": [...], "lookahead": K}
DRAFT_CHECK_TOKENS = 8  # new tokens decoded to check a shipped draft
DRAFT_PROMPT_TOKENS = 16
DRAFT_PROMPT_TEXT = "The quick brown fox jumps over the lazy dog. "  # without an eval set

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportReport:
    """What was written, what verification found and what was measured (every family)."""

    path: Path
    family: str
    format: str
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
    latency_not_measured: str | None = None
    target: str | None = None
    trial: int | None = None
    source_fingerprint: str | None = None
    files: list[str] = field(default_factory=list)
    # The blocks recorded in the export's metadata file, as written (strict JSON: null for NaN).
    quality: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    verification: dict[str, Any] = field(default_factory=dict)
    # The shipped draft: `draft_widths` (of the export), `lookahead`, `source_draft_widths`
    # and what the check found (`check_tokens`, `acceptance_rate`); None without a draft.
    speculative: dict[str, Any] | None = None

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
class Draft:
    """A draft to ship with an export: widths of the source checkpoint, and the lookahead."""

    widths: list[int]
    lookahead: int = DEFAULT_LOOKAHEAD

    def __post_init__(self) -> None:
        from mnm_search.speculative import MAX_LOOKAHEAD

        lookahead = self.lookahead
        if isinstance(lookahead, bool) or not isinstance(lookahead, int):
            raise ConfigError(f"--lookahead must be an integer, got {lookahead!r:.80}")
        if not 1 <= lookahead <= MAX_LOOKAHEAD:
            raise ConfigError(
                f"--lookahead must be in [1, {MAX_LOOKAHEAD}] (tokens the draft proposes per "
                f"verification), got {lookahead}"
            )


@dataclass(frozen=True)
class Member:
    """One configuration to export: its widths, and where it came from (if a search)."""

    widths: list[int]
    trial: int | None = None
    predicted_ms: float | None = None
    search_loss: float | None = None


def check_format(family: Family, fmt: str | None) -> str:
    """FMT if the family writes it (None: the family's default), else a clear error."""
    formats = tuple(family.export_formats)
    if fmt is None:
        return formats[0]
    if fmt not in formats:
        choices = " or ".join(f"--format {f}" for f in formats)
        raise ExportError(
            f"a {family.name} checkpoint ({family.summary}) exports as {choices}, not {fmt!r}"
        )
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


def check_draft_fits(family: Family, draft: Sequence[int], member: Member) -> None:
    """A draft ships with an export only if the export holds it: at most the export's width
    in every layer (ExportError naming the layer otherwise)."""
    widths = list(member.widths)
    for layer, (narrow, width) in enumerate(zip(draft, widths)):
        if narrow > width:
            what = f"trial {member.trial}" if member.trial is not None else "the export"
            raise ExportError(
                f"layer {layer}: the draft's width {narrow} is wider than {what}'s {width}; a "
                f"draft runs on the exported weights, so it must be at most as wide as the "
                f"export in every layer (--draft {family.format_widths(draft)} vs "
                f"{family.format_widths(widths)}); nothing was written"
            )


# ---------------------------------------------------------------------------------------------
# Measuring


def evaluate_configuration(family: Family, widths: Sequence[int], eval_set: EvalSet) -> float:
    """Mean next-token loss (nats/token) of the configuration, computed in place.

    The plain forward (`Family.logits`) is the reference every family's cached evaluator must
    match, and the export's own verification proves the written files compute the same.
    """
    return evaluate_loss(family.logits, eval_set, list(widths), batch_size=family.eval_batch_size)


def measure_configurations(
    family: Family,
    target: HardwareTarget,
    configs: Sequence[Sequence[int]],
    *,
    on_round: Callable[[int], None] | None = None,
) -> list[TimingStats]:
    """End-to-end latency of each configuration on `target`, timed interleaved: the
    profiler's generic measurement of the family as loaded (no `prepare_for_target`)."""
    from mnm_search.profiler import measure_latency

    return measure_latency(family, target, [list(c) for c in configs], on_round=on_round)


# ---------------------------------------------------------------------------------------------
# Writing


class _Exporter:
    """Exports members of one checkpoint, each verified and timed next to the full model."""

    def __init__(
        self,
        family: Family,
        *,
        fmt: str | None,
        eval_set: EvalSet | None,
        data_name: str,
        latency_model: LatencyModel | None,
        target: HardwareTarget | None,
        provenance: dict[str, Any],
        on_progress: Progress | None,
        draft: Draft | None = None,
    ) -> None:
        self.family = family
        self.fmt = check_format(family, fmt)
        self.draft = draft
        if draft is not None:
            self.draft = dataclasses.replace(draft, widths=family.validate_widths(draft.widths))
        self.eval_set = eval_set
        self.data_name = data_name
        self.latency_model = latency_model
        self.target = target if target is not None else getattr(latency_model, "target", None)
        self.provenance = provenance
        self.on_progress = on_progress or (lambda message: None)

    def validate(self, member: Member) -> list[int]:
        widths = self.family.validate_widths(list(member.widths))
        if self.draft is not None:
            check_draft_fits(self.family, self.draft.widths, member)
        return widths

    def write(self, directory: Path, member: Member) -> ExportReport:
        """Measure one member, then write and verify it in an existing (temporary) directory."""
        family = self.family
        widths = self.validate(member)
        compact = family.format_widths(widths)
        predicted = member.predicted_ms
        if self.latency_model is not None:
            predicted = self.latency_model.predict_ms(widths)
        quality, loss = self._quality(widths, compact, member)
        latency = self._latency(widths, compact, predicted)
        params = family.param_count(widths)
        export_info: dict[str, Any] = {
            "format": self.fmt,
            "widths_compact": compact,
            **self.provenance,
        }
        if member.trial is not None:
            export_info["trial"] = member.trial
        metadata: dict[str, Any] = finite(
            {
                "source_fingerprint": family.fingerprint,
                "source_path": str(family.path) if family.path else None,
                "mnm_version": __version__,
                "export": export_info,
                "params": params,
                "quality": quality,
                "latency": latency,
            }
        )
        self.on_progress(f"slicing {compact}, writing and verifying {self.fmt}")
        facts = family.write_export(directory, widths, fmt=self.fmt, metadata=metadata)
        speculative = self._ship_draft(directory, widths) if self.draft is not None else None
        metadata_file = facts.get("metadata_file", DEFAULT_METADATA_FILE)
        files = [str(f) for f in facts.get("files", [metadata_file])]
        report = ExportReport(
            path=directory,
            family=family.name,
            format=self.fmt,
            widths=list(widths),
            widths_compact=compact,
            params=params,
            loss=loss,
            eval_tokens=self.eval_set.n_tokens if self.eval_set is not None else None,
            logits_max_abs_diff=float(facts["verified_max_abs_diff"]),
            onnx_max_abs_diff=facts.get("onnx_max_abs_diff"),
            predicted_ms=predicted,
            # The numbers mnm.json records (rounded), so the card and the file agree.
            measured_ms=latency.get("measured_ms"),
            measured_p10_ms=latency.get("measured_p10_ms"),
            measured_p90_ms=latency.get("measured_p90_ms"),
            full_model_ms=latency.get("full_model_measured_ms"),
            latency_not_measured=latency.get("not_measured"),
            target=self.target.describe() if self.target is not None else None,
            trial=member.trial,
            source_fingerprint=family.fingerprint,
            files=[*files, CARD_FILE] if CARD_FILE not in files else files,
            quality=metadata["quality"],
            latency=metadata["latency"],
            verification=dict(facts.get("verification") or {}),
            speculative=speculative,
        )
        card = model_card(report, family, facts.get("card") or {}, metadata_file=metadata_file)
        atomic_write_text(directory / CARD_FILE, card)
        return report

    def _ship_draft(self, directory: Path, widths: list[int]) -> dict[str, Any]:
        """Record the draft in the export's config.json, then load the export back and check
        that greedy decoding with the draft equals plain greedy decoding."""
        from mnm_search.families import load_family
        from mnm_search.speculative import SpeculationStats, generate

        assert self.draft is not None
        source, lookahead = self.draft.widths, self.draft.lookahead
        on_export = self.family.widths_on_export(source, widths)
        block = {"draft_widths": [int(w) for w in on_export], "lookahead": lookahead}
        _record_speculative(directory / CONFIG_FILE, block)
        shown = self.family.format_widths(source)
        self.on_progress(f"checking the draft {shown} on the written export")
        try:
            exported = load_family(directory)
            draft = exported.parse_widths(block["draft_widths"])
        except MnmError as exc:
            raise ExportError(
                f"the {self.family.name} export of {self.family.format_widths(widths)} cannot "
                f"serve the draft {shown} as written: {exc}; nothing was written"
            ) from exc
        prompt = self._draft_prompt(exported)
        stats = SpeculationStats(lookahead=lookahead)
        plain = generate(exported, prompt, max_new_tokens=DRAFT_CHECK_TOKENS)
        drafted = generate(
            exported,
            prompt,
            max_new_tokens=DRAFT_CHECK_TOKENS,
            draft_widths=draft,
            lookahead=lookahead,
            stats=stats,
        )
        if not torch.equal(plain, drafted):
            raise ExportError(
                f"greedy decoding of the export with the draft {shown} (lookahead {lookahead}) "
                f"gave other tokens than plain greedy decoding ({drafted[0, -8:].tolist()} vs "
                f"{plain[0, -8:].tolist()}): the export cannot serve this draft exactly; "
                f"nothing was written"
            )
        del exported
        return {
            **block,
            "source_draft_widths": list(source),
            "draft_widths_compact": shown,
            "check_tokens": DRAFT_CHECK_TOKENS,
            "acceptance_rate": finite(stats.acceptance_rate),
        }

    def _draft_prompt(self, exported: Family) -> torch.Tensor:
        """A short prompt [1, T] in the export's tokens: eval text, else a fixed sentence
        (else, for an export without a tokenizer, the first token ids)."""
        length = max(1, min(DRAFT_PROMPT_TOKENS, exported.eval_seq_len - DRAFT_CHECK_TOKENS))
        if self.eval_set is not None and self.eval_set.inputs.numel():
            return self.eval_set.inputs[:1, :length].long()
        try:
            ids = exported.encode(DRAFT_PROMPT_TEXT * 4)[:length]
        except MnmError:
            ids = torch.arange(1, length + 1)
        return ids.reshape(1, -1).long()

    def _quality(
        self, widths: list[int], compact: str, member: Member
    ) -> tuple[dict[str, Any] | None, float | None]:
        if self.eval_set is None:
            return None, None
        self.on_progress(f"evaluating {compact} on {self.eval_set.n_tokens:,} tokens")
        loss = float(evaluate_configuration(self.family, widths, self.eval_set))
        quality: dict[str, Any] = {
            "loss": round(loss, 6),
            "perplexity": round(perplexity(loss), 4),
            "eval_tokens": self.eval_set.n_tokens,
            "data": self.data_name,
            "search_loss": member.search_loss,
        }
        if not math.isfinite(loss):  # JSON has no NaN: say why there is no number instead
            quality["not_measured"] = (
                f"the loss on {self.eval_set.n_tokens:,} tokens of {self.data_name} is {loss} "
                "(overflow in this dtype, or a broken configuration)"
            )
        return quality, loss

    def _latency(self, widths: list[int], compact: str, predicted: float | None) -> dict[str, Any]:
        target = self.target
        latency: dict[str, Any] = {
            "target": target.to_dict() if target is not None else None,
            "predicted_ms": _round(predicted),
        }
        if target is None:
            return latency
        full = self.family.full_widths()
        configs = [widths] if list(widths) == list(full) else [widths, full]
        label = f"timing {compact} and the full model on {target.name}"
        self.on_progress(label)
        try:
            # As loaded: a family whose weights must be converted or moved to run on the
            # target says why not (export never converts the model it writes).
            stats = measure_configurations(
                self.family,
                target,
                configs,
                on_round=lambda done: self.on_progress(f"{label}: round {done}/{target.repeats}"),
            )
        except (ConfigError, DeviceError) as exc:  # e.g. a CUDA target on a CPU-only machine
            self.on_progress(f"latency not measured: {exc}")
            latency.update(measured_ms=None, not_measured=str(exc))
            return latency
        member, whole = stats[0], stats[-1]
        latency.update(
            measured_ms=_round(member.median_ms),
            measured_p10_ms=_round(member.p10_ms),
            measured_p90_ms=_round(member.p90_ms),
            error_pct=(
                _round(100.0 * (predicted - member.median_ms) / member.median_ms, 2)
                if predicted is not None
                else None
            ),
            full_model_measured_ms=_round(whole.median_ms),
            speedup_vs_full=_round(whole.median_ms / member.median_ms, 3),
            repeats=member.n,
        )
        return latency


def _record_speculative(path: Path, block: dict[str, Any]) -> None:
    """Add the `speculative` block to an export's config.json (top level, every family)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(
            f"the export has no readable {path.name} to record the draft in ({exc}); nothing "
            f"was written"
        ) from exc
    if not isinstance(config, dict):
        raise ExportError(f"the export's {path.name} is not a JSON object; nothing was written")
    config[SPECULATIVE_KEY] = block
    atomic_write_text(path, json_text(config) + "\n")


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


_CARD_NUMBERS = (
    "loss",
    "predicted_ms",
    "measured_ms",
    "measured_p10_ms",
    "measured_p90_ms",
    "full_model_ms",
)


def model_card(
    report: ExportReport,
    family: Family,
    card: dict[str, Any],
    *,
    metadata_file: str = DEFAULT_METADATA_FILE,
) -> str:
    """README.md of an export: what it is, how good and fast it is, how to load it.

    `card` holds the family's parts (`front_matter`, `title`, `about`, `rows`, `verified`,
    `usage`); the measurements are the same for every family.
    """
    # A NaN loss or latency (a diverged model, a failed timing) reads as "not measured".
    report = dataclasses.replace(
        report,
        **{key: finite(getattr(report, key)) for key in _CARD_NUMBERS},
    )
    title = card.get("title") or f"{family.name} Mix'n'Match submodel {report.widths_compact}"
    lines = [card["front_matter"].rstrip("\n"), ""] if card.get("front_matter") else []
    lines += [f"# {title}", ""]
    if card.get("about"):
        lines += [str(card["about"]).rstrip("\n"), ""]
    listed = ",".join(map(str, report.widths))
    compact = f" ({report.widths_compact})" if report.widths_compact != listed else ""
    lines += [
        "| | |",
        "|---|---|",
        f"| FFN widths per layer | `{listed}`{compact} |",
        f"| parameters | {report.params:,} (full model: {family.param_count():,}) |",
    ]
    lines += [f"| {label} | {value} |" for label, value in card.get("rows", [])]
    if report.trial is not None:
        lines.append(f"| search trial | {report.trial} |")
    quality = report.quality or {}
    if report.loss is not None:
        lines.append(
            f"| validation loss | {report.loss:.4f} nats/token (perplexity "
            f"{perplexity(report.loss):.3f}) on {report.eval_tokens:,} tokens of "
            f"{quality.get('data')} |"
        )
    elif quality:  # the raw value (NaN, inf) is in the metadata file's reason
        lines.append(
            f"| validation loss | not a finite number on {report.eval_tokens:,} tokens of "
            f"{quality.get('data')} (overflow in this dtype, or a broken configuration) |"
        )
    if report.target:
        lines.append(f"| target | {report.target} |")
    if report.predicted_ms is not None:
        lines.append(f"| predicted latency | {report.predicted_ms:.3f} ms |")
    if report.measured_ms is not None:
        spread = ""
        if report.measured_p10_ms is not None and report.measured_p90_ms is not None:
            spread = f" (p10 {report.measured_p10_ms:.3f}, p90 {report.measured_p90_ms:.3f})"
        lines.append(f"| measured latency | {report.measured_ms:.3f} ms{spread} |")
    elif report.target:
        lines.append(f"| measured latency | not measured{_reason(report.latency_not_measured)} |")
    if report.latency_error_pct is not None:
        lines.append(f"| prediction error | {report.latency_error_pct:+.1f} % |")
    if report.speedup_vs_full is not None:
        lines.append(
            f"| vs full model | {report.speedup_vs_full:.2f}x faster "
            f"({report.full_model_ms:.3f} ms measured alongside) |"
        )
    if report.speculative is not None:
        spec = report.speculative
        lines.append(
            f"| self-speculative draft | `{','.join(map(str, spec['draft_widths']))}` "
            f"(lookahead {spec['lookahead']}; `{SPECULATIVE_KEY}` in `{CONFIG_FILE}`): greedy "
            f"decoding with it was checked to equal plain greedy decoding |"
        )
    verified = card.get("verified") or (
        f"logits max abs diff {report.logits_max_abs_diff:.2e} vs the source model at these widths"
    )
    lines.append(f"| verified | {verified} |")
    if card.get("usage"):
        lines += ["", "## Use", "", str(card["usage"]).rstrip("\n")]
    lines += [
        "",
        f"All numbers above are also in `{metadata_file}` (`quality`, `latency`, `verification`).",
        "",
    ]
    return "\n".join(lines)


def _reason(text: Any) -> str:
    return f": {text}" if text else ""


# ---------------------------------------------------------------------------------------------
# Publishing


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another --out or pass --force")


def export_submodel(
    family: Family,
    member: Member | Sequence[int],
    out: str | Path,
    *,
    fmt: str | None = None,
    eval_set: EvalSet | None = None,
    data_name: str = "bundled validation text",
    latency_model: LatencyModel | None = None,
    target: HardwareTarget | None = None,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
    on_progress: Progress | None = None,
    draft: Draft | None = None,
) -> ExportReport:
    """Measure, write, verify and atomically publish one configuration at `out`.

    `fmt`: one of the family's `export_formats` (None: its first). `draft`: ship a narrower
    configuration with it for self-speculative decoding (checked; see the module docs).
    """
    out = Path(out)
    member = member if isinstance(member, Member) else Member(widths=list(member))
    exporter = _Exporter(
        family,
        fmt=fmt,
        eval_set=eval_set,
        data_name=data_name,
        latency_model=latency_model,
        target=target,
        provenance=provenance or {},
        on_progress=on_progress,
        draft=draft,
    )
    exporter.validate(member)
    refuse_overlap(out, {"the source checkpoint": family.path})
    _refuse_existing(out, overwrite)
    with _atomic(out, overwrite) as tmp:
        report = exporter.write(tmp, member)
    return _moved(report, out)


def export_front(
    family: Family,
    members: Sequence[Member],
    out: str | Path,
    *,
    fmt: str | None = None,
    eval_set: EvalSet | None = None,
    data_name: str = "bundled validation text",
    latency_model: LatencyModel | None = None,
    target: HardwareTarget | None = None,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
    on_progress: Progress | None = None,
    draft: Draft | None = None,
) -> list[ExportReport]:
    """Export several configurations as `out/trial-NNNN/` (all or nothing) plus `front.csv`;
    a `draft` ships with each (it must fit every member)."""
    out = Path(out)
    if not members:
        raise ExportError("nothing to export: the front is empty")
    exporter = _Exporter(
        family,
        fmt=fmt,
        eval_set=eval_set,
        data_name=data_name,
        latency_model=latency_model,
        target=target,
        provenance=provenance or {},
        on_progress=on_progress,
        draft=draft,
    )
    for member in members:
        exporter.validate(member)
    refuse_overlap(out, {"the source checkpoint": family.path})
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
        "max_abs_logit_diff": report.logits_max_abs_diff,
        **(
            {
                "draft_widths": ",".join(map(str, report.speculative["draft_widths"])),
                "lookahead": report.speculative["lookahead"],
            }
            if report.speculative is not None
            else {}
        ),
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
