"""Benchmark of start-up time (issue 15): how long `mnm --help` and friends take.

Each command runs N times in a fresh process (the installed `mnm` script, so that the
interpreter's own start-up counts, as a user sees it); the report gives median, min and max
wall seconds. `python -X importtime -c "import mnm_search.cli"` then names the slowest
imports (cumulative microseconds), and which heavy libraries the CLI imports at all.
Target: `mnm --help` <= 0.5 s on an idle machine.

Usage (on an idle machine; timings under load are meaningless):
    python bench/startup.py                      # 9 runs each, writes bench/data/startup.json
    python bench/startup.py --runs 15 --json /tmp/startup.json
Each run replaces its --label's entry (default "after") in the JSON file and keeps the others.
The "before" entry measured commit b0dc4d4, the last one before the change, from a copy:
    git archive b0dc4d4 mnm_search | tar -x -C /tmp/mnm-before
    PYTHONPATH=/tmp/mnm-before python bench/startup.py --label before
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [["--help"], ["search", "--help"], ["info", "--help"]]
HEAVY = ["torch", "numpy", "pandas", "matplotlib", "optuna", "safetensors", "transformers"]
# As a user runs it: Python caches byte-code (PYTHONDONTWRITEBYTECODE, set in some sandboxes,
# would make every run compile the package from source).
ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
# Outside the repository: `python -c` puts the working directory first on sys.path, which
# would shadow a PYTHONPATH pointing at another copy of the package (a "before" snapshot).
CWD = tempfile.gettempdir()


def mnm_executable() -> list[str]:
    """The installed `mnm` script next to this interpreter, else `python -m mnm_search`."""
    script = Path(sys.executable).parent / "mnm"
    if script.exists():
        return [str(script)]
    found = shutil.which("mnm")
    return [found] if found else [sys.executable, "-m", "mnm_search"]


def wall_seconds(command: list[str], runs: int) -> dict[str, Any]:
    """Wall seconds of `runs` fresh processes, after one untimed run (warms the byte-code
    cache and the file system cache)."""
    subprocess.run(command, capture_output=True, check=True, env=ENV, cwd=CWD)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True, env=ENV, cwd=CWD)
        times.append(time.perf_counter() - started)
    return {
        "runs": runs,
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "max_s": round(max(times), 3),
    }


def import_times(module: str, top: int) -> dict[str, Any]:
    """The `top` slowest imports (cumulative) of `import module`, and the heavy ones present."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=True,
        env=ENV,
        cwd=CWD,
    )
    # Lines read "import time: self_us | cumulative_us | module".
    rows = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative_us, name = line.split("|")
        rows.append((int(cumulative_us), name.strip()))
    names = {name for _, name in rows}
    total_us = next((us for us, name in rows if name == module), 0)
    rows.sort(reverse=True)
    return {
        "total_ms": round(total_us / 1000, 1),
        "top": [{"module": name, "cumulative_ms": round(us / 1000, 1)} for us, name in rows[:top]],
        "heavy_imported": [name for name in HEAVY if name in names],
    }


def commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "data" / "startup.json")
    parser.add_argument(
        "--label", default="after", help="key of this run in the JSON file; others are kept"
    )
    parser.add_argument("--note", default="", help="what was measured, stored with the run")
    args = parser.parse_args()

    mnm = mnm_executable()
    walls = {}
    for arguments in COMMANDS:
        label = " ".join(["mnm", *arguments])
        walls[label] = wall_seconds([*mnm, *arguments], args.runs)
        print(
            f"{label:<20} median {walls[label]['median_s']:.3f} s "
            f"(min {walls[label]['min_s']:.3f}, max {walls[label]['max_s']:.3f}, n={args.runs})"
        )
    baseline = wall_seconds([sys.executable, "-c", "pass"], args.runs)
    print(f"{'python -c pass':<20} median {baseline['median_s']:.3f} s")
    imports = import_times("mnm_search.cli", args.top)
    print(
        f"\nimport mnm_search.cli: {imports['total_ms']} ms cumulative; "
        f"heavy modules imported: {', '.join(imports['heavy_imported']) or 'none'}"
    )
    for row in imports["top"]:
        print(f"  {row['cumulative_ms']:>9.1f} ms  {row['module']}")

    report = json.loads(args.json.read_text()) if args.json.exists() else {}
    report[args.label] = {
        "commit": commit(),
        "note": args.note,
        "command": mnm,
        "wall": walls,
        "python_startup": baseline,
        "import_mnm_search_cli": imports,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
