"""`mnm search` through the command line: results, resume, and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mnm_search.checkpoint import save_checkpoint
from mnm_search.cli import app
from mnm_search.config import ModelConfig, param_count
from mnm_search.model import MatLM

runner = CliRunner()
TARGET_YAML = "device: cpu\nphase: prefill\nseq_len: 16\nrepeats: 5\nwarmup: 1\n"
FAST = ["--max-tokens", "256"]


def _invoke(args: list[str]):  # type: ignore[no-untyped-def]
    result = runner.invoke(app, args)
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TARGET_YAML)
    return tmp_path


def test_search_loss_params_json(workdir: Path, tiny_checkpoint: Path) -> None:
    result = _invoke(
        [
            "search",
            str(tiny_checkpoint),
            "--objectives",
            "loss,params",
            "--trials",
            "12",
            "--sampler",  # the sampled path: `auto` would enumerate this tiny space
            "gp",
            "--study",
            "t1",
            "--json",
            *FAST,
        ]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["n_complete"] == 12 and data["results_dir"] == "results/t1"
    for name in ("trials.csv", "pareto.csv", "run.json", "study.journal"):
        assert (workdir / "results" / "t1" / name).is_file()
    config = ModelConfig.from_dict(json.loads((tiny_checkpoint / "config.json").read_text()))
    for point in data["pareto"]:
        assert point["params"] == param_count(config, point["widths"])
    info = json.loads((workdir / "results" / "t1" / "run.json").read_text())
    assert info["command"] is not None and info["seed"] == 0

    # the same command again resumes (nothing new), a larger total continues
    again = _invoke(
        [
            "search",
            str(tiny_checkpoint),
            "--objectives",
            "loss,params",
            "--trials",
            "15",
            "--sampler",
            "gp",
            "--study",
            "t1",
            *FAST,
        ]
    )
    assert again.exit_code == 0, again.output
    assert "resuming study 't1': 12 of 15" in again.output
    assert "15 trials complete (3 new" in again.output


def test_default_latency_objective_profiles_the_target_first(
    workdir: Path, tiny_checkpoint: Path
) -> None:
    args = [
        "search",
        str(tiny_checkpoint),
        "--target",
        "tiny.yaml",
        "--quick-profile",
        "--trials",
        "10",
        "--out",
        "res",
        "--json",
        *FAST,
    ]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    assert "profiling on target tiny" in result.stderr
    data = json.loads(result.stdout)
    assert data["objectives"] == ["loss", "latency"]
    assert all(p["latency_ms"] > 0 for p in data["pareto"])
    assert (workdir / "res" / "profile.json").is_file()
    # resuming reuses the measured profile rather than measuring again
    again = _invoke([*args[:-2], "--trials", "12", *FAST])
    assert again.exit_code == 0, again.output
    assert "using the latency profile measured for this study" in again.stderr

    # that profile is refused for another checkpoint
    torch.manual_seed(3)
    other = save_checkpoint(
        MatLM(ModelConfig.from_dict(json.loads((tiny_checkpoint / "config.json").read_text()))),
        workdir / "other",
    )
    refused = _invoke(
        ["search", str(other), "--profile", "res/profile.json", "--trials", "5", *FAST]
    )
    assert refused.exit_code == 1
    assert "measured for another checkpoint" in refused.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sampler", "annealing"], "unknown sampler 'annealing'"),
        (["--objectives", "loss,speed"], "unknown objective(s) in --objectives"),
        (
            ["--objectives", "loss,params", "--max-params", "10"],
            "--max-params 10: the lowest reachable params is",
        ),
        (
            ["--objectives", "loss,params", "--storage", "postgresql://mnm@127.0.0.1:1/nowhere"],
            "cannot open storage postgresql://mnm@127.0.0.1:1/nowhere",
        ),
        (["--objectives", "loss,params", "--storage", "results/x.db"], "not a database URL"),
        (["--objectives", "loss,latency"], "latency profile missing.json does not exist"),
        (
            ["--objectives", "loss,params", "--min-widths", "XL,XL,XL", "--max-widths", "S,S,S"],
            "lower bound 64 is above upper bound 8",
        ),
    ],
)
def test_bad_input_is_a_clear_error(
    workdir: Path, tiny_checkpoint: Path, args: list[str], message: str
) -> None:
    if args == ["--objectives", "loss,latency"]:
        args = [*args, "--profile", "missing.json"]
    result = _invoke(
        ["search", str(tiny_checkpoint), "--trials", "5", "--study", "bad", *FAST, *args]
    )
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.stderr.split()), result.stderr
    assert not (workdir / "results" / "bad" / "trials.csv").exists()


def test_reusing_a_study_name_with_another_checkpoint_changes_nothing(
    workdir: Path, tiny_checkpoint: Path
) -> None:
    base = ["search", "--objectives", "loss,params", "--trials", "6", "--study", "shared", *FAST]
    assert _invoke([base[0], str(tiny_checkpoint), *base[1:]]).exit_code == 0
    before = {p.name: p.read_bytes() for p in (workdir / "results" / "shared").iterdir()}
    torch.manual_seed(5)
    config = ModelConfig.from_dict(json.loads((tiny_checkpoint / "config.json").read_text()))
    other = save_checkpoint(MatLM(config), workdir / "other")
    result = _invoke([base[0], str(other), *base[1:]])
    assert result.exit_code == 1
    assert "was created with another checkpoint" in " ".join(result.stderr.split())
    after = {p.name: p.read_bytes() for p in (workdir / "results" / "shared").iterdir()}
    assert after == before
    # another space under the same name is refused as well
    skip = _invoke([base[0], str(tiny_checkpoint), *base[1:], "--allow-skip"])
    assert skip.exit_code == 1
    assert "another search space" in " ".join(skip.stderr.split())


@pytest.mark.parametrize("bad", [True, False], ids=["unreliable", "reliable"])
def test_profile_measured_by_search_carries_and_prints_its_warnings(
    workdir: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, bad: bool
) -> None:
    problems = ["held-out MAPE 49.4 % > 15 %: predicted latencies are off"] if bad else []
    monkeypatch.setattr("mnm_search.profiler.latency_model_warnings", lambda validation: problems)
    args = ["search", str(tiny_checkpoint), "--target", "tiny.yaml", "--quick-profile"]
    result = runner.invoke(
        app, [*args, "--trials", "4", "--out", "res", "--json", *FAST], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 0, result.output
    assert json.loads((workdir / "res" / "profile.json").read_text())["warnings"] == problems
    json.loads(result.stdout)  # the box goes to stderr: stdout stays one JSON object
    stderr = " ".join(result.stderr.split())
    assert ("Warning: this latency model is unreliable" in stderr) == bad
    assert ("held-out MAPE 49.4 % > 15 %" in stderr) == bad


@pytest.mark.parametrize("study", ["../../escaped", "a/b", "/tmp/abs-escaped", "..", "."])
def test_a_study_name_that_is_a_path_is_refused_without_out(
    workdir: Path, tiny_checkpoint: Path, study: str
) -> None:
    before = set(workdir.parent.iterdir())
    result = _invoke(
        ["search", str(tiny_checkpoint), "--objectives", "loss,params", "--trials", "2",
         "--study", study, *FAST]
    )  # fmt: skip
    assert result.exit_code == 1
    assert "not a plain name" in result.output and "--out" in result.output
    assert set(workdir.parent.iterdir()) == before
    assert not (workdir / "results").exists()


def test_any_study_name_works_with_out(workdir: Path, tiny_checkpoint: Path) -> None:
    result = _invoke(
        ["search", str(tiny_checkpoint), "--objectives", "loss,params", "--trials", "2",
         "--study", "team/a..b", "--out", "res", *FAST]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (workdir / "res" / "trials.csv").exists()
