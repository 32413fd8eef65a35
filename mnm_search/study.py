"""The Optuna study behind `mnm search`: objectives, constraints, samplers, seeding, resume.

One trial = one configuration (one categorical width per layer). Every trial stores all the
metrics it computed as user attrs, so tables do not depend on the objective order. A study
remembers what it was set up with (checkpoint fingerprint, space, objectives, constraints,
eval data, latency model) and refuses to continue under a different set-up.

Several processes may share a study (a journal file on one machine, PostgreSQL across
machines): each claims a trial before evaluating it, so the requested total of complete
trials is exact, and trials of workers that died are failed so that a re-run fills the gap.

A search sees the checkpoint only as a `Family` (`mnm_search.families.base`). Its parts:
`run_search` (set-up: checks, storage, seeds, sampler), `_Objective` (one trial),
`CostModel` (params, latency, memory), `CachedEvaluator` (quality), and in private modules
`_trials.TrialClaims` (claims, surplus, known configurations), `_trials.FidelityScreen`
(`--fidelity-tokens`) and `_results.ResultsSink` (trials.csv, pareto.csv, run.json, progress).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution
from optuna.samplers._base import _CONSTRAINTS_KEY  # where Optuna keeps trial constraints
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState

from mnm_search._enumerate import (
    FIRST_CHUNK_TOKENS,
    Decision,
    Enumeration,
    Strategy,
    estimate_strategy,
    seconds_per_layer_pass,
)
from mnm_search._files import atomic_write_bytes
from mnm_search._results import (
    ResultsSink,
    SearchProgress,
    trials_frame,
)
from mnm_search._trials import (
    FAIL_ATTR,
    METRICS_ATTR,
    SEED_ATTR,
    SEED_KIND_ATTR,
    FidelityScreen,
    TrialClaims,
    fail_dead_trials,
    fail_running,
    trial_metrics,
)
from mnm_search.data import EvalSet
from mnm_search.errors import ConfigError, SearchError
from mnm_search.evaluator import CachedEvaluator, eval_subset
from mnm_search.families.base import Family, SeedConfig
from mnm_search.options import (
    DEFAULT_SAMPLER,
    MAXIMISED,
    OBJECTIVES,
    SAMPLERS,
    SINGLE_OBJECTIVES,
)
from mnm_search.pareto import pareto_front
from mnm_search.redact import redact, url_secrets
from mnm_search.space import SearchSpace, param_name
from mnm_search.speculative import best_lookahead

if TYPE_CHECKING:
    from mnm_search.latency import LatencyModel
    from mnm_search.targets import HardwareTarget

__all__ = [
    "DEFAULT_SAMPLER",
    "JOURNAL_FILE",
    "MAXIMISED",
    "OBJECTIVES",
    "SAMPLERS",
    "SINGLE_OBJECTIVES",
    "CostModel",
    "SearchInterrupted",
    "SearchProgress",
    "SearchResult",
    "SearchSettings",
    "fail_dead_trials",
    "open_storage",
    "open_study",
    "run_search",
    "seed_configs",
    "speculation_metrics",
    "trials_frame",
]

# OBJECTIVES, MAXIMISED, SINGLE_OBJECTIVES, SAMPLERS and DEFAULT_SAMPLER are defined in
# `mnm_search.options` (light enough for `mnm --help`) and re-exported here.
JOURNAL_FILE = "study.journal"
_SETUP_ATTR = "mnm_setup"
# What a non-finite metric most likely means, for the failure message.
_FAIL_HINTS = {
    "loss": "the checkpoint's weights or norm_eps are not finite; check with mnm eval",
    "kl": "the checkpoint's weights or norm_eps are not finite; check with mnm eval",
    "agreement": "the checkpoint's weights or norm_eps are not finite; check with mnm eval",
    "disagreement": "the checkpoint's weights or norm_eps are not finite; check with mnm eval",
    "latency_ms": "the latency profile holds non-finite timings; measure again with mnm profile",
    "params": "the checkpoint's config is inconsistent; check with mnm info",
    "memory_bytes": "the hardware target is inconsistent; check its YAML",
    "acceptance": "the checkpoint's weights or norm_eps are not finite; check with mnm eval",
    "speedup": "the latency profile predicts a non-positive or non-finite latency for it or "
    "for the full model; measure again with mnm profile",
}
# Result columns that `CostModel` computes from the widths alone.
_COST_COLUMNS = ("params", "latency_ms", "memory_bytes")
# Writing the result files after every trial is fine while it takes less than this.
_FAST_WRITE_S = 0.05
# Objective name -> the setting that makes it a constraint (for "cannot compute" errors).
_CONSTRAINT_OF = {"latency": "max_latency_ms", "params": "max_params", "memory": "max_memory"}
# Objectives computed from the evaluator's agreement with the full model.
_AGREEMENT_OBJECTIVES = frozenset({"kl", "disagreement", "acceptance", "speedup"})


@dataclass(frozen=True)
class SearchSettings:
    """What a search optimises and how. Validated on construction."""

    n_trials: int = 100
    objectives: tuple[str, ...] = ("loss", "latency")
    sampler: str = DEFAULT_SAMPLER
    seed: int = 0
    max_latency_ms: float | None = None
    max_params: int | None = None
    max_memory: int | None = None
    batch_size: int = 16
    cache_mb: float = 1024.0
    fidelity_tokens: int = 0  # > 0: screen each config on this many tokens first
    seed_configs: bool = True  # enqueue the uniform and minimum-slope configurations

    def __post_init__(self) -> None:
        if not isinstance(self.n_trials, int) or self.n_trials <= 0:
            raise ConfigError(f"n_trials must be a positive integer, got {self.n_trials!r}")
        objectives = tuple(self.objectives)
        object.__setattr__(self, "objectives", objectives)
        unknown = [o for o in objectives if o not in OBJECTIVES]
        if unknown:
            raise ConfigError(
                f"unknown objective(s) {', '.join(map(repr, unknown))}; "
                f"choose from {', '.join(OBJECTIVES)}"
            )
        alone = len(objectives) == 1 and objectives[0] in SINGLE_OBJECTIVES
        if (len(objectives) < 2 and not alone) or len(set(objectives)) != len(objectives):
            raise ConfigError(
                f"objectives must name at least two different objectives, e.g. loss,latency "
                f"(or {' or '.join(SINGLE_OBJECTIVES)} alone: it weighs acceptance against "
                f"latency itself); got {','.join(objectives) or 'none'}"
            )
        if self.sampler not in SAMPLERS:
            raise ConfigError(
                f"unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLERS)}"
            )
        for name in ("max_latency_ms", "max_params", "max_memory"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive, got {value!r}")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if self.cache_mb < 0:
            raise ConfigError(f"cache_mb must be >= 0, got {self.cache_mb}")
        if self.fidelity_tokens < 0:
            raise ConfigError(f"fidelity_tokens must be >= 0, got {self.fidelity_tokens}")
        agreement = sorted(_AGREEMENT_OBJECTIVES & set(objectives))
        if self.fidelity_tokens and agreement:
            raise ConfigError(
                "fidelity_tokens (multi-fidelity screening) works with loss plus cost "
                f"objectives only, not with {'/'.join(agreement)}"
            )

    @property
    def needs_latency(self) -> bool:
        return bool({"latency", "speedup"} & set(self.objectives)) or (
            self.max_latency_ms is not None
        )

    @property
    def needs_memory(self) -> bool:
        return "memory" in self.objectives or self.max_memory is not None

    @property
    def needs_agreement(self) -> bool:
        return bool(_AGREEMENT_OBJECTIVES & set(self.objectives))

    @property
    def columns(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

    @property
    def directions(self) -> list[str]:
        """Optuna's direction of each objective: "maximize" or "minimize"."""
        return ["maximize" if o in MAXIMISED else "minimize" for o in self.objectives]

    @property
    def maximised_columns(self) -> set[str]:
        return {OBJECTIVES[o] for o in self.objectives if o in MAXIMISED}

    def constraints(self) -> dict[str, float]:
        """Result column -> upper bound, for the constraints that are set."""
        limits = {
            "latency_ms": self.max_latency_ms,
            "params": self.max_params,
            "memory_bytes": self.max_memory,
        }
        return {column: float(v) for column, v in limits.items() if v is not None}


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped a search; `signum` says which."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _SignalGuard:
    """Delivers SIGINT/SIGTERM as `SearchInterrupted` only where that is safe.

    Python raises KeyboardInterrupt wherever the signal lands. Inside Optuna's storage writes
    that tears the journal, and inside its `tell` it leaves the trial RUNNING (Optuna then
    fails with UnboundLocalError instead). So: during a trial's evaluation (pure compute) the
    signal raises at once; anywhere else it is held, the study is told to stop, and it is
    raised at the next safe point.
    """

    def __init__(self) -> None:
        self.pending: int | None = None
        self.safe = False
        self.study: optuna.Study | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: signals stay as they were
            self.uninstall()
            return False
        return True

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pending is None:
            self.pending = signum
        if self.safe:
            self.safe = False
            raise SearchInterrupted(signum)
        if self.study is not None:
            self.study.stop()  # only sets a flag: safe anywhere

    def check(self) -> None:
        """Raise a held signal (call only where raising is safe)."""
        if self.pending is not None:
            raise SearchInterrupted(self.pending)

    @contextlib.contextmanager
    def interruptible(self) -> Any:
        self.check()
        self.safe = True
        try:
            yield
        finally:
            self.safe = False


@dataclass
class SearchResult:
    trials: pd.DataFrame
    pareto: pd.DataFrame
    run_info: dict[str, Any]
    results_dir: Path
    n_new: int
    seconds: float
    cache_stats: dict[str, int] = field(default_factory=dict)


class CostModel:
    """The cheap, exact metrics of a configuration: params, predicted latency, memory."""

    def __init__(
        self,
        family: Family,
        *,
        latency_model: LatencyModel | None = None,
        memory_target: HardwareTarget | None = None,
    ) -> None:
        self.family = family
        self.latency_model = latency_model
        self.memory_target = memory_target

    def params(self, widths: Sequence[int]) -> int:
        return self.family.param_count(widths)

    @functools.cached_property
    def full_latency_ms(self) -> float | None:
        """Predicted latency of the full model (the target a draft speeds up), if known."""
        if self.latency_model is None:
            return None
        return float(self.latency_model.predict_ms(self.family.full_widths()))

    def __call__(self, widths: Sequence[int]) -> dict[str, float]:
        metrics: dict[str, float] = {"params": float(self.params(widths))}
        if self.latency_model is not None:
            metrics["latency_ms"] = float(self.latency_model.predict_ms(widths))
        if self.memory_target is not None:
            metrics["memory_bytes"] = float(
                self.family.memory_bytes(widths, self.memory_target).total
            )
        return metrics


def speculation_metrics(metrics: dict[str, Any], full_latency_ms: float | None) -> dict[str, Any]:
    """The configuration as a self-speculative draft of the full model, from its metrics.

    `acceptance` is its top-1 agreement with the full model (a proxy of the greedy acceptance
    rate); with a predicted latency, `speedup` is the predicted speed-up at the best lookahead
    (`lookahead`) for the cost ratio c = latency / latency of the full model. Nothing without
    an agreement; a NaN speed-up where c is not a positive number (the trial then fails).
    """
    agreement = metrics.get("agreement")
    if agreement is None:
        return {}
    derived: dict[str, Any] = {"acceptance": agreement}
    latency = metrics.get("latency_ms")
    if latency is None or full_latency_ms is None:
        return derived
    ratio = latency / full_latency_ms if full_latency_ms > 0 else math.nan
    if not (math.isfinite(ratio) and ratio > 0 and 0 <= agreement <= 1):
        derived["speedup"] = math.nan
        return derived
    lookahead, speedup = best_lookahead(agreement, ratio)
    derived.update(speedup=speedup, lookahead=lookahead)
    return derived


def check_feasible(space: SearchSpace, costs: CostModel, limits: dict[str, float]) -> None:
    """Raise SearchError, naming the nearest feasible values, if no config meets `limits`."""
    if not limits:
        return
    # Small spaces are checked exactly (jointly); big ones at the smallest configuration,
    # where every cost that grows with width is lowest.
    configs = space.all_configs() if space.size <= 100_000 else iter([space.smallest()])
    best = {column: math.inf for column in limits}
    for widths in configs:
        metrics = costs(widths)
        if all(metrics[c] <= limit for c, limit in limits.items()):
            return
        for column in limits:
            best[column] = min(best[column], metrics[column])
    names = {
        "latency_ms": "--max-latency-ms",
        "params": "--max-params",
        "memory_bytes": "--max-memory",
    }
    parts = []
    for column, limit in limits.items():
        if best[column] > limit:
            parts.append(
                f"{names[column]} {limit:g}: the lowest reachable {column} is {best[column]:g}"
            )
    detail = "; ".join(parts) if parts else "each limit is reachable alone, but not together"
    raise SearchError(
        f"no configuration in the search space meets the constraints ({detail}). "
        f"Relax the limit(s) or widen the space (--allow-skip, --min-widths/--max-widths)"
    )


# -- storage and study set-up ----------------------------------------------------------------


def open_storage(
    storage: str | None,
    results_dir: Path,
    *,
    on_warning: Callable[[str], None] | None = None,
) -> BaseStorage:
    """None: a journal file in `results_dir`; a URL (postgresql://, sqlite:///...): RDB.

    A journal damaged by an interrupted write is repaired first (see `repair_journal`);
    `on_warning` (default: `warnings.warn`) hears what was repaired.
    """
    if storage is None:
        results_dir.mkdir(parents=True, exist_ok=True)
        return open_journal(results_dir / JOURNAL_FILE, on_warning=on_warning)
    if "://" not in storage:
        shown = storage if "@" not in storage else "***@" + storage.rsplit("@", 1)[1]
        raise SearchError(
            f"storage {shown!r} is not a database URL; use e.g. "
            f"postgresql://user:pass@host/db, or leave --storage out for a file under the "
            f"results directory"
        )
    _refuse_unencoded_at(storage)
    secrets = url_secrets(storage)
    url = _with_driver(storage)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgres"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    for attempt in range(4):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" but long stable
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # Heartbeats let workers on other machines fail the trials of a dead worker.
                return RDBStorage(
                    url, heartbeat_interval=10, grace_period=60, engine_kwargs=engine_kwargs
                )
        except Exception as exc:  # sqlalchemy/driver errors have no common public base
            # Workers starting together on a fresh database race to create its tables.
            if "already exists" in str(exc) or "duplicate key" in str(exc):
                time.sleep(0.5 * (attempt + 1))
                continue
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            # Drivers quote the URL, or the piece of a password after an unencoded `@`.
            raise SearchError(
                f"cannot open storage {redact_url(storage)}: {redact(message, secrets)}"
            ) from None
    raise SearchError(f"cannot open storage {redact_url(storage)}: table creation kept failing")


def redact_url(url: str) -> str:
    """URL with its password (userinfo or query parameter) masked, for files and messages."""
    return redact(url, url_secrets(url))


def _refuse_unencoded_at(url: str) -> None:
    """Refuse a second `@` in user:password@host before connecting: drivers split the URL at
    the wrong `@` and then quote the rest of the password as a host name in their errors."""
    authority = url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
    if authority.count("@") > 1:
        raise SearchError(
            f"storage URL {redact_url(url)} has an unencoded '@' in its user name or password; "
            f"percent-encode it as %40 (e.g. postgresql://user:p%40ss@host/db)"
        )


def _with_driver(url: str) -> str:
    """SQLAlchemy 2.1 maps postgresql:// to psycopg 3; use psycopg2 where only it is installed."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    try:
        import psycopg  # noqa: F401
    except ImportError:
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            raise SearchError(
                "PostgreSQL storage needs a driver: pip install 'mnm-search[postgres]'"
            ) from None
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


# -- the journal file -------------------------------------------------------------------------

# A writer holds the journal lock for one append (milliseconds); a lock this old belongs to a
# killed process. Optuna releases such a lock after this grace period by itself, provided the
# lock's symlink target resolves, which needs an absolute journal path.
_LOCK_GRACE_S = 10


@dataclass(frozen=True)
class JournalRepair:
    """What `repair_journal` changed: bytes and records dropped, and where the original is."""

    path: Path
    backup: Path
    dropped_bytes: int
    dropped_records: int
    kept_records: int

    def message(self) -> str:
        return (
            f"{self.path} ended in or held a half-written record (an interrupted write, e.g. a "
            f"full disk): dropped {self.dropped_bytes} bytes ({self.dropped_records} damaged "
            f"record(s)), kept {self.kept_records} complete records; the original is kept as "
            f"{self.backup}"
        )


def open_journal(path: Path, *, on_warning: Callable[[str], None] | None = None) -> JournalStorage:
    """The journal storage at `path`, after clearing a stale lock and repairing a torn tail."""
    warn = on_warning or (lambda message: warnings.warn(message, stacklevel=3))
    path = path.absolute()  # relative lock targets defeat Optuna's stale-lock release
    _clear_stale_lock(path, warn)
    lock = JournalFileSymlinkLock(str(path), grace_period=_LOCK_GRACE_S)
    if path.exists() and not _is_sound(path.read_bytes()):
        # Check again under the lock: a record another worker was appending a moment ago is
        # not torn. (Sound journals, the usual case, never hold the lock for a whole scan:
        # past Optuna's grace period other workers would break it.)
        lock.acquire()
        try:
            repair = repair_journal(path)
        finally:
            lock.release()
        if repair is not None:
            warn(repair.message())
    return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))


def _clear_stale_lock(journal: Path, warn: Callable[[str], None]) -> None:
    """Remove a lock left by a killed process: older than the grace period, or a symlink
    whose (relative) target does not resolve, which Optuna would retry forever."""
    lock = Path(f"{journal}.lock")  # where JournalFileSymlinkLock puts it
    try:
        age = time.time() - lock.lstat().st_mtime
    except FileNotFoundError:
        return
    dangling = lock.is_symlink() and not lock.exists()
    if age <= _LOCK_GRACE_S and not dangling:
        return  # possibly held right now by a live worker; Optuna's grace period covers it
    try:
        lock.unlink()
    except FileNotFoundError:
        return  # another worker cleared it
    why = "its target does not resolve" if dangling else f"it is {age:.0f} s old"
    warn(f"removed the stale journal lock {lock} left by a killed process ({why})")


def repair_journal(path: Path) -> JournalRepair | None:
    """Drop the damaged records an interrupted append left in an Optuna journal file.

    Two shapes are recoverable: a torn last line (no newline, or undecodable), and a torn
    record that the next append continued on the same line (kept: the complete record at the
    end of that line). The original is copied to `<name>.bak-<time>` first. Any other
    undecodable record is corruption we cannot undo safely: SearchError, file untouched.
    Returns None when the file is sound.
    """
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # the bytes after the last newline: b"" for a sound file
    kept: list[bytes] = []
    dropped_records = 0
    rewrite = False
    offset = 0
    for number, line in enumerate(lines, start=1):
        record = line if _is_record(line) else _salvage(line)
        if record is None and number == len(lines) and not tail:
            dropped_records += 1  # an undecodable last line: torn, then newline-terminated
        elif record is None:
            backup = _backup(path)
            raise SearchError(
                f"{path}: record {number} of {len(lines)} (byte {offset}) is corrupt and "
                f"{len(lines) - number} records follow it; a copy is kept as {backup}. To "
                f"resume from the {number - 1} records before it (later trials are lost), run "
                f"`head -c {offset} {backup} > {path}`, or use another --out/--study"
            )
        else:
            if record is not line:
                dropped_records += 1
                rewrite = True
            kept.append(record)
        offset += len(line) + 1
    if tail:
        dropped_records += 1
    if dropped_records == 0:
        return None
    backup = _backup(path)
    repaired = b"".join(line + b"\n" for line in kept)
    if rewrite:
        atomic_write_bytes(path, repaired)
    else:  # only a torn end: truncate in place (same inode for workers that hold it open)
        os.truncate(path, len(repaired))
    return JournalRepair(
        path=path,
        backup=backup,
        dropped_bytes=len(data) - len(repaired),
        dropped_records=dropped_records,
        kept_records=len(kept),
    )


def _is_sound(data: bytes) -> bool:
    """Whether DATA is complete journal records only (newline-terminated JSON objects)."""
    if not data:
        return True
    return data.endswith(b"\n") and all(_is_record(line) for line in data.split(b"\n")[:-1])


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def _salvage(line: bytes) -> bytes | None:
    """The complete record that ends LINE after a torn prefix, if there is one."""
    start = line.find(b"{", 1)
    while start != -1:
        if b'"op_code"' in line[start:] and _is_record(line[start:]):
            return line[start:]
        start = line.find(b"{", start + 1)
    return None


def _backup(path: Path) -> Path:
    """A copy of PATH beside it; an identical earlier copy is reused (a journal that stays
    corrupt over several attempts keeps one backup, not one per attempt)."""
    data = path.read_bytes()
    for earlier in sorted(path.parent.glob(f"{path.name}.bak-*")):
        if earlier.stat().st_size == len(data) and earlier.read_bytes() == data:
            return earlier
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    backup = path.with_name(f"{path.name}.bak-{stamp}")
    n = 1
    while backup.exists():
        n += 1
        backup = path.with_name(f"{path.name}.bak-{stamp}-{n}")
    shutil.copy2(path, backup)
    return backup


def eval_fingerprint(eval_set: EvalSet) -> str:
    digest = hashlib.sha256()
    digest.update(str(tuple(eval_set.inputs.shape)).encode())
    digest.update(eval_set.inputs.numpy().tobytes())
    digest.update(eval_set.targets.numpy().tobytes())
    return digest.hexdigest()[:16]


def study_setup(
    family: Family,
    space: SearchSpace,
    settings: SearchSettings,
    eval_set: EvalSet,
    costs: CostModel,
) -> dict[str, Any]:
    """Everything that must stay the same for the trials of one study to be comparable."""
    latency = None
    if costs.latency_model is not None:
        blob = json.dumps(costs.latency_model.to_dict(), sort_keys=True, default=str)
        latency = hashlib.sha256(blob.encode()).hexdigest()[:16]
    memory = costs.memory_target.to_dict() if costs.memory_target is not None else None
    return {
        "fingerprint": family.fingerprint,
        "space": space.to_dict(),
        "objectives": list(settings.objectives),
        "constraints": settings.constraints(),
        "eval_data": eval_fingerprint(eval_set),
        "latency_model": latency,
        "memory_target": memory,
        "fidelity_tokens": settings.fidelity_tokens,
    }


_SETUP_NAMES = {
    "fingerprint": "checkpoint",
    "space": "search space",
    "objectives": "objectives",
    "constraints": "constraints",
    "eval_data": "evaluation data",
    "latency_model": "latency profile",
    "memory_target": "memory target",
    "fidelity_tokens": "multi-fidelity setting",
}


def _check_setup(study_name: str, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    stored = json.loads(json.dumps(stored))
    wanted = json.loads(json.dumps(wanted))
    for key, label in _SETUP_NAMES.items():
        if stored.get(key) != wanted.get(key):
            raise SearchError(
                f"study {study_name!r} was created with another {label} "
                f"({_short(stored.get(key))} there, {_short(wanted.get(key))} now); its trials "
                f"are not comparable. Use another --study name (or --out directory) for this "
                f"search; nothing was changed"
            )


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def make_sampler(name: str, *, seed: int, n_objectives: int) -> optuna.samplers.BaseSampler:
    """Optuna's sampler for `--sampler NAME`. `auto` (when it samples rather than enumerates)
    is the GP sampler that hands over to TPE once its own time outgrows an evaluation's."""
    if name == "auto":
        return BoundedGPSampler(
            make_sampler("gp", seed=seed, n_objectives=n_objectives),
            make_sampler("tpe", seed=seed, n_objectives=n_objectives),
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=10, n_ei_candidates=48
        )
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=10)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "exhaustive":
        with warnings.catch_warnings():  # experimental since v3.1 but stable in use
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.BruteForceSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


# Where Optuna keeps an enqueued trial's parameters (`Study.enqueue_trial`).
_ENQUEUED = "fixed_params"


class _DelegatingSampler(optuna.samplers.BaseSampler):
    """Passes every sampler call on to `self.inner`; subclasses change the ones they need."""

    inner: optuna.samplers.BaseSampler

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> Any:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, space: Any) -> Any:
        return self.inner.sample_relative(study, trial, space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, name: str, distribution: Any
    ) -> Any:
        return self.inner.sample_independent(study, trial, name, distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


class BoundedGPSampler(_DelegatingSampler):
    """The GP sampler while its suggestions cost less than the evaluations they choose; TPE
    after that, so that the sampler's own time stays a bounded share of the search.

    The GP refits on every trial, so its time per suggestion grows with the trials (seconds
    per suggestion after ~100); where an evaluation takes milliseconds a GP-driven search
    would mostly wait for the GP. Seeds (enqueued trials) are not sent to the GP at all:
    Optuna would have it fit a model for parameters that are already fixed, and their
    evaluations (short shared prefixes) say little about later ones. After `min_trials` of
    its own suggestions it compares the median of the last `window` suggestion times with the
    median evaluation time (a trial's duration minus its suggestion) and hands over for good
    when the GP is slower: TPE learns from the same trials, the GP's included. `inner` is the
    sampler in charge; `switch` says when and why it changed (None while on the GP).
    """

    def __init__(
        self,
        gp: optuna.samplers.BaseSampler,
        fallback: optuna.samplers.BaseSampler,
        *,
        min_trials: int = 15,
        window: int = 5,
    ) -> None:
        self.gp = gp
        self.fallback = fallback
        self.min_trials = min_trials
        self.window = window
        self.inner = gp
        self.switch: str | None = None
        self.on_switch: Callable[[str], None] | None = None
        self._suggest_s: dict[int, float] = {}  # trial number -> the sampler's time on it
        self._gp_s: list[float] = []
        self._eval_s: list[float] = []

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> Any:
        if _ENQUEUED in trial.system_attrs:  # a seed: its parameters are given
            return {}
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, space: Any) -> Any:
        if not space:  # a seed, or no relative space yet: nothing for the GP to fit
            return {}
        started = time.perf_counter()
        try:
            return self.inner.sample_relative(study, trial, space)
        finally:
            self._suggest_s[trial.number] = time.perf_counter() - started

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.inner.after_trial(study, trial, state, values)
        suggest = self._suggest_s.pop(trial.number, None)
        if self.inner is not self.gp or suggest is None or trial.datetime_start is None:
            return
        total = (datetime.now() - trial.datetime_start).total_seconds()
        self._gp_s.append(suggest)
        self._eval_s.append(max(total - suggest, 0.0))
        if len(self._gp_s) < self.min_trials:
            return
        gp_s = statistics.median(self._gp_s[-self.window :])
        eval_s = statistics.median(self._eval_s[-self.window :])
        if gp_s > eval_s:
            self.inner = self.fallback
            self.switch = (
                f"after {len(self._gp_s)} trials the GP took {gp_s:.2f} s per suggestion, "
                f"more than an evaluation ({eval_s:.2f} s): TPE from here on"
            )
            if self.on_switch is not None:
                self.on_switch(self.switch)

    def reseed_rng(self) -> None:
        self.gp.reseed_rng()
        self.fallback.reseed_rng()


class _OwnedSampler(_DelegatingSampler):
    """Delegates to a sampler, but first tags each new trial with its worker.

    Tagging in `before_trial` (before the sampler's possibly slow model fit) leaves almost
    no window in which a killed worker's RUNNING trial has no owner to check.
    """

    def __init__(self, inner: optuna.samplers.BaseSampler, worker: str) -> None:
        self.inner = inner
        self.worker = worker

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        study._storage.set_trial_user_attr(trial._trial_id, "worker", self.worker)
        self.inner.before_trial(study, trial)


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def open_study(
    study_name: str,
    storage: BaseStorage,
    setup: dict[str, Any],
    settings: SearchSettings,
) -> tuple[optuna.Study, bool]:
    """Create the study or load it after checking its set-up; (study, created_here)."""
    directions = settings.directions
    # Look first: a failed create would still append to a journal file.
    if study_name not in {s.study_name for s in storage.get_all_studies()}:
        try:
            study = optuna.create_study(
                study_name=study_name, storage=storage, directions=directions
            )
            study.set_user_attr(_SETUP_ATTR, setup)
            _name_metrics(study, settings)
            return study, True
        except optuna.exceptions.DuplicatedStudyError:
            pass  # another worker created it a moment ago
    study = optuna.load_study(study_name=study_name, storage=storage)
    # A worker that created the study a moment ago may not have stored its set-up yet.
    deadline = time.monotonic() + 30
    while _SETUP_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.2)
    stored = study.user_attrs.get(_SETUP_ATTR)
    if stored is None:
        raise SearchError(
            f"study {study_name!r} exists in this storage but was not created by mnm search; "
            f"use another --study name"
        )
    _check_setup(study_name, stored, setup)
    stored_directions = [d.name.lower() for d in study.directions]
    if stored_directions != directions:
        raise SearchError(
            f"study {study_name!r} was created with the directions "
            f"{','.join(stored_directions)}, but objectives {','.join(settings.objectives)} "
            f"need {','.join(directions)}; its trials are not comparable. Use another --study "
            f"name (or --out directory) for this search; nothing was changed"
        )
    if study.metric_names is None:  # created by an older mnm
        _name_metrics(study, settings)
    return study, False


def _name_metrics(study: optuna.Study, settings: SearchSettings) -> None:
    """Name the objectives (optuna-dashboard shows "Objective 0" otherwise)."""
    with warnings.catch_warnings():  # experimental since Optuna 3.2, stable in use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(settings.columns)


def seed_configs(
    space: SearchSpace, family: Family, costs: CostModel, limits: dict[str, float]
) -> list[SeedConfig]:
    """The family's uniform and minimum-slope configurations of `space` that meet the limits."""
    feasible = []
    for seed in family.seed_configs(space):
        metrics = costs(list(seed.widths))
        if all(metrics[c] <= limit for c, limit in limits.items()):
            feasible.append(seed)
    return feasible


# -- results ----------------------------------------------------------------------------------


def _non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _failure(metrics: dict[str, Any], columns: Sequence[str]) -> str | None:
    """Why METRICS cannot be a result: the first of COLUMNS that is missing or not finite."""
    for column in columns:
        value = metrics.get(column)
        if value is not None and math.isfinite(value):
            continue
        shown = "NaN" if value is not None and math.isnan(value) else str(value)
        name = "predicted latency" if column == "latency_ms" else column
        return f"{name} is {shown} — {_FAIL_HINTS.get(column, 'check the checkpoint')}"
    return None


# -- the search -------------------------------------------------------------------------------


def run_search(
    family: Family,
    space: SearchSpace,
    settings: SearchSettings,
    eval_set: EvalSet,
    *,
    study_name: str,
    results_dir: str | Path,
    storage: str | None = None,
    latency_model: LatencyModel | None = None,
    memory_target: HardwareTarget | None = None,
    run_info: dict[str, Any] | None = None,
    on_progress: Callable[[SearchProgress], None] | None = None,
    on_ready: Callable[[int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    named_configs: Sequence[SeedConfig] = (),
    handle_signals: bool = False,
    on_strategy: Callable[[str], None] | None = None,
) -> SearchResult:
    """Run (or resume) a study until it holds `settings.n_trials` complete trials.

    `family` is any loaded model family (`mnm_search.families.load_family`).
    `named_configs` (e.g. MatFormer Lab's configurations, `Family.named_configs`) are
    evaluated first, next to the family's uniform and heuristic seeds, whatever the cost
    limits say; a seed's label is its trial's `source`, its kind the trial's `seed_kind`.
    Writes trials.csv, pareto.csv and run.json to `results_dir` (also when interrupted).
    `on_ready(n_complete)` is called once the study is open, before the first trial;
    `on_warning(message)` (default: `warnings.warn`) hears about repaired storage;
    `on_strategy(message)` what `--sampler auto` chose and why (and a later hand-over).
    Enumerating (`exhaustive`, or `auto` on a space it estimates cheap enough) decides every
    configuration of the space that meets the limits, whatever `n_trials` says, in its own
    order (named and seed configurations keep their labels).

    A trial whose loss, cost or objective is not finite (NaN weights, a broken profile) is
    FAILED with the reason in its `fail_reason` user attr and counts toward `n_trials`; a
    study whose trials all fail stops with a SearchError naming the likely cause.
    Interrupted (KeyboardInterrupt), this process's running trial is failed, never left
    RUNNING, and the result files are written before the interrupt propagates. With
    `handle_signals` (main thread only; the CLI sets it) SIGINT and SIGTERM raise
    `SearchInterrupted` only at safe points (see `_SignalGuard`), never inside a storage write.
    """
    results_dir = Path(results_dir)
    named = [_as_seed(seed) for seed in named_configs]
    _check_request(family, space, settings, named, latency_model, memory_target)
    costs = CostModel(family, latency_model=latency_model, memory_target=memory_target)
    limits = settings.constraints()
    check_feasible(space, costs, limits)
    warning = _speedup_warning(settings, latency_model)
    if warning is not None:
        (on_warning or (lambda message: warnings.warn(message, stacklevel=2)))(warning)
    setup = study_setup(family, space, settings, eval_set, costs)

    storage_obj = open_storage(storage, results_dir, on_warning=on_warning)
    study, created = open_study(study_name, storage_obj, setup, settings)
    fail_dead_trials(study)
    strategy = choose_strategy(family, space, settings, eval_set, shared_storage=bool(storage))
    if on_strategy is not None and settings.sampler == "auto":
        on_strategy(f"auto: {strategy.reason}")
    enumeration = (
        _Enumerated(family, space, settings, eval_set, costs, limits, named, strategy)
        if strategy.name == "enumerate"
        else None
    )
    n_target = settings.n_trials
    if enumeration is not None:
        n_target = enumeration.n_configs
    elif settings.sampler == "exhaustive":
        n_target = min(n_target, space.size)
    if created and enumeration is None:
        seeds = named + (
            seed_configs(space, family, costs, limits) if settings.seed_configs else []
        )
        for seed in seeds:
            study.enqueue_trial(
                space.to_params(list(seed.widths)),
                user_attrs={SEED_ATTR: seed.label, SEED_KIND_ATTR: seed.kind},
            )
    # The creating worker uses the seed as given (reproducible runs); others joining or
    # resuming get their own stream so they do not propose the same configurations.
    sampler_seed = settings.seed if created else (settings.seed * 1_000_003 + os.getpid())
    worker = _worker_id()
    sampler = make_sampler(
        settings.sampler, seed=sampler_seed % 2**32, n_objectives=len(settings.objectives)
    )
    if isinstance(sampler, BoundedGPSampler) and on_strategy is not None:
        sampler.on_switch = lambda message: on_strategy(f"auto: {message}")
    study.sampler = _OwnedSampler(sampler, worker)

    evaluator = _evaluator(family, eval_set, settings, space)
    screen = (
        FidelityScreen(
            _evaluator(
                family,
                eval_subset(eval_set, settings.fidelity_tokens),
                dataclasses.replace(settings, cache_mb=settings.cache_mb / 4),
                space,
                screening=True,
            ),
            study,
            settings.columns,
        )
        if settings.fidelity_tokens
        else None
    )
    guard = _SignalGuard()
    guard.study = study
    claims = TrialClaims(study, n_target)
    objective = _Objective(
        space, settings, costs, limits, claims, evaluator, screen=screen, guard=guard
    )
    info = dict(run_info or {})
    info.update(
        {
            "study": study_name,
            "storage": redact_url(storage) if storage else str(results_dir / JOURNAL_FILE),
            "sampler": settings.sampler,
            "strategy": strategy.to_dict(),
            "seed": settings.seed,
            "n_trials": settings.n_trials,
            "objectives": list(settings.objectives),
            "objective_columns": settings.columns,
            "objective_directions": settings.directions,
            "constraints": limits,
            "fingerprint": family.fingerprint,
            "checkpoint": str(family.path.resolve()) if family.path else None,
            "family": family.name,
            # Display names of uniform widths ("S", "M"...), so `mnm pareto` needs no model.
            "width_names": {
                str(widths[0]): name
                for name, widths in family.uniform_configs().items()
                if len(set(widths)) == 1
            },
            "space": space.to_dict(),
            "space_size": space.size,
            "eval_tokens": eval_set.n_tokens,
            "eval_data_fingerprint": setup["eval_data"],
            "fidelity_tokens": settings.fidelity_tokens,
            "versions": {"optuna": optuna.__version__, "torch": _torch_version()},
        }
    )
    sink = ResultsSink(
        results_dir,
        space,
        settings.columns,
        info,
        n_target=n_target,
        maximise=settings.maximised_columns,
        on_progress=on_progress,
        fast_write_s=_FAST_WRITE_S,
    )

    if on_ready is not None:
        on_ready(claims.complete_count())
    if handle_signals:
        guard.install()
    try:
        if enumeration is not None:
            enumeration.run(study, sink, worker, guard)
        elif claims.done_count() < n_target:
            study.optimize(
                objective,
                callbacks=[sink.after_trial],
                catch=(),
                gc_after_trial=False,
                show_progress_bar=False,
            )
        guard.check()  # a signal held while Optuna stored the last trial
    except KeyboardInterrupt:
        fail_running(study, worker)
        raise
    finally:
        try:  # signals stay held until the files are whole
            if isinstance(sampler, BoundedGPSampler) and sampler.switch is not None:
                info["strategy"]["switch"] = sampler.switch
            frame = sink.frame(study.get_trials(deepcopy=False))
            front = sink.write(frame)
        finally:
            guard.uninstall()
    if info["n_complete"] == 0 and info["n_failed"]:
        reasons = frame["fail_reason"].dropna()
        raise SearchError(
            f"every trial failed ({info['n_failed']} of them): {reasons.iloc[-1]}; "
            f"the failed trials are listed in {results_dir / 'trials.csv'}"
        )
    stats = evaluator.stats
    cache_stats = (
        enumeration.cache_stats()
        if enumeration is not None
        else {
            "evaluations": stats.evaluations,
            "prefix_hits": stats.prefix_hits,
            "layer_runs": stats.layer_runs,
            "evictions": stats.evictions,
        }
    )
    return SearchResult(
        trials=frame,
        pareto=front,
        run_info=info,
        results_dir=results_dir,
        n_new=sink.n_new,
        seconds=time.monotonic() - sink.started,
        cache_stats=cache_stats,
    )


def _as_seed(seed: SeedConfig | tuple[str, Sequence[int]]) -> SeedConfig:
    """A named configuration as a SeedConfig ((label, widths) pairs are named seeds)."""
    if isinstance(seed, SeedConfig):
        return seed
    label, widths = seed
    return SeedConfig("named", label, tuple(int(w) for w in widths))


def _check_request(
    family: Family,
    space: SearchSpace,
    settings: SearchSettings,
    named: Sequence[SeedConfig],
    latency_model: LatencyModel | None,
    memory_target: HardwareTarget | None,
) -> None:
    """Refuse, before any file is written, a search that cannot run as asked."""
    wanted = list(settings.objectives)
    wanted += [
        name
        for name, setting in _CONSTRAINT_OF.items()
        if getattr(settings, setting) is not None and name not in wanted
    ]
    for name in wanted:
        reason = family.unsupported_objectives.get(name)
        if reason is not None:
            what = f"objective {name}" if name in settings.objectives else _CONSTRAINT_OF[name]
            raise SearchError(
                f"the {family.name} family cannot compute {name} ({what}): {reason}; "
                f"choose other objectives/constraints"
            )
    for seed in named:
        if not space.contains(list(seed.widths)):
            skips = any(w == 0 for w in seed.widths)
            hint = " (it skips layers: add --allow-skip)" if skips else ""
            raise SearchError(
                f"configuration {seed.label!r} ({','.join(map(str, seed.widths))}) is not in "
                f"the search space{hint}; widen the space or leave it out"
            )
    if "speedup" in settings.objectives and latency_model is None:
        raise SearchError(
            "the speedup objective needs a latency profile, ideally of decoding (the draft's "
            "cost relative to the full model's): pass --profile FILE.json (from mnm profile "
            "--target profiles/cpu-decode.yaml) or --target profiles/cpu-decode.yaml (or use "
            "--objectives acceptance,params)"
        )
    if settings.needs_latency and latency_model is None:
        raise SearchError(
            "the latency objective/constraint needs a latency profile: pass --profile FILE.json "
            "or --target profiles/NAME.yaml (or use --objectives loss,params)"
        )
    if settings.needs_memory and memory_target is None:
        raise SearchError("the memory objective/constraint needs a hardware target")
    if latency_model is not None and latency_model.fingerprint != family.fingerprint:
        raise SearchError(
            f"the latency profile belongs to checkpoint {latency_model.fingerprint}, not to "
            f"{family.fingerprint}; profile this checkpoint with `mnm profile`"
        )


def _speedup_warning(settings: SearchSettings, latency_model: LatencyModel | None) -> str | None:
    """Why predicted speed-ups may mislead: a draft's cost is a decode step's, so a profile
    of another phase only approximates it (a warning, not an error)."""
    if "speedup" not in settings.objectives or latency_model is None:
        return None
    target = latency_model.target
    if target.phase == "decode":
        return None
    return (
        f"the speedup objective compares decode steps, but the latency profile was measured "
        f"for phase {target.phase!r} (target {target.name}); its speed-ups are rough. For "
        f"better ones profile a decode target: mnm profile --target profiles/cpu-decode.yaml"
    )


class _Objective:
    """One trial, as Optuna calls it: claim a place, sample a configuration, cost it, then
    get its quality (reused for a configuration already evaluated, predicted for one the
    fidelity screen rules out, else evaluated) and store every metric with the trial.

    A configuration whose cost or quality is not finite fails with the reason stored.
    """

    def __init__(
        self,
        space: SearchSpace,
        settings: SearchSettings,
        costs: CostModel,
        limits: dict[str, float],
        claims: TrialClaims,
        evaluator: Any,
        *,
        screen: FidelityScreen | None,
        guard: _SignalGuard,
    ) -> None:
        self.space = space
        self.columns = settings.columns
        self.costs = costs
        self.limits = limits
        self.claims = claims
        self.evaluator = evaluator
        self.screen = screen
        self.guard = guard
        self.distributions = {
            param_name(layer): CategoricalDistribution(list(options))
            for layer, options in enumerate(space.choices)
        }

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        self.guard.check()  # a signal held while the previous trial was being stored
        self.claims.claim(trial)
        params = {
            name: trial.suggest_categorical(name, dist.choices)
            for name, dist in self.distributions.items()
        }
        widths = self.space.from_params(params)
        metrics: dict[str, Any] = self.costs(widths)
        failure = _failure(metrics, list(metrics))
        if failure is not None:  # no quality evaluation for a configuration we cannot place
            return self._fail(trial, metrics, failure)
        for column, limit in self.limits.items():
            trial.set_constraint(column, metrics[column] - limit)
        known = self.claims.known(trial.params)
        # The sampler may propose a configuration already evaluated: its quality is reused.
        metrics.update(known if known is not None else self._quality(widths, metrics))
        metrics.update(speculation_metrics(metrics, self.costs.full_latency_ms))
        failure = _failure(metrics, self.columns)
        if failure is not None:
            return self._fail(trial, metrics, failure)
        trial.set_user_attr(METRICS_ATTR, metrics)
        return tuple(float(metrics[c]) for c in self.columns)

    def _quality(self, widths: list[int], costs: dict[str, Any]) -> dict[str, Any]:
        """Loss (and kl/agreement where asked) of `widths`, screened first if enabled."""
        loss_low = None
        if self.screen is not None:
            loss_low, predicted = self.screen.screen(widths, costs, self.guard.interruptible)
            if predicted is not None:
                return {"loss": predicted, "fidelity": "subset"}
        with self.guard.interruptible():
            quality = self.evaluator.evaluate(widths)
        metrics: dict[str, Any] = {"loss": quality.loss, "fidelity": "full"}
        if quality.agreement is not None:
            metrics["kl"] = quality.kl
            metrics["agreement"] = quality.agreement
            metrics["disagreement"] = 1.0 - quality.agreement
        if self.screen is not None and loss_low is not None:
            self.screen.record(quality.loss, loss_low)
        return metrics

    def _fail(self, trial: optuna.Trial, metrics: dict[str, Any], reason: str) -> tuple[float, ...]:
        # Returning NaN makes Optuna fail the trial without a traceback; the reason stays with
        # the trial (and in trials.csv). Stored metrics leave non-finite values out: tables
        # have integer columns, and strict JSON has no NaN.
        finite = {k: v for k, v in metrics.items() if not _non_finite(v)}
        trial.set_user_attr(METRICS_ATTR, finite)
        trial.set_user_attr(FAIL_ATTR, reason)
        return tuple(math.nan for _ in self.columns)


def choose_strategy(
    family: Family,
    space: SearchSpace,
    settings: SearchSettings,
    eval_set: EvalSet,
    *,
    shared_storage: bool,
) -> Strategy:
    """Enumerate or sample: `--sampler auto` estimates both (`_enumerate.estimate_strategy`);
    `exhaustive` enumerates (Optuna's brute force where workers share a storage)."""
    # A race predicts losses from partial sums; agreement metrics need every token.
    race = "loss" in settings.objectives and not settings.needs_agreement
    if settings.sampler == "exhaustive":
        if shared_storage:
            return Strategy("exhaustive", "--sampler exhaustive with a shared --storage")
        return Strategy(
            "enumerate",
            "--sampler exhaustive: every configuration"
            + (" (screened on --fidelity-tokens first)" if settings.fidelity_tokens else ""),
            race=race and bool(settings.fidelity_tokens),
        )
    if settings.sampler != "auto":
        return Strategy(settings.sampler, f"--sampler {settings.sampler}")
    return estimate_strategy(
        space=space,
        n_trials=settings.n_trials,
        layer_pass_s=seconds_per_layer_pass(
            family, eval_set, space.choices[0], batch_size=settings.batch_size
        ),
        cheap_siblings=family.layer_steps().cheap_siblings,
        race=race,
        shared_storage=shared_storage,
    )


class _Enumerated:
    """A search that enumerates: every configuration of the space that meets the limits
    (and the named ones) is decided by an `Enumeration` and added to the study in batches,
    without Optuna's per-trial loop (its samplers cost more than these evaluations)."""

    def __init__(
        self,
        family: Family,
        space: SearchSpace,
        settings: SearchSettings,
        eval_set: EvalSet,
        costs: CostModel,
        limits: dict[str, float],
        named: Sequence[SeedConfig],
        strategy: Strategy,
    ) -> None:
        self.space = space
        self.columns = settings.columns
        self.costs = costs
        self.limits = limits
        seeds = seed_configs(space, family, costs, limits) if settings.seed_configs else []
        self.labels = {tuple(s.widths): s for s in [*seeds, *named]}  # named ones win
        self.metrics: dict[tuple[int, ...], dict[str, Any]] = {}
        for widths in [*(tuple(s.widths) for s in named), *map(tuple, space.all_configs())]:
            if widths in self.metrics:
                continue
            metrics = costs(list(widths))
            within = all(metrics[c] <= limit for c, limit in limits.items())
            if within or widths in self.labels:
                self.metrics[widths] = metrics
        # The objectives the cost model computes (a race compares them with the loss).
        self.cost_columns = [c for c in self.columns if c in _COST_COLUMNS]
        self.enumeration = Enumeration(
            family,
            eval_set,
            space.choices,
            cost_columns=self.cost_columns,
            race=strategy.race,
            agreement=settings.needs_agreement,
            batch_size=settings.batch_size,
            cache_mb=settings.cache_mb,
            first_chunk_tokens=settings.fidelity_tokens or FIRST_CHUNK_TOKENS,
        )
        self.distributions = {
            param_name(layer): CategoricalDistribution(list(options))
            for layer, options in enumerate(space.choices)
        }

    @property
    def n_configs(self) -> int:
        return len(self.metrics)

    def run(self, study: optuna.Study, sink: ResultsSink, worker: str, guard: _SignalGuard) -> None:
        done: set[tuple[int, ...]] = set()
        known_full: dict[tuple[int, ...], float] = {}
        for trial in study.get_trials(deepcopy=False):
            if len(trial.params) != self.space.n_layers or trial.state == TrialState.RUNNING:
                continue
            widths = tuple(self.space.from_params(trial.params))
            metrics = trial_metrics(trial)
            if trial.state == TrialState.COMPLETE or FAIL_ATTR in trial.user_attrs:
                done.add(widths)
            if metrics.get("fidelity") == "full" and widths in self.metrics:
                known_full[widths] = metrics["loss"]
        todo, failed = [], []
        for widths, metrics in self.metrics.items():
            if widths in done:
                continue
            if _failure(metrics, list(metrics)) is None:
                todo.append(widths)
            else:  # no quality evaluation for a configuration we cannot place
                failed.append(Decision(widths, {}, 0.0))
        if failed:
            self._record(study, sink, worker, failed)
        self.enumeration.run(
            todo,
            {w: [m[c] for c in self.cost_columns] for w, m in self.metrics.items()},
            known_full=known_full,
            on_decided=lambda decisions: self._record(study, sink, worker, decisions),
            on_stage=lambda label, n, total: sink.stage(study, f"{label} {n}/{total}"),
            interruptible=guard.interruptible,
        )
        guard.check()

    def cache_stats(self) -> dict[str, int]:
        total = {"evaluations": 0, "prefix_hits": 0, "layer_runs": 0, "evictions": 0}
        for evaluator in self.enumeration.evaluators:
            for key in total:
                total[key] += getattr(evaluator.stats, key)
        return total

    def _record(
        self, study: optuna.Study, sink: ResultsSink, worker: str, decisions: list[Decision]
    ) -> None:
        now = datetime.now()
        # Another process enumerating the same study (a shared journal) may have decided
        # some of these meanwhile: the work is repeated, but never a trial.
        present = {
            tuple(self.space.from_params(t.params))
            for t in study.get_trials(deepcopy=False)
            if len(t.params) == self.space.n_layers and t.state != TrialState.RUNNING
        }
        trials = []
        for decision in decisions:
            if decision.widths in present:
                continue
            metrics = {**self.metrics[decision.widths], **decision.metrics}
            if decision.metrics:
                metrics.update(speculation_metrics(metrics, self.costs.full_latency_ms))
            failure = _failure(metrics, self.columns if decision.metrics else list(metrics))
            attrs: dict[str, Any] = {
                METRICS_ATTR: {k: v for k, v in metrics.items() if not _non_finite(v)},
                "worker": worker,
            }
            label = self.labels.get(decision.widths)
            if label is not None:
                attrs.update({SEED_ATTR: label.label, SEED_KIND_ATTR: label.kind})
            if failure is not None:
                attrs[FAIL_ATTR] = failure
            trials.append(
                FrozenTrial(
                    number=0,  # add_trials numbers them
                    state=TrialState.COMPLETE if failure is None else TrialState.FAIL,
                    value=None,
                    values=None if failure else [float(metrics[c]) for c in self.columns],
                    datetime_start=now - timedelta(seconds=decision.seconds),
                    datetime_complete=now,
                    params=self.space.to_params(list(decision.widths)),
                    distributions=self.distributions,
                    user_attrs=attrs,
                    system_attrs={
                        _CONSTRAINTS_KEY: [metrics[c] - limit for c, limit in self.limits.items()]
                    }
                    if self.limits
                    else {},
                    intermediate_values={},
                    trial_id=0,
                )
            )
        if trials:
            study.add_trials(trials)
            sink.after_trials(study, trials)


def _evaluator(
    family: Family,
    eval_set: EvalSet,
    settings: SearchSettings,
    space: SearchSpace,
    *,
    screening: bool = False,
) -> CachedEvaluator:
    """The quality evaluator: prefix-cached, for every family (through its layer steps)."""
    return CachedEvaluator(
        family,
        eval_set,
        batch_size=settings.batch_size,
        cache_mb=settings.cache_mb,
        layer_widths=space.choices,
        agreement=settings.needs_agreement and not screening,
        # The screener's small subset affords every sibling width (as before this refactor).
        siblings="always" if settings.sampler == "exhaustive" or screening else "auto",
    )


def _torch_version() -> str:
    import torch

    return torch.__version__


def frame_front(frame: pd.DataFrame, objectives: Sequence[str]) -> pd.DataFrame:
    """Pareto front of a trials frame for objective names (e.g. ("loss", "latency"), or
    ("speedup",): its best trial), each objective in its direction."""
    return pareto_front(
        frame,
        [OBJECTIVES[o] for o in objectives],
        maximise={OBJECTIVES[o] for o in objectives if o in MAXIMISED},
    )
