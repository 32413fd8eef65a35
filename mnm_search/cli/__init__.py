"""The `mnm` command line: a thin typer app; each command lives in a `_*.py` module here."""

from __future__ import annotations

from typing import Annotated

import typer

from mnm_search.cli import _core, _demo, _export, _pareto, _profile, _search

app = typer.Typer(
    name="mnm",
    help="Find the best Mix'n'Match submodel of a MatFormer checkpoint for your hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    ctx.obj = {"debug": debug}


app.command(name="info")(_core.info)
app.command(name="eval")(_core.eval_command)
app.command(name="profile")(_profile.profile)
app.command(name="search")(_search.search)
app.command(name="pareto")(_pareto.pareto)
app.command(name="export")(_export.export)
app.command(name="train")(_core.train)
app.command(name="demo")(_demo.demo)


def main() -> None:
    """The `mnm` entry point: the app, with SIGTERM handled like Ctrl-C.

    SIGTERM's default action kills the process on the spot, leaving `finally` blocks unrun
    and an export's hidden temporary directory behind (gigabytes for Gemma 3n). Raising
    `Terminated` instead unwinds normally; the commands' error boundary then exits 143.
    """
    import signal

    from mnm_search.errors import Terminated

    def on_sigterm(signum: int, frame: object) -> None:
        # Once is enough: a second SIGTERM must not interrupt the cleanup the first started.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        app()
    except Terminated:  # arrived outside a command (while parsing): nothing to clean up
        typer.echo("Terminated (SIGTERM).", err=True)
        raise SystemExit(143) from None
