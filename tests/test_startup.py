"""Fast start-up (issue 15): `import mnm_search` and every `--help` stay free of heavy libraries.

Each check runs in a fresh interpreter, since this test process has long imported torch.
Timing is left to `bench/startup.py`; here the cause of a slow start is checked directly:
which libraries got imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from typer.main import get_command

import mnm_search
from mnm_search.cli import app

# Each takes from a tenth of a second (numpy) to seconds (torch) to import; no help needs one.
HEAVY = (
    "torch",
    "numpy",
    "pandas",
    "matplotlib",
    "optuna",
    "safetensors",
    "transformers",
    "sqlalchemy",
    "scipy",
    "gguf",
    "onnx",
)
COMMANDS = sorted(get_command(app).commands)  # type: ignore[attr-defined]


def _heavy_modules_after(code: str) -> list[str]:
    """Run CODE in a fresh interpreter; the heavy libraries it left in sys.modules."""
    script = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import json, sys
        print(json.dumps(sorted(set({HEAVY!r}) & set(sys.modules))))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_there_are_commands_to_check() -> None:
    assert {"info", "search", "export"} <= set(COMMANDS)


def test_importing_the_package_imports_no_heavy_library() -> None:
    assert _heavy_modules_after("import mnm_search") == []


@pytest.mark.parametrize("command", [None, *COMMANDS], ids=lambda c: c or "mnm")
def test_help_imports_no_heavy_library(command: str | None) -> None:
    args = ["--help"] if command is None else [command, "--help"]
    code = f"""
        from typer.testing import CliRunner
        from mnm_search.cli import app

        result = CliRunner().invoke(app, {args!r})
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output, result.output
    """
    assert _heavy_modules_after(code) == []


@pytest.mark.parametrize("name", sorted(set(mnm_search.__all__) - {"__version__"}))
def test_lazy_public_names_resolve_to_their_definitions(name: str) -> None:
    value = getattr(mnm_search, name)
    assert callable(value)
    module = sys.modules[value.__module__]
    assert getattr(module, name) is value
    assert name in dir(mnm_search)


def test_from_import_of_a_lazy_name_works() -> None:
    from mnm_search import load_model
    from mnm_search.checkpoint import load_model as defined

    assert load_model is defined
    assert isinstance(mnm_search.__version__, str)


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = mnm_search.no_such_name  # type: ignore[attr-defined]
    assert not hasattr(mnm_search, "no_such_name")
