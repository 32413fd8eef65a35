"""`mnm export --draft`: an export ships with a self-speculative draft that it can serve."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from mnm_search import speculative
from mnm_search.checkpoint import load_checkpoint
from mnm_search.cli import app
from mnm_search.data import load_eval_set
from mnm_search.errors import ConfigError, ExportError, WidthsError
from mnm_search.export import Draft, Member, export_front, export_submodel
from mnm_search.families import load_family
from mnm_search.families.base import Family
from mnm_search.speculative import generate

PROMPT = torch.tensor([list(b"The quick brown fox")])


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _check_round_trip(out: Path, lookahead: int) -> list[int]:
    """The export's `speculative` block, and greedy decoding with it equals plain greedy."""
    block = _config(out)["speculative"]
    assert set(block) == {"draft_widths", "lookahead"} and block["lookahead"] == lookahead
    exported = load_family(out)
    plain = generate(exported, PROMPT, max_new_tokens=8)
    drafted = generate(
        exported, PROMPT, max_new_tokens=8, draft_widths=block["draft_widths"], lookahead=lookahead
    )
    assert torch.equal(plain, drafted)
    return block["draft_widths"]


def _empty(tmp_path: Path) -> Path:
    """An empty directory for exports (the atomic export's temporary one goes there too)."""
    parent = tmp_path / "exports"
    parent.mkdir()
    return parent


@pytest.fixture
def native(tiny_checkpoint: Path) -> Family:
    return load_family(tiny_checkpoint)


@pytest.mark.parametrize(
    ("widths", "draft", "lookahead"),
    [
        ([32, 64, 16], [8, 16, 16], 3),
        ([64, 64, 64], [8, 8, 8], 4),
        ([0, 64, 8], [0, 16, 8], 1),  # a skipped FFN stays a layer of width 0
        ([32, 32, 32], [32, 32, 32], 2),  # as wide as the export: allowed
        ([40, 12, 64], [20, 8, 0], 5),  # widths between granularities, a draft that skips
    ],
)
def test_native_round_trip(
    native: Family, tmp_path: Path, widths: list[int], draft: list[int], lookahead: int
) -> None:
    eval_set = load_eval_set(None, seq_len=32, max_tokens=64)
    out = tmp_path / "export"
    report = export_submodel(
        native, widths, out, eval_set=eval_set, draft=Draft(draft, lookahead=lookahead)
    )
    assert _check_round_trip(out, lookahead) == draft  # native exports keep every layer
    assert _config(out)["ffn_widths"] == widths
    assert report.speculative is not None
    assert report.speculative["draft_widths"] == draft
    assert report.speculative["source_draft_widths"] == draft
    assert 0 <= report.speculative["acceptance_rate"] <= 1
    assert "self-speculative draft" in (out / "README.md").read_text()
    assert load_checkpoint(out).config.ffn_widths == tuple(widths)  # still loads natively


def test_llama_round_trip(tmp_path: Path) -> None:
    from llama_models import save_tiny_llama

    source = load_family(save_tiny_llama(tmp_path / "llama", tokenizer=False))
    out = tmp_path / "export"
    export_submodel(source, [64, 0, 32], out, draft=Draft([16, 0, 8], lookahead=4))
    assert _config(out)["speculative"] == {"draft_widths": [16, 0, 8], "lookahead": 4}
    assert _config(out)["mnm"]["intermediate_sizes"] == [64, 0, 32]
    _check_round_trip(out, 4)


def test_gemma3n_export_maps_the_draft_to_its_kept_layers(tmp_path: Path) -> None:
    """Gemma 3n exports drop skipped layers: the shipped draft names the kept ones only."""
    from gemma3n_models import save_tiny_checkpoint

    source = load_family(save_tiny_checkpoint(tmp_path / "g"))
    widths = [0, 128, 256, 256, 256, 256]  # layer 0 skipped: the export has 5 layers
    out = tmp_path / "export"
    report = export_submodel(source, widths, out, draft=Draft([0, 64, 64, 128, 64, 64], 2))
    assert _config(out)["speculative"] == {"draft_widths": [64, 64, 128, 64, 64], "lookahead": 2}
    assert report.speculative is not None
    assert report.speculative["source_draft_widths"] == [0, 64, 64, 128, 64, 64]
    exported = load_family(out)
    assert exported.n_layers == 5
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    drafted = generate(
        exported, ids, max_new_tokens=8, draft_widths=[64, 64, 128, 64, 64], lookahead=2
    )
    assert torch.equal(drafted, generate(exported, ids, max_new_tokens=8))


# -- refused: nothing is written ------------------------------------------------------------


@pytest.mark.parametrize(
    ("widths", "draft", "lookahead", "error", "match"),
    [
        (
            [32, 64, 16],
            [8, 16, 32],
            4,
            ExportError,
            "layer 2: the draft's width 32 is wider than the export's 16",
        ),
        ([0, 64, 64], [8, 8, 8], 4, ExportError, "layer 0: the draft's width 8 is wider"),
        ([64, 64, 64], [8, 8], 4, WidthsError, "got 2 widths, but the checkpoint has 3"),
        ([64, 64, 64], [8, 8, 80], 4, WidthsError, "layer 2: width 80 is outside"),
        ([64, 64, 64], [8, 8, 8], 0, ConfigError, r"--lookahead must be in \[1, 64\]"),
        ([64, 64, 64], [8, 8, 8], 65, ConfigError, "--lookahead must be in"),
    ],
)
def test_bad_drafts_are_refused(
    native: Family,
    tmp_path: Path,
    widths: list[int],
    draft: list[int],
    lookahead: int,
    error: type,
    match: str,
) -> None:
    parent = _empty(tmp_path)
    with pytest.raises(error, match=match):
        export_submodel(native, widths, parent / "export", draft=Draft(draft, lookahead))
    assert list(parent.iterdir()) == []  # nothing written, no temporary directory left


def test_a_draft_that_decodes_differently_writes_nothing(
    native: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = speculative.generate

    def diverging(model, ids, **kwargs):  # type: ignore[no-untyped-def]
        tokens = real(model, ids, **kwargs)
        if kwargs.get("draft_widths") is not None:
            tokens[0, -1] = (tokens[0, -1] + 1) % 256
        return tokens

    monkeypatch.setattr(speculative, "generate", diverging)
    parent = _empty(tmp_path)
    with pytest.raises(ExportError, match="gave other tokens than plain greedy decoding"):
        export_submodel(native, [32, 64, 16], parent / "export", draft=Draft([8, 16, 16]))
    assert list(parent.iterdir()) == []


def test_an_export_that_cannot_serve_the_draft_writes_nothing(
    native: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # e.g. a family whose exports renumber layers without saying so
    monkeypatch.setattr(type(native), "widths_on_export", lambda self, w, e: list(w)[:2])
    parent = _empty(tmp_path)
    with pytest.raises(ExportError, match="cannot serve the draft S M M as written"):
        export_submodel(native, [32, 64, 16], parent / "export", draft=Draft([8, 16, 16]))
    assert list(parent.iterdir()) == []


def test_a_front_ships_the_draft_with_every_member(native: Family, tmp_path: Path) -> None:
    members = [Member([16, 16, 16], trial=3), Member([64, 64, 64], trial=5)]
    reports = export_front(native, members, tmp_path / "front", draft=Draft([8, 16, 8], 2))
    for report in reports:
        _check_round_trip(report.path, 2)
    front = pd.read_csv(tmp_path / "front" / "front.csv")
    assert front["draft_widths"].tolist() == ["8,16,8", "8,16,8"]
    with pytest.raises(ExportError, match="layer 1: the draft's width 32 is wider than trial 3"):
        export_front(native, members, tmp_path / "again", draft=Draft([8, 32, 8]))
    assert not (tmp_path / "again").exists()


# -- the command line -----------------------------------------------------------------------


def _run(*args: str):  # type: ignore[no-untyped-def]
    base = ["export", "--target", "tiny.yaml", "--max-tokens", "64"]
    result = CliRunner().invoke(app, [*base, *args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text("device: cpu\nphase: prefill\nseq_len: 8\nrepeats: 3\n")
    results = tmp_path / "res"
    results.mkdir()
    rows = pd.DataFrame(
        {
            "trial": [0, 1],
            "widths": ["8,8,8", "32,64,32"],
            "loss": [5.0, 4.5],
            "latency_ms": [1.0, 2.0],
            "state": ["COMPLETE", "COMPLETE"],
        }
    )
    rows.to_csv(results / "trials.csv", index=False)
    rows.to_csv(results / "pareto.csv", index=False)
    info = {
        "objective_columns": ["loss", "latency_ms"],
        "checkpoint": str(tiny_checkpoint),
        "fingerprint": load_checkpoint(tiny_checkpoint).fingerprint,
    }
    (results / "run.json").write_text(json.dumps(info))
    return tmp_path


def test_cli_widths_with_draft(workdir: Path, tiny_checkpoint: Path) -> None:
    result = _run(str(tiny_checkpoint), "--widths", "L,XL,M", "--draft", "S,M,M",
                  "--lookahead", "3", "--out", "out", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["speculative"]["draft_widths"] == [8, 16, 16]
    assert data["speculative"]["lookahead"] == 3
    assert _config(workdir / "out")["speculative"] == {"draft_widths": [8, 16, 16], "lookahead": 3}
    _check_round_trip(workdir / "out", 3)
    # the table says so too; the lookahead defaults to 4
    shown = _run(str(tiny_checkpoint), "--widths", "XL*3", "--draft", "S*3", "--out", "out4")
    assert shown.exit_code == 0, shown.output
    assert "draft S S S (lookahead 4) shipped" in " ".join(shown.stdout.split())
    assert _config(workdir / "out4")["speculative"]["lookahead"] == 4


def test_cli_from_results_with_draft(workdir: Path) -> None:
    result = _run("--from", "res", "--trial", "1", "--draft", "8,16,8", "--out", "out")
    assert result.exit_code == 0, result.output
    assert _config(workdir / "out")["ffn_widths"] == [32, 64, 32]
    assert _check_round_trip(workdir / "out", 4) == [8, 16, 8]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--from", "res", "--trial", "0", "--draft", "8,16,8"],
            "layer 1: the draft's width 16 is wider than trial 0's 8",
        ),
        (["--widths", "M,M,M", "--draft", "S,L,S"], "the draft's width 32 is wider than the"),
        (["--widths", "M,M,M", "--lookahead", "3"], "--lookahead sets the lookahead of a --draft"),
        (["--widths", "M,M,M", "--draft", "S,S"], "give 2 entries, but the"),
        (["--widths", "M,M,M", "--draft", "S,S,S", "--lookahead", "0"], "--lookahead must be in"),
    ],
)
def test_cli_bad_drafts(
    workdir: Path, tiny_checkpoint: Path, args: list[str], message: str
) -> None:
    source = [] if "--from" in args else [str(tiny_checkpoint)]
    result = _run(*source, *args, "--out", "bad")
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.stderr.split()), result.stderr
    assert not (workdir / "bad").exists()
