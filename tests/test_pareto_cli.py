"""`mnm pareto` on a synthetic results directory (DESIGN §3 files and columns)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mnm_search.cli import app
from mnm_search.config import run_length_widths
from mnm_search.pareto import pareto_front

GRANS = (128, 256, 512, 1024)
NAMES = dict(zip(GRANS, ("S", "M", "L", "XL")))
PNG = b"\x89PNG\r\n\x1a\n"


def write_results(
    directory: Path, *, n_random: int = 30, budget: float | None = 3.0, state: str = "COMPLETE"
) -> pd.DataFrame:
    """trials.csv, pareto.csv and run.json of a 4-layer search, as `mnm search` writes them."""
    rng = np.random.default_rng(0)
    configs = [(f"uniform {NAMES[g]}", [g] * 4) for g in GRANS]
    configs += [("min-slope", [128] * k + [256] * (4 - k)) for k in range(1, 4)]
    configs += [("sampler", [int(w) for w in rng.choice(GRANS, 4)]) for _ in range(n_random)]
    rows = []
    for trial, (source, widths) in enumerate(configs):
        latency = 1.0 + sum(widths) / 1000 + rng.normal(0, 0.01)
        rows.append(
            {
                "trial": trial,
                "widths": ",".join(map(str, widths)),
                "loss": 1.5
                + sum(0.05 * np.log2(1024 / w) * (1 + i) for i, w in enumerate(widths)) / 4
                + rng.normal(0, 0.002),
                "params": 1_000_000 + 512 * sum(widths),
                "latency_ms": latency,
                "state": state,
                "feasible": budget is None or latency <= budget,
                "source": source,
            }
        )
    trials = pd.DataFrame(rows)
    directory.mkdir(parents=True)
    trials.to_csv(directory / "trials.csv", index=False)
    trials.iloc[:1].to_csv(directory / "pareto.csv", index=False)  # stale: must be refreshed
    run_info = {
        "study": "synthetic",
        "objectives": ["loss", "latency"],
        "objective_columns": ["loss", "latency_ms"],
        "constraints": {"latency_ms": budget} if budget else {},
        "space": {"choices": [list(GRANS)] * 4, "granularities": list(GRANS)},
        "fingerprint": "0123456789abcdef",
        "checkpoint": None,
    }
    (directory / "run.json").write_text(json.dumps(run_info))
    return trials


def _invoke(args: list[str]):  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output
    return result


def test_pareto_table_files_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    trials = write_results(tmp_path / "res")
    result = _invoke(["pareto", "res", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = pareto_front(trials, ("loss", "latency_ms"))  # feasible rows only
    assert [row["trial"] for row in data["front"]] == expected["trial"].tolist()
    assert data["budget"] == 3.0 and data["cost"] == "latency_ms"
    first = data["front"][0]
    assert first["widths_compact"] == " ".join(NAMES[w] for w in first["widths"])
    assert first["perplexity"] == pytest.approx(math.exp(first["loss"]))
    # the gain over the best uniform model costing no more, computed by hand
    uniform = trials[trials["source"].str.startswith("uniform")]
    for row in data["front"]:
        affordable = uniform[uniform["latency_ms"] <= row["latency_ms"] + 1e-9]  # JSON rounding
        if affordable.empty:
            assert row["nearest_uniform"] is None
            continue
        nearest = affordable.loc[affordable["latency_ms"].idxmax()]
        assert row["nearest_uniform"] == nearest["source"].split()[1]
        assert row["loss_vs_uniform"] == pytest.approx(row["loss"] - nearest["loss"], abs=1e-9)
        assert row["loss_vs_uniform"] <= 1e-9  # a front member is never worse than what it affords
    assert any(row["loss_vs_uniform"] < -1e-3 for row in data["front"])
    refreshed = pd.read_csv(tmp_path / "res" / "pareto.csv")
    assert refreshed["trial"].tolist() == expected["trial"].tolist()
    for name in ("pareto.png", "heatmap.png"):
        assert (tmp_path / "res" / name).read_bytes()[:8] == PNG


def test_pareto_table_and_custom_plot_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_results(tmp_path / "res", budget=None)
    result = _invoke(["pareto", "res", "--plot", "figs/front.png", "--heatmap", "figs/widths.png"])
    assert result.exit_code == 0, result.output
    assert "Pareto front of res" in result.stdout
    assert "S S S S" in result.stdout and "XL XL XL XL" in result.stdout
    assert "vs uniform" in result.stdout
    assert (tmp_path / "figs" / "front.png").read_bytes()[:8] == PNG
    assert (tmp_path / "figs" / "widths.png").read_bytes()[:8] == PNG
    assert not (tmp_path / "res" / "pareto.png").exists()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("no-finished", "no finished trial"),
        ("missing", "does not exist"),
        ("not-results", "lacks trials.csv"),
    ],
)
def test_pareto_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setup: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    if setup == "no-finished":
        write_results(tmp_path / "res", state="RUNNING")
    elif setup == "not-results":
        (tmp_path / "res").mkdir()
    result = _invoke(["pareto", "res"])
    assert result.exit_code == 1
    assert message in result.output
    assert not (tmp_path / "res" / "pareto.png").exists()


def _rewrite_run_info(directory: Path, **changes: object) -> None:
    info = json.loads((directory / "run.json").read_text())
    info.update(changes)
    (directory / "run.json").write_text(json.dumps(info))


def test_width_names_come_from_run_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_results(tmp_path / "res")
    names = {"128": "xs", "256": "s", "512": "m", "1024": "l"}
    # The checkpoint is gone: the recorded names are all that is needed.
    _rewrite_run_info(tmp_path / "res", width_names=names, checkpoint=str(tmp_path / "gone"))
    data = json.loads(_invoke(["pareto", "res", "--json"]).stdout)
    for row in data["front"]:
        assert row["widths_compact"] == " ".join(names[str(w)] for w in row["widths"])
    assert {row["nearest_uniform"] for row in data["front"]} <= {None, *names.values()}


def test_widths_stay_numbers_without_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An old run.json whose checkpoint is gone: no names to show, run-length numbers."""
    monkeypatch.chdir(tmp_path)
    write_results(tmp_path / "res")
    _rewrite_run_info(tmp_path / "res", checkpoint=str(tmp_path / "gone"))
    result = _invoke(["pareto", "res", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    first = data["front"][0]
    assert first["widths_compact"] == run_length_widths(first["widths"])
    # uniform seeds are still recognised, by their seed kind, and named by their width
    assert {row["nearest_uniform"] for row in data["front"]} - {None} <= {"128", "256", "512"}


def test_seed_kind_column_decides_what_a_row_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    trials = write_results(tmp_path / "res")
    kinds = {"uniform": "uniform", "min-slope": "min-slope", "sampler": ""}
    trials["seed_kind"] = [kinds[s.split()[0]] for s in trials["source"]]
    trials["source"] = "relabelled"  # labels are for people; the kind is what is read
    trials.to_csv(tmp_path / "res" / "trials.csv", index=False)
    _rewrite_run_info(tmp_path / "res", width_names={}, checkpoint=str(tmp_path / "gone"))
    from mnm_search.cli._pareto import Results

    uniform, heuristic = Results(tmp_path / "res").labelled()
    assert sorted(uniform) == ["1024", "128", "256", "512"]
    assert len(heuristic) == 3
