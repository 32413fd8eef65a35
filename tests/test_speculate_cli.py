"""`mnm speculate` through the CLI on a tiny checkpoint: drafts, results, JSON, plot, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from mnm_search import _speculate_sweep as sweep
from mnm_search.checkpoint import load_checkpoint
from mnm_search.cli import app
from mnm_search.families import load_family
from mnm_search.latency import LatencyModel

PNG = b"\x89PNG\r\n\x1a\n"
# The tiny model holds 32 positions: 8-token prompts and 6 new tokens fit, quickly.
FAST = ["--prompt-tokens", "8", "--max-new-tokens", "6", "--n-prompts", "2", "--repeats", "1"]
ROW_KEYS = {
    "draft_widths",
    "draft",
    "source",
    "lookahead",
    "cost_ratio",
    "verify_ratio",
    "acceptance_rate",
    "tokens_per_round",
    "plain_tokens_per_s",
    "speculative_tokens_per_s",
    "measured_speedup",
    "predicted_speedup",
    "predicted_speedup_paper",
    "stats",
    "divergences",
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tmp cwd with a 1-thread CPU target (the shipped cpu-decode would do too)."""
    monkeypatch.chdir(tmp_path)
    target = {"device": "cpu", "phase": "decode", "context_len": 8, "threads": 1}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(target))
    return tmp_path


def _invoke(*args: str) -> Any:
    result = CliRunner().invoke(app, ["speculate", *args])
    assert "Traceback" not in result.output
    return result


def _json(*args: str) -> dict[str, Any]:
    result = _invoke(*args, "--target", "tiny.yaml", *FAST, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def write_results(directory: Path, checkpoint: Path, fingerprint: str | None = None) -> None:
    """trials.csv, pareto.csv and run.json of a 3-layer search, as `mnm search` writes them."""
    rows = [  # (widths, loss, latency_ms): all on the front
        ("8,8,8", 5.0, 1.0),  # uniform S again: measured once
        ("8,16,32", 4.7, 2.0),
        ("16,32,64", 4.5, 3.0),
        ("64,64,64", 4.4, 4.0),  # the full model: not a draft
    ]
    frame = pd.DataFrame(
        [
            {"trial": t, "widths": w, "loss": loss, "params": 0, "latency_ms": ms}
            | {"state": "COMPLETE", "feasible": True}
            for t, (w, loss, ms) in enumerate(rows)
        ]
    )
    directory.mkdir()
    frame.to_csv(directory / "trials.csv", index=False)
    frame.to_csv(directory / "pareto.csv", index=False)
    run_info = {
        "objective_columns": ["loss", "latency_ms"],
        "constraints": {},
        "checkpoint": str(checkpoint),
        "fingerprint": fingerprint or load_checkpoint(checkpoint).fingerprint,
        "profile": None,
    }
    (directory / "run.json").write_text(json.dumps(run_info))


def test_draft_json_schema(workdir: Path, tiny_checkpoint: Path) -> None:
    data = _json(str(tiny_checkpoint), "--draft", "S*3", "--lookahead", "2,4")
    assert data["settings"]["lookaheads"] == [2, 4]
    assert data["settings"]["n_prompts"] == 2 and data["prompts"]["tokens"] == [8, 8]
    assert [row["lookahead"] for row in data["rows"]] == [2, 4]
    for row in data["rows"]:
        assert set(row) >= ROW_KEYS
        assert row["draft_widths"] == [8, 8, 8] and row["source"] == "--draft"
        assert 0 <= row["acceptance_rate"] <= 1
        assert 1 <= row["tokens_per_round"] <= row["lookahead"] + 1
        assert row["measured_speedup"] == pytest.approx(
            row["speculative_tokens_per_s"] / row["plain_tokens_per_s"]
        )
        assert row["cost_ratio"] > 0 and row["verify_ratio"] > 0
        assert row["predicted_speedup"] > 0 and row["predicted_speedup_paper"] > 0
        assert row["divergences"] == []  # greedy: token-identical to plain decoding
    best = max(data["rows"], key=lambda r: r["measured_speedup"])
    assert data["best"] == best
    assert data["cost_source"] == "measured"
    assert data["plain"]["tokens_per_run"] == 2 * 6
    memory = data["memory"]
    assert memory["extra_weight_bytes_for_draft"] == 0
    assert memory["weights_bytes"] > 0 and memory["draft_kv_cache_bytes"] > 0
    assert data["plot"] is None and data["interrupted"] is False


def test_table_and_plot(workdir: Path, tiny_checkpoint: Path) -> None:
    result = _invoke(
        str(tiny_checkpoint), "--draft", "S,M,L", "-k", "2", "--target", "tiny.yaml", *FAST,
        "--plot", "figs/speculate.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "S M L" in result.stdout and "Best: draft S M L" in result.stdout
    assert "Memory: the draft shares" in result.stdout
    assert (workdir / "figs" / "speculate.png").read_bytes()[:8] == PNG


def test_from_results_measures_the_front_and_uniform_drafts(
    workdir: Path, tiny_checkpoint: Path
) -> None:
    write_results(workdir / "res", tiny_checkpoint)
    # No CKPT: the checkpoint the search ran on (run.json).
    data = _json("--from", "res", "--lookahead", "2")
    drafts = [tuple(row["draft_widths"]) for row in data["rows"]]
    assert len(drafts) == len(set(drafts))  # uniform S is on the front too: measured once
    assert set(drafts) == {(8, 8, 8), (8, 16, 32), (16, 32, 64), (16, 16, 16), (32, 32, 32)}
    assert (64, 64, 64) not in drafts  # the full model is the target, not a draft
    sources = {tuple(row["draft_widths"]): row["source"] for row in data["rows"]}
    assert sources[(8, 16, 32)] == "trial 1" and sources[(32, 32, 32)] == "uniform L"
    assert sources[(8, 8, 8)] == "uniform S"  # trial 0 too; the readable name is kept
    assert (workdir / "res" / "speculate.png").read_bytes()[:8] == PNG
    written = json.loads((workdir / "res" / "speculate.json").read_text())
    assert written["rows"] == data["rows"] and data["json_file"] == str(Path("res/speculate.json"))


def test_shipped_draft_is_the_default(workdir: Path, tiny_checkpoint: Path) -> None:
    config_path = tiny_checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config["speculative"] = {"draft_widths": [8, 16, 16], "lookahead": 3}
    config_path.write_text(json.dumps(config))
    assert sweep.shipped_draft(load_family(tiny_checkpoint)) == ([8, 16, 16], 3)
    data = _json(str(tiny_checkpoint))
    assert [(r["draft_widths"], r["lookahead"]) for r in data["rows"]] == [([8, 16, 16], 3)]
    assert data["rows"][0]["source"] == "shipped with the checkpoint"


def test_without_a_draft_the_narrower_uniform_models(workdir: Path, tiny_checkpoint: Path) -> None:
    assert sweep.shipped_draft(load_family(tiny_checkpoint)) is None
    data = _json(str(tiny_checkpoint), "--lookahead", "1")
    assert [r["draft_widths"] for r in data["rows"]] == [[8] * 3, [16] * 3, [32] * 3]


def test_prompts_file_and_sampling(workdir: Path, tiny_checkpoint: Path) -> None:
    (workdir / "prompts.txt").write_text("def f(x):\n    return\n\n\n  \nimport os\n")
    result = _invoke(
        str(tiny_checkpoint), "--draft", "M*3", "-k", "2", "--target", "tiny.yaml",
        "--prompts", "prompts.txt", "--max-new-tokens", "5", "--repeats", "1",
        "--temperature", "0.8", "--seed", "3", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["prompts"]["tokens"] == [len(b"def f(x):\n    return"), len(b"import os")]
    assert data["settings"]["temperature"] == 0.8
    assert data["rows"][0]["stats"]["rounds"] > 0


def test_profile_gives_the_draft_cost(workdir: Path, tiny_checkpoint: Path) -> None:
    profile_target = {
        "device": "cpu", "phase": "decode", "context_len": 8, "repeats": 3, "warmup": 0,
        "calibration": 6, "validation": 3,
    }  # fmt: skip
    (workdir / "decode.yaml").write_text(yaml.safe_dump(profile_target))
    made = CliRunner().invoke(
        app, ["profile", str(tiny_checkpoint), "-t", "decode.yaml", "-o", "p.json", "--quick"]
    )
    assert made.exit_code == 0, made.output
    data = _json(str(tiny_checkpoint), "--draft", "S*3", "-k", "2", "--profile", "p.json")
    assert data["cost_source"] == "profile p.json"
    assert data["drafts"][0]["tokens_per_s_alone"] is None  # not timed: predicted
    model = LatencyModel.load(workdir / "p.json")
    expected = model.predict_ms([8, 8, 8]) / model.predict_ms([64, 64, 64])
    assert data["rows"][0]["cost_ratio"] == pytest.approx(expected)


def test_interrupt_prints_what_was_measured(
    workdir: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    measure = sweep.SpeculationBench.speculative
    calls = []

    def interrupted(self: Any, widths: Any, lookahead: int) -> Any:
        calls.append(lookahead)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(self, widths, lookahead)

    monkeypatch.setattr(sweep.SpeculationBench, "speculative", interrupted)
    result = _invoke(
        str(tiny_checkpoint), "--draft", "S*3", "-k", "1,2", "--target", "tiny.yaml", *FAST
    )
    assert result.exit_code == 130
    assert "S S S" in result.stdout  # the row measured before Ctrl-C
    assert "Interrupted after 1 of 2" in result.stderr


def test_a_real_mismatch_is_an_internal_error(
    workdir: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decode = sweep.decode_speculative

    def wrong(*args: Any, **kwargs: Any) -> list[int]:
        tokens = decode(*args, **kwargs)
        # The full model's least likely token instead of its first one.
        return [(tokens[0] + 128) % 256, *tokens[1:]]

    monkeypatch.setattr(sweep, "decode_speculative", wrong)
    result = _invoke(str(tiny_checkpoint), "--draft", "S*3", "-k", "2", "-t", "tiny.yaml", *FAST)
    assert result.exit_code == 1
    assert "internal error: greedy speculative decoding" in result.stderr


def test_lookahead_parsing() -> None:
    assert sweep.parse_lookaheads("4") == [4]
    assert sweep.parse_lookaheads("8, 2,2,1") == [1, 2, 8]
    for bad in ("0", "x", "1,,2", "65", "-1"):
        with pytest.raises(Exception, match="--lookahead takes integers"):
            sweep.parse_lookaheads(bad)


def _other_fingerprint(workdir: Path, checkpoint: Path) -> None:
    write_results(workdir / "res", checkpoint, fingerprint="0123456789abcdef")


def _no_run_json(workdir: Path, checkpoint: Path) -> None:
    write_results(workdir / "res", checkpoint)
    (workdir / "res" / "run.json").unlink()


def _shipping(entry: object) -> Any:
    def setup(workdir: Path, checkpoint: Path) -> None:
        shutil.copytree(checkpoint, workdir / "ckpt")
        config = json.loads((workdir / "ckpt" / "config.json").read_text())
        config["speculative"] = entry
        (workdir / "ckpt" / "config.json").write_text(json.dumps(config))

    return setup


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["--draft", "S*2"], "give 2 entries, but the checkpoint has 3 layers"),
        (None, ["--draft", "S,Q,S"], "layer 1"),
        (None, ["--draft", "XL*3"], "is the full model itself"),
        (None, ["--draft", "S*3", "--lookahead", "0"], "--lookahead takes integers from 1"),
        (None, ["--draft", "S*3", "--lookahead", "2,x"], "--lookahead takes integers"),
        (None, ["--draft", "S*3", "--lookahead", "8"], "raise --max-new-tokens to at least 9"),
        (None, ["--draft", "S*3", "--from", "res"], "not both"),
        (None, ["--from", "missing"], "does not exist"),
        (_no_run_json, ["--from", "res"], "lacks run.json"),
        (_other_fingerprint, ["--from", "res"], "was searched on checkpoint 0123456789abcdef"),
        (None, ["--draft", "S*3", "--prompt-tokens", "30"], "but the model holds at most"),
        (None, ["--draft", "S*3", "--prompt-tokens", "40"], "longer than the evaluation"),
        (None, ["--draft", "S*3", "--prompts", "none.txt"], "none.txt does not exist"),
        (None, ["--draft", "S*3", "--plot", "front.pdf"], "must name a .png"),
        (None, ["--draft", "S*3", "--target", "nope.yaml"], "nope.yaml does not exist"),
        (None, ["--draft", "S*3", "--temperature", "-1"], "--temperature"),
        (_shipping({"draft_widths": "S", "lookahead": 2}), ["ckpt"], "'speculative' must be"),
        (
            _shipping({"draft_widths": [8, 8], "lookahead": 2}),
            ["ckpt"],
            "draft_widths: got 2 widths",
        ),
    ],
)
def test_bad_input_is_one_clear_message(
    workdir: Path, tiny_checkpoint: Path, setup: Any, args: list[str], message: str
) -> None:
    if setup is not None:
        setup(workdir, tiny_checkpoint)
    ckpt = [] if args and args[0] == "ckpt" else [str(tiny_checkpoint)]
    fast = ["--max-new-tokens", "6", "--n-prompts", "1", "--repeats", "1"]
    if "--target" not in args:
        fast += ["--target", "tiny.yaml"]
    result = _invoke(*ckpt, *args, *fast)
    assert result.exit_code != 0
    assert result.stdout == ""
    assert message in result.output, result.output
    if result.exit_code == 1:  # ours; typer's own usage errors (exit 2) draw a box
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
