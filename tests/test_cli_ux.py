"""What a new user sees: help texts, 80-column output, progress in logs, labelled losses."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer.main
from rich.console import Console
from typer.testing import CliRunner

from mnm_search import profiler
from mnm_search.cli import _common, _core, app
from mnm_search.profiler import latency_model_warnings

runner = CliRunner()
ROOT = typer.main.get_command(app)
COMMANDS = sorted(ROOT.commands)  # type: ignore[attr-defined]
TARGET_YAML = "device: cpu\nphase: prefill\nseq_len: 8\nrepeats: 3\nwarmup: 0\n"
TARGET_YAML += "calibration: 4\nvalidation: 3\n"


def _flat(text: str) -> str:
    """Output with rich's line wrapping and table borders undone, for phrase checks."""
    return " ".join(re.sub(r"[│┃|]", " ", text).split())


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)])
def test_help_shows_flags_without_a_value_type(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    assert "--help" in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_and_the_command_an_example(name: str) -> None:
    command = ROOT.commands[name]  # type: ignore[attr-defined]
    context = command.make_context(name, [], resilient_parsing=True)
    undocumented = [param.name for param in command.get_params(context) if not param.help]
    assert undocumented == []
    assert "Example: mnm " in runner.invoke(app, [name, "--help"]).output


def test_eval_help_states_the_widths_default() -> None:
    output = _flat(runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "80"}).output)
    assert "(default: the checkpoint's own widths" in output


@pytest.fixture
def target_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TARGET_YAML)
    return path


def _cases(ckpt: Path, target: Path, tmp: Path) -> dict[str, list[str]]:
    return {
        "info default": ["info"],
        "eval": ["eval", str(ckpt), "-w", "S,M,XL", "--max-tokens", "64"],
        "profile": ["profile", str(ckpt), "-t", str(target), "-o", str(tmp / "p.json")],
    }


@pytest.mark.parametrize("case", ["info default", "eval", "profile"])
def test_tables_fit_80_columns_without_cutting_cells(
    case: str, tiny_checkpoint: Path, target_file: Path, tmp_path: Path
) -> None:
    args = _cases(tiny_checkpoint, target_file, tmp_path)[case]
    result = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80


@pytest.mark.parametrize("latency", [True, False])
def test_eval_table_of_a_large_model_fits_80_columns(
    latency: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(_common, "out", Console(file=screen, width=80, color_system=None))
    result: dict[str, Any] = {
        "widths_compact": "16384*35",
        "loss": 2.123456,
        "perplexity": 8.3456,
        "params": 7_849_814_400,  # Gemma 3n E4B sizes
        "effective_params": 4_012_345_678,
        "n_tokens": 4096,
        "eval_seconds": 123.45,
        "data": None,
    }
    if latency:
        result.update(latency_ms=1234.5678, latency_target="cpu-prefill")
    _common.print_eval_result(result)
    text = screen.getvalue()
    assert "…" not in text
    for number in ("2.1235", "7,849,814,400", "4,012,345,678", *(["1234.568"] if latency else [])):
        assert number in text


def test_progress_bar_on_an_80_column_terminal_keeps_bar_and_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    screen = io.StringIO()
    terminal = Console(file=screen, width=80, force_terminal=True, color_system=None)
    monkeypatch.setattr(_common, "err", terminal)
    status = "0.25 trials/s  best loss under the limits 1.4866  HV 0.123456"
    with _common.progress_bar() as progress:
        task = progress.add_task("searching", total=100, status=status)
        progress.update(task, completed=30)
        progress.refresh()
    text = screen.getvalue()
    assert "30/100" in text and "━" in text
    assert "…" not in text
    assert "1.4866" in text


def test_search_without_a_terminal_prints_progress_lines(
    tiny_checkpoint: Path, eval_text_file: Path, tmp_path: Path
) -> None:
    args = ["search", str(tiny_checkpoint), "--objectives", "loss,params", "--trials", "6"]
    args += ["--sampler", "random", "--data", str(eval_text_file), "--max-tokens", "64"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    lines = re.findall(r"^searching \d+/6 \(\d+%\), \d+:\d\d:\d\d elapsed.*$", result.output, re.M)
    assert lines, result.output
    assert lines[-1].startswith("searching 6/6 (100%)")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("updates", "expected"),
    [
        # one line per 10 % of the total, never two for the same step
        ([(step, 0.1) for step in range(1, 101)], [f"{p}/100 ({p}%)" for p in range(10, 101, 10)]),
        # slow work: a line after 30 s even though 10 % is not reached
        ([(1, 31.0), (2, 1.0), (3, 31.0)], ["1/100 (1%)", "3/100 (3%)"]),
    ],
)
def test_log_progress_prints_every_10_percent_or_30_seconds(
    updates: list[tuple[int, float]], expected: list[str]
) -> None:
    clock = _Clock()
    log = io.StringIO()
    progress = _common.LogProgress(console=Console(file=log, width=200), get_time=clock)
    with progress:
        task = progress.add_task("work", total=100, status="")
        for completed, seconds in updates:
            clock.now += seconds
            progress.update(task, completed=completed, status="ok")
    lines = log.getvalue().splitlines()
    shown = [re.match(r"work (\S+ \(\d+%\))", line).group(1) for line in lines]  # type: ignore[union-attr]
    # the last state is always printed when the display stops
    last = f"{updates[-1][0]}/100 ({updates[-1][0]}%)"
    assert shown == (expected if expected[-1] == last else [*expected, last])
    assert all(line.endswith(", ok") for line in lines)


def test_log_progress_time_left_ignores_resumed_work() -> None:
    clock = _Clock()
    log = io.StringIO()
    with _common.LogProgress(console=Console(file=log, width=200), get_time=clock) as progress:
        task = progress.add_task("training", total=100, status="")
        clock.now = 60.0  # start-up, then a resumed run reports the 50 steps it already has
        progress.update(task, completed=50)
        for step in range(51, 61):  # then one step per second
            clock.now += 1.0
            progress.update(task, completed=step)
    lines = log.getvalue().splitlines()
    assert lines[0] == "training 50/100 (50%), 0:01:00 elapsed"
    assert lines[1] == "training 60/100 (60%), 0:01:10 elapsed, ~0:00:40 left"


@pytest.mark.parametrize(
    ("data", "n_tokens", "text"),
    [
        (None, 8192, "nats/token, bundled validation text, 8,192 tokens"),
        ("bundled validation text", 4096, "nats/token, bundled validation text, 4,096 tokens"),
        ("corpus.txt", 32768, "nats/token, corpus.txt, 32,768 tokens"),
        ("corpus.txt", None, "nats/token, corpus.txt, token count not recorded"),
    ],
)
def test_loss_label(data: str | None, n_tokens: int | None, text: str) -> None:
    assert _common.loss_label(data, n_tokens) == text


def test_eval_table_says_what_the_loss_was_measured_on(tiny_checkpoint: Path) -> None:
    args = ["eval", str(tiny_checkpoint), "-w", "S*3", "--max-tokens", "64"]
    result = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "loss: nats/token, bundled validation text, 64 tokens" in _flat(result.output)


def test_info_labels_the_recorded_losses() -> None:
    result = runner.invoke(app, ["info"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    output = _flat(result.output)
    assert "(nats/token, bundled validation text, 32,768 tokens; at the last training step)" in (
        output
    )
    assert "65,536 tokens; the weights as shipped" in output
    # recorded as `--out /work/train_default` on the machine it was trained on
    assert "mnm train --out train_default --preset default" in output
    assert "/work/train_default" not in output


@pytest.mark.parametrize(
    ("command", "checkpoint", "shown"),
    [
        ("mnm train --out /work/run --steps 5", "/elsewhere/ckpt", "mnm train --out run --steps 5"),
        (
            "mnm train --out /w/ckpt --data /w/ckpt/t.txt",
            "/w/ckpt",
            "mnm train --out . --data t.txt",
        ),
        ("mnm train --out=/a/b/c --seed 1", None, "mnm train --out=c --seed 1"),
        (
            "mnm train --out my-matlm --data 'my texts/'",
            "/x",
            "mnm train --out my-matlm --data 'my texts/'",
        ),
    ],
)
def test_recorded_commands_show_short_paths(
    command: str, checkpoint: str | None, shown: str
) -> None:
    directory = Path(checkpoint) if checkpoint is not None else None
    assert _core.display_command(command, directory) == shown


def _validation(mape: float, noise: float, spearman: float) -> dict[str, Any]:
    return {"mape_pct": mape, "spearman": spearman, "noise_floor": {"mape_pct": noise}}


@pytest.mark.parametrize(
    ("validation", "expected"),
    [
        (_validation(2.5, 1.0, 0.98), []),
        (_validation(49.4, 3.0, 0.9), ["held-out MAPE 49.4 % > 15 %"]),
        (_validation(8.0, 23.0, 0.9), ["noise floor 23.0 % > 10 %"]),
        (_validation(8.0, 3.0, 0.5), ["Spearman 0.50 < 0.8"]),
        (
            _validation(49.4, 23.0, 0.5),
            ["held-out MAPE 49.4 %", "noise floor 23.0 %", "Spearman 0.50"],
        ),
        ({"mape_pct": None, "spearman": None, "noise_floor": {"mape_pct": None}}, []),
    ],
)
def test_latency_model_warnings(validation: dict[str, Any], expected: list[str]) -> None:
    problems = latency_model_warnings(validation)
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected):
        assert problem.startswith(start)


@pytest.mark.parametrize("bad", [True, False])
def test_profile_warns_about_an_unreliable_latency_model(
    bad: bool,
    tiny_checkpoint: Path,
    target_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    measured = profiler.profile

    def fake_validation(*args: Any, **kwargs: Any) -> dict[str, Any]:
        result = measured(*args, **kwargs)
        result["validation"].update(_validation(49.4, 23.0, 0.3) if bad else _validation(2, 1, 1))
        result["warnings"] = latency_model_warnings(result["validation"])
        return result

    monkeypatch.setattr(profiler, "profile", fake_validation)
    out = tmp_path / "p.json"
    args = ["profile", str(tiny_checkpoint), "-t", str(target_file), "-o", str(out), "--json"]
    result = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    stored = json.loads(out.read_text())["warnings"]
    assert json.loads(result.stdout)["warnings"] == stored  # stdout is still one JSON object
    output = _flat(result.output)
    if bad:
        assert len(stored) == 3
        assert "Warning: this latency model is unreliable" in output
        assert "re-run `mnm profile` without --quick" in output
    else:
        assert stored == []
        assert "unreliable" not in output
