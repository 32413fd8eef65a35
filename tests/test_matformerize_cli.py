"""`mnm matformerize`, and `mnm search` / `mnm info` / `mnm export` on Llama-architecture
models, through the command line (in-process, isolated temp dirs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from llama_models import english, hf_model, input_ids, save_tiny_llama

from mnm_search.checkpoint import default_checkpoint_path
from mnm_search.cli import app
from mnm_search.families import load_family
from mnm_search.families.llama_nest import DEFAULT_CRITERION

runner = CliRunner()


def _invoke(args: list[str]):  # type: ignore[no-untyped-def]
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def _stderr(result) -> str:  # type: ignore[no-untyped-def]
    return " ".join(result.stderr.split())


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dense Llama with a tokenizer (read-only)."""
    return save_tiny_llama(tmp_path_factory.mktemp("cli") / "dense")


@pytest.fixture
def calibration(tmp_path: Path) -> Path:
    path = tmp_path / "calibration.txt"
    path.write_text(english(200, seed=500))
    return path


# ================================================================= matformerize


def test_matformerize_writes_a_nested_model_and_says_what_next(dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "nested"
    result = _invoke(["matformerize", dense, "--out", out, "--max-tokens", "512"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert f"Next: mnm profile {out} --target cpu-prefill" in text
    assert f"criterion {DEFAULT_CRITERION}" in text and "512 tokens of built-in corpus" in text
    mnm = json.loads((out / "config.json").read_text())["mnm"]
    assert mnm["nested"] is True and mnm["criterion"] == DEFAULT_CRITERION
    assert mnm["calibration"]["tokens"] == 512
    nested, source = load_family(out), load_family(dense)
    assert nested.is_nested and (out / "tokenizer.json").is_file()
    ids = input_ids(length=32)
    torch.testing.assert_close(nested.logits(ids), source.logits(ids), atol=1e-4, rtol=0)
    # transformers still loads it as a plain model (only neurons were permuted)
    with torch.inference_mode():
        hf = hf_model(out)(ids).logits
    torch.testing.assert_close(hf, source.logits(ids), atol=1e-4, rtol=0)


def test_matformerize_json_is_one_object(dense: Path, tmp_path: Path, calibration: Path) -> None:
    out = tmp_path / "nested"
    result = _invoke(
        [
            "matformerize",
            dense,
            "--out",
            out,
            "--data",
            calibration,
            "--max-tokens",
            "256",
            "--criterion",
            "activation-rms",
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["out"] == str(out) and report["criterion"] == "activation-rms"
    assert report["calibration"]["source"] == str(calibration)
    assert report["calibration"]["tokens"] == 256 and report["n_layers"] == 3
    assert report["full_width_max_abs_diff"] <= 1e-4 and report["seconds"] >= 0
    assert "tokenizer.json" in report["tokenizer_files"]


def test_force_replaces_an_existing_out(dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "nested"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    refused = _invoke(["matformerize", dense, "--out", out, "--criterion", "weight"])
    assert refused.exit_code == 1
    assert f"{out} already exists; choose another --out or pass --force" in _stderr(refused)
    assert _tree(out) == {"mine.txt": b"keep me"}
    forced = _invoke(["matformerize", dense, "--out", out, "--criterion", "weight", "--force"])
    assert forced.exit_code == 0, forced.output
    assert not (out / "mine.txt").exists() and load_family(out).is_nested


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--criterion", "bogus"], "criterion must be one of activation-rms, activation, weight"),
        (["--data", "{tmp}/none.txt"], "does not exist"),
        (["--data", "{tmp}/short.txt"], "at least 128 are needed"),
        (["--max-tokens", "0"], "greater than or equal to 1"),  # typer checks the minimum
    ],
)
def test_bad_options_write_nothing(
    dense: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "short.txt").write_text("the cat sat")
    out = tmp_path / "nested"
    result = _invoke(["matformerize", dense, "--out", out, *[a.format(tmp=tmp_path) for a in args]])
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


def test_out_overlapping_the_source_or_data_is_refused(
    dense: Path, tmp_path: Path, calibration: Path
) -> None:
    before = _tree(dense)
    cases = [
        (["--out", dense / "nested"], "is inside the source model"),
        (["--out", dense, "--force"], "is the source model"),
        (["--out", calibration.parent, "--data", calibration, "--force"], "contains the --data"),
    ]
    for args, message in cases:
        result = _invoke(["matformerize", dense, *args])
        assert result.exit_code == 1, args
        assert message in _stderr(result) and "choose an --out outside it" in _stderr(result)
    assert _tree(dense) == before and calibration.is_file()


def test_a_model_without_tokenizer_needs_one_for_calibration(tmp_path: Path) -> None:
    source = save_tiny_llama(tmp_path / "bare", tokenizer=False)
    out = tmp_path / "nested"
    result = _invoke(["matformerize", source, "--out", out, "--max-tokens", "256"])
    assert result.exit_code == 1
    stderr = _stderr(result)
    assert "has no tokenizer" in stderr and "copy the tokenizer files" in stderr, stderr
    assert not out.exists()
    # The weight criterion reads no text: it needs no tokenizer.
    weight = _invoke(["matformerize", source, "--out", out, "--criterion", "weight"])
    assert weight.exit_code == 0, weight.output
    assert load_family(out).is_nested


def test_a_matlm_checkpoint_is_nested_already(tmp_path: Path) -> None:
    out = tmp_path / "nested"
    result = _invoke(["matformerize", default_checkpoint_path(), "--out", out])
    assert result.exit_code == 1
    assert "nested already" in _stderr(result) and "matformerize turns a dense model" in _stderr(
        result
    )
    assert not out.exists()


def test_help_has_an_example() -> None:
    result = _invoke(["matformerize", "--help"])
    assert result.exit_code == 0 and "Example: mnm matformerize" in result.output


# ======================================================== search, info, export


SEARCH = ["--objectives", "loss,params", "--trials", "4", "--max-tokens", "256", "--sampler", "gp"]


def test_search_warns_about_a_dense_model_only(
    dense: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = _invoke(["search", dense, *SEARCH, "--study", "dense", "--json"])
    assert result.exit_code == 0, result.output
    stderr = _stderr(result)
    assert f"Warning: {dense} is a dense model" in stderr, stderr
    assert f"run `mnm matformerize {dense} --out DIR` first" in stderr
    data = json.loads(result.stdout)  # the warning stays off stdout
    assert data["n_complete"] == 4
    family = load_family(dense)
    assert all(p["params"] == family.param_count(p["widths"]) for p in data["pareto"])

    assert (
        _invoke(["matformerize", dense, "--out", "nested", "--criterion", "weight"]).exit_code == 0
    )
    nested = _invoke(["search", "nested", *SEARCH, "--study", "nested"])
    assert nested.exit_code == 0, nested.output
    assert "dense model" not in _stderr(nested) and "matformerize" not in _stderr(nested)


@pytest.mark.parametrize("step", [None, "16"])
def test_info_json(dense: Path, step: str | None) -> None:
    result = _invoke(["info", dense, "--json", *(["--step", step] if step else [])])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    family = load_family(dense)
    assert data["family"] == "llama" and data["model_type"] == "llama"
    assert data["nested"] is False and data["stored_widths"] == [64, 64, 64]
    assert data["n_layers"] == 3 and data["kind"] == "universal"
    assert data["params"] == sum(p.numel() for p in hf_model(dense).parameters())
    assert data["fingerprint"] == family.fingerprint and data["tokenizer"] == "yes"
    n = 8 if step is None else 4
    assert data["step"] == 64 // n and len(data["granularities"]) == n
    assert data["n_configs"] == {"mix_n_match": n**3, "with_skips": (n + 1) ** 3}
    table = _invoke(["info", dense])
    assert table.exit_code == 0 and "64*3" in table.output


def test_info_of_a_nested_model(dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "nested"
    assert _invoke(["matformerize", dense, "--out", out, "--criterion", "weight"]).exit_code == 0
    data = json.loads(_invoke(["info", out, "--json"]).stdout)
    assert data["nested"] is True and data["nesting"]["criterion"] == "weight"
    assert data["nesting"]["source"]["fingerprint"] == load_family(dense).fingerprint


def test_info_of_an_unsupported_config_is_one_clear_line(dense: Path, tmp_path: Path) -> None:
    import shutil

    path = Path(shutil.copytree(dense, tmp_path / "gelu"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    result = _invoke(["info", path])
    assert result.exit_code == 1
    assert "Error:" in result.stderr and "hidden_act 'gelu' is not supported" in _stderr(result)


def test_export_cli_writes_a_verified_llama_directory(
    dense: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    target = "device: cpu\nphase: prefill\nseq_len: 8\nrepeats: 3\nwarmup: 0\n"
    (tmp_path / "tiny.yaml").write_text(target)
    result = _invoke(
        [
            "export",
            dense,
            "--widths",
            "50%,0,100%",
            "--out",
            "out",
            "--target",
            "tiny.yaml",
            "--max-tokens",
            "256",
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["widths"] == [32, 0, 64] and report["family"] == "llama"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["mnm"]["intermediate_sizes"] == [32, 0, 64]
    assert config["mnm"]["quality"]["eval_tokens"] == 256
    ids = input_ids(length=16)
    torch.testing.assert_close(
        load_family(tmp_path / "out").logits(ids),
        load_family(dense).logits(ids, [32, 0, 64]),
        atol=1e-5,
        rtol=0,
    )
