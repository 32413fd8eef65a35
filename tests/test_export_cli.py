"""`mnm export` through the CLI: every way of choosing, every bad input, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from mnm_search.checkpoint import load_checkpoint
from mnm_search.cli import app
from mnm_search.families import matlm as matlm_module

# trial -> (widths, loss, latency_ms): the front by latency is 0, 2, 3, 4 (1 is dominated)
TRIALS = {
    0: ("8,8,8", 5.0, 1.0),
    1: ("16,16,16", 4.9, 2.5),
    2: ("8,16,32", 4.7, 2.0),
    3: ("32,32,64", 4.5, 3.0),
    4: ("64,64,64", 4.4, 4.0),
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path) -> Path:
    """A tmp cwd holding a tiny checkpoint, a tiny timing target and a results directory."""
    monkeypatch.chdir(tmp_path)
    target = {"device": "cpu", "phase": "prefill", "seq_len": 8, "repeats": 3, "warmup": 0}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(target))
    write_results(tmp_path / "res", tiny_checkpoint)
    return tmp_path


def write_results(directory: Path, checkpoint: Path, *, state: str = "COMPLETE") -> None:
    rows = [
        {
            "trial": t,
            "widths": w,
            "loss": loss,
            "params": 0,
            "latency_ms": ms,
            "state": state,
            "feasible": True,
        }
        for t, (w, loss, ms) in TRIALS.items()
    ]
    trials = pd.DataFrame(rows)
    directory.mkdir()
    trials.to_csv(directory / "trials.csv", index=False)
    trials.to_csv(directory / "pareto.csv", index=False)
    run_info = {
        "objective_columns": ["loss", "latency_ms"],
        "constraints": {},
        "space": {"granularities": [8, 16, 32, 64]},
        "checkpoint": str(checkpoint),
        "fingerprint": load_checkpoint(checkpoint).fingerprint,
        "profile": None,
    }
    (directory / "run.json").write_text(json.dumps(run_info))


def run(*args: str):  # type: ignore[no-untyped-def]
    base = ["export", "--target", "tiny.yaml", "--max-tokens", "256"]
    result = CliRunner().invoke(app, [*base, *args])
    assert "Traceback" not in result.output
    return result


def exported_widths(path: Path) -> list[int]:
    return json.loads((path / "config.json").read_text())["ffn_widths"]


def test_export_widths_json(workdir: Path, tiny_checkpoint: Path) -> None:
    result = run(str(tiny_checkpoint), "--widths", "S,0,XL", "--out", "out", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["widths"] == [8, 0, 64] and data["widths_compact"] == "S 0 XL"
    assert data["logits_max_abs_diff"] <= 1e-5
    assert data["measured_ms"] > 0 and data["full_model_ms"] > 0 and data["loss"] > 0
    assert exported_widths(workdir / "out") == [8, 0, 64]


@pytest.mark.parametrize(
    ("choice", "widths"),
    [
        (["--trial", "1"], [16, 16, 16]),
        (["--max-latency-ms", "2.9"], [8, 16, 32]),
        (["--max-latency-ms", "3"], [32, 32, 64]),
    ],
)
def test_export_from_results(workdir: Path, choice: list[str], widths: list[int]) -> None:
    result = run("--from", "res", *choice, "--out", "out")
    assert result.exit_code == 0, result.output
    assert exported_widths(workdir / "out") == widths
    config = json.loads((workdir / "out" / "config.json").read_text())
    assert config["latency"]["predicted_ms"] == TRIALS[config["export"]["trial"]][2]
    assert config["export"]["results_dir"] == "res"
    assert "verified" in result.stdout


def test_export_all_pareto(workdir: Path) -> None:
    result = run("--from", "res", "--all-pareto", "--out", "front")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (workdir / "front").iterdir())
    assert names == ["front.csv", "trial-0000", "trial-0002", "trial-0003", "trial-0004"]
    for trial in (0, 2, 3, 4):
        widths = [int(w) for w in TRIALS[trial][0].split(",")]
        assert exported_widths(workdir / "front" / f"trial-{trial:04d}") == widths
    assert "MAPE over 4 exports" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "res", "--trial", "99"], "trial 99 does not exist in res"),
        (["--from", "res", "--max-latency-ms", "0.5"], "fastest available is trial 0 at 1.000 ms"),
        (["--from", "res"], "choose exactly one of --trial N"),
        (["--from", "res", "--trial", "1", "--all-pareto"], "choose exactly one"),
        (["--trial", "1"], "either --widths W or --from RESULTS_DIR"),
        (["--widths", "S,S,S", "--from", "res"], "either --widths W or --from"),
        (["--widths", "S,S"], "give 2 entries, but the checkpoint has 3 layers"),
        (["--widths", "S,S,Q"], "layer 2: unknown width 'Q'"),
        (
            ["--widths", "S,S,S", "--format", "hf"],
            "exports as --format safetensors or --format onnx",
        ),
        (["--from", "nowhere", "--trial", "1"], "nowhere does not exist"),
    ],
)
def test_export_bad_input(
    workdir: Path, tiny_checkpoint: Path, args: list[str], message: str
) -> None:
    ckpt = [str(tiny_checkpoint)] if "--widths" in args and "--from" not in args else []
    result = run(*ckpt, *args, "--out", "out")
    assert result.exit_code == 1
    assert message in result.output
    assert not (workdir / "out").exists()


def test_no_finished_trial(workdir: Path, tiny_checkpoint: Path) -> None:
    write_results(workdir / "running", tiny_checkpoint, state="RUNNING")
    result = run("--from", "running", "--all-pareto", "--out", "out")
    assert result.exit_code == 1
    assert "no finished trial" in result.output
    assert not (workdir / "out").exists()


def test_results_of_another_checkpoint(workdir: Path, tiny_checkpoint: Path) -> None:
    run_json = workdir / "res" / "run.json"
    run_json.write_text(run_json.read_text().replace('"fingerprint": "', '"fingerprint": "x'))
    result = run(str(tiny_checkpoint), "--from", "res", "--trial", "1", "--out", "out")
    assert result.exit_code == 1
    assert "was searched on checkpoint x" in result.output


def test_existing_output_needs_force(workdir: Path) -> None:
    (workdir / "out").mkdir()
    (workdir / "out" / "mine.txt").write_text("keep")
    result = run("--from", "res", "--trial", "1", "--out", "out")
    assert result.exit_code == 1
    assert "out already exists" in result.output and "--force" in result.output
    assert (workdir / "out" / "mine.txt").read_text() == "keep"
    result = run("--from", "res", "--trial", "1", "--out", "out", "--force")
    assert result.exit_code == 0, result.output
    assert exported_widths(workdir / "out") == [16, 16, 16]


def test_failure_half_way_leaves_nothing(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matlm_module, "write_onnx", disk_full)
    result = run("--from", "res", "--all-pareto", "--format", "onnx", "--out", "front")
    assert result.exit_code == 1
    assert "disk full while writing front: free space or choose another --out" in result.output
    assert "nothing was written" in result.output
    assert sorted(p.name for p in workdir.iterdir()) == ["res", "tiny-ckpt", "tiny.yaml"]


@pytest.mark.parametrize(
    ("max_len", "dtype", "name", "seq_len", "description"),
    [
        (4096, None, "cpu-prefill", 128, "CPU prefill, batch 1, 128 tokens"),
        (64, None, "cpu-prefill", 64, "CPU prefill, batch 1, 64 tokens"),
        (
            4096,
            "bfloat16",
            "cpu-prefill-bfloat16",
            128,
            "CPU prefill, batch 1, 128 tokens, bfloat16",
        ),
        (32, "float16", "cpu-prefill-float16", 32, "CPU prefill, batch 1, 32 tokens, float16"),
    ],
)
def test_default_measurement_target_fits_the_model(
    max_len: int, dtype: str | None, name: str, seq_len: int, description: str
) -> None:
    from mnm_search.cli._export import cpu_prefill_target

    target = cpu_prefill_target(max_len=max_len, dtype=dtype)
    assert (target.name, target.seq_len, target.description) == (name, seq_len, description)
    assert target.dtype == (dtype or "float32") and target.device == "cpu"


@pytest.mark.parametrize(
    ("ckpt_arg", "recorded", "named"),
    [
        ("given", "tiny", "tiny"),
        ("omitted", "tiny", "tiny"),
        ("omitted", None, "embedded"),
    ],
)
def test_another_checkpoints_results_name_the_checkpoint_loaded(
    workdir: Path, tiny_checkpoint: Path, ckpt_arg: str, recorded: str | None, named: str
) -> None:
    from mnm_search.checkpoint import default_checkpoint_path

    run_json = workdir / "res" / "run.json"
    info = json.loads(run_json.read_text())
    info["fingerprint"] = "7a21" * 4
    info["checkpoint"] = str(tiny_checkpoint) if recorded else None
    run_json.write_text(json.dumps(info))
    ckpt = [str(tiny_checkpoint)] if ckpt_arg == "given" else []
    result = run(*ckpt, "--from", "res", "--trial", "1", "--out", "out")
    assert result.exit_code == 1
    source = tiny_checkpoint if named == "tiny" else default_checkpoint_path()
    assert f"was searched on checkpoint {'7a21' * 4}, but {source} is " in result.stderr
    assert "None" not in result.stderr
    assert not (workdir / "out").exists()


@pytest.mark.parametrize("slow", [False, True], ids=["quick", "slow"])
def test_export_without_a_terminal_logs_progress_lines(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, slow: bool
) -> None:
    """In a log file a spinner shows nothing until the end: a line per member of a front,
    and the current step when 30 s (here 0) passed without one."""
    if slow:
        monkeypatch.setattr("mnm_search.cli._export.PROGRESS_LOG_SECONDS", 0.0)
    result = run("--from", "res", "--all-pareto", "--out", "front")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("exporting (")]
    members = [f"[{i + 1}/4] trial-{t:04d}" for i, t in enumerate((0, 2, 3, 4))]
    assert [line.split(": ", 1)[1] for line in lines if ": [" in line] == members
    assert any(": slicing S S S" in line for line in lines) == slow, lines
    single = run("--from", "res", "--trial", "1", "--out", "one")
    assert single.exit_code == 0, single.output
    assert ("exporting (" in single.stderr) == slow
