"""The result tables of `mnm pareto`, `mnm search` and `mnm export` on an 80-column screen:
no cell cut to `1.46…`, no `nan` for a missing comparison, and every loss says what it was
measured on (text and token count)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_pareto_cli import write_results
from typer.testing import CliRunner

from mnm_search.cli import app

TEXT = "The quick brown fox jumps over the lazy dog. " * 40
TARGET = {"device": "cpu", "phase": "prefill", "seq_len": 8, "repeats": 3, "warmup": 0}


def _slow_results(directory: Path) -> None:
    """A search of a slow 8-layer model (latencies in the hundreds of ms, once cut as
    `162.…`) on text.txt, whose cheapest uniform model is gone (its comparison once showed
    `+nan`)."""
    write_results(directory, budget=None)
    trials = pd.read_csv(directory / "trials.csv")
    trials["latency_ms"] *= 60
    trials["widths"] = trials["widths"] + "," + trials["widths"]
    trials = trials[trials["source"] != "uniform S"]
    trials.to_csv(directory / "trials.csv", index=False)
    info = json.loads((directory / "run.json").read_text())
    info.update(data="text.txt", eval_tokens=4096)
    (directory / "run.json").write_text(json.dumps(info))


# (command, arguments, the loss label it must show)
COMMANDS = [
    ("pareto", ["pareto", "res"], "loss: nats/token, text.txt, 4,096 tokens"),
    (
        "search",
        ["search", "tiny-ckpt", "--objectives", "loss,params", "--trials", "6"],
        "loss: nats/token, text.txt, 256 tokens",
    ),
    (
        "export",
        ["export", "tiny-ckpt", "--widths", "S,M,XL", "--out", "out", "--target", "t.yaml"],
        "loss: nats/token, text.txt, 256 tokens",
    ),
]


@pytest.mark.parametrize(("args", "label"), [c[1:] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_tables_fit_80_columns_and_label_the_loss(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_checkpoint: Path,
    args: list[str],
    label: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text(TEXT)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(TARGET))
    _slow_results(tmp_path / "res")
    if args[0] != "pareto":
        args = [*args, "--data", "text.txt", "--max-tokens", "256"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert "…" not in table, table
    assert "nan" not in table.lower(), table
    assert label in " ".join(table.split()), table
    if args[0] == "pareto":
        assert "│ 306.71 │" in table  # the slowest member's latency, whole
        assert " - │" in table  # no uniform model is as cheap as the fastest members


def test_gemma3n_export_table_fits_80_columns_and_labels_the_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("transformers")
    from gemma3n_models import save_tiny_checkpoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text(TEXT)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(TARGET))
    ckpt = save_tiny_checkpoint(tmp_path / "gemma3n-tiny")
    args = ["export", str(ckpt), "--widths", "128*6", "--out", "out", "--target", "t.yaml"]
    args += ["--data", "text.txt", "--max-tokens", "64"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout, result.stdout
    assert "loss: nats/token, text.txt, " in " ".join(result.stdout.split()), result.stdout
