"""Searching for self-speculative drafts: the acceptance and speedup objectives (maximised)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from mnm_search.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from mnm_search.cli import app
from mnm_search.config import ModelConfig
from mnm_search.data import EvalSet, load_eval_set
from mnm_search.errors import ConfigError, SearchError
from mnm_search.families.matlm import MatLMFamily
from mnm_search.latency import PROFILE_FORMAT, LatencyModel
from mnm_search.model import MatLM
from mnm_search.pareto import (
    ResultsError,
    objective_maximise,
    pareto_front,
    read_results,
    read_run_info,
)
from mnm_search.space import SearchSpace
from mnm_search.speculative import best_lookahead
from mnm_search.study import SearchSettings, open_storage, run_search
from mnm_search.targets import HardwareTarget, machine_facts

TINY = ModelConfig(
    d_model=32, n_layers=3, n_heads=2, d_ff=64, granularities=(8, 16, 32, 64), max_seq_len=32
)
FULL = "64,64,64"
DECODE = HardwareTarget(name="tiny-decode", phase="decode", context_len=16)
PREFILL = HardwareTarget(name="tiny-prefill", phase="prefill", seq_len=16)
runner = CliRunner()


def _latency_model(fingerprint: str, target: HardwareTarget = DECODE) -> LatencyModel:
    """A synthetic latency model where the FFN dominates (as in a real decode step of a big
    model): narrow drafts are cheap, so some of them beat the full model. Deterministic,
    unlike timing a tiny model, whose fixed costs swamp its FFNs."""
    widths = [8, 16, 32, 64]
    return LatencyModel(
        target=target,
        fingerprint=fingerprint,
        d_ff=64,
        measured_widths=widths,
        ffn_ms=[[w / 64 for w in widths]] * TINY.n_layers,
        fixed_ms=0.2,
    )


def _write_profile(path: Path, model: LatencyModel) -> Path:
    """The latency model as a profile file, as `mnm profile` writes one (for --profile)."""
    profile = {
        "format": PROFILE_FORMAT,
        "target": model.target.to_dict(),
        "device": machine_facts(model.target),
        "checkpoint": {"fingerprint": model.fingerprint, "d_ff": 64, "n_layers": TINY.n_layers},
        "latency_model": model.to_dict(),
    }
    path.write_text(json.dumps(profile))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    torch.manual_seed(0)
    model = MatLM(TINY).eval()  # unscaled: narrow widths agree often with the full model
    return load_checkpoint(save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture(scope="module")
def eval_set() -> EvalSet:
    return load_eval_set(None, seq_len=TINY.max_seq_len, max_tokens=8 * 32)


def _run(
    checkpoint: Checkpoint,
    eval_set: EvalSet,
    results: Path,
    objectives: tuple[str, ...],
    *,
    n_trials: int = 14,
    sampler: str = "gp",  # the sampled path; `auto` would enumerate this tiny space
    target: HardwareTarget = DECODE,
    warnings_seen: list[str] | None = None,
):  # type: ignore[no-untyped-def]
    family = MatLMFamily(checkpoint)
    return run_search(
        family,
        SearchSpace.from_config(TINY),
        SearchSettings(n_trials=n_trials, objectives=objectives, sampler=sampler),
        eval_set,
        study_name="s",
        results_dir=results,
        latency_model=_latency_model(family.fingerprint, target),
        on_warning=(warnings_seen.append if warnings_seen is not None else None),
    )


# -- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("objectives", "directions"),
    [
        (("speedup",), ["maximize"]),
        (("acceptance", "latency"), ["maximize", "minimize"]),
        (("latency", "acceptance"), ["minimize", "maximize"]),
        (("speedup", "params"), ["maximize", "minimize"]),
        (("loss", "latency"), ["minimize", "minimize"]),
        (("kl", "disagreement", "memory"), ["minimize", "minimize", "minimize"]),
    ],
)
def test_directions(objectives: tuple[str, ...], directions: list[str]) -> None:
    settings = SearchSettings(objectives=objectives)
    assert settings.directions == directions
    assert settings.needs_agreement == bool(
        {"speedup", "acceptance", "kl", "disagreement"} & set(objectives)
    )
    assert settings.needs_latency == ("latency" in objectives or "speedup" in objectives)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"objectives": ("acceptance",)}, "at least two different objectives.*or speedup alone"),
        ({"objectives": ("loss",)}, "at least two"),
        ({"objectives": ("speedup", "speedup")}, "at least two different"),
        ({"objectives": ("speedup", "speed")}, "unknown objective.*'speed'"),
        ({"objectives": ("speedup",), "fidelity_tokens": 64}, "not with speedup"),
        ({"objectives": ("acceptance", "latency"), "fidelity_tokens": 64}, "not with acceptance"),
    ],
)
def test_settings_are_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SearchSettings(**kwargs)


# -- the Pareto table with maximised columns ----------------------------------------------


ROWS = pd.DataFrame(
    {
        "trial": [0, 1, 2, 3, 4],
        "widths": ["8", "16", "32", "64", "8"],
        "loss": [3.0, 2.5, 2.2, 2.0, 3.0],
        "latency_ms": [1.0, 2.0, 3.0, 4.0, 1.0],
        "acceptance": [0.5, 0.7, 0.6, 1.0, 0.5],
        "speedup": [1.4, 1.6, 1.1, 1.0, 1.4],
        "state": ["COMPLETE"] * 5,
    }
)


@pytest.mark.parametrize(
    ("objectives", "maximise", "trials"),
    [
        (["speedup"], None, [1]),  # one objective: its best row
        (["acceptance", "latency_ms"], None, [0, 1, 3]),  # 2 is dominated by 1; 4 repeats 0
        (["speedup", "latency_ms"], None, [0, 1]),
        (["loss", "latency_ms"], None, [0, 1, 2, 3]),
        (["speedup"], set(), [3]),  # an explicit override: minimised
    ],
)
def test_pareto_front_maximises_acceptance_and_speedup(
    objectives: list[str], maximise: set[str] | None, trials: list[int]
) -> None:
    front = pareto_front(ROWS, objectives, maximise=maximise)
    assert front["trial"].tolist() == trials


@pytest.mark.parametrize(
    ("info", "maximise", "error"),
    [
        (
            {"objective_columns": ["speedup"], "objective_directions": ["maximize"]},
            {"speedup"},
            None,
        ),
        ({"objective_columns": ["speedup"], "objective_directions": ["minimize"]}, set(), None),
        ({"objective_columns": ["acceptance", "latency_ms"]}, {"acceptance"}, None),  # older
        ({"objective_columns": ["speedup"], "objective_directions": ["up"]}, None, "expected one"),
        (
            {"objective_columns": ["speedup"], "objective_directions": ["maximize"] * 2},
            None,
            "per objective column",
        ),
    ],
)
def test_run_json_records_the_directions(
    tmp_path: Path, info: dict, maximise: set[str] | None, error: str | None
) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(info))
    if error is not None:
        with pytest.raises(ResultsError, match=error):
            read_run_info(path)
        return
    columns = info["objective_columns"]
    assert objective_maximise(read_run_info(path), columns) == maximise


# -- the search -----------------------------------------------------------------------------


def test_speedup_search_keeps_the_fastest_draft(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path
) -> None:
    seen: list[str] = []
    result = _run(checkpoint, eval_set, tmp_path / "s", ("speedup",), warnings_seen=seen)
    assert seen == []  # a decode profile: nothing to warn about
    storage = open_storage(None, tmp_path / "s")
    assert optuna.load_study(study_name="s", storage=storage).directions == [
        optuna.study.StudyDirection.MAXIMIZE
    ]
    trials, front, info = read_results(tmp_path / "s")
    assert info["objective_columns"] == ["speedup"]
    assert info["objective_directions"] == ["maximize"]
    done = trials[trials["state"] == "COMPLETE"]
    assert len(done) == 14
    # the front of one maximised objective: the highest-speedup trial (a narrow draft here)
    best = done.loc[done["speedup"].idxmax()]
    assert front["trial"].tolist() == [best["trial"]] == result.pareto["trial"].tolist()
    assert best["speedup"] > 1 and best["widths"] != FULL
    # every stored speed-up is best_lookahead(acceptance, latency / full latency)
    full = done[done["widths"] == FULL].iloc[0]
    for row in done.itertuples():
        lookahead, speedup = best_lookahead(row.acceptance, row.latency_ms / full["latency_ms"])
        assert row.speedup == pytest.approx(speedup, rel=1e-12)
        assert row.lookahead == lookahead
        assert row.acceptance == row.agreement
    # the full model (seeded as uniform XL) drafting for itself: acceptance 1, no speed-up
    assert full["acceptance"] == 1.0 and full["speedup"] == 1.0 and full["lookahead"] == 1


def test_enumerated_speedup_search_decides_every_draft(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path
) -> None:
    """`auto` enumerates this tiny space, every configuration in full (no race: agreement
    needs every token), with the same speed-up metrics as a sampled trial."""
    result = _run(checkpoint, eval_set, tmp_path / "s", ("speedup",), sampler="auto")
    assert result.run_info["strategy"]["name"] == "enumerate"
    assert result.run_info["strategy"]["race"] is False
    done = result.trials[result.trials["state"] == "COMPLETE"]
    assert len(done) == SearchSpace.from_config(TINY).size == done["widths"].nunique()
    assert (done["fidelity"] == "full").all()
    full = done[done["widths"] == FULL].iloc[0]
    for row in done.itertuples():
        lookahead, speedup = best_lookahead(row.acceptance, row.latency_ms / full["latency_ms"])
        assert row.speedup == pytest.approx(speedup, rel=1e-12) and row.lookahead == lookahead
    assert result.pareto["trial"].tolist() == [done.loc[done["speedup"].idxmax(), "trial"]]


def test_acceptance_latency_front_and_resume(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path
) -> None:
    _run(checkpoint, eval_set, tmp_path / "s", ("acceptance", "latency"), n_trials=12)
    trials, front, info = read_results(tmp_path / "s")
    assert info["objective_directions"] == ["maximize", "minimize"]
    done = trials[trials["state"] == "COMPLETE"]
    # no front member is dominated: nothing at most as slow is at least as accepted
    for row in front.itertuples():
        others = done[done["trial"] != row.trial]
        dominated = (
            (others["acceptance"] >= row.acceptance)
            & (others["latency_ms"] <= row.latency_ms)
            & ((others["acceptance"] > row.acceptance) | (others["latency_ms"] < row.latency_ms))
        )
        assert not dominated.any()
    assert FULL in front["widths"].tolist()  # the only configuration with acceptance 1
    assert front["latency_ms"].is_monotonic_increasing
    assert front["acceptance"].is_monotonic_increasing
    # the same set-up resumes; another objective direction is another study
    again = _run(checkpoint, eval_set, tmp_path / "s", ("acceptance", "latency"), n_trials=14)
    assert again.n_new == 2
    with pytest.raises(SearchError, match="another objectives"):
        _run(checkpoint, eval_set, tmp_path / "s", ("disagreement", "latency"), n_trials=16)


def test_speedup_warns_about_a_profile_that_is_not_of_decoding(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path
) -> None:
    seen: list[str] = []
    _run(
        checkpoint,
        eval_set,
        tmp_path / "s",
        ("speedup",),
        n_trials=4,
        target=PREFILL,
        warnings_seen=seen,
    )
    assert len(seen) == 1 and "phase 'prefill'" in seen[0] and "cpu-decode" in seen[0]


def test_speedup_without_a_latency_profile_is_refused(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path
) -> None:
    with pytest.raises(SearchError, match=r"speedup objective needs a latency profile.*--profile"):
        run_search(
            MatLMFamily(checkpoint),
            SearchSpace.from_config(TINY),
            SearchSettings(n_trials=4, objectives=("speedup",)),
            eval_set,
            study_name="s",
            results_dir=tmp_path / "s",
        )
    assert not (tmp_path / "s").exists()


# -- the command line -----------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoint: Checkpoint) -> Path:
    monkeypatch.chdir(tmp_path)
    fingerprint = checkpoint.fingerprint
    _write_profile(tmp_path / "decode.json", _latency_model(fingerprint, DECODE))
    _write_profile(tmp_path / "prefill.json", _latency_model(fingerprint, PREFILL))
    return tmp_path


def _invoke(args: list[str]):  # type: ignore[no-untyped-def]
    result = runner.invoke(app, args)
    assert "Traceback" not in result.output, result.output
    return result


def test_cli_single_objective_speedup_end_to_end(workdir: Path, checkpoint: Checkpoint) -> None:
    ckpt = str(checkpoint.path)
    args = ["search", ckpt, "--objectives", "speedup", "--profile", "decode.json",
            "--trials", "10", "--out", "res", "--max-tokens", "256"]  # fmt: skip
    result = _invoke([*args, "--json"])
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.stderr
    data = json.loads(result.stdout)
    assert data["objectives"] == ["speedup"]
    trials = pd.read_csv(workdir / "res" / "trials.csv", dtype={"widths": str})
    assert {"acceptance", "speedup", "lookahead"} <= set(trials.columns)
    [best] = data["pareto"]
    assert best["speedup"] == pytest.approx(trials["speedup"].max())
    assert best["lookahead"] == int(trials.loc[trials["speedup"].idxmax(), "lookahead"])

    # the table shows the speed-up; resuming continues the maximising study
    table = _invoke([*args[:-4], "--trials", "12", "--out", "res", "--max-tokens", "256"])
    assert table.exit_code == 0, table.output
    assert "resuming study" in table.output and "speedup" in table.stdout

    # `mnm pareto` keeps the maximum and plots speed-up vs latency
    shown = _invoke(["pareto", "res", "--json"])
    assert shown.exit_code == 0, shown.output
    pareto = json.loads(shown.stdout)
    assert pareto["cost"] == "latency_ms"
    trials = pd.read_csv(workdir / "res" / "trials.csv", dtype={"widths": str})
    [member] = pareto["front"]
    assert member["speedup"] == pytest.approx(trials["speedup"].max())
    assert Path(pareto["plot"]).stat().st_size > 0 and Path(pareto["heatmap"]).is_file()
    assert _invoke(["pareto", "res"]).exit_code == 0


def test_cli_warns_about_a_prefill_profile(workdir: Path, checkpoint: Checkpoint) -> None:
    result = _invoke(
        ["search", str(checkpoint.path), "--objectives", "acceptance,speedup",
         "--profile", "prefill.json", "--trials", "4", "--out", "res", "--max-tokens", "256"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "phase 'prefill'" in " ".join(result.stderr.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--objectives", "speedup"],
            "needs a latency profile, ideally of decoding: pass --profile",
        ),
        (["--objectives", "speedup"], "or --target profiles/cpu-decode.yaml"),
        (["--objectives", "acceptance"], "at least two different objectives"),
        (["--objectives", "speedup,speedup"], "at least two different objectives"),
        (["--objectives", "speedup,speed"], "unknown objective(s) in --objectives"),
        (
            ["--objectives", "speedup", "--fidelity-tokens", "64", "--profile", "decode.json"],
            "not with speedup",
        ),
    ],
)
def test_cli_errors(workdir: Path, checkpoint: Checkpoint, args: list[str], message: str) -> None:
    result = _invoke(
        ["search", str(checkpoint.path), "--trials", "4", "--out", "bad", "--max-tokens", "256",
         *args]
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.stderr.split()), result.stderr
    assert not (workdir / "bad" / "trials.csv").exists()
