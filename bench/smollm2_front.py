"""The searched front vs uniform slicing on one `mnm search` run, and exported slices'
measured vs predicted latency.

1. For each uniform slice (every layer at the same share of its FFN; seeded into every search)
   the best searched configuration that costs no more, at equal predicted latency and at
   equal parameters, and the loss gap (uniform minus searched; > 0: the search wins).
2. For export directories (`mnm export ... --out DIR`): loss, predicted and measured latency
   from their config.json, and the MAPE of the predictions.

Usage:
    python bench/smollm2_front.py RESULTS_DIR [--budgets 75%,50%,25%] [--exports DIR...]
        [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd


def uniform_rows(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials whose widths are one width everywhere (the uniform seeds)."""
    widths = trials["widths"].astype(str).str.split(",")
    same = widths.apply(lambda ws: len({w.split("*")[0] for w in ws}) == 1)
    return trials[same & (trials["state"] == "COMPLETE")]


def best_within(trials: pd.DataFrame, column: str, limit: float) -> pd.Series | None:
    done = trials[(trials["state"] == "COMPLETE") & (trials[column] <= limit * (1 + 1e-9))]
    return None if done.empty else done.loc[done["loss"].idxmin()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--exports", nargs="*", type=Path, default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    trials = pd.read_csv(args.results / "trials.csv", dtype={"widths": str})
    uniform = uniform_rows(trials).sort_values("params", ascending=False)
    full_params = float(uniform["params"].max())
    result: dict[str, Any] = {"results": str(args.results), "uniform": [], "exports": []}
    print(
        "| uniform | params | loss | pred. ms | best at ≤ its latency (gap) | "
        "best at ≤ its params (gap) |"
    )
    print("|---|---|---|---|---|---|")
    for _, row in uniform.iterrows():
        entry: dict[str, Any] = {
            "widths": row["widths"],
            "params": int(row["params"]),
            "share_of_params": float(row["params"]) / full_params,
            "loss": float(row["loss"]),
            "latency_ms": float(row["latency_ms"]),
        }
        cells = []
        for column in ("latency_ms", "params"):
            best = best_within(trials, column, float(row[column]))
            gap = float(row["loss"]) - float(best["loss"]) if best is not None else None
            entry[f"best_at_{column}"] = (
                None
                if best is None
                else {
                    "widths": best["widths"],
                    "loss": float(best["loss"]),
                    column: float(best[column]),
                    "gap": gap,
                }
            )
            cells.append(f"{float(best['loss']):.3f} ({gap:+.3f})" if best is not None else "-")
        result["uniform"].append(entry)
        print(
            f"| {row['widths']} | {row['params'] / 1e6:.1f}M | {row['loss']:.3f} | "
            f"{row['latency_ms']:.1f} | {cells[0]} | {cells[1]} |"
        )
    errors = []
    for directory in args.exports:
        mnm = json.loads((directory / "config.json").read_text())["mnm"]
        latency, quality = mnm.get("latency") or {}, mnm.get("quality") or {}
        predicted, measured = latency.get("predicted_ms"), latency.get("measured_ms")
        error = (
            100 * (predicted - measured) / measured if predicted is not None and measured else None
        )
        if error is not None:
            errors.append(abs(error))
        result["exports"].append(
            {
                "dir": str(directory),
                "widths": mnm.get("export", {}).get("widths_compact"),
                "loss": quality.get("loss"),
                "predicted_ms": predicted,
                "measured_ms": measured,
                "full_model_ms": latency.get("full_model_measured_ms"),
                "error_pct": error,
                "gguf": (mnm.get("verification") or {}).get("gguf"),
                "onnx_max_abs_diff": (mnm.get("verification") or {}).get("onnx_max_abs_diff"),
            }
        )
    if result["exports"]:
        print("\n| export | loss | predicted ms | measured ms | error |")
        print("|---|---|---|---|---|")
        for e in result["exports"]:
            err = f"{e['error_pct']:+.1f} %" if e["error_pct"] is not None else "-"
            print(
                f"| {Path(e['dir']).name} | {e['loss']} | {e['predicted_ms']} | "
                f"{e['measured_ms']} | {err} |"
            )
        if errors:
            result["mape_pct"] = sum(errors) / len(errors)
            print(f"MAPE of the exports' predicted latency: {result['mape_pct']:.2f} %")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
