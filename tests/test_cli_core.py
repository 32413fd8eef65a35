"""`mnm info`, `mnm eval`, `mnm train` driven in-process, with isolated temp dirs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mnm_search.cli import app
from mnm_search.config import param_count
from mnm_search.model import MatLM

runner = CliRunner()


def _json(args: list[str]) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_info_json(tiny_checkpoint: Path, tiny_model: MatLM) -> None:
    data = _json(["info", str(tiny_checkpoint), "--json"])
    assert data["granularities"] == [8, 16, 32, 64]
    assert data["n_layers"] == 3
    assert data["params_uniform"]["S"] == param_count(tiny_model.config, [8, 8, 8])
    assert data["n_configs"] == {"mix_n_match": 64, "with_skips": 125}
    assert len(data["fingerprint"]) == 16


def test_info_table(tiny_checkpoint: Path) -> None:
    result = runner.invoke(app, ["info", str(tiny_checkpoint)])
    assert result.exit_code == 0
    assert "S=8, M=16, L=32, XL=64" in result.output


def test_eval_json_has_the_contract_keys(tiny_checkpoint: Path, eval_text_file: Path) -> None:
    data = _json(
        ["eval", str(tiny_checkpoint), "--widths", "S,L,0", "--data", str(eval_text_file), "--json"]
    )
    assert data["widths"] == [8, 32, 0]
    assert data["perplexity"] == pytest.approx(math.exp(data["loss"]), rel=1e-4)
    assert 4 < data["loss"] < 7  # an untrained byte model is near ln(256) = 5.55
    assert data["n_tokens"] > 0


def test_eval_wider_is_not_worse_after_training(tmp_path: Path, eval_text_file: Path) -> None:
    trained = tmp_path / "trained"
    result = runner.invoke(
        app,
        [
            "train",
            "--out",
            str(trained),
            "--preset",
            "tiny",
            "--steps",
            "30",
            "--data",
            str(eval_text_file),
            "--eval-every",
            "30",
            "--warmup",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "validation loss" in result.output
    small = _json(["eval", str(trained), "-w", "S*2", "--data", str(eval_text_file), "--json"])
    assert small["loss"] < math.log(256)  # it learned something


@pytest.mark.parametrize(
    ("widths", "message"),
    [
        ("S,M", "give 2 entries, but the checkpoint has 3 layers"),
        ("S,M,Z", "layer 2: unknown width 'Z'"),
        ("S,M,99", r"layer 2: width 99 is outside \[0, 64\]"),
    ],
)
def test_eval_bad_widths(tiny_checkpoint: Path, widths: str, message: str) -> None:
    result = runner.invoke(app, ["eval", str(tiny_checkpoint), "--widths", widths])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert re.search(message, result.output)


def test_eval_missing_data_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["eval", str(tiny_checkpoint), "-w", "S*3", "--data", str(tmp_path / "none.txt")]
    )
    assert result.exit_code == 1
    assert "does not exist" in result.output


def test_debug_flag_shows_the_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--debug", "info", str(tmp_path / "missing")])
    assert result.exit_code != 0
    assert result.exception is not None


@pytest.mark.parametrize("command", ["info", "eval", "train", "demo"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Example: mnm" in result.output


def test_info_of_an_exported_checkpoint(tiny_model: MatLM, tmp_path: Path) -> None:
    from mnm_search.checkpoint import save_checkpoint
    from mnm_search.slicing import slice_model

    path = save_checkpoint(
        slice_model(tiny_model, [8, 0, 64]), tmp_path / "x", metadata={"source_fingerprint": "ab"}
    )
    data = _json(["info", str(path), "--json"])
    assert data["kind"] == "exported" and data["ffn_widths"] == [8, 0, 64]
    assert data["params"] == param_count(tiny_model.config, [8, 0, 64])
    assert data["source_fingerprint"] == "ab" and "n_configs" not in data
    table = runner.invoke(app, ["info", str(path)], env={"COLUMNS": "100"})
    assert table.exit_code == 0, table.output
    assert "S 0 XL" in table.output and "exported from" in table.output


def test_info_eval_and_load_model_serve_any_registered_family(tmp_path: Path) -> None:
    """A family registered outside the package (the contract suite's toy) goes through the
    same `info`, `eval` and `load_model` code as the built-in ones."""
    contract = pytest.importorskip("test_family_contract")
    import torch

    from mnm_search import load_model
    from mnm_search.evaluator import evaluate_loss
    from mnm_search.families import load_family, register_family, unregister_family

    register_family("toy", summary="toy", detect=contract._is_toy, load=contract.ToyFamily.load)
    try:
        path = contract.save_toy_checkpoint(tmp_path / "toy")
        family = load_family(path)
        data = _json(["info", str(path), "--json"])
        assert data["family"] == "toy" and data["n_layers"] == family.n_layers
        assert data["params"] == family.param_count()
        space = family.search_space(allow_skip=False)
        assert data["n_configs"]["mix_n_match"] == space.size
        assert runner.invoke(app, ["info", str(path)]).exit_code == 0
        widths = [8, 32, 16]
        result = _json(["eval", str(path), "-w", "8,32,16", "--max-tokens", "256", "--json"])
        eval_set = family.load_eval_set(None, max_tokens=256)
        assert result["family"] == "toy" and result["widths"] == widths
        assert result["loss"] == pytest.approx(
            evaluate_loss(family.logits, eval_set, widths), abs=1e-6
        )
        assert result["params"] == family.param_count(widths)
        model = load_model(path)
        ids = eval_set.inputs[:2]
        with torch.no_grad():
            assert torch.allclose(model(ids, widths=widths), family.logits(ids, widths))
    finally:
        unregister_family("toy")
