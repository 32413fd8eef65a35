"""Exports never destroy their inputs, never leave partial or leaked directories, and get
ordinary file modes.

- `--out` overlapping the checkpoint, the results directory or an input file is refused,
  with or without `--force`, however the path is spelled (symlinks, `..`, relative).
- An export killed at any moment (SIGKILL, Ctrl-C, SIGTERM) leaves `--out` absent or
  complete; Ctrl-C and SIGTERM remove the hidden temporary at once, and the next export to
  the same `--out` removes a SIGKILLed one. Nothing is written to $TMPDIR.
- Files are 0644 and directories 0755 under umask 022 (tempfile would give 0600/0700).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_process import start, temporaries, wait_until
from test_export_cli import write_results
from typer.testing import CliRunner

from mnm_search._files import refuse_overlap
from mnm_search.cli import app
from mnm_search.errors import OverlapError
from mnm_search.export import Member, export_front, export_submodel
from mnm_search.families import load_family

FAST_TARGET = "device: cpu\nphase: prefill\nseq_len: 8\nrepeats: 3\nwarmup: 0\n"
# Timing thousands of repeats keeps an export inside its temporary directory for seconds,
# so that a kill reliably lands there.
SLOW_TARGET = "device: cpu\nphase: prefill\nseq_len: 8\nrepeats: 4000\nwarmup: 0\n"
NATIVE_FILES = {"config.json", "model.safetensors", "README.md"}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fast.yaml").write_text(FAST_TARGET)
    (tmp_path / "slow.yaml").write_text(SLOW_TARGET)
    return tmp_path


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _invoke(args: list[str]) -> Any:
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output
    return result


def _tree_digest(path: Path) -> str:
    """Names and contents of every file under PATH (to prove an input was left alone)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        digest.update(str(file.relative_to(path.parent)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


# -------------------------------------------------------------------------------- overlap

# (case, extra arguments, --out, the input named in the refusal)
OVERLAPS = [
    ("checkpoint", [], "tiny-ckpt", "is the checkpoint"),
    ("checkpoint-absolute", [], "{workdir}/tiny-ckpt", "is the checkpoint"),
    ("checkpoint-dotdot", [], "inputs/../tiny-ckpt", "is the checkpoint"),
    ("checkpoint-symlink", [], "link-to-ckpt", "is the checkpoint"),
    ("checkpoint-parent", [], ".", "contains the checkpoint"),
    ("inside-checkpoint", [], "tiny-ckpt/export", "is inside the checkpoint"),
    ("results", ["--from", "res", "--trial", "1"], "res", "is the --from results directory"),
    ("inside-results", ["--from", "res", "--trial", "1"], "res/best", "is inside the --from"),
    ("results-symlink", ["--from", "link-to-res", "--all-pareto"], "res", "is the --from"),
    ("profile-parent", ["--profile", "inputs/p.json"], "inputs", "contains the --profile file"),
    ("data-file", ["--data", "inputs/eval.txt"], "inputs/eval.txt", "is the --data text"),
    ("data-parent", ["--data", "inputs/eval.txt"], "inputs", "contains the --data text"),
    ("target-parent", ["--target", "inputs/t.yaml"], "inputs", "contains the --target file"),
]


@pytest.mark.parametrize(
    ("extra", "out", "relation"), [o[1:] for o in OVERLAPS], ids=[o[0] for o in OVERLAPS]
)
@pytest.mark.parametrize("force", [True, False], ids=["force", "no-force"])
def test_export_refuses_to_overwrite_its_inputs(
    workdir: Path, tiny_checkpoint: Path, extra: list[str], out: str, relation: str, force: bool
) -> None:
    write_results(workdir / "res", tiny_checkpoint)
    inputs = workdir / "inputs"
    inputs.mkdir()
    (inputs / "p.json").write_text("{}")
    (inputs / "eval.txt").write_text("some text to evaluate on " * 20)
    (inputs / "t.yaml").write_text(FAST_TARGET)
    (workdir / "link-to-ckpt").symlink_to(tiny_checkpoint)
    (workdir / "link-to-res").symlink_to(workdir / "res")
    before = {p: _tree_digest(p) for p in (tiny_checkpoint, workdir / "res", inputs)}
    source = [] if "--from" in extra else [str(tiny_checkpoint), "--widths", "S,M,L"]
    out = out.format(workdir=workdir)
    args = ["export", *source, *extra, "--out", out, *(["--force"] if force else [])]
    result = _invoke(args)
    assert result.exit_code == 1, result.output
    assert f"--out {out} {relation}" in result.stderr
    assert "choose an --out outside it" in result.stderr
    assert {p: _tree_digest(p) for p in before} == before
    assert not (tiny_checkpoint / "export").exists() and not (workdir / "res" / "best").exists()


@pytest.mark.parametrize(
    ("out", "inputs", "refused"),
    [
        ("a/ckpt2", {"ckpt": "a/ckpt"}, False),  # a sibling sharing a prefix is not inside
        ("a/ckpt-export", {"ckpt": "a/ckpt"}, False),
        ("b", {"ckpt": "a/ckpt", "data": None}, False),
        ("a/./ckpt/", {"ckpt": "a/ckpt"}, True),
        ("a", {"data": "a/deep/er/text.txt"}, True),
        ("a/ckpt/x/y", {"ckpt": "a/ckpt"}, True),
    ],
)
def test_refuse_overlap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str, inputs: dict, refused: bool
) -> None:
    monkeypatch.chdir(tmp_path)
    if refused:
        with pytest.raises(OverlapError):
            refuse_overlap(out, inputs)
    else:
        refuse_overlap(out, inputs)


def test_library_export_refuses_its_source_checkpoint(tiny_checkpoint: Path) -> None:
    checkpoint = load_family(tiny_checkpoint)
    before = _tree_digest(tiny_checkpoint)
    for out in (tiny_checkpoint, tiny_checkpoint.parent):
        with pytest.raises(OverlapError, match="the source checkpoint"):
            export_submodel(checkpoint, [8, 8, 8], out, overwrite=True)
        with pytest.raises(OverlapError, match="the source checkpoint"):
            export_front(checkpoint, [Member([8, 8, 8], trial=0)], out, overwrite=True)
    assert _tree_digest(tiny_checkpoint) == before


# ---------------------------------------------------------------------------------- kills


def _assert_absent_or_complete(out: Path, files: set[str]) -> None:
    if out.exists():
        assert files <= {p.name for p in out.iterdir()}, sorted(out.iterdir())


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# (case, what is exported, signal, when: "start" = 0.3 s after starting, "temp" = once the
#  temporary exists; then extra seconds, exit code expected when the signal lands in time)
KILLS = [
    ("sigkill-at-start", "widths", signal.SIGKILL, "start", 0.0, -signal.SIGKILL),
    ("sigkill-in-temp", "widths", signal.SIGKILL, "temp", 0.0, -signal.SIGKILL),
    ("sigkill-later", "widths", signal.SIGKILL, "temp", 0.8, -signal.SIGKILL),
    ("sigint-in-temp", "widths", signal.SIGINT, "temp", 0.0, 130),
    ("sigint-later", "widths", signal.SIGINT, "temp", 0.8, 130),
    ("sigterm-at-start", "widths", signal.SIGTERM, "start", 0.0, 143),
    ("sigterm-in-temp", "widths", signal.SIGTERM, "temp", 0.3, 143),
    ("sigkill-front", "front", signal.SIGKILL, "temp", 0.5, -signal.SIGKILL),
    ("sigterm-front", "front", signal.SIGTERM, "temp", 0.5, 143),
    ("sigkill-over-old", "force", signal.SIGKILL, "temp", 0.3, -signal.SIGKILL),
    ("sigint-over-old", "force", signal.SIGINT, "temp", 0.3, 130),
]


@pytest.mark.parametrize(
    ("what", "sig", "when", "delay", "code"), [k[1:] for k in KILLS], ids=[k[0] for k in KILLS]
)
def test_killed_export_leaves_nothing_partial(
    workdir: Path,
    tiny_checkpoint: Path,
    what: str,
    sig: int,
    when: str,
    delay: float,
    code: int,
) -> None:
    out = workdir / "exports" / "small"
    args = ["export", str(tiny_checkpoint), "--widths", "S,M,L", "--out", str(out)]
    expected = NATIVE_FILES
    old = None
    if what == "front":
        write_results(workdir / "res", tiny_checkpoint)
        args = ["export", "--from", "res", "--all-pareto", "--out", str(out)]
        expected = {"front.csv", "trial-0000"}
    elif what == "force":  # an earlier export that a killed --force must leave as it was
        result = _invoke([*args, "--target", "fast.yaml", "--max-tokens", "64"])
        assert result.exit_code == 0, result.output
        old = _tree_digest(out)
        args.append("--force")
    child = start([*args, "--target", "slow.yaml"], cwd=workdir, tmpdir=workdir / "tmpdir")
    if when == "temp":
        wait_until(lambda: bool(temporaries(out)) or not child.process.is_alive())
    else:
        time.sleep(0.3)
    assert child.process.is_alive(), child.errors  # the slow target keeps it exporting
    time.sleep(delay)
    os.kill(child.pid, sig)
    assert child.wait() == code, child.errors
    # Killed before the rename: --out is absent, or the earlier export untouched.
    assert (_tree_digest(out) == old) if old is not None else not out.exists()
    # Library caches may appear in $TMPDIR (torchinductor_root/, empty); weights never.
    assert _bytes_under(workdir / "tmpdir") < 1024
    if sig == signal.SIGKILL:
        # No chance to clean up: the next export to the same --out does.
        result = _invoke([*args, "--target", "fast.yaml", "--max-tokens", "64", "--force"])
        assert result.exit_code == 0, result.output
        assert out.exists()
        _assert_absent_or_complete(out, expected)
    else:
        lines = child.errors.strip().splitlines()
        assert "Traceback" not in child.errors
        assert ("Interrupted" if sig == signal.SIGINT else "Terminated") in lines[-1]
    assert temporaries(out) == [] and list(out.parent.glob(".*tmp*")) == []


def test_killed_gemma3n_export_is_cleaned_by_the_next(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, umask_022: None
) -> None:
    pytest.importorskip("transformers")
    from gemma3n_models import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(workdir / "gemma3n-tiny")
    out = workdir / "exports" / "small"
    args = ["export", str(ckpt), "--widths", "128*6", "--out", str(out)]
    args += ["--target", "fast.yaml", "--max-tokens", "64"]
    child = start(args, cwd=workdir, tmpdir=workdir / "tmpdir")
    wait_until(lambda: bool(temporaries(out)) or not child.process.is_alive())
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    _assert_absent_or_complete(out, {"config.json", "mnm.json", "README.md"})
    assert _bytes_under(workdir / "tmpdir") < 1024

    # The next export cleans up; a NaN loss is recorded as null (strict JSON).
    monkeypatch.setattr("mnm_search.export.evaluate_configuration", lambda *a, **k: math.nan)
    result = _invoke([*args, "--force", "--json"])
    assert result.exit_code == 0, result.output
    assert temporaries(out) == [] and list(out.parent.glob(".*tmp*")) == []
    info = _strict_json(out / "mnm.json")
    assert info["quality"]["loss"] is None and "nan" in info["quality"]["not_measured"]
    _assert_modes(out)


# ---------------------------------------------------------------------------------- modes


def _assert_modes(root: Path, file_mode: int = 0o644, dir_mode: int = 0o755) -> None:
    assert stat.S_IMODE(root.stat().st_mode) == dir_mode
    for path in root.rglob("*"):
        expected = dir_mode if path.is_dir() else file_mode
        assert stat.S_IMODE(path.stat().st_mode) == expected, f"{path}: {oct(path.stat().st_mode)}"


def test_native_exports_get_ordinary_modes(
    workdir: Path, tiny_checkpoint: Path, umask_022: None
) -> None:
    args = ["export", str(tiny_checkpoint), "--widths", "S,M,L", "--out", "single"]
    result = _invoke([*args, "--target", "fast.yaml", "--max-tokens", "64"])
    assert result.exit_code == 0, result.output
    _assert_modes(workdir / "single")
    checkpoint = load_family(tiny_checkpoint)
    members = [Member([8, 8, 8], trial=3), Member([64, 64, 64], trial=7)]
    export_front(checkpoint, members, workdir / "front")
    _assert_modes(workdir / "front")
    assert {"front.csv", "trial-0003", "trial-0007"} <= {
        p.name for p in (workdir / "front").iterdir()
    }


def test_modes_follow_a_stricter_umask(tiny_checkpoint: Path, tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        export_submodel(load_family(tiny_checkpoint), [8, 8, 8], tmp_path / "x")
    finally:
        os.umask(old)
    _assert_modes(tmp_path / "x", 0o640, 0o750)


# ----------------------------------------------------------------------------- strict JSON


def _strict_json(path: Path) -> Any:
    def refuse(name: str) -> None:
        raise AssertionError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_nan_measurements_are_null_in_the_files(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mnm_search.data import load_eval_set

    monkeypatch.setattr("mnm_search.export.evaluate_loss", lambda *a, **k: math.nan)
    checkpoint = load_family(tiny_checkpoint)
    eval_set = load_eval_set(None, seq_len=checkpoint.eval_seq_len, max_tokens=64)
    member = Member([8, 8, 8], trial=0, predicted_ms=math.inf, search_loss=math.nan)
    export_submodel(checkpoint, member, tmp_path / "x", eval_set=eval_set)
    config = _strict_json(tmp_path / "x" / "config.json")
    assert config["quality"]["loss"] is None and config["quality"]["perplexity"] is None
    assert config["quality"]["search_loss"] is None
    assert config["latency"]["predicted_ms"] is None
    card = (tmp_path / "x" / "README.md").read_text()
    assert re.search(r"\b(nan|inf)\b", card, re.IGNORECASE) is None, card
