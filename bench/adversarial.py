"""Adversarial benchmark of the `mnm` command line (issue 11): attack it, count clean outcomes.

Builds tiny checkpoints, a tiny latency profile and tiny search results in a temporary
directory, then runs a table of attacks, each one or more `python -m mnm_search ...`
subprocesses in its own sandbox, and classifies every attack as CLEAN or DEFECT:

- CLEAN: exit 0 with correct, finite output (strict JSON under `--json`), or a non-zero exit
  with a short error (no traceback, at most 15 lines of stderr) -- and no collateral damage:
  nothing written outside the attack's directory, no hidden `.*tmp*` directory left, inputs
  intact, no credential in any output or file, memory bounded (4 GiB address space), no hang,
  no RUNNING trial left in a study.
- DEFECT: anything else, with a short reason.

    python bench/adversarial.py                      # every class, ~200 attacks
    python bench/adversarial.py --quick              # a few attacks per class
    python bench/adversarial.py --classes journal,creds --json adversarial.json

`PYTHONPATH=OTHER_TREE python bench/adversarial.py` attacks another checkout of the package.
Classes run interleaved; Ctrl-C (or SIGTERM) stops early and prints the totals so far. Timeouts
and kill delays scale with the measured start-up time of `mnm`, so a loaded machine does not
turn slow runs into "hangs".
Exit code 0 always (a benchmark, not a test), unless the harness itself breaks.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

MEMORY_LIMIT = 4 << 30  # address space of every attacked process
MAX_ERROR_LINES = 15
SECRETS = ("secret", "p@ss")
TINY = dict(d_model=32, n_layers=3, n_heads=2, d_ff=64, granularities=(8, 16, 32, 64))
TARGET_YAML = """\
description: tiny adversarial target
device: cpu
dtype: float32
threads: 1
batch: 1
phase: prefill
seq_len: 16
repeats: 3
warmup: 0
calibration: 4
validation: 3
"""
# search on the tiny checkpoint: 6 seeded trials (uniform S/M/L/XL + min-slope), no GP model
SEARCH = ("search", "ckpt", "--objectives", "loss,params", "--max-tokens", "512")
WIDTHS = "S,M,L"
EXPORT = ("export", "ckpt", "--widths", WIDTHS, "--max-tokens", "512")
HIDDEN_TMP = re.compile(r"^\..*tmp", re.IGNORECASE)
NON_FINITE = re.compile(r"(?<![\w.])[-+]?(nan|inf|infinity)(?![\w])", re.IGNORECASE)
PROGRESS_LINE = re.compile(r"\d+/\d+ \(\d+%\)")  # `mnm`'s plain progress lines (no terminal)
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning))\b")
MEMORY_WORDS = ("MemoryError", "bad_alloc", "can't allocate memory", "Cannot allocate memory")
REFERENCE_STARTUP_S = 5.0  # `mnm info --json` on an idle 2-core machine; timeouts scale from it
MAX_SCALE = 2.5  # a hang is still a hang: at most 2.5x the table's timeouts


# ----------------------------------------------------------------------------------------------
# the attack table's vocabulary


@dataclass(frozen=True)
class Step:
    """One command of an attack: `mnm ARGS` run in the attack's directory."""

    args: tuple[str, ...]  # after `mnm`; "{sandbox}" is replaced by the sandbox path
    expect: str = "any"  # "ok": must exit 0; "error": must refuse; "any": either, if clean
    timeout: float = 60.0
    kill: tuple[int, float] | None = None  # (signal, seconds after start) sent to its group
    fsize: int | None = None  # RLIMIT_FSIZE in bytes (a full disk), SIGXFSZ ignored
    debug_ok: bool = False  # `mnm --debug`: a traceback is expected
    mentions: tuple[str, ...] = ()  # an error must name one of these (case-insensitive)


@dataclass
class Run:
    """What one step did."""

    args: list[str]
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    max_rss_mb: float
    timed_out: bool
    signalled: bool  # we sent the step's kill signal before it exited


Ctx = Path  # the attack's working directory (cwd of every step), holding copies of the inputs
Check = Callable[[Ctx, list[Run]], str | None]


@dataclass(frozen=True)
class Attack:
    cls: str
    name: str
    setup: Callable[[Ctx], None]  # mutates the copied inputs in the working directory
    steps: tuple[Step, ...]
    checks: tuple[Check, ...] = ()
    quick: bool = False  # part of --quick
    protect: tuple[str, ...] = ("ckpt", "prof.json")  # inputs that must come out unchanged
    secrets: bool = False  # look for credentials in outputs and files
    study: bool = False  # no RUNNING trial may be left in any journal afterwards


@dataclass
class Outcome:
    cls: str
    name: str
    clean: bool
    reasons: list[str]
    seconds: float
    runs: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# fixtures


@dataclass(frozen=True)
class Fixtures:
    root: Path
    ckpt: Path  # tiny universal checkpoint (max_seq_len 128)
    other: Path  # same shape, other weights: another fingerprint
    target: Path  # tiny target YAML
    profile: Path  # quick profile of ckpt on the tiny target
    results: Path  # `mnm search` results (journal storage)
    text: Path  # small evaluation text
    big_text: Path  # 200 MB of text (created on first use)
    scale: float = 1.0  # timeouts and kill delays x this: the machine is that much slower now


def mnm(*args: str) -> list[str]:
    return [sys.executable, "-m", "mnm_search", *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="80")
    env.pop("FORCE_COLOR", None)
    env["NO_COLOR"] = "1"
    return env


def build_fixtures(root: Path) -> Fixtures:
    import torch

    from mnm_search.checkpoint import save_checkpoint
    from mnm_search.config import ModelConfig
    from mnm_search.model import MatLM

    torch.set_num_threads(1)
    config = ModelConfig(max_seq_len=128, **TINY)  # type: ignore[arg-type]
    paths = []
    for seed, name in ((0, "ckpt"), (1, "other")):
        torch.manual_seed(seed)
        paths.append(Path(save_checkpoint(MatLM(config).eval(), root / name)))
    target = root / "target.yaml"
    target.write_text(TARGET_YAML)
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    startup = []
    for _ in range(2):  # the first one may compile the package's bytecode
        start = time.monotonic()
        subprocess.run(mnm("info", "ckpt", "--json"), cwd=root, env=child_env(),
                       capture_output=True, timeout=600, check=False)  # fmt: skip
        startup.append(time.monotonic() - start)
    scale = min(MAX_SCALE, max(1.0, min(startup) / REFERENCE_STARTUP_S))
    fx = Fixtures(root, paths[0], paths[1], target, root / "prof.json", root / "res", text,
                  root / "big.txt", round(scale, 2))  # fmt: skip
    for args in (
        ("profile", "ckpt", "--target", "target.yaml", "--quick", "--out", "prof.json"),
        (*SEARCH, "--trials", "6", "--out", "res"),
    ):
        done = subprocess.run(
            mnm(*args), cwd=root, env=child_env(), capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            raise SystemExit(f"fixture `mnm {' '.join(args)}` failed:\n{done.stderr[-3000:]}")
    _plain_table_calibration(fx.profile)
    return fx


def _plain_table_calibration(profile: Path) -> None:
    """Make the fixture profile's latency model the plain per-layer table (positive, sane).

    A quick profile of a tiny model on a loaded machine can fit a calibration that predicts
    negative latencies; a CLI that refuses such a profile would then refuse every attack that
    uses it for that reason instead of the one under test.
    """
    data = json.loads(profile.read_text())
    model = data.get("latency_model")
    if isinstance(model, dict) and isinstance(model.get("features"), list):
        model["coefficients"] = [1.0 if f == "ffn_table_ms" else 0.0 for f in model["features"]]
        profile.write_text(json.dumps(data, indent=2))


def big_text(fx: Fixtures) -> Path:
    if not fx.big_text.exists():
        line = ("The quick brown fox jumps over the lazy dog, again and again. " * 16) + "\n"
        chunk = (line * ((1 << 20) // len(line) + 1))[: 1 << 20]
        with fx.big_text.open("w") as handle:
            for _ in range(200):
                handle.write(chunk)
    return fx.big_text


# ----------------------------------------------------------------------------------------------
# running and judging


def _limits(fsize: int | None) -> Callable[[], None]:
    def apply() -> None:
        # a background shell starts jobs with SIGINT ignored; the CLI must see a real Ctrl-C
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        os.umask(0o022)
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return apply


def run_step(step: Step, cwd: Path, sandbox: Path, scale: float) -> Run:
    args = [a.replace("{sandbox}", str(sandbox)) for a in step.args]
    kill_at = step.kill[1] * scale if step.kill else 0.0
    deadline = step.timeout * scale + kill_at
    start = time.monotonic()
    # pipes, not files: RLIMIT_FSIZE (a full disk) must not cut the error message short
    proc = subprocess.Popen(
        mnm(*args),
        cwd=cwd,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_limits(step.fsize),
    )
    readers = [_Drain(proc.stdout), _Drain(proc.stderr)]  # type: ignore[arg-type]
    status, usage, timed_out, signalled = None, None, False, False
    try:
        while status is None:
            pid, raw, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, usage = raw, ru
                break
            elapsed = time.monotonic() - start
            if step.kill is not None and not signalled and elapsed >= kill_at:
                _signal_group(proc.pid, step.kill[0])
                signalled = True
            if elapsed > deadline:
                timed_out = True
                _signal_group(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    except BaseException:  # the harness is interrupted: take the attacked process along
        _signal_group(proc.pid, signal.SIGKILL)
        os.wait4(proc.pid, 0)
        proc.returncode = -9
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not reap it again
    seconds = time.monotonic() - start
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftover workers of the group
    stdout, stderr = (reader.text() for reader in readers)
    rss = (usage.ru_maxrss / 1024) if usage is not None else 0.0
    return Run(
        args,
        proc.returncode,
        stdout,
        stderr,
        round(seconds, 2),
        round(rss, 1),
        timed_out,
        signalled,
    )


class _Drain(threading.Thread):
    """Reads one pipe of a child to its end, so that a chatty child never blocks on it."""

    def __init__(self, pipe: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.pipe = pipe
        self.chunks: list[bytes] = []
        self.start()

    def run(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for chunk in iter(lambda: self.pipe.read1(65536), b""):
                self.chunks.append(chunk)

    def text(self) -> str:
        self.join(timeout=10)
        with contextlib.suppress(OSError):
            self.pipe.close()
        return b"".join(self.chunks).decode("utf-8", "replace")


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def strict_json(text: str) -> str | None:
    """None when TEXT is one strict JSON value with finite numbers, else why not."""

    def reject(token: str) -> Any:
        raise ValueError(f"non-finite constant {token}")

    def finite(token: str) -> float:
        value = float(token)
        if not math.isfinite(value):
            raise ValueError(f"non-finite number {token}")
        return value

    try:
        json.loads(text, parse_constant=reject, parse_float=finite)
    except ValueError as exc:
        return "non-finite number in --json output" if "finite" in str(exc) else "invalid JSON"
    return None


def judge_step(step: Step, run: Run) -> str | None:
    """The first defect of one step, or None."""
    if run.timed_out:
        return "hang after the signal" if run.signalled else "hang (no exit before the timeout)"
    if any(word in run.stderr for word in MEMORY_WORDS):
        return "memory exhausted (4 GiB address space)"
    killed_by_us = run.signalled and step.kill is not None
    if killed_by_us and step.kill[0] in (signal.SIGKILL, signal.SIGTERM):  # type: ignore[index]
        return None  # nothing to say for itself; the checks look at what it left
    if run.rc is not None and run.rc < 0 and not killed_by_us:
        return f"died from signal {signal.Signals(-run.rc).name}"
    if "Traceback (most recent call last)" in run.stderr and not step.debug_ok:
        return f"traceback ({_exception_type(run.stderr)})"
    if killed_by_us:  # SIGINT: a short message and a non-zero exit (or done just in time)
        return None if run.rc is not None and run.rc >= 0 else "SIGINT not handled"
    if run.rc != 0:
        lines = [line for line in run.stderr.splitlines()
                 if line.strip() and not PROGRESS_LINE.search(line)]  # fmt: skip
        if not lines:
            return "failed without a message"
        if len(lines) > MAX_ERROR_LINES and not step.debug_ok:
            return f"error message over {MAX_ERROR_LINES} lines"
        if step.expect == "ok":
            return "refused a valid run"
        if step.mentions and not any(w.lower() in run.stderr.lower() for w in step.mentions):
            return "error does not name the problem"
        return None
    if step.expect == "error":
        return "accepted invalid input"
    if "--json" in run.args:
        return strict_json(run.stdout)
    if NON_FINITE.search(run.stdout):
        return "non-finite number in output"
    return None


def _exception_type(stderr: str) -> str:
    for line in reversed(stderr.splitlines()):
        match = EXCEPTION_LINE.match(line.strip())
        if match:
            return match.group(1).rsplit(".", 1)[-1]
    return "unknown"


def digest(path: Path) -> str:
    """A hash of a file or directory tree (names and contents); 'missing' if absent."""
    if not path.exists() and not path.is_symlink():
        return "missing"
    h = hashlib.sha256()
    items = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for item in items:
        h.update(str(item.relative_to(path.parent)).encode())
        h.update(item.read_bytes())
    return h.hexdigest()


def walk(root: Path) -> Iterator[Path]:
    """Every path under ROOT (not following symlinks), tolerant of unreadable entries."""
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda _e: None):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def collateral(
    attack: Attack, sandbox: Path, work: Path, runs: list[Run], before: dict[str, str]
) -> list[str]:
    reasons = []
    outside = [p for p in walk(sandbox) if work not in (p, *p.parents) and p not in work.parents]
    if outside:
        reasons.append("wrote outside its directory")
    if any(HIDDEN_TMP.match(p.name) for p in walk(work)):
        reasons.append("left a hidden temp dir")
    for name, value in before.items():
        now = digest(work / name)
        if now != value:
            reasons.append("deleted an input" if now == "missing" else "modified an input")
    if attack.secrets:
        reasons += _secret_leaks(work, runs)
    if attack.study and running_trials(work):
        reasons.append("RUNNING trial left in the study")
    return reasons


def _secret_leaks(work: Path, runs: list[Run]) -> list[str]:
    reasons = []
    if any(s in r.stdout + r.stderr for r in runs for s in SECRETS):
        reasons.append("credential in stdout/stderr")
    for path in walk(work):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 50 << 20:
            data = path.read_bytes()
            if any(s.encode() in data for s in SECRETS):
                reasons.append("credential written to a file")
                break
    return reasons


def running_trials(work: Path) -> bool:
    """Whether any Optuna journal under WORK holds a RUNNING trial (unreadable: no verdict)."""
    try:
        import optuna
        from optuna.storages.journal import JournalFileBackend
    except ImportError:
        return False
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for journal in work.rglob("*.journal"):
        try:
            storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
            for summary in storage.get_all_studies():
                trials = storage.get_all_trials(summary._study_id, deepcopy=False)
                if any(t.state == optuna.trial.TrialState.RUNNING for t in trials):
                    return True
        except Exception:  # a torn journal is judged by the CLI's own runs
            continue
    return False


def run_attack(attack: Attack, fx: Fixtures, index: int) -> Outcome:
    sandbox = fx.root / "attacks" / f"{index:03d}"
    work = sandbox / "d1" / "d2" / "work"
    work.mkdir(parents=True)
    for source in (fx.ckpt, fx.other, fx.results):
        shutil.copytree(source, work / source.name)
    for source in (fx.target, fx.profile, fx.text):
        shutil.copy2(source, work / source.name)
    start = time.monotonic()
    reasons: list[str] = []
    runs: list[Run] = []
    try:
        attack.setup(work)
        before = {name: digest(work / name) for name in attack.protect}
        for step in attack.steps:
            run = run_step(step, work, sandbox, fx.scale)
            runs.append(run)
            reason = judge_step(step, run)
            if reason:
                reasons.append(reason)
        for check in attack.checks:
            reason = check(work, runs)
            if reason:
                reasons.append(reason)
        reasons += collateral(attack, sandbox, work, runs, before)
    except Exception as exc:  # a broken attack is reported, not fatal
        reasons.append(f"harness error: {type(exc).__name__}: {exc}")
    seconds = time.monotonic() - start
    details = [
        {
            **{k: v for k, v in asdict(r).items() if k not in ("stdout", "stderr")},
            "stdout_tail": r.stdout[-1500:],
            "stderr_tail": r.stderr[-1500:],
        }
        for r in runs
    ]
    _make_removable(sandbox)
    shutil.rmtree(sandbox, ignore_errors=True)
    return Outcome(
        attack.cls,
        attack.name,
        not reasons,
        list(dict.fromkeys(reasons)),
        round(seconds, 1),
        details,
    )


def _make_removable(root: Path) -> None:
    for path in walk(root):
        if path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.chmod(0o755)


# ----------------------------------------------------------------------------------------------
# set-up helpers (each takes the working directory)


def nothing(_work: Path) -> None:
    pass


def edit_json(relative: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        path = work / relative
        path.write_text(json.dumps(change(json.loads(path.read_text())), indent=2))

    return setup


def set_key(
    relative: str, dotted: str, value: Any, *, delete: bool = False
) -> Callable[[Path], None]:
    def change(data: Any) -> Any:
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if delete:
            del node[last]
        else:
            node[last] = value
        return data

    return edit_json(relative, change)


def write_file(relative: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        path = work / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)

    return setup


def truncate(relative: str, keep: float | int) -> Callable[[Path], None]:
    """Keep a fraction (float) or a number of bytes (int, negative: drop that many)."""

    def setup(work: Path) -> None:
        path = work / relative
        data = path.read_bytes()
        size = int(len(data) * keep) if isinstance(keep, float) else keep
        path.write_bytes(data[:size])

    return setup


def append(relative: str, content: bytes) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        with (work / relative).open("ab") as handle:
            handle.write(content)

    return setup


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        for one in setups:
            one(work)

    return setup


def edit_weights(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        path = work / "ckpt" / "model.safetensors"
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        change(tensors)
        save_file(tensors, str(path), metadata=metadata)

    return setup


def fill(name_part: str, value: float) -> Callable[[Path], None]:
    def change(tensors: dict[str, Any]) -> None:
        for key, tensor in tensors.items():
            if name_part in key and tensor.is_floating_point():
                tensor.fill_(value)

    return edit_weights(change)


def edit_trials(
    change: Callable[[list[dict[str, str]]], list[dict[str, str]]], drop: str | None = None
) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        path = work / "res" / "trials.csv"
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        rows = change(rows)
        columns = [c for c in rows[0] if c != drop] if rows else ["trial"]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    return setup


def set_column(column: str, value: str, rows: slice = slice(None)) -> Callable[[Path], None]:
    def change(all_rows: list[dict[str, str]]) -> list[dict[str, str]]:
        for row in all_rows[rows]:
            row[column] = value
        return all_rows

    return edit_trials(change)


def stale_lock(kind: str) -> Callable[[Path], None]:
    """A `study.journal.lock` as a killed Optuna worker leaves it (symlink lock by default)."""

    def setup(work: Path) -> None:
        lock = work / "res" / "study.journal.lock"
        if kind == "relative":  # the worker ran with a relative --out: target is cwd-relative
            os.symlink("res/study.journal", lock)
        elif kind == "absolute":
            os.symlink(work / "res" / "study.journal", lock)
        elif kind == "dangling":
            os.symlink("/nonexistent/study.journal", lock)
        else:  # JournalFileOpenLock: an O_EXCL regular file
            lock.write_text("")
        old = time.time() - 3600
        os.utime(lock, (old, old), follow_symlinks=False)

    return setup


def yaml_target(**fields: Any) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        lines = TARGET_YAML.splitlines()
        kept = [line for line in lines if line.split(":")[0] not in fields]
        kept += [f"{k}: {v}" for k, v in fields.items()]
        (work / "bad.yaml").write_text("\n".join(kept) + "\n")

    return setup


def alias_bomb(field: str) -> str:
    """A target YAML whose FIELD is a billion-laughs list: 9**9 strings from 10 short lines."""
    levels = ['&a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"&{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    return f"device: cpu\nphase: prefill\n{field}: [{', '.join(levels)}]\n"


def make_readonly(relative: str) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        path = work / relative
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o555)

    return setup


# ----------------------------------------------------------------------------------------------
# checks (work dir, runs) -> defect reason or None


def out_complete_or_absent(name: str) -> Check:
    def check(work: Path, _runs: list[Run]) -> str | None:
        out = work / name
        if not out.exists():
            return None
        needed = ("config.json", "model.safetensors")
        if not all((out / f).is_file() for f in needed):
            return "partial --out after the kill"
        try:
            json.loads((out / "config.json").read_text())
        except ValueError:
            return "partial --out after the kill"
        return None

    return check


def out_present(name: str) -> Check:
    def check(work: Path, _runs: list[Run]) -> str | None:
        return None if (work / name / "config.json").is_file() else "--force lost the old --out"

    return check


def readable_files(*names: str) -> Check:
    """Every file under NAMES is group- and other-readable (umask 022 in the child)."""

    def check(work: Path, _runs: list[Run]) -> str | None:
        for name in names:
            root = work / name
            paths = [root] if root.is_file() else list(walk(root)) if root.exists() else []
            for path in paths:
                if path.is_symlink():
                    continue
                if path.is_file() and path.stat().st_mode & 0o044 != 0o044:
                    return f"file not group/other-readable ({path.name})"
                if path.is_dir() and path.stat().st_mode & 0o055 != 0o055:
                    return "directory not group/other-readable"
        return None

    return check


def no_none(work: Path, runs: list[Run]) -> str | None:
    return "error message says None" if any("None" in r.stderr for r in runs) else None


def exists_after(name: str) -> Check:
    def check(work: Path, _runs: list[Run]) -> str | None:
        return None if (work / name).exists() else f"{name} missing after a clean exit"

    return check


def rss_within(factor: float) -> Check:
    """The last step's peak RSS is at most FACTOR times the first step's (the baseline)."""

    def check(_work: Path, runs: list[Run]) -> str | None:
        if len(runs) < 2 or not runs[0].max_rss_mb or runs[-1].rc != 0:
            return None
        if runs[-1].max_rss_mb > factor * runs[0].max_rss_mb:
            return f"peak memory over {factor:g}x baseline on a large --data"
        return None

    return check


def study_complete(name: str, n: int) -> Check:
    def check(work: Path, runs: list[Run]) -> str | None:
        path = work / name / "trials.csv"
        if not runs or runs[-1].rc != 0:
            return None
        try:
            with path.open(newline="") as handle:
                done = sum(r.get("state") == "COMPLETE" for r in csv.DictReader(handle))
        except OSError:
            return "trials.csv missing after a clean search"
        return None if done >= n else "resumed study has fewer complete trials than --trials"

    return check


# ----------------------------------------------------------------------------------------------
# the attack table


def attacks(fx: Fixtures) -> list[Attack]:
    table: list[Attack] = []

    def add(
        cls: str,
        name: str,
        setup: Callable[[Path], None],
        *steps: Step,
        checks: tuple[Check, ...] = (),
        quick: bool = False,
        **kw: Any,
    ) -> None:
        table.append(Attack(cls, name, setup, tuple(steps), checks, quick, **kw))

    def S(*args: str, **kw: Any) -> Step:  # a table shorthand
        return Step(tuple(args), **kw)

    search8 = S(*SEARCH, "--trials", "8", "--out", "res", "--json", timeout=120)
    pareto = S("pareto", "res", "--json")

    # 1. torn journal -------------------------------------------------------------------------
    journal = "res/study.journal"
    torn = [
        ("truncated to half", truncate(journal, 0.5)),
        ("last 7 bytes cut", truncate(journal, -7)),
        ("emptied", truncate(journal, 0)),
        ("garbage line appended", append(journal, b"{not json at all\n")),
        (
            "running trial appended",
            append(
                journal,
                b'{"op_code": 4, "worker_id": "dead", "study_id": 0, "datetime_start": '
                b'"2020-01-01T00:00:00.000000"}\n',
            ),
        ),
    ]
    for i, (label, setup) in enumerate(torn):
        add(
            "1-torn-journal",
            f"search after journal {label}",
            setup,
            search8,
            pareto,
            quick=i in (0, 3),
            study=True,
        )
        add("1-torn-journal", f"pareto after journal {label}", setup, pareto)

    # 2. stale journal lock / killed worker, relative --out ------------------------------------
    locks = [("relative", "res"), ("relative", "./res"), ("absolute", "res"), ("open-lock", "res")]
    for i, (kind, out) in enumerate(locks):
        add(
            "2-stale-lock",
            f"{kind} lock, --out {out}",
            stale_lock(kind),
            S(*SEARCH, "--trials", "8", "--out", out, expect="ok", timeout=60),
            checks=(study_complete("res", 8),),
            quick=i == 0,
            study=True,
        )
    for delay in (9.0, 15.0):
        add(
            "2-stale-lock",
            f"SIGKILL search at {delay:g}s then resume",
            nothing,
            S(
                *SEARCH,
                "--trials",
                "40",
                "--out",
                "res",
                kill=(signal.SIGKILL, delay),
                timeout=60,
            ),
            S(*SEARCH, "--trials", "12", "--out", "res", expect="ok"),
            checks=(study_complete("res", 12),),
            study=True,
        )

    # 3. NaN loss -----------------------------------------------------------------------------
    nan_inputs: list[tuple[str, Callable[[Path], None]]] = [
        ("norm_eps NaN", set_key("ckpt/config.json", "norm_eps", float("nan"))),
        ("norm_eps Infinity", set_key("ckpt/config.json", "norm_eps", float("inf"))),
        ("norm_eps negative", set_key("ckpt/config.json", "norm_eps", -1e-5)),
        ("NaN embedding", fill("wte", float("nan"))),
        ("huge weights (overflow)", fill("ffn.down", 3e38)),
    ]
    for i, (label, setup) in enumerate(nan_inputs):
        add(
            "3-nan-loss",
            f"search --trials 3 with {label}",
            setup,
            S(*SEARCH, "--trials", "3", "--out", "r", "--json", timeout=45),
            S("pareto", "r", "--json"),
            quick=i in (0, 3),
            study=True,
        )
        add(
            "3-nan-loss",
            f"eval --json with {label}",
            setup,
            S("eval", "ckpt", "--widths", WIDTHS, "--max-tokens", "512", "--json"),
        )

    # 4. credentials --------------------------------------------------------------------------
    urls = [
        "postgresql://u:secret@127.0.0.1:1/db",
        "postgresql://u@127.0.0.1:1/db?password=secret",
        "postgresql://u:p@ss@127.0.0.1:1/db",
        "postgresql+psycopg2://u:secret@127.0.0.1:1/db",
        "postgresql://u:p@ss@127.0.0.1:1/db?password=p@ss&sslmode=disable",
        "mysql://u:secret@127.0.0.1:1/db",
    ]
    for i, url in enumerate(urls):
        base = (*SEARCH, "--trials", "2", "--storage", url, "--out", "r")
        add(
            "4-credentials",
            f"search --storage {url}",
            nothing,
            S(*base, timeout=90),
            quick=i in (0, 2),
            secrets=True,
        )
        if i < 3:
            debug = Step(("--debug", *base, "--json"), timeout=90, debug_ok=True)
            add("4-credentials", f"--debug search --json --storage {url}", nothing, debug,
                secrets=True)  # fmt: skip

    # 5. small inputs exhausting memory ---------------------------------------------------------
    huge = [
        ("n_layers", 10**7),
        ("d_model", 10**9),
        ("d_ff", 10**12),
        ("vocab_size", 10**12),
    ]
    for i, (key, value) in enumerate(huge):
        setup = set_key("ckpt/config.json", key, value)
        info = S("info", "ckpt", "--json")
        add("5-memory", f"info with {key}={value:.0e}", setup, info, quick=i == 0)
        if key in ("n_layers", "d_model", "vocab_size"):
            evaluate = S("eval", "ckpt", "--widths", "S", "--max-tokens", "512")
            add("5-memory", f"eval with {key}={value:.0e}", setup, evaluate)
    profile_bad = S("profile", "ckpt", "--target", "bad.yaml", "--quick", "--out", "p.json")
    many = "S*99999999999"
    memory: list[tuple[str, Callable[[Path], None], Step]] = [
        ("YAML alias bomb in name: profile --target", write_file("bad.yaml", alias_bomb("name")),
         profile_bad),
        ("YAML alias bomb in seed: search --target", write_file("bad.yaml", alias_bomb("seed")),
         S(*SEARCH, "--trials", "2", "--target", "bad.yaml", "--out", "r")),
        ("target batch 1e8", yaml_target(batch=10**8), profile_bad),
        ("target decode context_len 1e9",
         yaml_target(phase="decode", seq_len=1, context_len=10**9), profile_bad),
        (f"eval --widths {many}", nothing,
         S("eval", "ckpt", "--widths", many, "--max-tokens", "512")),
        (f"export --widths {many}", nothing, S("export", "ckpt", "--widths", many, "--out", "x")),
        (f"search --min-widths {many}", nothing,
         S(*SEARCH, "--trials", "2", "--min-widths", many, "--out", "r")),
        ("eval --max-tokens 1e12", nothing,
         S("eval", "ckpt", "--widths", WIDTHS, "--max-tokens", str(10**12))),
        ("train --batch-size 1e8", nothing,
         S("train", "--out", "t", "--preset", "tiny", "--steps", "1", "--batch-size", "100000000")),
    ]  # fmt: skip
    for i, (label, setup, step) in enumerate(memory):
        add("5-memory", label, setup, step, quick=i in (0, 4))

    # 6. path escape --------------------------------------------------------------------------
    names = ["x/../../escaped", "../../escaped", "{sandbox}/abs-escaped", ".."]
    for i, name in enumerate(names):
        add(
            "6-path-escape",
            f"target name {name!r}, profile without --out",
            lambda w, n=name: yaml_target(
                name=json.dumps(n.replace("{sandbox}", str(w.parents[2])))
            )(w),
            S("profile", "ckpt", "--target", "bad.yaml", "--quick"),
            quick=i == 0,
        )
        add(
            "6-path-escape",
            f"--study {name!r}, search without --out",
            nothing,
            S(*SEARCH, "--trials", "2", "--study", name),
            quick=i == 1,
        )
    add(
        "6-path-escape",
        "target name '../../escaped', search --target --out r",
        yaml_target(name='"../../escaped"'),
        S(*SEARCH, "--trials", "2", "--target", "bad.yaml", "--quick-profile", "--out", "r"),
    )
    add(
        "6-path-escape",
        "study name with newline",
        nothing,
        S(*SEARCH, "--trials", "2", "--study", "x\ny"),
    )

    # 7. killed exports -----------------------------------------------------------------------
    sigs = (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)
    for sig in sigs:
        for delay in (5.0, 12.0):
            add(
                "7-killed-export",
                f"{sig.name} export at {delay:g}s, then export again",
                nothing,
                S(*EXPORT, "--out", "ex", kill=(sig, delay)),
                S(*EXPORT, "--out", "ex2", expect="ok"),
                checks=(out_complete_or_absent("ex"),),
                quick=(sig, delay) == (signal.SIGKILL, 12.0),
            )
    for sig in sigs:
        add(
            "7-killed-export",
            f"{sig.name} export --force over an old export at 10s",
            both(lambda w: shutil.copytree(w / "ckpt", w / "ex")),
            S(*EXPORT, "--out", "ex", "--force", kill=(sig, 10.0)),
            S(*EXPORT, "--out", "ex2", expect="ok"),
            checks=(out_complete_or_absent("ex"), out_present("ex")),
        )

    # 8. --force on inputs --------------------------------------------------------------------
    inputs = ("ckpt", "prof.json", "res", "text.txt")
    forced = [
        ("--out CKPT", S(*EXPORT, "--out", "ckpt", "--force")),
        ("--out . (parent of CKPT)", S(*EXPORT, "--out", ".", "--force")),
        ("--out sandbox (grandparent)", S(*EXPORT, "--out", "{sandbox}", "--force")),
        (
            "--out RESULTS_DIR with --from it",
            S("export", "ckpt", "--from", "res", "--trial", "2", "--out", "res", "--force"),
        ),
        ("--out a symlink to CKPT", S(*EXPORT, "--out", "link", "--force")),
        (
            "--out the --profile's dir",
            S(*EXPORT, "--profile", "pd/prof.json", "--out", "pd", "--force"),
        ),
        ("--out the --data dir", S(*EXPORT, "--data", "dd", "--out", "dd", "--force")),
        (
            "profile --out CKPT/config.json",
            S("profile", "ckpt", "--target", "target.yaml", "--quick", "--out", "ckpt/config.json"),
        ),
        (
            "pareto --plot CKPT/model.safetensors",
            S("pareto", "res", "--plot", "ckpt/model.safetensors"),
        ),
        ("train --out CKPT", S("train", "--out", "ckpt", "--preset", "tiny", "--steps", "1")),
    ]

    def force_setup(work: Path) -> None:
        os.symlink("ckpt", work / "link")
        (work / "pd").mkdir()
        shutil.copy2(work / "prof.json", work / "pd" / "prof.json")
        (work / "dd").mkdir()
        shutil.copy2(work / "text.txt", work / "dd" / "text.txt")

    for i, (label, step) in enumerate(forced):
        step = Step(step.args, expect="error", timeout=90)
        add(
            "8-force-inputs",
            label,
            force_setup,
            step,
            quick=i in (0, 3),
            protect=(*inputs, "pd/prof.json", "dd/text.txt"),
        )

    # 9. tracebacks ---------------------------------------------------------------------------
    export_from = (
        "export",
        "ckpt",
        "--from",
        "res",
        "--trial",
        "2",
        "--out",
        "x",
        "--max-tokens",
        "512",
    )
    run_json = [
        ("run.json truncated", truncate("res/run.json", 0.5)),
        ("run.json a list", write_file("res/run.json", "[]")),
        ("run.json objectives a string", set_key("res/run.json", "objective_columns", "loss")),
        ("run.json fingerprint a number", set_key("res/run.json", "fingerprint", 123)),
    ]
    trials_csv = [
        ("trials.csv truncated mid-row", truncate("res/trials.csv", 0.6)),
        (
            "trials.csv header only",
            write_file("res/trials.csv", "trial,widths,loss,params,state\n"),
        ),
        ("trials.csv without loss", edit_trials(lambda r: r, drop="loss")),
        ("trials.csv widths 'abc'", set_column("widths", "abc")),
        ("trials.csv widths of wrong length", set_column("widths", "8,8")),
        ("trials.csv loss 'abc'", set_column("loss", "abc")),
    ]
    for i, (label, setup) in enumerate(run_json + trials_csv):
        add("9-tracebacks", f"pareto with {label}", setup, S("pareto", "res"), quick=i == 0)
        if i % 4 == 0:
            add("9-tracebacks", f"export --from with {label}", setup, S(*export_from))
    bad_config = [
        ("d_model a string", "d_model", "32"),
        ("n_layers a list", "n_layers", [3]),
        ("granularities descending", "granularities", [64, 32, 16, 8]),
        ("n_heads not dividing d_model", "n_heads", 3),
        ("vocab_size too small for the weights", "vocab_size", 10),
        ("storage_dtype unknown", "storage_dtype", "float7"),
    ]
    for i, (label, key, value) in enumerate(bad_config):
        setup = set_key("ckpt/config.json", key, value)
        mentions = (key, "config")
        add(
            "9-tracebacks",
            f"info with config {label}",
            setup,
            S("info", "ckpt", "--json", mentions=mentions),
            quick=i == 0,
        )
        if i % 3 == 0:
            evaluate = S(
                "eval", "ckpt", "--widths", "S*3", "--max-tokens", "512", mentions=mentions
            )
            add("9-tracebacks", f"eval with config {label}", setup, evaluate)
    whole_config = [
        ("config.json not JSON", write_file("ckpt/config.json", "{'d_model': 32")),
        ("config.json family gemma3n", set_key("ckpt/config.json", "family", "gemma3n")),
    ]
    weights = [
        ("model.safetensors truncated to half", truncate("ckpt/model.safetensors", 0.5)),
        (
            "model.safetensors huge header length",
            write_file("ckpt/model.safetensors", (2**62).to_bytes(8, "little") + b"{}"),
        ),
        ("model.safetensors a tensor missing", edit_weights(lambda t: t.pop(sorted(t)[0]))),
        (
            "model.safetensors a wrong shape",
            edit_weights(lambda t: t.__setitem__(sorted(t)[0], t[sorted(t)[0]][:1].clone())),
        ),
        (
            "model.safetensors an int tensor",
            edit_weights(
                lambda t: t.__setitem__(sorted(t)[0], t[sorted(t)[0]].to(__import__("torch").int32))
            ),
        ),
    ]
    for label, setup in whole_config + weights:
        add(
            "9-tracebacks",
            f"eval with {label}",
            setup,
            S("eval", "ckpt", "--widths", "S*3", "--max-tokens", "512"),
        )
    add(
        "9-tracebacks",
        "search with model.safetensors truncated",
        truncate("ckpt/model.safetensors", 0.5),
        S(*SEARCH, "--trials", "2", "--out", "r"),
    )
    # train_state.json
    train = ("train", "--out", "t", "--preset", "tiny", "--steps", "3", "--eval-every", "1000")
    states = [
        ("truncated", truncate("t/train_state.json", 0.5)),
        ("binary", write_file("t/train_state.json", b"\xff\x00" * 20)),
    ]
    for label, mutate in states:
        add(
            "9-tracebacks",
            f"train resume with train_state.json {label}",
            _after_train(mutate),
            S(*train, timeout=120),
        )
    # unwritable outputs (root ignores modes: a path under a regular file or /proc instead)
    unwritable = [
        ("search --out under a file", S(*SEARCH, "--trials", "2", "--out", "text.txt/r")),
        ("export --out under a file", S(*EXPORT, "--out", "text.txt/x")),
        (
            "profile --out under a file",
            S("profile", "ckpt", "--target", "target.yaml", "--quick", "--out", "text.txt/p.json"),
        ),
        (
            "train --out under a file",
            S("train", "--out", "text.txt/t", "--preset", "tiny", "--steps", "1"),
        ),
    ]
    for i, (label, step) in enumerate(unwritable):
        add("9-tracebacks", label, make_readonly("ro"), step, quick=i == 1)
    missing = [
        ("info missing ckpt", S("info", "nope")),
        ("eval missing --data", S("eval", "ckpt", "--widths", WIDTHS, "--data", "nope.txt")),
        ("eval empty --data file", S("eval", "ckpt", "--widths", WIDTHS, "--data", "empty.txt")),
        (
            "eval binary --data",
            S(
                "eval",
                "ckpt",
                "--widths",
                WIDTHS,
                "--data",
                "ckpt/model.safetensors",
                "--max-tokens",
                "512",
            ),
        ),
        (
            "export --trial 999",
            S("export", "ckpt", "--from", "res", "--trial", "999", "--out", "x"),
        ),
        ("eval ckpt is a file", S("eval", "text.txt", "--widths", WIDTHS)),
    ]

    def empties(work: Path) -> None:
        (work / "empty.txt").write_text("")
        (work / "emptydir").mkdir()

    for label, step in missing:
        add("9-tracebacks", label, empties, step)
    full = 48 << 10
    disk_full = [
        ("export", S(*EXPORT, "--out", "x", fsize=full)),
        ("search", S(*SEARCH, "--trials", "6", "--out", "r", fsize=8 << 10)),
        (
            "profile",
            S(
                "profile",
                "ckpt",
                "--target",
                "target.yaml",
                "--quick",
                "--out",
                "p.json",
                fsize=1 << 10,
            ),
        ),
        ("train", S("train", "--out", "t", "--preset", "tiny", "--steps", "2", fsize=full)),
    ]
    for i, (label, step) in enumerate(disk_full):
        add("9-tracebacks", f"disk full during {label} (RLIMIT_FSIZE)", nothing, step, quick=i == 0)
    add(
        "9-tracebacks",
        "SIGINT during search, then resume",
        nothing,
        S(
            *SEARCH,
            "--trials",
            "60",
            "--out",
            "res",
            kill=(signal.SIGINT, 13.0),
        ),
        S(*SEARCH, "--trials", "10", "--out", "res", expect="ok"),
        checks=(study_complete("res", 10),),
        quick=True,
        study=True,
    )
    add(
        "9-tracebacks",
        "SIGINT during train, then resume",
        nothing,
        S("train", "--out", "t", "--preset", "tiny", "--steps", "400", kill=(signal.SIGINT, 13.0)),
        S("train", "--out", "t", "--preset", "tiny", "--steps", "2", timeout=120),
    )
    add(
        "9-tracebacks",
        "SIGINT during profile",
        nothing,
        S("profile", "ckpt", "--quick", "--out", "p.json", kill=(signal.SIGINT, 12.0)),
    )

    # 10. non-finite values -------------------------------------------------------------------
    prof = "prof.json"
    coefficients = "latency_model.coefficients"
    bad_profiles = [
        ("NaN coefficients", set_key(prof, coefficients, [float("nan")] * 3)),
        ("negative coefficients", set_key(prof, coefficients, [-5.0, -5.0, -5.0])),
        ("huge ffn_ms", edit_json(prof, _scale_ffn(1e308))),
        ("NaN ffn_ms", edit_json(prof, _scale_ffn(float("nan")))),
    ]
    eval_profile = S("eval", "ckpt", "--widths", WIDTHS, "--max-tokens", "512", "--profile", prof,
                     "--json")  # fmt: skip
    search_profile = S("search", "ckpt", "--profile", prof, "--trials", "3", "--max-tokens", "512",
                       "--out", "r", "--json", timeout=90)  # fmt: skip
    for i, (label, setup) in enumerate(bad_profiles):
        add("10-non-finite", f"eval --json --profile with {label}", setup, eval_profile,
            quick=i == 0, protect=("ckpt",))  # fmt: skip
        if i in (0, 1, 3):
            add("10-non-finite", f"search --profile with {label}", setup, search_profile,
                protect=("ckpt",))  # fmt: skip
    for i, value in enumerate(("nan", "inf", "1e999")):
        setup = set_column("loss", value, slice(0, 3))
        add("10-non-finite", f"pareto --json with loss {value} in trials.csv", setup,
            S("pareto", "res", "--json"), quick=i == 0)  # fmt: skip
        if i < 2:
            add("10-non-finite", f"export --from with loss {value} in trials.csv", setup,
                S(*export_from))  # fmt: skip
    add("10-non-finite", "eval --json --max-tokens 1", nothing,
        S("eval", "ckpt", "--widths", WIDTHS, "--max-tokens", "1", "--json"))  # fmt: skip
    add("10-non-finite", "eval --json on 1 byte of --data", write_file("one.txt", "a"),
        S("eval", "ckpt", "--widths", WIDTHS, "--data", "one.txt", "--json"))  # fmt: skip

    # 11. smaller -----------------------------------------------------------------------------
    mismatched = [
        ("eval", S("eval", "other", "--widths", WIDTHS, "--max-tokens", "512", "--profile", prof)),
        ("search", S("search", "other", "--profile", prof, "--trials", "2", "--max-tokens", "512",
                     "--out", "r")),
        ("export", S("export", "other", "--widths", WIDTHS, "--profile", prof, "--out", "x",
                     "--max-tokens", "512")),
    ]  # fmt: skip
    for label, step in mismatched:
        refused = Step(step.args, expect="error", mentions=("fingerprint", "checkpoint"))
        add("11-smaller", f"fingerprint mismatch: {label} with another checkpoint's profile",
            nothing, refused, checks=(no_none,), quick=label == "eval")  # fmt: skip
    modes = [
        ("export", S(*EXPORT, "--out", "x", expect="ok"), ("x",)),
        ("search", S(*SEARCH, "--trials", "6", "--out", "r", expect="ok"), ("r",)),
        ("profile", S("profile", "ckpt", "--target", "target.yaml", "--quick", "--out", "p.json",
                      expect="ok"), ("p.json",)),
        ("pareto", S("pareto", "res", "--plot", "p.png", "--heatmap", "h.png", expect="ok"),
         ("p.png", "h.png", "res/pareto.csv")),
        ("train", S("train", "--out", "t", "--preset", "tiny", "--steps", "2", expect="ok",
                    timeout=120), ("t",)),
    ]  # fmt: skip
    for label, step, outputs in modes:
        add("11-smaller", f"file modes under umask 022: {label}", nothing, step,
            checks=(readable_files(*outputs),), quick=label == "export")  # fmt: skip
    small, big = "text.txt", "big.txt"

    def link_big(work: Path) -> None:
        os.symlink(big_text(fx), work / big)

    add("11-smaller", "eval --data 200 MB --max-tokens 4096: peak memory vs small --data",
        link_big,
        S("eval", "ckpt", "--widths", WIDTHS, "--data", small, "--max-tokens", "4096", expect="ok"),
        S("eval", "ckpt", "--widths", WIDTHS, "--data", big, "--max-tokens", "4096", expect="ok",
          timeout=120),
        checks=(rss_within(2.0),))  # fmt: skip
    add("11-smaller", "search --data 200 MB --max-tokens 4096: peak memory vs small --data",
        link_big,
        S(*SEARCH, "--trials", "2", "--out", "r0", "--data", small, "--max-tokens", "4096",
          expect="ok"),
        S(*SEARCH, "--trials", "2", "--out", "r1", "--data", big, "--max-tokens", "4096",
          expect="ok", timeout=120),
        checks=(rss_within(2.0),))  # fmt: skip
    return table


def _scale_ffn(value: float) -> Callable[[Any], Any]:
    def change(data: Any) -> Any:
        data["latency_model"]["ffn_ms"] = [
            [value for _ in row] for row in data["latency_model"]["ffn_ms"]
        ]
        return data

    return change


def _after_train(mutate: Callable[[Path], None]) -> Callable[[Path], None]:
    """Train 2 tiny steps first (in the attack's own directory), then corrupt its state."""

    def setup(work: Path) -> None:
        subprocess.run(
            mnm("train", "--out", "t", "--preset", "tiny", "--steps", "2"),
            cwd=work,
            env=child_env(),
            capture_output=True,
            timeout=300,
            check=False,
        )
        if (work / "t" / "train_state.json").exists():
            mutate(work)

    return setup


# ----------------------------------------------------------------------------------------------
# report


def report(outcomes: list[Outcome], seconds: float) -> str:
    by_class: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_class.setdefault(outcome.cls, []).append(outcome)
    lines = [f"{'class':<18} {'attempts':>8} {'clean':>6} {'defects':>8}  distinct defect reasons"]
    lines.append("-" * 100)
    for cls, group in sorted(by_class.items(), key=lambda kv: int(kv[0].split("-")[0])):
        clean = sum(o.clean for o in group)
        counts: dict[str, int] = {}
        for outcome in group:
            for reason in outcome.reasons:
                counts[reason] = counts.get(reason, 0) + 1
        reasons = "; ".join(f"{r} (x{n})" for r, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        lines.append(f"{cls:<18} {len(group):>8} {clean:>6} {len(group) - clean:>8}  {reasons}")
    total = len(outcomes)
    clean = sum(o.clean for o in outcomes)
    lines.append("-" * 100)
    lines.append(f"{'TOTAL':<18} {total:>8} {clean:>6} {total - clean:>8}  ({seconds:.0f} s)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", help="comma-separated class numbers or name parts")
    parser.add_argument("--quick", action="store_true", help="a few attacks per class")
    parser.add_argument("--json", type=Path, help="write every outcome here (after each attack)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    options = parser.parse_args()
    # Ctrl-C or `kill` (also of a background run) stops early and still prints the totals
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    import mnm_search

    package = str(Path(mnm_search.__file__).parent)
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="mnm-adversarial-"))
    print(f"attacking {package} in {root}", flush=True)
    outcomes: list[Outcome] = []
    interrupted = False
    try:
        fx = build_fixtures(root)
        print(f"timeouts x{fx.scale:g} (startup vs {REFERENCE_STARTUP_S:g} s idle)", flush=True)
        table = select(attacks(fx), options.classes, options.quick)
        for index, attack in enumerate(table):
            outcome = run_attack(attack, fx, index)
            outcomes.append(outcome)
            verdict = "clean " if outcome.clean else "DEFECT"
            why = "" if outcome.clean else "  <- " + "; ".join(outcome.reasons)
            print(f"[{index + 1:3d}/{len(table)}] {verdict} {attack.cls}: {attack.name}"
                  f" ({outcome.seconds:.0f} s){why}", flush=True)  # fmt: skip
            if options.json:
                write_json(options.json, package, outcomes, time.monotonic() - started, fx.scale)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if not options.keep:
            _make_removable(root)
            shutil.rmtree(root, ignore_errors=True)
    seconds = time.monotonic() - started
    print()
    if interrupted:
        print(f"interrupted after {len(outcomes)} attacks")
    print(report(outcomes, seconds))


def select(table: list[Attack], classes: str | None, quick: bool) -> list[Attack]:
    """The attacks to run, classes interleaved so that a stopped run still samples them all."""
    if classes:
        wanted = [w.strip() for w in classes.split(",") if w.strip()]
        table = [a for a in table if any(_class_matches(a.cls, w) for w in wanted)]
    if quick:
        table = [a for a in table if a.quick]
    by_class: dict[str, list[Attack]] = {}
    for attack in table:
        by_class.setdefault(attack.cls, []).append(attack)
    rounds = max((len(group) for group in by_class.values()), default=0)
    return [group[i] for i in range(rounds) for group in by_class.values() if i < len(group)]


def write_json(path: Path, package: str, outcomes: list[Outcome], seconds: float,
               scale: float) -> None:  # fmt: skip
    summary = {
        "package": package,
        "seconds": round(seconds, 1),
        "timeout_scale": scale,
        "attempts": len(outcomes),
        "clean": sum(o.clean for o in outcomes),
        "defects": sum(not o.clean for o in outcomes),
        "outcomes": [asdict(o) for o in outcomes],
    }
    path.write_text(json.dumps(summary, indent=2))


def _class_matches(cls: str, wanted: str) -> bool:
    number, _, name = cls.partition("-")
    return wanted == number or wanted in name


if __name__ == "__main__":
    main()
