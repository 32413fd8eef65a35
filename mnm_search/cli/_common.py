"""Shared pieces of the command line: consoles, error handling, progress, common options.

Library functions raise `MnmError`; `user_errors`, the one error boundary every command runs
in, turns those and every other failure into one clear line and a non-zero exit (a traceback
only with `mnm --debug ...`).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table

from mnm_search.errors import MnmError, Terminated
from mnm_search.targets import shipped_target_names

DEFAULT_EVAL_TOKENS = 32_768

out = Console()
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

CkptArg = Annotated[
    Path | None,
    typer.Argument(help="Checkpoint directory (default: the embedded default checkpoint)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
DataOpt = Annotated[
    Path | None,
    typer.Option("--data", help="Text file or directory to evaluate on (default: bundled text)."),
]


def target_help(what: str = "Hardware target") -> str:
    """`--target` help naming the shipped targets, which work by bare name from anywhere."""
    names = ", ".join(shipped_target_names()) or "none found"
    return f"{what}: a YAML file, or the name of a shipped target ({names})."


TargetOpt = Annotated[
    Path | None,
    typer.Option(
        "--target",
        "-t",
        help=target_help("Hardware target (default: cpu-prefill)"),
        metavar="TARGET",
    ),
]

# `mnm --debug ...`: set by the root command, read by the error boundary (no click context
# needed, so no private typer/click API).
_DEBUG: ContextVar[bool] = ContextVar("mnm_debug", default=False)


def set_debug(debug: bool) -> None:
    """Make the error boundary re-raise (tracebacks) for the rest of this invocation."""
    _DEBUG.set(debug)


def user_errors(func: F) -> F:
    """Run a command; print any failure as one line on stderr and exit non-zero.

    The one error boundary of the CLI: library errors, OS errors (disk full, read-only,
    permissions), corrupt files and interruptions become one redacted line naming the file
    and the fix (exit 1; 130 for Ctrl-C, 143 for SIGTERM); anything else is reported as an
    internal error. `mnm --debug ...` re-raises instead, for the traceback.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # typer's own exits and usage errors (click's, in typer): it prints them
        except BaseException as exc:
            if _DEBUG.get() or isinstance(exc, (SystemExit, GeneratorExit)):
                raise
            message, code = describe_exception(exc)
            secrets = _argument_secrets([*args, *kwargs.values()])
            print_error(message, secrets=secrets, warn=code in (130, 143))
            raise typer.Exit(code=code) from None

    return wrapper  # type: ignore[return-value]


def print_error(message: str, *, secrets: Iterable[str] = (), warn: bool = False) -> None:
    """MESSAGE on stderr as one redacted line (`Error: ...`)."""
    from mnm_search.redact import redact

    # One line even when a library's text (quoted in the message) spans several.
    text = " ".join(line.strip() for line in redact(message, secrets).splitlines() if line.strip())
    if warn:
        err.print(f"[yellow]{escape(text)}[/]", highlight=False, soft_wrap=True)
    else:
        err.print(f"[bold red]Error:[/] {escape(text)}", highlight=False, soft_wrap=True)


def _argument_secrets(arguments: Iterable[Any]) -> list[str]:
    """Passwords in any command-line argument (storage URLs), to mask in messages."""
    from mnm_search.redact import url_secrets

    # sys.argv for the real command line; the parsed values for in-process callers
    # (CliRunner, embedding), whose arguments never reach sys.argv.
    values = [str(a) for a in sys.argv] + [str(v) for v in arguments if v is not None]
    return [secret for value in values for secret in url_secrets(value)]


def _one_line(text: str, limit: int = 500) -> str:
    """Library messages can span lines (SQLAlchemy appends its docs link): keep one line."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_exception(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for any exception that ends a command."""
    from mnm_search._files import describe_os_error

    if isinstance(exc, Terminated):
        return "Terminated (SIGTERM); nothing half-written was left behind.", 143
    if isinstance(exc, KeyboardInterrupt):
        return "Interrupted; nothing half-written was left behind.", 130
    if isinstance(exc, MnmError):
        return str(exc), 1
    if isinstance(exc, MemoryError):
        return (
            "out of memory: use a smaller model, --max-tokens or batch, or free memory "
            "(close other programs)",
            1,
        )
    if isinstance(exc, BrokenPipeError):
        return "the output was closed before mnm finished writing it (a pipe reader exited)", 1
    if isinstance(exc, OSError):
        return describe_os_error(exc), 1
    if isinstance(exc, json.JSONDecodeError):
        return (
            f"a JSON file is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}): "
            "restore it (checkpoint config.json, --profile, run.json) or write it again",
            1,
        )
    if isinstance(exc, UnicodeDecodeError):
        return (
            f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}): pass UTF-8 text "
            "(--data) or restore the file",
            1,
        )
    module = type(exc).__module__.split(".", 1)[0]
    known = _LIBRARY_ERRORS.get(module)
    name = type(exc).__name__
    if known is not None and not isinstance(exc, (AssertionError, TypeError, AttributeError)):
        what, fix = known
        return _one_line(f"{what} ({name}: {exc}): {fix}"), 1
    return (
        _one_line(f"internal error: {name}: {exc}")
        + " — run `mnm --debug ...` for the traceback and report it",
        1,
    )


# Errors raised by the libraries we drive, keyed by top-level module: (what, fix).
_LIBRARY_ERRORS: dict[str, tuple[str, str]] = {
    "safetensors": (
        "a .safetensors file is corrupt, truncated or could not be written",
        "re-copy the checkpoint, check free space, or export it again",
    ),
    "yaml": ("a YAML file is invalid", "fix the --target YAML (see profiles/*.yaml)"),
    "optuna": ("the Optuna study failed", "check --study, --storage and --sampler"),
    "sqlalchemy": (
        "the study database failed",
        "check the --storage URL, that the database is reachable, and its permissions",
    ),
    "pandas": ("a CSV file is empty or malformed", "restore it or run `mnm search` again"),
}


def print_json(data: Any) -> None:
    """One strict JSON object on stdout (NaN/inf as null: strict parsers reject `NaN`)."""
    from mnm_search._files import json_text

    typer.echo(json_text(data))


@contextmanager
def progress_bar(*, transient: bool = True) -> Iterator[Progress]:
    """Progress on stderr for anything that can take more than a few seconds.

    Tasks take a `status` field. On a terminal this is a rich bar; its status column wraps
    rather than pushing the bar and the times off an 80-column screen. Anywhere else (a log
    file, a pipe, CI) a live bar would print nothing until the end, so plain progress lines
    are printed instead (see `LogProgress`).
    """
    progress: Progress
    if err.is_terminal and not err.is_dumb_terminal:
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(compact=True),
            TextColumn(
                "{task.fields[status]}",
                table_column=Column(ratio=1, no_wrap=False, overflow="fold"),
            ),
            console=err,
            transient=transient,
        )
    else:
        progress = LogProgress(console=err)
    with progress:
        yield progress


StepOpt = Annotated[
    int | None,
    typer.Option(
        "--step",
        min=1,
        help="FFN width step, for families whose widths are multiples of one (e.g. Gemma 3n; "
        "default: from the checkpoint). Other families refuse it.",
    ),
]


def print_eval_result(result: dict[str, Any]) -> None:
    """The table of `mnm eval` (both families) from its JSON result.

    Short headers keep it within 80 columns even with Gemma's 10-digit parameter counts;
    the caption says what the loss was measured on and what predicted the latency.
    """
    notes = [f"loss: {loss_label(result.get('data'), result.get('n_tokens'))}"]
    columns = ["loss", "ppl", "params"]
    cells = [f"{result['loss']:.4f}", f"{result['perplexity']:.3f}", f"{result['params']:,}"]
    if "effective_params" in result:
        columns.append("effective")
        cells.append(f"{result['effective_params']:,}")
    columns += ["tokens", "eval s"]
    cells += [f"{result['n_tokens']:,}", f"{result['eval_seconds']:.2f}"]
    if "latency_ms" in result:
        columns.append("pred. ms")
        cells.append(f"{result['latency_ms']:.3f}")
        notes.append(f"pred. ms: latency on {result['latency_target']} predicted by the profile")
    table = Table(title=f"eval {result['widths_compact']}", caption="\n".join(notes))
    for column in columns:
        add_number_column(table, column)
    table.add_row(*cells)
    out.print(table)


def loss_label(data: str | None, n_tokens: int | None) -> str:
    """What a loss was measured on, e.g. `nats/token, bundled validation text, 8,192 tokens`.

    Losses are only comparable on the same text and the same number of tokens (the eval set
    is a prefix of the text, and the bundled text gets harder further in), so every loss
    shown names both. `data` is what results record: a path, or None for the bundled text.
    """
    text = data or "bundled validation text"
    tokens = f"{n_tokens:,} tokens" if n_tokens else "token count not recorded"
    return f"nats/token, {text}, {tokens}"


def add_number_column(table: Table, header: str, **options: Any) -> None:
    """A right-aligned column whose numbers wrap instead of being cut to `1.46…` when narrow."""
    table.add_column(header, justify="right", overflow="fold", **options)


PROGRESS_LOG_SHARE = 0.1  # without a terminal: a progress line every 10 % of a task ...
PROGRESS_LOG_SECONDS = 30.0  # ... or every 30 s, whichever comes first


class LogProgress(Progress):
    """`Progress` for logs: plain lines instead of a live bar that shows only at the end.

    Prints `description done/total (pct), elapsed, time left, status` each time a task
    passes another 10 % of its total or 30 s after its last line, and once more for any
    task that moved since its last line when the display stops.
    """

    def __init__(
        self,
        *,
        console: Console,
        every_share: float = PROGRESS_LOG_SHARE,
        every_seconds: float = PROGRESS_LOG_SECONDS,
        get_time: Callable[[], float] | None = None,
    ) -> None:
        # disabled: no live display at all, only the lines printed here
        super().__init__(console=console, disable=True, get_time=get_time)
        self.every_share = every_share
        self.every_seconds = every_seconds
        self._last: dict[TaskID, tuple[float, float]] = {}  # task -> (completed, time) logged
        # (completed, time) at a task's first update: the rate for "time left" counts only
        # work done since then, not a resumed run's earlier steps or the start-up time.
        self._base: dict[TaskID, tuple[float, float]] = {}

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        self._last[task_id] = (self._tasks[task_id].completed, self.get_time())
        return task_id

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._base.setdefault(task_id, (self._tasks[task_id].completed, self.get_time()))
        self._maybe_log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_log(task_id)

    def stop(self) -> None:
        super().stop()
        for task in self.tasks:
            if task.completed != self._last.get(task.id, (None, 0.0))[0]:
                self._log(task)

    def _maybe_log(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        last_completed, last_time = self._last[task_id]
        step = self.every_share * task.total if task.total else None
        due_by_share = step is not None and task.completed >= last_completed + step
        due_by_time = self.get_time() - last_time >= self.every_seconds
        if due_by_share or due_by_time:
            self._log(task)

    def _log(self, task: Task) -> None:
        now = self.get_time()
        self._last[task.id] = (task.completed, now)
        base_completed, base_time = self._base.get(task.id, (task.completed, now))
        left = None
        if task.total and base_completed < task.completed < task.total:
            rate = (task.completed - base_completed) / max(now - base_time, 1e-9)
            left = (task.total - task.completed) / rate
        line = progress_line(task, seconds_left=left)
        self.console.print(line, highlight=False, markup=False, soft_wrap=True)


def progress_line(task: Task, *, seconds_left: float | None = None) -> str:
    """`searching 30/100 (30%), 0:00:45 elapsed, ~0:01:45 left, <status>` for a log."""
    done = f"{task.completed:,.0f}"
    if task.total:
        done += f"/{task.total:,.0f} ({task.completed / task.total:.0%})"
    parts = [f"{task.description} {done}", f"{_clock(task.elapsed or 0.0)} elapsed"]
    if seconds_left is not None:
        parts.append(f"~{_clock(seconds_left)} left")
    status = str(task.fields.get("status") or "").strip()
    if status:
        parts.append(status)
    return ", ".join(parts)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
