"""`mnm profile` and `mnm eval --profile` through the CLI: success paths and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mnm_search.checkpoint import save_checkpoint
from mnm_search.cli import _profile, app
from mnm_search.model import MatLM
from mnm_search.profiler import latency_model_warnings

runner = CliRunner()

TINY_TARGET = """\
device: cpu
phase: prefill
seq_len: 8
repeats: 3
warmup: 1
calibration: 6
validation: 3
"""


@pytest.fixture
def target_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-prefill.yaml"
    path.write_text(TINY_TARGET)
    return path


@pytest.fixture
def profile_file(tmp_path: Path, tiny_checkpoint: Path, target_file: Path) -> Path:
    out = tmp_path / "profile.json"
    result = runner.invoke(
        app, ["profile", str(tiny_checkpoint), "--target", str(target_file), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    return out


def _fails(args: list[str], message: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert message in result.output, result.output
    return result.output


def test_profile_writes_json_and_prints_summary(
    tmp_path: Path, tiny_checkpoint: Path, target_file: Path
) -> None:
    out = tmp_path / "p.json"
    result = runner.invoke(
        app,
        ["profile", str(tiny_checkpoint), "-t", str(target_file), "-o", str(out), "--quick"],
    )
    assert result.exit_code == 0, result.output
    for text in ("Time per layer", "Fixed costs", "Uniform models", "MAPE", "noise floor"):
        assert text in result.output
    profile = json.loads(out.read_text())
    assert profile["quick"] is True
    assert profile["target"]["name"] == "tiny-prefill"


def test_profile_json_output(tmp_path: Path, tiny_checkpoint: Path, target_file: Path) -> None:
    out = tmp_path / "p.json"
    result = runner.invoke(
        app, ["profile", str(tiny_checkpoint), "-t", str(target_file), "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["profile"] == str(out)
    assert {"mape_pct", "spearman", "within_10pct", "noise_floor"} <= set(data["validation"])
    # the library writes the warnings (search --target and demo profiles carry them too)
    stored = json.loads(out.read_text())
    assert stored["warnings"] == latency_model_warnings(stored["validation"]) == data["warnings"]


def test_profile_default_output_name(
    tmp_path: Path, tiny_checkpoint: Path, target_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["profile", str(tiny_checkpoint), "-t", str(target_file)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "profile-tiny-prefill.json").is_file()


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("device: cpu\nphase: train\nseq_len: 8\n", "'phase' must be one of prefill, decode"),
        ("device: cpu\nphase: prefill\nseq_len: 8\nthreds: 1\n", "unknown field(s) 'threds'"),
        ("phase: prefill\nseq_len: 8\n", "missing required field 'device'"),
    ],
)
def test_bad_target_is_a_clear_error(
    tmp_path: Path, tiny_checkpoint: Path, yaml_text: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    _fails(["profile", str(tiny_checkpoint), "--target", str(path)], message)


def test_cuda_target_without_cuda(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "p.json"
    target = Path(__file__).resolve().parent.parent / "profiles" / "cuda-prefill.yaml"
    _fails(
        ["profile", str(tiny_checkpoint), "-t", str(target), "-o", str(out)],
        "CUDA is not available",
    )
    assert not out.exists()


def test_target_too_long_for_the_checkpoint(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = tmp_path / "long.yaml"
    path.write_text("device: cpu\nphase: decode\ncontext_len: 100\n")
    _fails(["profile", str(tiny_checkpoint), "-t", str(path)], "max_seq_len=32")


def test_interrupted_profile_writes_nothing(
    tmp_path: Path, tiny_checkpoint: Path, target_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(_profile, "profile_loaded", interrupted)
    out = tmp_path / "p.json"
    result = runner.invoke(
        app, ["profile", str(tiny_checkpoint), "-t", str(target_file), "-o", str(out)]
    )
    assert result.exit_code == 130
    assert "Interrupted" in result.output and "Traceback" not in result.output
    assert list(tmp_path.glob("*.json")) == []


def test_bad_measure_widths(tiny_checkpoint: Path, target_file: Path) -> None:
    _fails(
        ["profile", str(tiny_checkpoint), "-t", str(target_file), "--measure-widths", "a,b"],
        "--measure-widths takes comma-separated integers",
    )
    _fails(
        ["profile", str(tiny_checkpoint), "-t", str(target_file), "--measure-widths", "100"],
        "extra width 100 is outside (0, 64]",
    )


def test_eval_with_profile_reports_predicted_latency(
    tiny_checkpoint: Path, profile_file: Path, eval_text_file: Path
) -> None:
    args = ["eval", str(tiny_checkpoint), "--widths", "S,M,XL", "--data", str(eval_text_file)]
    result = runner.invoke(app, [*args, "--profile", str(profile_file), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    profile = json.loads(profile_file.read_text())
    coefficients = profile["latency_model"]["coefficients"]
    assert data["latency_ms"] > 0
    assert data["latency_target"] == "tiny-prefill"
    assert data["latency_interpolated_layers"] == []
    assert coefficients is not None
    table = runner.invoke(app, [*args, "--profile", str(profile_file)])
    assert table.exit_code == 0 and "pred. ms" in table.output
    assert "pred. ms: latency on tiny-prefill predicted by the profile" in table.output
    plain = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert "latency_ms" not in plain


def test_eval_refuses_another_checkpoints_profile(
    tmp_path: Path, profile_file: Path, tiny_config, eval_text_file: Path
) -> None:
    torch.manual_seed(1)
    other = save_checkpoint(MatLM(tiny_config), tmp_path / "other-ckpt")
    _fails(
        [
            "eval",
            str(other),
            "--widths",
            "S*3",
            "--data",
            str(eval_text_file),
            "--profile",
            str(profile_file),
        ],
        "measured for another checkpoint",
    )


def test_eval_refuses_a_corrupt_profile(
    tmp_path: Path, tiny_checkpoint: Path, profile_file: Path, eval_text_file: Path
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text(profile_file.read_text()[:200])
    _fails(
        [
            "eval",
            str(tiny_checkpoint),
            "--widths",
            "S*3",
            "--data",
            str(eval_text_file),
            "--profile",
            str(broken),
        ],
        "is corrupt",
    )


def test_eval_warns_about_a_profile_from_other_hardware(
    tmp_path: Path, tiny_checkpoint: Path, profile_file: Path, eval_text_file: Path
) -> None:
    profile = json.loads(profile_file.read_text())
    profile["device"]["cpu_model"] = "Imaginary CPU 9000"
    moved = tmp_path / "elsewhere.json"
    moved.write_text(json.dumps(profile))
    result = runner.invoke(
        app,
        [
            "eval",
            str(tiny_checkpoint),
            "--widths",
            "S*3",
            "--data",
            str(eval_text_file),
            "--profile",
            str(moved),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Warning:" in result.stderr and "Imaginary CPU 9000" in result.stderr
    assert json.loads(result.stdout)["latency_ms"] > 0


def test_help_has_an_example() -> None:
    result = runner.invoke(app, ["profile", "--help"])
    assert result.exit_code == 0
    assert "Example: mnm profile" in result.output


def test_profile_prints_both_validations(
    tmp_path: Path, tiny_checkpoint: Path, target_file: Path
) -> None:
    """In-process and fresh-process held-out numbers, in the output, the JSON and --json."""
    out = tmp_path / "p.json"
    args = ["profile", str(tiny_checkpoint), "-t", str(target_file), "-o", str(out), "--quick"]
    result = runner.invoke(app, [*args, "--fresh", "3"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Held-out validation, in this process (3 sliced models)" in result.output
    assert "Held-out validation, fresh processes (3 exported models" in result.output
    profile = json.loads(out.read_text())
    fresh = profile["fresh_validation"]
    assert fresh["n"] == 3 and profile["validation"]["n"] == 3
    assert f"{fresh['mape_pct']:.2f} %" in result.output
    assert f"{profile['validation']['mape_pct']:.2f} %" in result.output
    data = json.loads(runner.invoke(app, [*args, "--fresh", "3", "--json"]).stdout)
    assert {"mape_pct", "spearman", "noise_floor", "drift_corrected"} <= set(
        data["fresh_validation"]
    )
    assert "samples" not in data["fresh_validation"]


def test_profile_fresh_zero_skips_and_says_so(
    tmp_path: Path, tiny_checkpoint: Path, target_file: Path
) -> None:
    out = tmp_path / "p.json"
    args = ["profile", str(tiny_checkpoint), "-t", str(target_file), "-o", str(out), "--fresh", "0"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Fresh-process validation: none (not requested" in result.output
    assert json.loads(out.read_text())["fresh_validation"]["n"] == 0


def test_a_version_1_profile_still_loads_and_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Profiles written before fresh-process validation (format version 1) keep working."""
    from mnm_search.latency import LatencyModel

    old = Path(__file__).resolve().parent.parent / "bench/data/profile-default-cpu-prefill.json"
    data = json.loads(old.read_text())
    assert data["version"] == 1 and "fresh_validation" not in data
    model = LatencyModel.from_profile(data)
    assert model.predict_ms([1024] * model.n_layers) > 0
    _profile.print_validation(data)
    printed = capsys.readouterr().out
    assert "Held-out validation, in this process" in printed
    assert "Fresh-process validation: none (this profile predates it" in printed
