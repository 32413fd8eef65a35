"""Atomic file and directory writes that respect the umask and clean up after killed runs.

Every file `mnm` writes (checkpoints, exports, profiles, results) is first written to a hidden
temporary sibling and renamed into place, so a reader never sees half a file. Two details matter
to users and are easy to get wrong with `tempfile`:

- `mkstemp`/`mkdtemp` create 0600/0700 entries; an export must be readable by the serving
  process like any file the user creates, so modes are reset to what the umask allows.
- A run killed with SIGKILL cannot remove its temporary sibling (for Gemma 3n, gigabytes).
  Names carry the writer's pid, and the next write to the same path removes siblings whose
  writer is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mnm_search.errors import CheckpointError


def current_umask() -> int:
    # os.umask can only be read by setting it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    return 0o666 & ~current_umask()


def _dir_mode() -> int:
    return 0o777 & ~current_umask()


def _temp_prefix(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove hidden `.NAME.tmp-PID-*` / `.NAME.old-PID-*` siblings of PATH left by dead writers."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:tmp|old)-(\d+)-")
    removed = []
    if not path.parent.is_dir():
        return removed
    for sibling in path.parent.iterdir():
        match = pattern.match(sibling.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        removed.append(sibling)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write DATA to PATH via a temporary sibling and a rename: old content or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path, "tmp"), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_directory(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes OUT only if the block succeeds.

    An interrupted or failed write leaves OUT untouched (old content or nothing); the
    temporary directory lives beside OUT (same file system, so the rename is atomic) and is
    removed on failure, or by the next write to OUT if this process is killed.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another path or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "tmp"), dir=out.parent))
    try:
        os.chmod(tmp, _dir_mode())
        yield tmp
        fix_modes(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "old"), dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fix_modes(directory: Path) -> None:
    """Give DIRECTORY's tree the modes the umask allows (libraries may create 0600 files)."""
    file_mode, dir_mode = _file_mode(), _dir_mode()
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                os.chmod(full, file_mode)
