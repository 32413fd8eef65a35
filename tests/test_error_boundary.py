"""The CLI's one error boundary: every failure is one redacted line and a non-zero exit.

No traceback reaches the user unless `mnm --debug`: library errors, OS errors (disk full,
read-only, permissions), corrupt files, third-party errors, out of memory and interruptions
each become one line naming the file and the fix; anything else is an "internal error".
"""

from __future__ import annotations

import errno
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_process import start, temporaries
from safetensors import SafetensorError
from typer.testing import CliRunner

from mnm_search import _files
from mnm_search.cli import _common, app
from mnm_search.cli._common import print_json, user_errors
from mnm_search.errors import ConfigError, Terminated

COMMANDS = [
    "info",
    "eval",
    "profile",
    "search",
    "pareto",
    "export",
    "train",
    "matformerize",
    "speculate",
    "demo",
]
PASSWORD = "s3cr3t-Pw"
STORAGE = f"postgresql://alice:{PASSWORD}@db.example:5432/mnm"


def _invoke(args: list[str]) -> Any:
    return CliRunner().invoke(app, args)


def _assert_one_line(result: Any, code: int, *fragments: str) -> str:
    """Exit CODE, nothing on stdout, one line on stderr holding FRAGMENTS, no traceback."""
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _raiser(exc: BaseException) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return fail


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_runs_inside_the_boundary(name: str) -> None:
    commands = {info.name: info.callback for info in app.registered_commands}
    assert set(commands) == set(COMMANDS)  # a new command must be added here, and wrapped
    wrapped_code = user_errors(lambda: None).__code__
    assert commands[name].__code__ is wrapped_code  # type: ignore[union-attr]


def _sqlalchemy_error() -> BaseException:
    from sqlalchemy.exc import OperationalError

    return OperationalError("SELECT 1", {}, Exception("connection refused\nis the server up?"))


def _optuna_error() -> BaseException:
    from optuna.exceptions import DuplicatedStudyError

    return DuplicatedStudyError("Another study with name 'x' already exists.")


def _pandas_error() -> BaseException:
    from pandas.errors import EmptyDataError

    return EmptyDataError("No columns to parse from file")


def _yaml_error() -> BaseException:
    try:
        yaml.safe_load("device: [cpu")
    except yaml.YAMLError as exc:
        return exc
    raise AssertionError("yaml accepted a broken document")


CASES: list[tuple[str, Callable[[], BaseException], int, tuple[str, ...]]] = [
    (
        "disk-full",
        lambda: OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors"),
        1,
        ("disk full while writing /data/out/model.safetensors", "choose another --out"),
    ),
    (
        "read-only",
        lambda: OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"),
        1,
        ("/mnt/ro/out is on a read-only file system: choose another --out",),
    ),
    (
        "permission",
        lambda: PermissionError(errno.EACCES, "Permission denied", "/srv/out"),
        1,
        ("permission denied for /srv/out",),
    ),
    (
        "missing-file",
        lambda: FileNotFoundError(errno.ENOENT, "No such file", "/gone/config.json"),
        1,
        ("/gone/config.json does not exist",),
    ),
    (
        "temporary-named-as-target",
        lambda: OSError(errno.ENOSPC, "No space left", "/d/.out.tmp-123-ab_9/model.safetensors"),
        1,
        ("disk full while writing /d/out/model.safetensors",),
    ),
    (
        "safetensors",
        lambda: SafetensorError("Error while deserializing header: HeaderTooLarge"),
        1,
        ("safetensors file is corrupt", "HeaderTooLarge"),
    ),
    (
        "json",
        lambda: json.JSONDecodeError("Expecting value", '{"a": }', 6),
        1,
        ("not valid JSON (line 1, column 7: Expecting value)",),
    ),
    ("yaml", _yaml_error, 1, ("YAML file is invalid", "--target")),
    (
        "unicode",
        lambda: UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        1,
        ("not UTF-8 text (invalid start byte at byte 0)",),
    ),
    ("optuna", _optuna_error, 1, ("Optuna study failed", "already exists", "--study")),
    ("sqlalchemy", _sqlalchemy_error, 1, ("study database failed", "is the server up?")),
    ("pandas", _pandas_error, 1, ("CSV file is empty or malformed",)),
    ("memory", MemoryError, 1, ("out of memory",)),
    ("library-error", lambda: ConfigError("widths must be positive"), 1, ("widths must be",)),
    (
        "library-error-quoting-several-lines",
        lambda: ConfigError("x.json is corrupt (parser said:\n   bad token on line 2)"),
        1,
        ("x.json is corrupt (parser said: bad token on line 2)",),
    ),
    ("ctrl-c", KeyboardInterrupt, 130, ("Interrupted",)),
    ("sigterm", Terminated, 143, ("Terminated",)),
    (
        "bug",
        lambda: ValueError("boom"),
        1,
        ("internal error: ValueError: boom", "mnm --debug", "report it"),
    ),
    (
        "bug-multiline",
        lambda: AssertionError("first\nsecond"),
        1,
        ("internal error: AssertionError: first second",),
    ),
]


@pytest.mark.parametrize(
    ("make", "code", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_failures_become_one_line(
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[], BaseException],
    code: int,
    fragments: tuple[str, ...],
) -> None:
    monkeypatch.setattr("mnm_search.cli._core.load_family", _raiser(make()))
    line = _assert_one_line(_invoke(["info"]), code, *fragments)
    if code == 1:
        assert line.startswith("Error: ")


def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mnm_search.cli._core.load_family", _raiser(ValueError("boom")))
    result = _invoke(["--debug", "info"])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)


REDACTED = [
    ("url", lambda: RuntimeError(f"could not reach {STORAGE}")),
    ("bare-password", lambda: ConnectionError(f"auth failed: password {PASSWORD!r} rejected")),
    ("library-error", lambda: ConfigError(f"bad storage ?password={PASSWORD}")),
    ("os-error-filename", lambda: OSError(errno.ENOENT, "No such file", f"/run/{PASSWORD}.sock")),
    ("sqlalchemy", lambda: _sqlalchemy_with(f"FATAL: password for alice:{PASSWORD} wrong")),
]


def _sqlalchemy_with(message: str) -> BaseException:
    from sqlalchemy.exc import OperationalError

    return OperationalError("connect", {}, Exception(message))


@pytest.mark.parametrize("make", [r[1] for r in REDACTED], ids=[r[0] for r in REDACTED])
def test_passwords_never_reach_the_terminal(
    monkeypatch: pytest.MonkeyPatch, make: Callable[[], BaseException]
) -> None:
    monkeypatch.setattr("mnm_search.cli._search.load_family", _raiser(make()))
    result = _invoke(["search", "--storage", STORAGE, "--trials", "1"])
    line = _assert_one_line(result, 1, "***")
    assert PASSWORD not in result.output and PASSWORD not in line


def test_passwords_on_the_real_command_line_are_masked_everywhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The secret is only in sys.argv (as for `mnm` run from a shell), not in any parameter.
    monkeypatch.setattr(sys, "argv", ["mnm", "search", "--storage", STORAGE])
    monkeypatch.setattr(
        "mnm_search.cli._core.load_family", _raiser(RuntimeError(f"saw {PASSWORD} in it"))
    )
    line = _assert_one_line(_invoke(["info"]), 1, "internal error", "***")
    assert PASSWORD not in line


# ------------------------------------------------------------------------ real write failures


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    target = "device: cpu\nphase: prefill\nseq_len: 8\nrepeats: 3\nwarmup: 0\n"
    (tmp_path / "tiny.yaml").write_text(target)
    return tmp_path


def _enospc(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file


def _safetensors_enospc(*args: Any, **kwargs: Any) -> None:
    raise SafetensorError("Error while serializing: I/O error: No space left (os error 28)")


def _mkdtemp(code: int) -> Callable[..., str]:
    def fail(*args: Any, dir: Any = None, **kwargs: Any) -> str:
        raise OSError(code, "refused", str(dir))

    return fail


WRITE_FAILURES = [
    ("enospc-write", "mnm_search.checkpoint.save_file", _enospc, "disk full while writing"),
    (
        "enospc-safetensors",
        "mnm_search.checkpoint.save_file",
        _safetensors_enospc,
        "disk full while writing {out}/model.safetensors: free space or choose another --out",
    ),
    (
        "erofs",
        "mnm_search._files.tempfile.mkdtemp",
        _mkdtemp(errno.EROFS),
        "{parent} is on a read-only file system: choose another --out",
    ),
    (
        "eacces",
        "mnm_search._files.tempfile.mkdtemp",
        _mkdtemp(errno.EACCES),
        "permission denied for {parent}",
    ),
]


@pytest.mark.parametrize(
    ("site", "fail", "expected"),
    [w[1:] for w in WRITE_FAILURES],
    ids=[w[0] for w in WRITE_FAILURES],
)
def test_export_write_failures_name_the_file_and_the_fix(
    workdir: Path,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    site: str,
    fail: Callable[..., Any],
    expected: str,
) -> None:
    monkeypatch.setattr(site, fail)
    out = workdir / "exports" / "small"
    args = ["export", str(tiny_checkpoint), "--widths", "S,M,L", "--out", str(out)]
    line = _assert_one_line(_invoke(args), 1, "Error: ", "nothing was written")
    assert expected.format(out=out, parent=out.parent) in line
    assert not out.exists() and temporaries(out) == []


def test_out_under_a_file_is_not_reported_as_existing(workdir: Path, tiny_checkpoint: Path) -> None:
    (workdir / "notes.txt").write_text("mine")
    args = ["export", str(tiny_checkpoint), "--widths", "S,M,L", "--out", "notes.txt/x"]
    _assert_one_line(_invoke(args), 1, "a part of notes.txt/x is a file, not a directory")
    assert (workdir / "notes.txt").read_text() == "mine"


def test_file_size_limit_in_a_real_process(workdir: Path, tiny_checkpoint: Path) -> None:
    """`ulimit -f` makes the kernel refuse the weights half-way (EFBIG), as a full disk would."""
    out = workdir / "exports" / "small"
    args = ["export", str(tiny_checkpoint), "--widths", "S,M,L", "--out", str(out)]
    child = start(args, cwd=workdir, file_size_limit=64 * 1024)  # the weights are ~136 kB
    assert child.wait() == 1, child.errors
    lines = child.errors.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in child.errors, child.errors
    assert f"{out}/model.safetensors grew past the largest file allowed" in lines[0]
    assert not out.exists() and temporaries(out) == []


# ----------------------------------------------------------------------------- strict JSON


def _strict(text: str) -> Any:
    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"loss": math.nan}, {"loss": None}),
        ({"a": [math.inf, 1.5, {"b": -math.inf}]}, {"a": [None, 1.5, {"b": None}]}),
        ({"t": (1.0, math.nan), "s": "NaN"}, {"t": [1.0, None], "s": "NaN"}),
    ],
)
def test_json_output_is_strict(
    capsys: pytest.CaptureFixture[str], data: dict[str, Any], expected: dict[str, Any]
) -> None:
    print_json(data)
    assert _strict(capsys.readouterr().out) == expected


def test_eval_json_with_a_nan_loss_is_strict(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mnm_search.evaluator.evaluate_loss", lambda *a, **k: math.nan)
    result = _invoke(["eval", str(tiny_checkpoint), "--widths", "S,M,L", "--json"])
    assert result.exit_code == 0, result.output
    assert _strict(result.stdout)["loss"] is None


def test_describe_os_error_without_a_file_still_reads() -> None:
    message = _files.describe_os_error(OSError(errno.ENOSPC, "No space left on device"))
    assert message == "disk full while writing a file: free space or choose another --out"
    assert _common.describe_exception(BrokenPipeError(errno.EPIPE, "Broken pipe"))[1] == 1


@pytest.mark.parametrize(
    ("raised", "code", "line"),
    [
        (KeyboardInterrupt(), 130, "Interrupted."),
        (SystemExit(0), 0, None),
        (SystemExit(2), 2, None),
    ],
)
def test_main_ends_cleanly_and_then_ignores_signals(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    raised: BaseException,
    code: int,
    line: str | None,
) -> None:
    """Ctrl-C outside a command's boundary (typer exiting) is one line, not a traceback; once
    the command is over, a late signal cannot turn its exit into "killed by signal"."""
    import signal

    import mnm_search.cli as cli

    handlers: dict[int, Any] = {}
    monkeypatch.setattr(signal, "signal", lambda sig, handler: handlers.__setitem__(sig, handler))

    def fake_app() -> None:
        raise raised

    monkeypatch.setattr(cli, "app", fake_app)
    try:
        cli.main()
    except SystemExit as exc:
        assert exc.code == code
    except BaseException as exc:  # a KeyboardInterrupt here would stop the whole test run
        pytest.fail(f"main() let {exc!r} escape")
    else:
        pytest.fail("main() returned without an exit status")
    assert capsys.readouterr().err.strip() == (line or "")
    assert handlers == {signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN}


def test_usage_errors_inside_a_command_are_typers_to_print() -> None:
    """The boundary passes typer's own usage errors through (exit 2 with typer's message),
    recognised by typer's public `TyperException`, not by a private click import."""
    import typer

    small = typer.Typer()

    @small.command()
    @user_errors
    def check(value: int = 0) -> None:
        raise typer.BadParameter(f"{value} is not allowed", param_hint="--value")

    result = CliRunner().invoke(small, ["--value", "3"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for --value: 3 is not allowed" in " ".join(result.output.split())
    cli_dir = Path(_common.__file__).parent
    for module in cli_dir.glob("*.py"):
        assert "._click" not in module.read_text(), module  # typer's private copy of click


def test_debug_applies_to_one_invocation_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mnm_search.cli._core.load_family", _raiser(ValueError("boom")))
    assert isinstance(_invoke(["--debug", "info"]).exception, ValueError)
    _assert_one_line(_invoke(["info"]), 1, "internal error", "boom")
