"""Atomic writes: modes follow the umask, failures leave old content, killed writers are cleaned."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mnm_search._files import (
    atomic_directory,
    atomic_write_text,
    current_umask,
    remove_stale_temporaries,
)
from mnm_search.errors import CheckpointError


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("mask", "file_mode", "dir_mode"),
    [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)],
)
def test_modes_follow_the_umask(tmp_path: Path, mask: int, file_mode: int, dir_mode: int) -> None:
    old = os.umask(mask)
    try:
        assert current_umask() == mask
        text = atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_directory(tmp_path / "export") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            fd = os.open(tmp / "sub" / "weights", os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
    finally:
        os.umask(old)
    assert _mode(text) == file_mode
    assert _mode(tmp_path / "export") == dir_mode
    assert _mode(tmp_path / "export" / "sub") == dir_mode
    assert _mode(tmp_path / "export" / "sub" / "weights") == file_mode


def test_failed_directory_write_keeps_the_old_one(tmp_path: Path, umask_022: None) -> None:
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
        raise RuntimeError("boom")
    assert (out / "v").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(CheckpointError, match=r"already exists.*--force"), atomic_directory(out):
        pass


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout)


@pytest.mark.parametrize("kind", ["tmp", "old"])
def test_temporaries_of_killed_writers_are_removed_by_the_next_write(
    tmp_path: Path, kind: str
) -> None:
    out = tmp_path / "export"
    stale = tmp_path / f".export.{kind}-{_dead_pid()}-abc"
    (stale / "deep").mkdir(parents=True)
    (stale / "deep" / "model.safetensors").write_bytes(b"x" * 10)
    live = tmp_path / f".export.tmp-{os.getpid()}-live"  # a writer that is still running
    live.mkdir()
    other = tmp_path / f".exports.tmp-{_dead_pid()}-x"  # another output's temporary
    other.mkdir()
    with atomic_directory(out) as tmp:
        (tmp / "f").write_text("ok")
    assert not stale.exists()
    assert live.exists() and other.exists()
    assert remove_stale_temporaries(tmp_path / "exports") == [other]
