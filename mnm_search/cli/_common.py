"""Shared pieces of the command line: consoles, error handling, progress, common options.

Library functions raise `MnmError`; `user_errors` turns them into one clear message and a
non-zero exit (a traceback only with `mnm --debug ...`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mnm_search.errors import MnmError

try:  # typer >= 0.29 ships its own copy of click
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import get_current_context

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


def user_errors(func: F) -> F:
    """Run a command; print library errors as one paragraph and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = get_current_context()
        debug = bool((ctx.find_root().obj or {}).get("debug"))
        try:
            return func(*args, **kwargs)
        except MnmError as exc:
            if debug:
                raise
            err.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            if debug:
                raise
            err.print("[yellow]Interrupted.[/]")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: dict[str, Any]) -> None:
    typer.echo(json.dumps(data, indent=2))


@contextmanager
def progress_bar(*, transient: bool = True) -> Iterator[Progress]:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=err,
        transient=transient,
    )
    with progress:
        yield progress


StepOpt = Annotated[
    int | None,
    typer.Option(
        "--step",
        min=1,
        help="Gemma 3n only: FFN width granularity (default: from the checkpoint, 2048 for E4B).",
    ),
]


def family_of(ckpt: Path | None) -> str:
    """The model family of CKPT: `matlm` (also the embedded default) or `gemma3n`."""
    from mnm_search.families import NATIVE, detect_family

    return NATIVE if ckpt is None else detect_family(ckpt)


def refuse_step(step: int | None) -> None:
    if step is not None:
        raise MnmError(
            "--step applies to Gemma 3n checkpoints only; a native checkpoint's widths are its "
            "trained granularities (see mnm info)"
        )


def print_eval_result(result: dict[str, Any]) -> None:
    """The table of `mnm eval` (both families) from its JSON result."""
    table = Table(title=f"eval {result['widths_compact']}")
    columns = ["loss (nats/token)", "perplexity", "params"]
    cells = [f"{result['loss']:.4f}", f"{result['perplexity']:.3f}", f"{result['params']:,}"]
    if "effective_params" in result:
        columns.append("effective")
        cells.append(f"{result['effective_params']:,}")
    columns += ["tokens", "seconds"]
    cells += [f"{result['n_tokens']:,}", f"{result['eval_seconds']:.2f}"]
    if "latency_ms" in result:
        columns.append(f"latency ms ({result['latency_target']}, predicted)")
        cells.append(f"{result['latency_ms']:.3f}")
    for column in columns:
        table.add_column(column, justify="right")
    table.add_row(*cells)
    out.print(table)
