"""Benchmark of the latency model (issue 3): accuracy, profiling time, FFN width scaling.

For each target it
1. runs `mnm profile --quick` and the full `mnm profile` as subprocesses and times them
   (targets: quick <= 60 s, full <= 5 min on the default checkpoint);
2. reports the full profile's held-out validation (MAPE, Spearman, share within ±10 %,
   the naive table's MAPE) next to the noise floor (the same configurations measured twice);
3. re-checks the model on a fresh held-out sample measured in this process (another seed);
4. sweeps one layer's isolated FFN over widths d_ff/64 .. d_ff to show how time scales with
   width (ideal: S = 1/8 of XL) and where per-op overhead bends the line.

Usage (after training has finished; timings under load are meaningless):
    python bench/latency_model.py                                  # cpu-prefill + cpu-decode
    python bench/latency_model.py --target profiles/cuda-prefill.yaml \
        --target profiles/cuda-decode.yaml
    python bench/latency_model.py --ckpt /path/to/ckpt --json bench-results.json
Prints a markdown report for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mnm_search.checkpoint import load_checkpoint
from mnm_search.families import load_family
from mnm_search.latency import LatencyModel, validation_metrics
from mnm_search.profiler import (
    TORCH_DTYPES,
    measure_latency,
    pinned_threads,
    select_device,
    time_interleaved,
)
from mnm_search.slicing import slice_model
from mnm_search.targets import load_target, machine_facts

ROOT = Path(__file__).resolve().parent.parent


def run_profile(ckpt: str | None, target: Path, out: Path, *, quick: bool) -> float:
    command = [sys.executable, "-m", "mnm_search", "profile", "--target", str(target)]
    command += ["--out", str(out), "--json"]
    if ckpt:
        command.insert(4, ckpt)
    if quick:
        command.append("--quick")
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"mnm profile failed:\n{result.stderr}")
    return seconds


def fresh_holdout(
    ckpt: str | None, target_path: Path, profile_path: Path, n: int, seed: int
) -> dict[str, Any]:
    """Predict vs measure a new sample of configurations, timed here (another process/time)."""
    target = load_target(target_path)
    family = load_family(ckpt).prepare_for_target(target)
    model = LatencyModel.load(profile_path, fingerprint=family.fingerprint)
    profile = json.loads(profile_path.read_text())
    seen = [s["widths"] for s in profile["calibration"]["samples"]]
    seen += [s["widths"] for s in profile["validation"]["samples"]]
    with torch.inference_mode():
        probe = family.latency_probe(target, select_device(target.device))
        configs = probe.sample(n, random.Random(seed), allow_skip=True, exclude=seen)
    stats = measure_latency(family, target, configs)
    measured = [s.median_ms for s in stats]
    predicted = [model.predict_ms(w) for w in configs]
    return validation_metrics(measured, predicted)


def width_sweep(ckpt: str | None, target_path: Path, layer: int = 0) -> list[dict[str, float]]:
    """Isolated FFN time of one layer for widths d_ff/64 .. d_ff (powers of two)."""
    checkpoint = load_checkpoint(ckpt)
    config = checkpoint.config
    target = load_target(target_path)
    device = select_device(target.device)
    widths = [w for w in (config.d_ff >> k for k in range(6, -1, -1)) if w >= 1]
    dtype = TORCH_DTYPES[target.dtype]
    x = torch.randn(target.batch, target.seq_len, config.d_model).to(device, dtype)
    fns = []
    for width in widths:
        sliced = slice_model(checkpoint.model, [width] * config.n_layers)  # a new model
        block = sliced.to(device=device, dtype=dtype).eval().blocks[layer]
        fns.append(lambda b=block, w=width: x + b.ffn(b.ffn_norm(x), w))
    with pinned_threads(target.threads), torch.inference_mode():
        stats = time_interleaved(
            fns, device=device, repeats=max(15, target.repeats), warmup=target.warmup + 2
        )
    xl = stats[-1].median_ms
    return [
        {
            "width": w,
            "ms": round(s.median_ms, 5),
            "ratio_to_full": round(s.median_ms / xl, 4),
            "ideal_ratio": round(w / config.d_ff, 4),
            "us_per_neuron": round(s.median_ms * 1e3 / w, 4),
        }
        for w, s in zip(widths, stats)
    ]


def bench_target(ckpt: str | None, target_path: Path, workdir: Path) -> dict[str, Any]:
    target = load_target(target_path)
    print(f"== {target.describe()}", file=sys.stderr)
    quick_json = workdir / f"{target.name}-quick.json"
    full_json = workdir / f"{target.name}.json"
    quick_seconds = run_profile(ckpt, target_path, quick_json, quick=True)
    print(f"   quick profile: {quick_seconds:.1f} s", file=sys.stderr)
    full_seconds = run_profile(ckpt, target_path, full_json, quick=False)
    print(f"   full profile: {full_seconds:.1f} s", file=sys.stderr)
    quick, full = json.loads(quick_json.read_text()), json.loads(full_json.read_text())
    holdout = fresh_holdout(ckpt, target_path, full_json, n=target.validation, seed=1234)
    print(f"   fresh hold-out: {holdout}", file=sys.stderr)
    sweep = width_sweep(ckpt, target_path)
    table = full["ffn_table"]
    means = [
        sum(layer[str(w)]["median_ms"] for layer in table["per_layer"]) / len(table["per_layer"])
        for w in table["widths"]
    ]
    uniform = {tuple(s["widths"]): s["measured_ms"] for s in full["calibration"]["samples"][:4]}
    return {
        "target": full["target"],
        "device": full["device"],
        "checkpoint": full["checkpoint"]["fingerprint"],
        "quick": {
            "seconds": round(quick_seconds, 1),
            "validation": {k: v for k, v in quick["validation"].items() if k != "samples"},
        },
        "full": {
            "seconds": round(full_seconds, 1),
            "validation": {k: v for k, v in full["validation"].items() if k != "samples"},
            "calibration_fit": full["calibration"]["fit"],
            "coefficients": full["latency_model"]["coefficients"],
        },
        "fresh_holdout": holdout,
        "ffn_table_mean_ms": dict(zip(map(str, table["widths"]), means)),
        "uniform_measured_ms": {",".join(map(str, k)): v for k, v in uniform.items()},
        "width_sweep": sweep,
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = []
    facts = results[0]["device"]
    hardware = facts.get("gpu_name") or facts.get("cpu_model")
    lines.append(
        f"Hardware: {hardware} ({facts['cpu_count']} CPUs), torch {facts['torch_version']}, "
        f"checkpoint {results[0]['checkpoint']}."
    )
    lines.append("")
    lines.append(
        "| target | profile time (quick / full) | MAPE | Spearman | within ±10 % | max err "
        "| naive table MAPE | noise floor MAPE | fresh hold-out MAPE / Spearman |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        v, q, h = r["full"]["validation"], r["quick"]["validation"], r["fresh_holdout"]
        lines.append(
            f"| {r['target']['name']} | {r['quick']['seconds']} s / {r['full']['seconds']} s "
            f"| {v['mape_pct']:.2f} % (quick {q['mape_pct']:.2f} %) | {v['spearman']:.3f} "
            f"| {v['within_10pct']:.0%} | {v['max_abs_pct_err']:.1f} % "
            f"| {v['naive']['mape_pct']:.1f} % | {v['noise_floor']['mape_pct']:.2f} % "
            f"| {h['mape_pct']:.2f} % / {h['spearman']:.3f} |"
        )
    for r in results:
        lines.append("")
        lines.append(f"FFN width scaling, {r['target']['name']} (layer 0, isolated, median):")
        lines.append("")
        lines.append("| width | ms | ÷ full width | ideal | µs per neuron |")
        lines.append("|---|---|---|---|---|")
        for row in r["width_sweep"]:
            lines.append(
                f"| {row['width']} | {row['ms']:.4f} | {row['ratio_to_full']:.3f} "
                f"| {row['ideal_ratio']:.3f} | {row['us_per_neuron']:.3f} |"
            )
        uniform = ", ".join(
            f"{k.split(',')[0]}: {v:.3f} ms" for k, v in r["uniform_measured_ms"].items()
        )
        lines.append("")
        lines.append(f"Uniform models end to end (sliced, measured): {uniform}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="checkpoint (default: the embedded one)")
    parser.add_argument(
        "--target",
        action="append",
        type=Path,
        help="target YAML (repeatable; default: cpu-prefill and cpu-decode)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write raw results here")
    args = parser.parse_args()
    targets = args.target or [
        ROOT / "profiles" / "cpu-prefill.yaml",
        ROOT / "profiles" / "cpu-decode.yaml",
    ]
    load_checkpoint(args.ckpt)  # fail early with a clear message
    print(f"machine: {machine_facts(load_target(targets[0]))}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_target(args.ckpt, t, Path(tmp)) for t in targets]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
