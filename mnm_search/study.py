"""The Optuna study behind `mnm search`: objectives, constraints, samplers, seeding, resume.

One trial = one configuration (one categorical width per layer). Every trial stores all the
metrics it computed as user attrs, so tables do not depend on the objective order. A study
remembers what it was set up with (checkpoint fingerprint, space, objectives, constraints,
eval data, latency model) and refuses to continue under a different set-up.

Several processes may share a study (a journal file on one machine, PostgreSQL across
machines): each claims a trial before evaluating it, so the requested total of complete
trials is exact, and trials of workers that died are failed so that a re-run fills the gap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import socket
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
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState

from mnm_search._files import atomic_write_bytes, pid_alive
from mnm_search.checkpoint import Checkpoint
from mnm_search.config import param_count
from mnm_search.data import EvalSet
from mnm_search.errors import ConfigError, SearchError
from mnm_search.evaluator import CachedEvaluator, eval_subset
from mnm_search.pareto import (
    METRIC_COLUMNS,
    format_widths_column,
    hypervolume,
    pareto_front,
    write_results,
)
from mnm_search.redact import redact, url_secrets
from mnm_search.space import SearchSpace, param_name

if TYPE_CHECKING:
    from mnm_search.families.gemma3n import Gemma3nFamily
    from mnm_search.latency import LatencyModel
    from mnm_search.targets import HardwareTarget

    # What a search runs on: a native checkpoint or a loaded model family adapter.
    Subject = Checkpoint | Gemma3nFamily

# objective name -> result column (every objective is minimised)
OBJECTIVES = {
    "loss": "loss",
    "latency": "latency_ms",
    "params": "params",
    "memory": "memory_bytes",
    "kl": "kl",
    "disagreement": "disagreement",
}
SAMPLERS = ("nsga2", "tpe", "gp", "random", "exhaustive")
DEFAULT_SAMPLER = "gp"
JOURNAL_FILE = "study.journal"
_SETUP_ATTR = "mnm_setup"
# Every metric of a trial goes into one user attr: each storage write costs an fsync.
_METRICS_ATTR = "metrics"
# Why a trial failed (a non-finite loss or cost); such trials count toward the budget.
_FAIL_ATTR = "fail_reason"
# A study whose first this-many trials in a row all failed will not do better: stop it.
_MAX_FAILURES_WITHOUT_SUCCESS = 10
# What a non-finite metric most likely means, for the failure message.
_FAIL_HINTS = {
    "loss": "the checkpoint's weights or norm_eps are not finite; check with mnm eval",
    "kl": "the checkpoint's weights or norm_eps are not finite; check with mnm eval",
    "agreement": "the checkpoint's weights or norm_eps are not finite; check with mnm eval",
    "disagreement": "the checkpoint's weights or norm_eps are not finite; check with mnm eval",
    "latency_ms": "the latency profile holds non-finite timings; measure again with mnm profile",
    "params": "the checkpoint's config is inconsistent; check with mnm info",
    "memory_bytes": "the hardware target is inconsistent; check its YAML",
}
# Writing the result files after every trial is fine while it takes less than this.
_FAST_WRITE_S = 0.05
# A worker tags its trial milliseconds after Optuna creates it; a trial still untagged after
# this long belongs to a worker killed in between.
_STALE_WITHOUT_OWNER = timedelta(seconds=10)


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
        if len(objectives) < 2 or len(set(objectives)) != len(objectives):
            raise ConfigError(
                f"objectives must name at least two different objectives, e.g. loss,latency; "
                f"got {','.join(objectives)}"
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
        if self.fidelity_tokens and ({"kl", "disagreement"} & set(objectives)):
            raise ConfigError(
                "fidelity_tokens (multi-fidelity screening) works with loss plus cost "
                "objectives only, not with kl/disagreement"
            )

    @property
    def needs_latency(self) -> bool:
        return "latency" in self.objectives or self.max_latency_ms is not None

    @property
    def needs_memory(self) -> bool:
        return "memory" in self.objectives or self.max_memory is not None

    @property
    def needs_agreement(self) -> bool:
        return bool({"kl", "disagreement"} & set(self.objectives))

    @property
    def columns(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

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
class SearchProgress:
    """Reported after every trial this process finishes."""

    n_complete: int
    n_target: int
    n_new: int  # trials finished by this process
    trials_per_s: float
    best_loss: float | None  # best feasible loss so far
    hypervolume: float | None  # of the feasible front, objectives scaled to the ranges seen
    n_failed: int = 0  # trials whose evaluation gave a non-finite value (count to the budget)
    failure: str | None = None  # why the latest failed trial failed, when it is new


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
        subject: Subject,
        *,
        latency_model: LatencyModel | None = None,
        memory_target: HardwareTarget | None = None,
    ) -> None:
        self.subject = subject
        self.latency_model = latency_model
        self.memory_target = memory_target

    def params(self, widths: Sequence[int]) -> int:
        if isinstance(self.subject, Checkpoint):
            return param_count(self.subject.config, widths)
        return self.subject.param_count(widths)

    def __call__(self, widths: Sequence[int]) -> dict[str, float]:
        metrics: dict[str, float] = {"params": float(self.params(widths))}
        if self.latency_model is not None:
            metrics["latency_ms"] = float(self.latency_model.predict_ms(widths))
        if self.memory_target is not None:
            from mnm_search.memory import memory_bytes

            assert isinstance(self.subject, Checkpoint)  # run_search refuses other families
            metrics["memory_bytes"] = float(
                memory_bytes(self.subject.config, widths, self.memory_target).total
            )
        return metrics


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
    checkpoint: Subject,
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
        "fingerprint": checkpoint.fingerprint,
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


class _OwnedSampler(optuna.samplers.BaseSampler):
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


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials whose worker process on this host is gone; return their numbers."""
    host = socket.gethostname()
    now = datetime.now()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker")
        dead = False
        if owner is None:
            started = trial.datetime_start
            if started is not None:
                current = now if started.tzinfo is None else datetime.now(started.tzinfo)
                dead = current - started > _STALE_WITHOUT_OWNER
        else:
            owner_host, _, pid = str(owner).rpartition(":")
            dead = owner_host == host and pid.isdigit() and not pid_alive(int(pid))
        if dead:
            try:
                study.tell(trial.number, state=TrialState.FAIL)
                failed.append(trial.number)
            except (RuntimeError, ValueError):
                pass  # another worker got there first
    return failed


def open_study(
    study_name: str,
    storage: BaseStorage,
    setup: dict[str, Any],
    settings: SearchSettings,
) -> tuple[optuna.Study, bool]:
    """Create the study or load it after checking its set-up; (study, created_here)."""
    directions = ["minimize"] * len(settings.objectives)
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
    if study.metric_names is None:  # created by an older mnm
        _name_metrics(study, settings)
    return study, False


def _name_metrics(study: optuna.Study, settings: SearchSettings) -> None:
    """Name the objectives (optuna-dashboard shows "Objective 0" otherwise)."""
    with warnings.catch_warnings():  # experimental since Optuna 3.2, stable in use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(settings.columns)


def seed_configs(
    space: SearchSpace, checkpoint: Subject, costs: CostModel, limits: dict[str, float]
) -> list[tuple[str, list[int]]]:
    """(label, widths) of the uniform and minimum-slope configs that meet the cost limits."""
    if isinstance(checkpoint, Checkpoint):
        uniform = {f"uniform {n}": w for n, w in space.uniform_configs(checkpoint.config).items()}
    else:
        uniform = {n: w for n, w in checkpoint.uniform_configs().items() if space.contains(w)}
    seeds = list(uniform.items())
    seeds += [("min-slope", w) for w in space.min_slope_configs()]
    feasible = []
    for label, widths in seeds:
        metrics = costs(widths)
        if all(metrics[c] <= limit for c, limit in limits.items()):
            feasible.append((label, widths))
    return feasible


# -- results ----------------------------------------------------------------------------------


def _metrics(trial: FrozenTrial) -> dict[str, Any]:
    return trial.user_attrs.get(_METRICS_ATTR, {})


def _eval_failed(trial: FrozenTrial) -> bool:
    """A trial that failed on a non-finite value (not one of a killed worker)."""
    return trial.state == TrialState.FAIL and _FAIL_ATTR in trial.user_attrs


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


def _fail_running(study: optuna.Study, worker: str) -> None:
    """Fail this worker's RUNNING trials: an interrupt that hits sampling or a storage write
    escapes Optuna's own handling and would leave the trial RUNNING for good."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("worker") == worker:
            with contextlib.suppress(RuntimeError, ValueError):  # finished meanwhile
                study.tell(trial.number, state=TrialState.FAIL)


def trials_frame(
    trials: Sequence[FrozenTrial], space: SearchSpace, keep: Sequence[str] = ()
) -> pd.DataFrame:
    """One row per trial (surplus claims left out), DESIGN §3 columns first.

    Metric columns no trial has are left out, except `loss` and those in `keep` (the
    objectives: readers need them even when every trial failed)."""
    rows = []
    for trial in trials:
        attrs = trial.user_attrs
        metrics = attrs.get(_METRICS_ATTR, {})
        # Surplus claims are not part of the study's result; a trial another worker is
        # still sampling has only some of its params yet.
        if attrs.get("surplus") or len(trial.params) != space.n_layers:
            continue
        row: dict[str, Any] = {
            "trial": trial.number,
            "widths": format_widths_column(space.from_params(trial.params)),
        }
        for column in METRIC_COLUMNS:
            row[column] = metrics.get(column)
        row["state"] = trial.state.name
        row["feasible"] = bool(all(v <= 0 for v in trial.constraints.values()))
        row["fidelity"] = metrics.get("fidelity")
        row["source"] = attrs.get("seed", "sampler")
        row["worker"] = attrs.get("worker")
        row["fail_reason"] = attrs.get(_FAIL_ATTR)
        duration = trial.duration
        row["seconds"] = round(duration.total_seconds(), 4) if duration is not None else None
        rows.append(row)
    columns = ["trial", "widths", *METRIC_COLUMNS, "state", "feasible", "fidelity", "source"]
    columns += ["worker", "seconds", "fail_reason"]
    frame = pd.DataFrame(rows, columns=columns)
    # Drop metric columns this search never computed (e.g. latency without a profile).
    kept = {"loss", *keep}
    empty = [c for c in METRIC_COLUMNS if c not in kept and frame[c].isna().all()]
    if frame["fail_reason"].isna().all():
        empty.append("fail_reason")
    frame = frame.drop(columns=empty)
    if "params" in frame.columns:  # absent when every trial failed before counting params
        frame["params"] = frame["params"].astype("Int64")
    if "memory_bytes" in frame.columns:
        frame["memory_bytes"] = frame["memory_bytes"].astype("Int64")
    return frame.sort_values("trial").reset_index(drop=True)


def _front_hypervolume(frame: pd.DataFrame, columns: list[str]) -> float | None:
    usable = frame[(frame["state"] == "COMPLETE") & frame["feasible"]].dropna(subset=columns)
    if usable.empty:
        return None
    values = usable[columns].astype(float)
    return hypervolume(usable, columns, ideal=values.min().tolist(), nadir=values.max().tolist())


# -- the search -------------------------------------------------------------------------------


def run_search(
    checkpoint: Subject,
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
    named_configs: Sequence[tuple[str, Sequence[int]]] = (),
    handle_signals: bool = False,
) -> SearchResult:
    """Run (or resume) a study until it holds `settings.n_trials` complete trials.

    `checkpoint` is a native checkpoint or a loaded family adapter (Gemma 3n).
    `named_configs` (label, widths), e.g. MatFormer Lab's configurations, are evaluated
    first, next to the uniform and heuristic seeds, whatever the cost limits say; their
    label is the trial's `source`.
    Writes trials.csv, pareto.csv and run.json to `results_dir` (also when interrupted).
    `on_ready(n_complete)` is called once the study is open, before the first trial;
    `on_warning(message)` (default: `warnings.warn`) hears about repaired storage.

    A trial whose loss, cost or objective is not finite (NaN weights, a broken profile) is
    FAILED with the reason in its `fail_reason` user attr and counts toward `n_trials`; a
    study whose trials all fail stops with a SearchError naming the likely cause.
    Interrupted (KeyboardInterrupt), this process's running trial is failed, never left
    RUNNING, and the result files are written before the interrupt propagates. With
    `handle_signals` (main thread only; the CLI sets it) SIGINT and SIGTERM raise
    `SearchInterrupted` only at safe points (see `_SignalGuard`), never inside a storage write.
    """
    results_dir = Path(results_dir)
    native = isinstance(checkpoint, Checkpoint)
    if not native and (settings.needs_memory or settings.needs_agreement):
        raise SearchError(
            f"the {checkpoint.name} family supports the objectives loss, latency and params "
            f"(and --max-latency-ms/--max-params); memory, kl and disagreement need a native "
            f"mnm checkpoint"
        )
    for label, widths in named_configs:
        if not space.contains(widths):
            skips = any(w == 0 for w in widths)
            hint = " (it skips layers: add --allow-skip)" if skips else ""
            raise SearchError(
                f"configuration {label!r} ({','.join(map(str, widths))}) is not in the search "
                f"space{hint}; widen the space or leave it out"
            )
    if settings.needs_latency and latency_model is None:
        raise SearchError(
            "the latency objective/constraint needs a latency profile: pass --profile FILE.json "
            "or --target profiles/NAME.yaml (or use --objectives loss,params)"
        )
    if settings.needs_memory and memory_target is None:
        raise SearchError("the memory objective/constraint needs a hardware target")
    if latency_model is not None and latency_model.fingerprint != checkpoint.fingerprint:
        raise SearchError(
            f"the latency profile belongs to checkpoint {latency_model.fingerprint}, not to "
            f"{checkpoint.fingerprint}; profile this checkpoint with `mnm profile`"
        )
    costs = CostModel(checkpoint, latency_model=latency_model, memory_target=memory_target)
    limits = settings.constraints()
    check_feasible(space, costs, limits)
    setup = study_setup(checkpoint, space, settings, eval_set, costs)

    storage_obj = open_storage(storage, results_dir, on_warning=on_warning)
    study, created = open_study(study_name, storage_obj, setup, settings)
    fail_dead_trials(study)
    n_target = settings.n_trials
    if settings.sampler == "exhaustive":
        n_target = min(n_target, space.size)
    if created:
        seeds = [(label, list(widths)) for label, widths in named_configs]
        if settings.seed_configs:
            seeds += seed_configs(space, checkpoint, costs, limits)
        for label, widths in seeds:
            study.enqueue_trial(space.to_params(widths), user_attrs={"seed": label})
    # The creating worker uses the seed as given (reproducible runs); others joining or
    # resuming get their own stream so they do not propose the same configurations.
    sampler_seed = settings.seed if created else (settings.seed * 1_000_003 + os.getpid())
    worker = _worker_id()
    study.sampler = _OwnedSampler(
        make_sampler(
            settings.sampler, seed=sampler_seed % 2**32, n_objectives=len(settings.objectives)
        ),
        worker,
    )

    distributions = {
        param_name(layer): CategoricalDistribution(list(options))
        for layer, options in enumerate(space.choices)
    }
    evaluator = _evaluator(checkpoint, eval_set, settings, space)
    screener = (
        _evaluator(
            checkpoint,
            eval_subset(eval_set, settings.fidelity_tokens),
            dataclasses.replace(settings, cache_mb=settings.cache_mb / 4),
            space,
            screening=True,
        )
        if settings.fidelity_tokens
        else None
    )
    fidelity_gaps: list[float] = []  # full - subset loss of fully evaluated configs
    guard = _SignalGuard()
    guard.study = study
    started = time.monotonic()
    n_new = 0
    consecutive_failures = 0
    failures_seen: set[str] = set()
    last_write = 0.0
    write_seconds = 0.0
    last_progress = 0.0
    info = dict(run_info or {})
    info.update(
        {
            "study": study_name,
            "storage": redact_url(storage) if storage else str(results_dir / JOURNAL_FILE),
            "sampler": settings.sampler,
            "seed": settings.seed,
            "n_trials": settings.n_trials,
            "objectives": list(settings.objectives),
            "objective_columns": settings.columns,
            "constraints": limits,
            "fingerprint": checkpoint.fingerprint,
            "checkpoint": str(checkpoint.path.resolve()) if checkpoint.path else None,
            "family": "matlm" if native else checkpoint.name,
            "space": space.to_dict(),
            "space_size": space.size,
            "eval_tokens": eval_set.n_tokens,
            "eval_data_fingerprint": setup["eval_data"],
            "fidelity_tokens": settings.fidelity_tokens,
            "versions": {"optuna": optuna.__version__, "torch": _torch_version()},
        }
    )

    def complete_count() -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def done_count() -> int:
        """Trials that used up budget: complete ones and those that failed on a bad value."""
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
        return sum(t.state == TrialState.COMPLETE or _eval_failed(t) for t in trials)

    def known_values(params: dict[str, Any]) -> dict[str, Any] | None:
        for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if other.params == params and _metrics(other).get("fidelity") == "full":
                return dict(_metrics(other), trial=other.number)
        return None

    def can_reach_front(metrics: dict[str, float], loss_low: float) -> bool:
        if len(fidelity_gaps) < 5:
            return True
        mean = sum(fidelity_gaps) / len(fidelity_gaps)
        spread = (sum((g - mean) ** 2 for g in fidelity_gaps) / len(fidelity_gaps)) ** 0.5
        optimistic = {**metrics, "loss": loss_low + mean - 3 * spread - 1e-3}
        columns = settings.columns
        for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            attrs = _metrics(other)
            if attrs.get("fidelity") != "full" or any(v > 0 for v in other.constraints.values()):
                continue
            if all(attrs[c] <= optimistic[c] for c in columns) and any(
                attrs[c] < optimistic[c] for c in columns
            ):
                return False
        return True

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        # Claim: the trials numbered before this one that are done or running. If they
        # already make up the total, this one is surplus (several workers raced for it).
        def claimed_ahead() -> list[FrozenTrial]:
            return [
                t
                for t in study.get_trials(
                    deepcopy=False,
                    states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL),
                )
                if t.number < trial.number
                and not t.user_attrs.get("surplus")
                and (t.state != TrialState.FAIL or _eval_failed(t))
            ]

        guard.check()  # a signal held while the previous trial was being stored
        ahead = claimed_ahead()
        # Before calling this trial surplus, make sure no claim ahead of it is an orphan of a
        # killed worker: owned orphans fail at once, untagged ones once they are stale.
        deadline = time.monotonic() + _STALE_WITHOUT_OWNER.total_seconds() + 2
        while len(ahead) >= n_target and any(t.state == TrialState.RUNNING for t in ahead):
            if fail_dead_trials(study):
                ahead = claimed_ahead()
                continue
            untagged = any(
                t.state == TrialState.RUNNING and "worker" not in t.user_attrs for t in ahead
            )
            if not untagged or time.monotonic() > deadline:
                break
            time.sleep(0.5)
            ahead = claimed_ahead()
        if len(ahead) >= n_target:
            trial.set_user_attr("surplus", True)
            study.stop()
            raise optuna.TrialPruned("surplus trial: the study already has its total")
        params = {
            name: trial.suggest_categorical(name, dist.choices)
            for name, dist in distributions.items()
        }
        widths = space.from_params(params)
        metrics: dict[str, Any] = costs(widths)
        failure = _failure(metrics, list(metrics))
        if failure is not None:  # no quality evaluation for a configuration we cannot place
            return fail(trial, metrics, failure)
        for column, limit in limits.items():
            trial.set_constraint(column, metrics[column] - limit)
        known = known_values(trial.params)
        if known is not None:  # the sampler proposed a configuration already evaluated
            metrics.update({c: known.get(c) for c in ("loss", "kl", "agreement", "disagreement")})
            metrics["fidelity"] = "full"
            metrics["duplicate_of"] = known.get("trial")
        else:
            full = True
            if screener is not None:
                with guard.interruptible():
                    loss_low = screener.evaluate(widths).loss
                if not can_reach_front(metrics, loss_low):
                    mean = sum(fidelity_gaps) / len(fidelity_gaps)
                    metrics["loss"] = loss_low + mean  # predicted; dominated either way
                    metrics["fidelity"] = "subset"
                    full = False
            if full:
                with guard.interruptible():
                    quality = evaluator.evaluate(widths)
                metrics["loss"] = quality.loss
                metrics["fidelity"] = "full"
                if quality.agreement is not None:
                    metrics["kl"] = quality.kl
                    metrics["agreement"] = quality.agreement
                    metrics["disagreement"] = 1.0 - quality.agreement
                if screener is not None and math.isfinite(quality.loss - loss_low):
                    fidelity_gaps.append(quality.loss - loss_low)
        failure = _failure(metrics, settings.columns)
        if failure is not None:
            return fail(trial, metrics, failure)
        trial.set_user_attr(_METRICS_ATTR, metrics)
        return tuple(float(metrics[c]) for c in settings.columns)

    def fail(trial: optuna.Trial, metrics: dict[str, Any], reason: str) -> tuple[float, ...]:
        # Returning NaN makes Optuna fail the trial without a traceback; the reason stays with
        # the trial (and in trials.csv). Stored metrics leave non-finite values out: tables
        # have integer columns, and strict JSON has no NaN.
        finite = {k: v for k, v in metrics.items() if not _non_finite(v)}
        trial.set_user_attr(_METRICS_ATTR, finite)
        trial.set_user_attr(_FAIL_ATTR, reason)
        return tuple(math.nan for _ in settings.columns)

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal n_new, consecutive_failures, last_write, write_seconds, last_progress
        reason = trial.user_attrs.get(_FAIL_ATTR) if trial.state == TrialState.FAIL else None
        if trial.state == TrialState.COMPLETE:
            n_new += 1
            consecutive_failures = 0
        elif reason is not None:
            consecutive_failures += 1
        trials = study.get_trials(deepcopy=False)
        n_complete = sum(t.state == TrialState.COMPLETE for t in trials)
        n_failed = sum(_eval_failed(t) for t in trials)
        if n_complete + n_failed >= n_target:
            study.stop()
        if n_complete == 0 and consecutive_failures >= _MAX_FAILURES_WITHOUT_SUCCESS:
            study.stop()  # run_search raises once the files are written
        new_failure = reason if reason is not None and reason not in failures_seen else None
        if new_failure is not None:
            failures_seen.add(new_failure)
        now = time.monotonic()
        # Progress costs O(trials): at most once a second, but a new failure at once.
        show = on_progress is not None and (
            now - last_progress > 1 or n_complete + n_failed >= n_target or new_failure
        )
        # Each finished trial reaches trials.csv at once, so a crash loses none; only where
        # a write is slow (huge studies) are writes spaced to take at most a tenth of the time.
        due = trial.state in (TrialState.COMPLETE, TrialState.FAIL) and (
            write_seconds < _FAST_WRITE_S or now - last_write >= 10 * write_seconds
        )
        if not (show or due):
            return
        frame = trials_frame(trials, space, settings.columns)
        if due:
            _write(frame)
            write_seconds = time.monotonic() - now
            last_write = time.monotonic()
        if show and on_progress is not None:
            last_progress = now
            feasible = frame[(frame["state"] == "COMPLETE") & frame["feasible"]]
            on_progress(
                SearchProgress(
                    n_complete=n_complete,
                    n_target=n_target,
                    n_new=n_new,
                    trials_per_s=n_new / max(now - started, 1e-9),
                    best_loss=float(feasible["loss"].min()) if not feasible.empty else None,
                    hypervolume=_front_hypervolume(frame, settings.columns),
                    n_failed=n_failed,
                    failure=new_failure,
                )
            )

    def _write(frame: pd.DataFrame) -> pd.DataFrame:
        info["n_complete"] = int((frame["state"] == "COMPLETE").sum()) if not frame.empty else 0
        info["n_failed"] = int(frame["fail_reason"].notna().sum()) if "fail_reason" in frame else 0
        info["seed_trials"] = {
            str(row.trial): row.source for row in frame.itertuples() if row.source != "sampler"
        }
        return write_results(results_dir, frame, settings.columns, info)

    if on_ready is not None:
        on_ready(complete_count())
    if handle_signals:
        guard.install()
    try:
        if done_count() < n_target:
            study.optimize(
                objective,
                callbacks=[after_trial],
                catch=(),
                gc_after_trial=False,
                show_progress_bar=False,
            )
        guard.check()  # a signal held while Optuna stored the last trial
    except KeyboardInterrupt:
        _fail_running(study, worker)
        raise
    finally:
        try:  # signals stay held until the files are whole
            frame = trials_frame(study.get_trials(deepcopy=False), space, settings.columns)
            front = _write(frame)
        finally:
            guard.uninstall()
    if info["n_complete"] == 0 and info["n_failed"]:
        reasons = frame["fail_reason"].dropna()
        raise SearchError(
            f"every trial failed ({info['n_failed']} of them): {reasons.iloc[-1]}; "
            f"the failed trials are listed in {results_dir / 'trials.csv'}"
        )
    stats = evaluator.stats
    return SearchResult(
        trials=frame,
        pareto=front,
        run_info=info,
        results_dir=results_dir,
        n_new=n_new,
        seconds=time.monotonic() - started,
        cache_stats={
            "evaluations": stats.evaluations,
            "prefix_hits": stats.prefix_hits,
            "layer_runs": stats.layer_runs,
            "evictions": stats.evictions,
        },
    )


def _evaluator(
    subject: Subject,
    eval_set: EvalSet,
    settings: SearchSettings,
    space: SearchSpace,
    *,
    screening: bool = False,
) -> Any:
    """The quality evaluator of the subject's family (anything with `evaluate` and `stats`)."""
    if not isinstance(subject, Checkpoint):
        from mnm_search.families.gemma3n import Gemma3nEvaluator

        return Gemma3nEvaluator(subject, eval_set)
    from mnm_search.families.matlm import MatLMFamily

    return CachedEvaluator(
        MatLMFamily(subject),
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
    """Pareto front of a trials frame for objective names (e.g. ("loss", "latency"))."""
    return pareto_front(frame, [OBJECTIVES[o] for o in objectives])
