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

import errno
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mnm_search.errors import CheckpointError, OverlapError


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


def pid_alive(pid: int) -> bool:
    """Whether process PID (on this machine) is still running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:  # a killed child that nobody reaped yet is a zombie: dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove hidden `.NAME.tmp-PID-*` / `.NAME.old-PID-*` siblings of PATH left by dead writers."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:tmp|old)-(\d+)-")
    removed = []
    if not path.parent.is_dir():
        return removed
    for sibling in path.parent.iterdir():
        match = pattern.match(sibling.name)
        if match is None or pid_alive(int(match.group(1))):
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
    _make_parents(path)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path, "tmp"), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _with_filename(exc, path) from exc
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
    _make_parents(out)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "tmp"), dir=out.parent))
    try:
        os.chmod(tmp, _dir_mode())
        try:
            yield tmp
        except OSError as exc:
            # `write()` errors (disk full) name no file; the user knows OUT, not TMP.
            raise _with_filename(exc, out) from exc
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


def _make_parents(path: Path) -> None:
    """Create PATH's missing parent directories."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        # A file where a directory is needed (`--out notes.txt/x`): EEXIST would read as
        # "already exists; pass --force", which cannot help.
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(path)) from exc


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


def _with_filename(exc: OSError, path: Path) -> OSError:
    """EXC itself if it names a file, else the same error (same subclass) naming PATH."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))


# ---------------------------------------------------------------------------------------------
# What went wrong, in words a user can act on

_TEMPORARY_PART = re.compile(r"(^|/)\.([^/]+)\.(?:tmp|old)-\d+-[A-Za-z0-9_]+(?=/|$)")

# errno -> (what happened, with {file}; what to do)
_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("disk full while writing {file}", "free space or choose another --out"),
    errno.EDQUOT: (
        "disk quota exceeded while writing {file}",
        "free space or choose another --out",
    ),
    errno.EFBIG: (
        "{file} grew past the largest file allowed here (file system or `ulimit -f`)",
        "raise the limit or choose another --out",
    ),
    errno.EROFS: ("{file} is on a read-only file system", "choose another --out"),
    errno.EACCES: ("permission denied for {file}", "fix its permissions or choose another path"),
    errno.EPERM: (
        "operation not permitted on {file}",
        "fix its permissions or choose another path",
    ),
    errno.ENOENT: ("{file} does not exist", "check the path"),
    errno.ENOTDIR: ("a part of {file} is a file, not a directory", "choose another path"),
    errno.EISDIR: ("{file} is a directory where a file was expected", "pass a file"),
    errno.EEXIST: ("{file} already exists", "choose another path or pass --force"),
    errno.ENAMETOOLONG: ("the path {file} is too long", "choose a shorter path"),
    errno.EMFILE: ("too many open files while opening {file}", "raise `ulimit -n`"),
    errno.ENOMEM: ("out of memory while accessing {file}", "free memory or use a smaller model"),
    errno.EIO: ("input/output error on {file}", "check the disk (dmesg) and try again"),
}


def user_path(filename: str | os.PathLike[str]) -> str:
    """FILENAME with the hidden temporary directory of an atomic write replaced by its target
    (`out/.x.tmp-42-ab/model.safetensors` -> `out/x/model.safetensors`)."""
    return _TEMPORARY_PART.sub(r"\1\2", os.fspath(filename))


def describe_os_error(exc: OSError, path: str | os.PathLike[str] | None = None) -> str:
    """One sentence naming the file and the fix, e.g. `disk full while writing X: free space
    or choose another --out`. PATH names the file when EXC does not."""
    name = exc.filename if exc.filename is not None else path
    file = user_path(name) if name is not None else "a file"
    if exc.filename2 is not None:
        file += f" -> {user_path(exc.filename2)}"
    known = _OS_ERRORS.get(exc.errno) if exc.errno is not None else None
    if known is not None:
        what, fix = known
        return f"{what.format(file=file)}: {fix}"
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason} ({file}): check the path and the disk"


_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")


def describe_safetensors_error(exc: Exception, path: str | os.PathLike[str]) -> str:
    """A `SafetensorError` as one sentence naming PATH: safetensors reports I/O failures
    (disk full) as text such as `I/O error: No space left on device (os error 28)`."""
    found = _OS_ERROR_IN_TEXT.search(str(exc))
    if found is not None:
        code = int(found.group(1))
        return describe_os_error(OSError(code, os.strerror(code), os.fspath(path)))
    return f"{user_path(path)}: {exc}"


# ---------------------------------------------------------------------------------------------
# Outputs that would destroy inputs


def refuse_overlap(
    out: str | os.PathLike[str],
    inputs: Mapping[str, str | os.PathLike[str] | None],
    *,
    option: str = "--out",
) -> None:
    """Raise `OverlapError` if writing OUT could destroy or alter one of INPUTS.

    `--force` replaces OUT whole, so OUT must not be an input, a directory holding one, or a
    place inside an input directory. INPUTS maps a description (`the checkpoint`, `--data`)
    to a path; None entries are skipped. Paths are compared resolved (symlinks, `..`, relative).
    """
    target = Path(out).resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if target == source or _same_file(target, source):
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents:
            relation = "is inside"
        else:
            continue
        raise OverlapError(
            f"{option} {out} {relation} {what} ({path}); writing there would destroy or "
            f"change it: choose an {option} outside it"
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


# ---------------------------------------------------------------------------------------------
# Strict JSON


def finite(data: Any) -> Any:
    """DATA with every NaN/inf float (in nested dicts, lists, tuples) replaced by None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(value) for value in data]
    return data


def json_text(data: Any, *, indent: int | None = 2) -> str:
    """Strict JSON (RFC 8259): non-finite floats become `null`, never `NaN`/`Infinity`,
    which `json.loads` accepts but strict parsers (jq, JavaScript, Go) reject."""
    return json.dumps(finite(data), indent=indent, allow_nan=False)
