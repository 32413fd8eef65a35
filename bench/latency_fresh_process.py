"""Benchmark: do a profile's latency predictions hold for exported models timed in their own
fresh processes (issue 15, part 5)?

For each target (default: cpu-prefill and cpu-decode) on the default (embedded) checkpoint:
1. runs the full `mnm profile` as a subprocess (wall time recorded);
2. draws 10 random configurations (seeded: every layer's width uniform over the trained
   granularities, no skips) and writes each as `mnm export` does (`Family.write_export`);
3. times each exported model in its own fresh process exactly as the issue says:
   `load_model`, 1 thread (the target's), 5 warm-ups, median of 30 back-to-back runs;
   twice (pass 2 in reverse order), so pass 1 vs pass 2 is the fresh-process noise floor;
4. compares the profile's predictions with pass 1 (the issue's protocol) and with both passes
   pooled: MAPE and Spearman; also times the same 10 exports batched in one child
   (`--per-process`) and in this process (`measure_latency`, the profiler's way), to show
   which of those differences matter.

Run it on an idle machine; results are merged into the JSON under `--label` (e.g. `before`
for the profile format of commit b0dc4d4, `after` for the current code):
    python bench/latency_fresh_process.py --label after --json bench/data/latency_fresh_process.json
Prints a markdown summary for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mnm_search._fresh_process import export_config, time_exports
from mnm_search.families import load_family
from mnm_search.latency import LatencyModel, validation_metrics
from mnm_search.profiler import measure_latency
from mnm_search.targets import load_target, machine_facts

ROOT = Path(__file__).resolve().parent.parent
N_CONFIGS = 10
WARMUP = 5
RUNS = 30
SEED = 15


def run_profile(target: Path, out: Path, *, quick: bool) -> float:
    command = [sys.executable, "-m", "mnm_search", "profile", "--target", str(target)]
    command += ["--out", str(out), "--json"] + (["--quick"] if quick else [])
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"mnm profile failed:\n{result.stderr}")
    return time.perf_counter() - started


def random_configs(family: Any, n: int, seed: int) -> list[list[int]]:
    """`n` distinct configurations, each layer's width uniform over the trained widths."""
    choices = sorted({w for config in family.uniform_configs().values() for w in config})
    rng, seen, configs = random.Random(seed), set(), []
    while len(configs) < n:
        widths = [rng.choice(choices) for _ in range(family.n_layers)]
        if tuple(widths) not in seen:
            seen.add(tuple(widths))
            configs.append(widths)
    return configs


def metrics(measured: list[float], predicted: list[float]) -> dict[str, Any]:
    m = validation_metrics(measured, predicted)
    bias = statistics.median(p / x - 1 for p, x in zip(predicted, measured)) * 100
    return {**m, "median_signed_pct_err": round(bias, 3)}


def bench_target(target_path: Path, workdir: Path, *, per_process: int, quick: bool) -> dict:
    target = load_target(target_path)
    print(f"== {target.describe()}", file=sys.stderr)
    profile_path = workdir / f"{target.name}.json"
    seconds = run_profile(target_path, profile_path, quick=quick)
    profile = json.loads(profile_path.read_text())
    print(f"   mnm profile: {seconds:.1f} s", file=sys.stderr)
    family = load_family(None)
    model = LatencyModel.load(profile_path, fingerprint=family.fingerprint)
    configs = random_configs(family, N_CONFIGS, SEED)
    predicted = [model.predict_ms(w) for w in configs]
    # Version 2 profiles rescale the in-process fit to fresh-process timings; without it:
    scale = profile["latency_model"].get("fresh_scale", 1.0)
    unscaled = [p / scale for p in predicted]
    paths = [
        export_config(family, w, workdir / f"{target.name}-{i}") for i, w in enumerate(configs)
    ]

    started = time.perf_counter()
    pass1 = time_exports(paths, target, warmup=WARMUP, runs=RUNS)
    pass1_s = time.perf_counter() - started
    pass2 = time_exports(paths[::-1], target, warmup=WARMUP, runs=RUNS)[::-1]
    started = time.perf_counter()
    batched = time_exports(paths, target, warmup=WARMUP, runs=RUNS, per_process=per_process)
    batched_s = time.perf_counter() - started
    in_process = measure_latency(family.prepare_for_target(target), target, configs)

    first = [s.median_ms for s in pass1]
    second = [s.median_ms for s in pass2]
    pooled = [statistics.median([a, b]) for a, b in zip(first, second)]
    result = {
        "target": profile["target"],
        "profile_seconds": round(seconds, 1),
        "profile_quick": quick,
        "profile_version": profile.get("version"),
        "profile_validation": _summary(profile.get("validation")),
        "profile_fresh_validation": _summary(profile.get("fresh_validation")),
        "coefficients": profile["latency_model"]["coefficients"],
        "configs": configs,
        "predicted_ms": [round(p, 4) for p in predicted],
        "fresh_pass1_ms": [round(x, 4) for x in first],
        "fresh_pass2_ms": [round(x, 4) for x in second],
        "batched_ms": [round(s.median_ms, 4) for s in batched],
        "in_process_ms": [round(s.median_ms, 4) for s in in_process],
        "vs_fresh_pass1": metrics(first, predicted),
        "vs_fresh_pooled": metrics(pooled, predicted),
        "fresh_scale": scale,
        "unscaled_vs_fresh_pass1": metrics(first, unscaled),
        "fresh_noise_floor": metrics(first, second),
        "vs_batched": metrics([s.median_ms for s in batched], predicted),
        "batched_vs_fresh": metrics(first, [s.median_ms for s in batched]),
        "in_process_vs_fresh": metrics(first, [s.median_ms for s in in_process]),
        "vs_in_process": metrics([s.median_ms for s in in_process], predicted),
        "seconds_one_process_each": round(pass1_s, 1),
        "seconds_batched": round(batched_s, 1),
        "per_process": per_process,
    }
    for key in (
        "vs_fresh_pass1",
        "unscaled_vs_fresh_pass1",
        "fresh_noise_floor",
        "in_process_vs_fresh",
        "vs_batched",
    ):
        print(f"   {key}: {result[key]}", file=sys.stderr)
    return result


def _summary(block: dict[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(block, dict):
        return None
    return {k: v for k, v in block.items() if k not in ("samples", "naive")}


def markdown(label: str, results: list[dict[str, Any]]) -> str:
    lines = [
        f"Run `{label}`: fresh processes, 10 random exports, 1 thread, 5 warm-ups, median of 30.",
        "",
        "| target | profile (s) | MAPE pass 1 | Spearman pass 1 | MAPE pooled | Spearman pooled "
        "| fresh noise floor MAPE / Spearman | in-process vs fresh | profile's own held-out |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        a, b, n, i = (
            r["vs_fresh_pass1"],
            r["vs_fresh_pooled"],
            r["fresh_noise_floor"],
            r["in_process_vs_fresh"],
        )
        v = r["profile_validation"] or {}
        lines.append(
            f"| {r['target']['name']} | {r['profile_seconds']} | {a['mape_pct']:.2f} % "
            f"| {a['spearman']:.3f} | {b['mape_pct']:.2f} % | {b['spearman']:.3f} "
            f"| {n['mape_pct']:.2f} % / {n['spearman']:.3f} "
            f"| {i['median_signed_pct_err']:+.2f} % | {v.get('mape_pct')} % / {v.get('spearman')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="key in the JSON: before, after, ...")
    parser.add_argument("--target", action="append", type=Path, help="target YAML (repeatable)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/data/latency_fresh_process.json")
    parser.add_argument("--per-process", type=int, default=N_CONFIGS, help="batched variant")
    parser.add_argument("--quick", action="store_true", help="profile with --quick")
    args = parser.parse_args()
    targets = args.target or [ROOT / "profiles/cpu-prefill.yaml", ROOT / "profiles/cpu-decode.yaml"]
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            bench_target(t, Path(tmp), per_process=args.per_process, quick=args.quick)
            for t in targets
        ]
    data = json.loads(args.json.read_text()) if args.json.exists() else {}
    data[args.label] = {
        "started": started,
        "machine": machine_facts(load_target(targets[0])),
        "protocol": {"configs": N_CONFIGS, "warmup": WARMUP, "runs": RUNS, "seed": SEED},
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(markdown(args.label, results))


if __name__ == "__main__":
    main()
