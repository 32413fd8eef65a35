"""Outputs never overlap inputs: profile, search, train, pareto and demo refuse an output
that is, holds or lies inside what they read, before any work and without touching it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_pareto_cli import write_results
from typer.testing import CliRunner

from mnm_search import study
from mnm_search.cli import _demo, _profile, app
from mnm_search.errors import Terminated
from mnm_search.train import Trainer

TARGET = "device: cpu\nphase: prefill\nseq_len: 8\nrepeats: 3\nwarmup: 0\n"


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode() + file.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path) -> Path:
    """tiny-ckpt/, t.yaml, texts/t.txt and a results directory res/ searched on tiny-ckpt."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.yaml").write_text(TARGET)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "t.txt").write_text("some text to train on " * 200)
    (tmp_path / "notes.txt").write_text("mine")
    shutil.copytree(tiny_checkpoint, tmp_path / "copy")  # a checkpoint run.json does not name
    write_results(tmp_path / "res")
    info = json.loads((tmp_path / "res" / "run.json").read_text())
    info["checkpoint"] = str(tiny_checkpoint)
    (tmp_path / "res" / "run.json").write_text(json.dumps(info))

    def no_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the refusal must come before the work")

    monkeypatch.setattr(_profile, "profile_loaded", no_work)
    monkeypatch.setattr(study, "run_search", no_work)
    monkeypatch.setattr(Trainer, "run", no_work)
    return tmp_path


SEARCH = ["search", "tiny-ckpt", "--objectives", "loss,params", "--trials", "2"]
TRAIN = ["train", "--preset", "tiny", "--steps", "2"]

# (case, arguments, what the one-line error says)
REFUSALS = [
    (
        "profile-into-checkpoint",
        ["profile", "tiny-ckpt", "-t", "t.yaml", "--out", "tiny-ckpt/config.json"],
        "--out tiny-ckpt/config.json is inside the checkpoint",
    ),
    (
        "profile-over-target",
        ["profile", "tiny-ckpt", "-t", "t.yaml", "--out", "t.yaml"],
        "--out t.yaml is the --target file",
    ),
    (
        "profile-under-a-file",
        ["profile", "tiny-ckpt", "-t", "t.yaml", "--out", "notes.txt/p.json"],
        "a part of notes.txt/p.json is a file, not a directory",
    ),
    (
        "profile-to-a-directory",
        ["profile", "tiny-ckpt", "-t", "t.yaml", "--out", "texts"],
        "texts is a directory where a file was expected",
    ),
    (
        "search-into-checkpoint",
        [*SEARCH, "--out", "tiny-ckpt"],
        "--out tiny-ckpt is the checkpoint",
    ),
    ("search-around-checkpoint", [*SEARCH, "--out", "."], "--out . contains the checkpoint"),
    (
        "train-around-data",
        [*TRAIN, "--data", "texts/t.txt", "--out", "texts"],
        "--out texts contains the --data text",
    ),
    (
        "train-over-a-checkpoint",
        [*TRAIN, "--out", "tiny-ckpt"],
        "--out tiny-ckpt holds a checkpoint that `mnm train` did not write",
    ),
    (
        "plot-over-trials",
        ["pareto", "res", "--plot", "res/trials.csv"],
        "--plot res/trials.csv is the results file trials.csv",
    ),
    (
        "plot-over-run-json",
        ["pareto", "res", "--plot", "res/run.json"],
        "--plot res/run.json is the results file run.json",
    ),
    (
        "plot-over-other-weights",
        ["pareto", "res", "--plot", "copy/model.safetensors"],
        "--plot copy/model.safetensors must name a .png file",
    ),
    (
        "heatmap-into-checkpoint",
        ["pareto", "res", "--heatmap", "tiny-ckpt/heat.png"],
        "--heatmap tiny-ckpt/heat.png is inside the searched checkpoint",
    ),
    (
        "demo-over-checkpoint",
        ["demo", "--quick", "--out", "tiny-ckpt"],
        "is the embedded checkpoint",
    ),
    ("demo-around-checkpoint", ["demo", "--quick", "--out", "."], "contains the embedded"),
]


@pytest.mark.parametrize(
    ("args", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_outputs_that_overlap_inputs_are_refused(
    workdir: Path,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    # The demo's "embedded" checkpoint is tiny-ckpt; a planted demo.json must not matter.
    monkeypatch.setattr("mnm_search.checkpoint.default_checkpoint_path", lambda: tiny_checkpoint)
    (tiny_checkpoint / _demo.MARKER).write_text("{}")
    inputs = (tiny_checkpoint, workdir / "res", workdir / "texts", workdir / "copy")
    before = {p: _digest(p) for p in inputs}
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert message in " ".join(result.stderr.split())
    assert {p: _digest(p) for p in before} == before
    assert (workdir / "t.yaml").read_text() == TARGET
    assert not (workdir / "notes.txt").is_dir()


@pytest.mark.parametrize(
    ("args", "target", "exc", "code", "message"),
    [
        (SEARCH, (study, "run_search"), KeyboardInterrupt(), 130, "Interrupted: finished"),
        (SEARCH, (study, "run_search"), Terminated(), 143, "Terminated: finished"),
        (
            [*TRAIN, "--out", "run"],
            (Trainer, "run"),
            KeyboardInterrupt(),
            130,
            "Interrupted; saved",
        ),
        ([*TRAIN, "--out", "run"], (Trainer, "run"), Terminated(), 143, "Terminated; saved"),
    ],
    ids=["search-ctrl-c", "search-sigterm", "train-ctrl-c", "train-sigterm"],
)
def test_interrupted_search_and_train_exit_by_signal(
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    target: tuple[Any, str],
    exc: BaseException,
    code: int,
    message: str,
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(*target, interrupted)
    result = CliRunner().invoke(app, [*args, "--out", "run"] if args is SEARCH else args)
    assert result.exit_code == code, result.output
    assert message in result.stderr and "Traceback" not in result.output
