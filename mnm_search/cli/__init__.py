"""The `mnm` command line: a thin typer app; each command lives in a `_*.py` module here."""

from __future__ import annotations

import inspect
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from mnm_search.cli import (
    _core,
    _demo,
    _export,
    _matformerize,
    _pareto,
    _profile,
    _search,
    _speculate,
)
from mnm_search.cli._common import set_debug
from mnm_search.targets import shipped_target_names


def _without_flag_metavars(params: list[Any]) -> list[Any]:
    """Give boolean flags an empty metavar, so that help shows `--json`, not `--json <bool>`.

    typer 0.29's rich help prints every option's type, flags included, which reads as if
    they took a value (`mnm info --json true` then fails on the checkpoint "true"). Its plain
    help already leaves flags bare; an explicit metavar is what the rich one prints instead.
    """
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


def _with_shipped_targets(params: list[Any]) -> list[Any]:
    """Make every `--target` option's help name the shipped targets (usable by bare name),
    whichever module defines the option."""
    for param in params:
        if isinstance(param, TyperOption) and "--target" in param.opts:
            names = shipped_target_names()
            if names and not all(name in (param.help or "") for name in names):
                param.help = f"{(param.help or '').rstrip()} Shipped targets, usable by name: " + (
                    ", ".join(names) + "."
                )
    return params


def _reflow(text: str | None) -> str | None:
    """Join the line breaks inside each paragraph of a docstring.

    typer 0.29's rich help keeps them, so a docstring wrapped at 96 columns comes out ragged
    on an 80-column terminal. Paragraphs (blank-line separated) stay apart.
    """
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


class _Command(TyperCommand):
    """Every `mnm` command: bare flags and reflowed help (see the functions above)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = _reflow(self.help)

    def get_params(self, ctx: Any) -> list[Any]:
        return _with_shipped_targets(_without_flag_metavars(super().get_params(ctx)))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _without_flag_metavars(super().get_params(ctx))


app = typer.Typer(
    name="mnm",
    help="Find the best Mix'n'Match submodel of a MatFormer checkpoint for your hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    ctx.obj = {"debug": debug}
    set_debug(debug)


for _name, _function in {
    "info": _core.info,
    "eval": _core.eval_command,
    "profile": _profile.profile,
    "search": _search.search,
    "pareto": _pareto.pareto,
    "export": _export.export,
    "train": _core.train,
    "matformerize": _matformerize.matformerize,
    "speculate": _speculate.speculate,
    "demo": _demo.demo,
}.items():
    app.command(name=_name, cls=_Command)(_function)


def main() -> None:
    """The `mnm` entry point: the app, with SIGTERM handled like Ctrl-C.

    SIGTERM's default action kills the process on the spot, leaving `finally` blocks unrun
    and an export's hidden temporary directory behind (gigabytes for Gemma 3n). Raising
    `Terminated` instead unwinds normally; the commands' error boundary then exits 143.
    """
    import signal

    from mnm_search.errors import Terminated

    terminated = False

    def on_sigterm(signum: int, frame: object) -> None:
        nonlocal terminated
        terminated = True
        # Once is enough: a second SIGTERM must not interrupt the cleanup the first started.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        app()
    except (SystemExit, Terminated) as exc:
        # Inside a command the error boundary has said so and exits 143; earlier (while
        # typer builds the command line) typer turns any interruption into a silent 130.
        if terminated and getattr(exc, "code", None) != 143:
            typer.echo("Terminated (SIGTERM) before the command started.", err=True)
            raise SystemExit(143) from None
        raise
    except KeyboardInterrupt:  # Ctrl-C outside the commands' boundary, e.g. while typer exits
        typer.echo("Interrupted.", err=True)
        raise SystemExit(130) from None
    finally:
        # The command is over and its output complete: a signal during interpreter shutdown
        # would only turn a finished run into a "killed by signal" exit status.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
