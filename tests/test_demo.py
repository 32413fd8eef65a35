"""`mnm demo --quick` end to end, made cheap: a tiny default checkpoint and a light target."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from typer.testing import CliRunner

from mnm_search.checkpoint import load_checkpoint
from mnm_search.cli import _demo, app
from mnm_search.profiler import latency_model_warnings
from mnm_search.targets import HardwareTarget

LIGHT = HardwareTarget(
    name="tiny-prefill", seq_len=8, repeats=3, warmup=0, calibration=4, validation=3
)


@pytest.fixture
def tiny_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mnm_search.checkpoint.default_checkpoint_path", lambda: tiny_checkpoint)
    monkeypatch.setattr(_demo, "default_measurement_target", lambda family: LIGHT)
    monkeypatch.setattr(
        _demo, "QUICK", _demo.DemoPlan(quick_profile=True, trials=8, eval_tokens=256, sampler="tpe")
    )
    return tiny_checkpoint


def test_demo_quick_runs_the_whole_pipeline(
    tmp_path: Path, tiny_default: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured = _demo.profile_loaded

    def noisy_profile(*args: Any, **kwargs: Any) -> dict[str, Any]:
        """The real profile with the validation of a busy machine (the demo must warn)."""
        profile = measured(*args, **kwargs)
        profile["validation"].update(mape_pct=49.4, noise_floor={"mape_pct": 23.0})
        profile["warnings"] = latency_model_warnings(profile["validation"])
        return profile

    monkeypatch.setattr(_demo, "profile_loaded", noisy_profile)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        result = CliRunner().invoke(app, ["demo", "--quick"])
        # Optuna's per-trial INFO lines would bury the demo's progress lines in a log
        assert optuna.logging.get_verbosity() == optuna.logging.WARNING
    finally:
        optuna.logging.set_verbosity(verbosity)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    demo = tmp_path / "results" / "demo"
    for name in (
        "profile.json",
        "trials.csv",
        "pareto.csv",
        "run.json",
        "pareto.png",
        "heatmap.png",
    ):
        assert (demo / name).is_file(), name
    trials = pd.read_csv(demo / "trials.csv")
    assert (trials["state"] == "COMPLETE").sum() == 8
    summary = json.loads((demo / "demo.json").read_text())
    assert summary["status"] == "done" and summary["quick"] is True
    export = summary["export"]
    assert export["trial"] in set(pd.read_csv(demo / "pareto.csv")["trial"])
    # the best front member within the budget (or the fastest one when none fits)
    front = pd.read_csv(demo / "pareto.csv")
    within = front[front["latency_ms"] <= summary["budget_ms"]]
    expected = within.nsmallest(1, "loss") if not within.empty else front.nsmallest(1, "latency_ms")
    assert export["trial"] == int(expected["trial"].iloc[0])
    exported = load_checkpoint(demo / "export")
    assert list(exported.config.ffn_widths) == export["widths"]
    assert exported.metadata["source_fingerprint"] == load_checkpoint(tiny_default).fingerprint
    assert export["logits_max_abs_diff"] <= 1e-5 and export["measured_ms"] > 0
    for text in ("results/demo/pareto.png", "results/demo/export", "[5/5] done"):
        assert text in result.output
    # losses say what they were measured on (they differ with the text and token count)
    label = "nats/token, bundled validation text, 256 tokens"
    flat = " ".join(result.output.split())  # undo rich's line wrapping
    assert f"(loss: {label})" in flat
    assert f"{export['loss']:.4f} ({label})" in flat
    # a latency model fitted on a noisy machine is called out, with what to do
    assert "Warning: this latency model is unreliable" in flat
    assert "held-out MAPE 49.4 % > 15 %" in flat and "noise floor 23.0 % > 10 %" in flat
    profile = json.loads((demo / "profile.json").read_text())
    assert profile["warnings"][0].startswith("held-out MAPE 49.4 %")
    assert profile["warnings"][1].startswith("noise floor 23.0 %")


def test_demo_refuses_a_directory_it_did_not_write(tmp_path: Path, tiny_default: Path) -> None:
    (tmp_path / "results" / "demo").mkdir(parents=True)
    (tmp_path / "results" / "demo" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["demo", "--quick"])
    assert result.exit_code == 1
    assert "was not written by `mnm demo`" in result.output
    assert "Traceback" not in result.output
    assert (tmp_path / "results" / "demo" / "notes.txt").read_text() == "mine"


def test_full_demo_enumerates_and_times_its_stages(
    tmp_path: Path, tiny_default: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --quick the demo's `auto` search enumerates a space this small: every
    configuration is decided and the front is exact; demo.json says where the time went."""
    monkeypatch.setattr(
        _demo, "FULL", _demo.DemoPlan(quick_profile=True, trials=8, eval_tokens=256)
    )
    result = CliRunner().invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "auto: all " in flat and "the exact front" in flat
    demo = tmp_path / "results" / "demo"
    run = json.loads((demo / "run.json").read_text())
    assert run["strategy"]["name"] == "enumerate"
    trials = pd.read_csv(demo / "trials.csv")
    assert len(trials) == run["space_size"] == trials["widths"].nunique()
    summary = json.loads((demo / "demo.json").read_text())
    stages = summary["stage_seconds"]
    assert list(stages) == ["set-up", "profile", "search", "front", "export"]
    assert all(seconds >= 0 for seconds in stages.values())
    assert sum(stages.values()) == pytest.approx(summary["seconds"], abs=0.3)
