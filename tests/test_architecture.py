"""Model families are the one extension point: code outside `mnm_search/families/` sees only the
`Family` interface, never a concrete family (DESIGN.md §5)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mnm_search"

# What naming a concrete family looks like: importing its module, its classes or constants,
# comparing a family name, or testing the native checkpoint type.
CONCRETE = re.compile(
    r"families\.(gemma3n|matlm|matformer_lab|llama\w*)\b"
    r"|families import [^\n]*\b(GEMMA3N|NATIVE|load_gemma3n)\b"
    r"|\bGEMMA3N\b"
    r"|\bGemma3n[A-Z]\w*"
    r"|\bMatLMFamily\b"
    r"|\bLlama(Family|LM|Spec|Steps|Probe|Decoder)\b"
    r"|isinstance\([^)]*Checkpoint\)"
    r"|\bfamily_of\("
    r"|== *[\"'](gemma3n|matlm|llama)[\"']"
)


def _offending_lines() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "families" in path.relative_to(PACKAGE).parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.lstrip().startswith("#"):
                continue
            if CONCRETE.search(line):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    return found


def test_no_module_outside_families_names_a_concrete_family() -> None:
    offending = _offending_lines()
    assert not offending, "use the Family interface instead:\n" + "\n".join(offending)


@pytest.mark.parametrize(
    "line",
    [
        "from mnm_search.families.gemma3n import Gemma3nFamily",
        "if family_of(ckpt) == GEMMA3N:",
        "if isinstance(subject, Checkpoint):",
        'native = family.name == "matlm"',
        "from mnm_search.families import load_gemma3n",
        "from mnm_search.families.llama import LlamaFamily",
        "from mnm_search.families.llama_nest import matformerize",
        'if family.name == "llama":',
    ],
)
def test_the_check_recognises_concrete_family_names(line: str) -> None:
    assert CONCRETE.search(line)


def test_the_check_allows_the_interface() -> None:
    for line in (
        "from mnm_search.families import load_family",
        "from mnm_search.families.base import Family",
        "family = load_family(ckpt, step=step)",
    ):
        assert not CONCRETE.search(line), line
