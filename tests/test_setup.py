"""The README's set-up commands and CI agree, and the package declares what its code needs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block, "README.md has no bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_the_demo_and_the_test_command() -> None:
    demo, tests = _readme_commands()
    assert demo.endswith("mnm demo")
    assert tests.endswith("python -m pytest -q")


def test_ci_runs_exactly_the_readme_commands_in_a_fresh_venv() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in ci.splitlines()]
    for command in _readme_commands():
        assert any(line.startswith(command) for line in lines), command
    assert "-m venv" in ci and "--system-site-packages" not in ci


def test_optuna_floor_and_gp_sampler_dependency_are_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[<>=!~ ]", dep, maxsplit=1)[0]: dep for dep in project["dependencies"]}
    # Trial.set_constraint / FrozenTrial.constraints are Optuna 5 APIs; GPSampler needs scipy.
    assert deps["optuna"] == "optuna>=5.0"
    assert "scipy" in deps
