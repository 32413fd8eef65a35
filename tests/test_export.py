"""Export: sliced checkpoints that compute what the universal model computes, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from mnm_search import checkpoint as checkpoint_module
from mnm_search import export as export_module
from mnm_search.checkpoint import load_checkpoint
from mnm_search.config import param_count
from mnm_search.data import load_eval_set
from mnm_search.errors import ExportError
from mnm_search.export import (
    Member,
    export_front,
    export_submodel,
    front_members,
    pick_trial,
    pick_under_budget,
)
from mnm_search.families import load_family
from mnm_search.families import matlm as matlm_module
from mnm_search.families.base import Family
from mnm_search.targets import HardwareTarget

TINY_TARGET = HardwareTarget(name="tiny-prefill", seq_len=8, repeats=3, warmup=0)


@pytest.fixture
def checkpoint(tiny_checkpoint: Path) -> Family:
    """The tiny native checkpoint, as the one interface the exporter sees."""
    return load_family(tiny_checkpoint)


@pytest.mark.parametrize(
    "widths",
    [[64, 64, 64], [8, 16, 32], [0, 64, 8], [0, 0, 0], [40, 12, 64]],
    ids=["full", "mixed", "skip", "all-skipped", "between-granularities"],
)
def test_export_matches_universal_model(
    checkpoint: Family, tmp_path: Path, widths: list[int]
) -> None:
    out = tmp_path / "export"
    report = export_submodel(checkpoint, widths, out)
    assert report.path == out
    reloaded = load_checkpoint(out)
    assert reloaded.config.ffn_widths == tuple(widths)
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        diff = (reloaded.model(ids) - checkpoint.model(ids, widths)).abs().max().item()
    assert diff <= 1e-5
    n_params = sum(p.numel() for p in reloaded.model.parameters())
    assert n_params == param_count(checkpoint.config, widths) == report.params
    config = json.loads((out / "config.json").read_text())
    assert config["ffn_widths"] == widths
    assert config["source_fingerprint"] == checkpoint.fingerprint
    assert config["verification"]["logits_max_abs_diff"] <= 1e-5
    assert (out / "README.md").read_text().startswith("# MatLM Mix'n'Match submodel")


def test_export_records_quality_and_latency(
    checkpoint: Family, tmp_path: Path, eval_text_file: Path
) -> None:
    eval_set = load_eval_set(eval_text_file, seq_len=checkpoint.config.max_seq_len)
    report = export_submodel(
        checkpoint,
        Member(widths=[8, 16, 64], trial=7, predicted_ms=1.5, search_loss=5.0),
        tmp_path / "export",
        eval_set=eval_set,
        data_name=str(eval_text_file),
        target=TINY_TARGET,
    )
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["quality"]["loss"] == pytest.approx(report.loss, abs=1e-6)
    assert config["quality"]["eval_tokens"] == eval_set.n_tokens
    assert config["quality"]["data"] == str(eval_text_file)
    assert config["export"]["trial"] == 7
    latency = config["latency"]
    assert latency["predicted_ms"] == 1.5
    assert latency["measured_ms"] > 0 and latency["full_model_measured_ms"] > 0
    assert latency["target"]["name"] == "tiny-prefill"
    assert report.latency_error_pct == pytest.approx(
        100 * (1.5 - report.measured_ms) / report.measured_ms
    )
    card = (tmp_path / "export" / "README.md").read_text()
    for text in (checkpoint.fingerprint, "8,16,64", "predicted latency", "measured latency"):
        assert text in card


def test_existing_output_is_refused_and_kept(checkpoint: Family, tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"already exists.*--force"):
        export_submodel(checkpoint, [8, 8, 8], out)
    assert (out / "keep.txt").read_text() == "mine"
    export_submodel(checkpoint, [8, 8, 8], out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert load_checkpoint(out).config.ffn_widths == (8, 8, 8)


@pytest.mark.parametrize(
    ("module", "stage"),
    [(export_module, "atomic_write_text"), (matlm_module, "_logits_difference")],
    ids=["model-card", "native-verification"],
)
def test_failure_half_way_leaves_nothing(
    checkpoint: Family,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    module: object,
    stage: str,
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, stage, broken)
    # write() errors name no file: the message names the export and the fix.
    message = rf"disk full while writing {tmp_path / 'export'}: free space or choose another --out"
    with pytest.raises(ExportError, match=rf"^{message}; nothing was written$"):
        export_submodel(checkpoint, [8, 16, 32], tmp_path / "export")
    assert list(tmp_path.iterdir()) == [tmp_path / "tiny-ckpt"]  # no export, no temp dir


def test_failure_half_way_through_a_front_leaves_nothing(
    checkpoint: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = []
    real = checkpoint_module.write_checkpoint_files

    def fails_on_second(directory: Path, *args: object, **kwargs: object) -> None:
        writes.append(directory)
        if len(writes) == 2:
            raise OSError(5, "Input/output error")
        real(directory, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "write_checkpoint_files", fails_on_second)
    members = [Member([8, 8, 8], trial=1), Member([64, 64, 64], trial=2)]
    with pytest.raises(ExportError, match=f"input/output error on {tmp_path / 'front'}"):
        export_front(checkpoint, members, tmp_path / "front")
    assert len(writes) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-ckpt"]


def test_verification_failure_is_an_error(
    checkpoint: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(matlm_module, "_logits_difference", lambda *a: 0.5)
    with pytest.raises(ExportError, match=r"differs from the universal model by 0.5"):
        export_submodel(checkpoint, [8, 16, 32], tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_export_front_writes_one_directory_per_member(checkpoint: Family, tmp_path: Path) -> None:
    members = [Member([8, 8, 8], trial=3), Member([16, 32, 64], trial=12)]
    reports = export_front(checkpoint, members, tmp_path / "front")
    assert [r.path.name for r in reports] == ["trial-0003", "trial-0012"]
    for report, member in zip(reports, members):
        assert load_checkpoint(report.path).config.ffn_widths == tuple(member.widths)
    summary = pd.read_csv(tmp_path / "front" / "front.csv")
    assert summary["trial"].tolist() == [3, 12]


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("hf", "exports as --format safetensors or --format onnx, not 'hf'"),
        ("gguf", "exports as --format safetensors or --format onnx, not 'gguf'"),
    ],
)
def test_unsupported_formats(checkpoint: Family, tmp_path: Path, fmt: str, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        export_submodel(checkpoint, [8, 8, 8], tmp_path / "export", fmt=fmt)
    assert not (tmp_path / "export").exists()


# --- choosing configurations from search results --------------------------------------------


def _trials() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trial": [0, 1, 2, 3, 4],
            "widths": ["8,8,8", "16,16,16", "64,64,64", "8,16,64", "32,32,32"],
            "loss": [3.0, 2.5, 2.0, 2.4, None],
            "params": [100, 200, 400, 250, 300],
            "latency_ms": [1.0, 2.0, 4.0, 2.5, None],
            "state": ["COMPLETE", "COMPLETE", "COMPLETE", "COMPLETE", "RUNNING"],
        }
    )


def test_pick_trial() -> None:
    member = pick_trial(_trials(), 3, results_dir="res")
    assert member == Member(widths=[8, 16, 64], trial=3, predicted_ms=2.5, search_loss=2.4)


@pytest.mark.parametrize(
    ("trial", "message"),
    [(99, r"trial 99 does not exist in res; finished trials are 0-3"), (4, "RUNNING")],
)
def test_pick_missing_trial(trial: int, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        pick_trial(_trials(), trial, results_dir="res")


@pytest.mark.parametrize(("budget", "trial"), [(2.4, 1), (2.5, 3), (100.0, 2), (1.0, 0)])
def test_pick_under_budget(budget: float, trial: int) -> None:
    assert pick_under_budget(_trials(), budget, results_dir="res").trial == trial


def test_budget_nothing_meets_names_the_fastest() -> None:
    with pytest.raises(ExportError, match=r"meets --max-latency-ms 0.5.*fastest.*trial 0 at 1.000"):
        pick_under_budget(_trials(), 0.5, results_dir="res")


def test_budget_without_latency_column() -> None:
    with pytest.raises(ExportError, match="no latency_ms"):
        pick_under_budget(_trials().drop(columns="latency_ms"), 1.0, results_dir="res")


def test_no_finished_trial() -> None:
    trials = _trials().assign(state="RUNNING")
    with pytest.raises(ExportError, match="no finished trial"):
        front_members(trials, results_dir="res")


def test_front_members_cheapest_first() -> None:
    assert [m.trial for m in front_members(_trials(), results_dir="res")] == [0, 1, 3, 2]


# --- one exporter for every family ---------------------------------------------------------


def _native(tmp_path: Path, tiny_checkpoint: Path) -> tuple[Family, list[int], torch.Tensor]:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    return load_family(tiny_checkpoint), [8, 0, 40], ids


def _gemma3n(tmp_path: Path, tiny_checkpoint: Path) -> tuple[Family, list[int], torch.Tensor]:
    pytest.importorskip("transformers")
    from gemma3n_models import input_ids, save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "gemma3n-tiny")
    return load_family(ckpt), [128, 64, 192, 256, 64, 0], input_ids(length=12)


@pytest.mark.parametrize("make", [_native, _gemma3n], ids=["matlm", "gemma3n"])
def test_generic_export_reloads_with_the_same_logits(
    tmp_path: Path, tiny_checkpoint: Path, make: object
) -> None:
    family, widths, ids = make(tmp_path, tiny_checkpoint)  # type: ignore[operator]
    eval_set = family.load_eval_set(None, max_tokens=64)
    target = TINY_TARGET
    out = tmp_path / "export"
    report = export_submodel(family, Member(widths, trial=5), out, eval_set=eval_set, target=target)

    assert report.family == family.name and report.format == family.export_formats[0]
    assert report.path == out and report.widths == widths and report.trial == 5
    assert report.params == family.param_count(widths)
    assert report.logits_max_abs_diff <= 1e-4 and report.verification
    assert report.loss is not None and report.quality["eval_tokens"] == eval_set.n_tokens
    assert report.latency["target"]["name"] == "tiny-prefill"
    assert set(report.files) <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert family.fingerprint in card and ",".join(map(str, widths)) in card

    reloaded = load_family(out)
    assert reloaded.name == family.name
    assert reloaded.param_count() == report.params
    with torch.inference_mode():
        diff = (reloaded.logits(ids) - family.logits(ids, widths)).abs().max().item()
    assert diff <= 1e-4


def test_a_format_the_family_does_not_write_lists_its_formats(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    family = load_family(tiny_checkpoint)
    with pytest.raises(ExportError, match=r"exports as --format safetensors or --format onnx"):
        export_front(family, [Member([8, 8, 8], trial=0)], tmp_path / "x", fmt="hf")
    assert not (tmp_path / "x").exists()
