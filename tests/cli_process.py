"""Run `mnm` in a child process, to kill it or to give it resource limits.

The child is forked from the test process and calls `mnm_search.cli.main()` (what `mnm` and
`python -m mnm_search` run), so it starts in milliseconds instead of importing torch again
(10-30 s on a loaded 2-core machine). Signals reach it as they would reach `mnm` in a
terminal: SIGINT raises KeyboardInterrupt, and `main()` installs the SIGTERM handler.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TEMPORARY = re.compile(r"^\..*\.(?:tmp|old)-\d+-")


@dataclass
class Child:
    process: multiprocessing.process.BaseProcess
    stdout: Path
    stderr: Path

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def wait(self, timeout: float = 120.0) -> int:
        """The exit code; -N when killed by signal N."""
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
            raise AssertionError(f"mnm did not finish within {timeout} s:\n{self.errors}")
        assert self.process.exitcode is not None
        return self.process.exitcode

    @property
    def errors(self) -> str:
        return self.stderr.read_text(errors="replace")

    @property
    def output(self) -> str:
        return self.stdout.read_text(errors="replace")


def _run(argv: list[str], cwd: Path, stdout: Path, stderr: Path, env: dict[str, str]) -> None:
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
    os.environ.update(env)
    tempfile.tempdir = None  # honour the child's TMPDIR
    # Ctrl-C as in a terminal: a test run in the background (`pytest &`) inherits SIGINT
    # ignored, and Python then never installs its handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if "MNM_TEST_FSIZE" in env:
        limit = int(env["MNM_TEST_FSIZE"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.argv = ["mnm", *argv]
    from mnm_search.cli import main

    main()


def start(
    argv: list[str],
    *,
    cwd: Path,
    tmpdir: Path | None = None,
    file_size_limit: int | None = None,
    name: str = "mnm",
) -> Child:
    """Start `mnm ARGV` in CWD (stdout/stderr to files there); TMPDIR and `ulimit -f` optional."""
    env: dict[str, str] = {}
    if tmpdir is not None:
        tmpdir.mkdir(exist_ok=True)
        env["TMPDIR"] = str(tmpdir)
    if file_size_limit is not None:
        env["MNM_TEST_FSIZE"] = str(file_size_limit)
    logs = cwd / f".{name}-logs"
    logs.mkdir(exist_ok=True)
    stdout, stderr = logs / "stdout.txt", logs / "stderr.txt"
    process = multiprocessing.get_context("fork").Process(
        target=_run, args=(argv, cwd, stdout, stderr, env), daemon=True
    )
    process.start()
    return Child(process, stdout, stderr)


def temporaries(out: Path) -> list[Path]:
    """Hidden `.OUT.tmp-*`/`.OUT.old-*` entries next to OUT (left by an unfinished write)."""
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if TEMPORARY.match(p.name))


def wait_until(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)
