"""Search quality without exhaustive truth: hypervolume vs evaluations and vs wall time.

On a model too large to evaluate every configuration (SmolLM2-135M: 9^30 with skips, 8^30
without), the reference front is the pooled best front of every run compared: each run's
hypervolume is measured against the same ideal/nadir (the pooled minimum/maximum of every
objective) and divided by the pooled front's. A sampler that finds a region the others miss
raises the reference for all of them.

Input: `mnm search` results directories (one per sampler, same checkpoint, profile,
objectives, eval tokens), e.g. made by `bench/smollm2_pipeline.sh`. Wall time is the
cumulative `seconds` column of trials.csv (each trial's duration, from the sampler's
suggestion to the evaluated loss: the sampler's own cost included).

Usage:
    python bench/smollm2_search_quality.py RESULTS_DIR... [--checkpoints 10,25,50,100]
        [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from mnm_search.pareto import hypervolume, pareto_front

OBJECTIVES = ["loss", "latency_ms"]


def load_run(directory: Path) -> tuple[str, pd.DataFrame]:
    run = json.loads((directory / "run.json").read_text())
    sampler = run.get("sampler") or run.get("settings", {}).get("sampler") or directory.name
    frame = pd.read_csv(directory / "trials.csv", dtype={"widths": str})
    frame = frame.sort_values("trial").reset_index(drop=True)
    frame["wall_s"] = frame["seconds"].fillna(0).cumsum()
    return str(sampler), frame


def usable(frame: pd.DataFrame) -> pd.DataFrame:
    done = frame[(frame["state"] == "COMPLETE")]
    if "feasible" in done.columns:
        done = done[done["feasible"].astype(bool)]
    return done.dropna(subset=OBJECTIVES)


def pooled_reference(
    frames: Iterable[pd.DataFrame],
) -> tuple[pd.DataFrame, list[float], list[float], float]:
    """The pooled front of all runs' usable trials, the pooled ideal and nadir, and the
    front's hypervolume: what each run's hypervolume is measured against."""
    pooled = pd.concat([usable(f) for f in frames], ignore_index=True)
    ideal = pooled[OBJECTIVES].min().tolist()
    nadir = pooled[OBJECTIVES].max().tolist()
    front = pareto_front(pooled, OBJECTIVES)
    return front, ideal, nadir, hypervolume(front, OBJECTIVES, ideal=ideal, nadir=nadir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--checkpoints", default="10,25,50,100")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = dict(load_run(d) for d in args.dirs)
    pooled_front, ideal, nadir, reference = pooled_reference(runs.values())
    checkpoints = [int(c) for c in args.checkpoints.split(",")]
    result: dict[str, Any] = {
        "objectives": OBJECTIVES,
        "pooled_front_size": len(pooled_front),
        "pooled_trials": sum(len(usable(f)) for f in runs.values()),
        "runs": {},
    }
    print(
        f"pooled reference: {result['pooled_trials']} trials, "
        f"front of {result['pooled_front_size']}"
    )
    header = " | ".join(f"{c} evals" for c in checkpoints)
    print(f"| sampler | {header} | wall s at {checkpoints[-1]} | front members from it |")
    print(f"|---|{'---|' * len(checkpoints)}---|---|")
    for name, frame in runs.items():
        ratios, walls = {}, {}
        for count in checkpoints:
            head = usable(frame.head(count))
            if len(frame) < count or head.empty:
                continue
            found = hypervolume(head, OBJECTIVES, ideal=ideal, nadir=nadir)
            ratios[count] = found / reference
            walls[count] = float(frame["wall_s"].iloc[count - 1])
        contributed = int(pooled_front["widths"].isin(set(frame["widths"])).sum())
        result["runs"][name] = {
            "hv_ratio": ratios,
            "wall_s": walls,
            "trials": len(frame),
            "pooled_front_members": contributed,
            "curve": [
                {
                    "evals": i + 1,
                    "wall_s": float(frame["wall_s"].iloc[i]),
                    "hv_ratio": hypervolume(
                        usable(frame.head(i + 1)), OBJECTIVES, ideal=ideal, nadir=nadir
                    )
                    / reference,
                }
                for i in range(len(frame))
            ],
        }
        cells = " | ".join(f"{ratios[c]:.3f}" if c in ratios else "-" for c in checkpoints)
        last = walls.get(checkpoints[-1])
        wall = f"{last:.0f}" if last is not None else "-"
        print(f"| {name} | {cells} | {wall} | {contributed} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
