"""The README's set-up commands and CI agree, and the package declares what its code needs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
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


def test_ci_lints_with_the_ruff_the_test_extra_installs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    tests_at = ci.index("python -m pytest -q")
    lint_at = ci.index('ruff" check .')
    assert tests_at < lint_at, "ruff runs after the README's test command"
    assert '"$venv/bin/ruff" check .' in ci  # the fresh venv's ruff, not one on PATH
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    test_extra = {
        re.split(r"[<>=!~ \[]", dep, maxsplit=1)[0]
        for dep in project["optional-dependencies"]["test"]
    }
    assert "ruff" in test_extra
    assert "[tool.ruff]" in (ROOT / "pyproject.toml").read_text()  # the repo's own settings


def _fake_ci(tmp_path: Path, pytest_status: int, ruff_status: int) -> subprocess.CompletedProcess:
    """.ci/run with python3, pip, mnm, pytest and ruff replaced by stubs with set exit codes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        # `python3 -m venv DIR` makes DIR/bin/{activate,ruff}; `python -m pytest` exits as told
        "python3": (
            'if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin"; '
            f'printf "export PATH={bin_dir}:\\$PATH\\n" > "$3/bin/activate"; '
            f'printf "#!/bin/sh\\nexit {ruff_status}\\n" > "$3/bin/ruff"; chmod +x "$3/bin/ruff"; '
            "exit 0; fi; exit 0"
        ),
        "python": f'[ "$2" = "pytest" ] && exit {pytest_status}; echo "Python 3"; exit 0',
        "pip": "exit 0",
        "mnm": "exit 0",
    }
    for name, body in stubs.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    (repo / ".ci" / "run").write_text((ROOT / ".ci" / "run").read_text())
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TMPDIR": str(tmp_path)}
    return subprocess.run(
        ["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize(
    ("pytest_status", "ruff_status", "expected"),
    [(0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1), (5, 0, 5)],
)
def test_ci_exit_status_covers_tests_and_lint(
    tmp_path: Path, pytest_status: int, ruff_status: int, expected: int
) -> None:
    if shutil.which("bash") is None:
        pytest.skip("no bash here")
    result = _fake_ci(tmp_path, pytest_status, ruff_status)
    assert result.returncode == expected, result.stdout + result.stderr


def test_the_wheel_ships_the_targets(tmp_path: Path) -> None:
    """`pip install .` (not editable) installs profiles/*.yaml, so `--target cpu-decode`
    works from any directory; built from a copy, so the checkout gets no build files."""
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "mnm_search", source / "mnm_search", ignore=shutil.ignore_patterns("__pycache__")
    )
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    result = subprocess.run(
        [*command, "-q", str(source), "-w", str(tmp_path / "wheel")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"mnm_search/profiles/{p.name}" for p in (ROOT / "profiles").glob("*.yaml")}
    assert shipped and shipped <= names
