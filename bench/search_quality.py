"""Search quality and evaluation speed of `mnm search` (issue 4).

1. Ground truth: every configuration of a universal checkpoint's space (default checkpoint:
   6 layers x 4 widths = 4096) evaluated once with the cached evaluator, saved as a CSV
   (loss, params, and predicted latency if a profile is given). Also measures evaluation
   throughput: the cached exhaustive sweep vs the plain forward on a random sample of the
   same configurations (and checks they agree to 1e-6).
2. Samplers: for random, nsga2, tpe, gp (seeded like `mnm search`, with the uniform and
   minimum-slope configurations) and the minimum-slope heuristic alone, the hypervolume of
   the found front divided by the true front's, after 50/100/200 evaluations, 5 seeds. The
   ground-truth table is the objective function, so this part takes minutes, not hours.

Run after training, on a quiet machine, for timings:

    python bench/search_quality.py ground-truth --profile bench/data/profile-default.json
    python bench/search_quality.py samplers
    python bench/search_quality.py search-wall --profile bench/data/profile-default.json

3. Wall time (issue 15): real `mnm search` processes, one per sampler and seed, each a fresh
   study stopped by Ctrl-C (SIGINT) at the wall budget unless it ends first; the hypervolume
   found within each wall-time budget counted from process start, and the wall split into
   start-up (to the first trial), evaluation, sampler and the rest. Against the exhaustive
   truth (`--truth`, default checkpoint at its 4096 tokens), else against the pooled front of
   every run in the work directory (`bench/smollm2_search_quality.py`):

    python bench/search_quality.py wall --truth --work /tmp/wallbench/default \
        --profile bench/data/profile-default-cpu-prefill.json --max-tokens 4096
    python bench/search_quality.py wall CKPT --work /tmp/wallbench/30layer --key wall_30layer \
        --profile PROFILE --max-tokens 512 --budgets 30 60 120 180 240
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch

from mnm_search._results import trials_frame
from mnm_search.evaluator import CachedEvaluator, evaluate_loss
from mnm_search.families import load_family
from mnm_search.pareto import format_widths_column, hypervolume, pareto_front
from mnm_search.space import SearchSpace
from mnm_search.study import JOURNAL_FILE, make_sampler, open_journal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_search_quality import OBJECTIVES, pooled_reference, usable

BENCH = Path(__file__).resolve().parent
DATA = BENCH / "data"
GROUND_TRUTH = "ground_truth_default.csv"
RESULTS = "search_quality.json"
SAMPLERS = ("random", "nsga2", "tpe", "gp")
BUDGETS = (50, 100, 200)
WALL_SAMPLERS = ("gp", "tpe", "random", "nsga2", "exhaustive")
WALL_BUDGETS = (10, 20, 30, 45, 60, 90, 120)
CURVE_STEP_S = 5  # resolution of the stored hypervolume-vs-wall curves


def ground_truth(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    family = load_family(args.checkpoint)
    space = family.search_space()
    eval_set = family.load_eval_set(None, max_tokens=args.tokens)
    latency = None
    if args.profile:
        from mnm_search.latency import LatencyModel

        latency = LatencyModel.load(args.profile, fingerprint=family.fingerprint)
    configs = list(space.all_configs())
    print(f"{len(configs)} configs, {eval_set.n_tokens} tokens, {args.threads} thread(s)")

    # Plain forward on a random sample (the whole sweep would take hours).
    sample = random.Random(0).sample(configs, args.plain_sample)
    started = time.perf_counter()
    plain = {tuple(w): evaluate_loss(family.logits, eval_set, w) for w in sample}
    plain_s = (time.perf_counter() - started) / len(sample)
    print(f"plain forward: {plain_s:.3f} s/config on {len(sample)} random configs")

    evaluator = CachedEvaluator(
        family, eval_set, layer_widths=space.choices, cache_mb=args.cache_mb
    )
    rows = []
    started = time.perf_counter()
    for i, widths in enumerate(configs):
        rows.append(
            {"widths": format_widths_column(widths), "loss": evaluator.evaluate(widths).loss}
        )
        if (i + 1) % 256 == 0:
            elapsed = time.perf_counter() - started
            print(f"  {i + 1}/{len(configs)} in {elapsed:.0f} s", flush=True)
    cached_s = (time.perf_counter() - started) / len(configs)
    losses = {r["widths"]: r["loss"] for r in rows}
    worst = max(abs(losses[format_widths_column(w)] - loss) / loss for w, loss in plain.items())
    for row, widths in zip(rows, configs):
        row["params"] = family.param_count(widths)
        if latency is not None:
            row["latency_ms"] = latency.predict_ms(widths)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.data_dir / GROUND_TRUTH, index=False)
    summary = {
        "space": space.to_dict(),
        "checkpoint_fingerprint": family.fingerprint,
        "n_configs": len(configs),
        "eval_tokens": eval_set.n_tokens,
        "threads": args.threads,
        "profile": args.profile,
        "plain_seconds_per_config": plain_s,
        "cached_exhaustive_seconds_per_config": cached_s,
        "speedup_exhaustive": plain_s / cached_s,
        "max_relative_difference_vs_plain": worst,
        "cache_stats": vars(evaluator.stats),
    }
    _update_results(args.data_dir, "ground_truth", summary)
    print(json.dumps(summary, indent=2))


def _truth(data_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    table = pd.read_csv(data_dir / GROUND_TRUTH, dtype={"widths": str})
    cost = "latency_ms" if "latency_ms" in table.columns else "params"
    return table, ["loss", cost]


def _hv_ratio(found: pd.DataFrame, truth: pd.DataFrame, columns: list[str]) -> float:
    return _truth_scale(truth, columns)(found)


def _truth_scale(truth: pd.DataFrame, columns: list[str]) -> Callable[[pd.DataFrame], float]:
    """found -> its hypervolume / the true front's (the truth's ranges as ideal and nadir)."""
    ideal = truth[columns].min().tolist()
    nadir = truth[columns].max().tolist()
    true_hv = hypervolume(pareto_front(truth, columns), columns, ideal=ideal, nadir=nadir)
    return lambda found: hypervolume(found, columns, ideal=ideal, nadir=nadir) / true_hv


def run_sampler(
    name: str, seed: int, budget: int, truth: pd.DataFrame, columns: list[str], space: SearchSpace
) -> list[str]:
    """Widths (in trial order) an `mnm search`-like study evaluates; the table answers."""
    values = {row.widths: (row.loss, getattr(row, columns[1])) for row in truth.itertuples()}
    sampler = make_sampler(name, seed=seed, n_objectives=2)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    for widths in _seed_configs(space):
        study.enqueue_trial(space.to_params(widths))
    order: list[str] = []

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        params = {
            f"w{i}": trial.suggest_categorical(f"w{i}", list(choices))
            for i, choices in enumerate(space.choices)
        }
        key = format_widths_column(space.from_params(params))
        order.append(key)
        return values[key]

    study.optimize(objective, n_trials=budget)
    return order


def _seed_configs(space: SearchSpace) -> list[list[int]]:
    grans = space.choices[0]
    return [[g] * space.n_layers for g in grans] + space.min_slope_configs()


def samplers(args: argparse.Namespace) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    truth, columns = _truth(args.data_dir)
    stored = json.loads((args.data_dir / RESULTS).read_text())["ground_truth"]
    space = SearchSpace.from_dict(stored["space"])
    by_widths = truth.set_index("widths")
    results: dict[str, dict[str, list[float]]] = {}
    timings: dict[str, float] = {}
    heuristic = [format_widths_column(w) for w in _seed_configs(space)]
    ratio = _hv_ratio(by_widths.loc[heuristic].reset_index(), truth, columns)
    results["min-slope heuristic"] = {str(len(heuristic)): [ratio]}
    print(f"min-slope heuristic alone ({len(heuristic)} configs): {ratio:.4f}")
    for name in args.samplers:
        results[name] = {str(b): [] for b in args.budgets}
        started = time.perf_counter()
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            order = run_sampler(name, seed, max(args.budgets), truth, columns, space)
            for budget in args.budgets:
                found = by_widths.loc[order[:budget]].reset_index()
                results[name][str(budget)].append(_hv_ratio(found, truth, columns))
        timings[name] = (time.perf_counter() - started) / args.seeds
        means = {b: statistics.mean(v) for b, v in results[name].items()}
        print(f"{name}: " + ", ".join(f"{b}: {m:.4f}" for b, m in means.items()), flush=True)
    _update_results(
        args.data_dir,
        args.key,
        {
            "objectives": columns,
            "seeds": args.seeds,
            "hv_ratio": results,
            "sampler_seconds_per_200_trials": timings,
        },
    )
    print(_markdown(results))


def _markdown(results: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| sampler | 50 | 100 | 200 |", "|---|---|---|---|"]
    for name, by_budget in results.items():
        cells = []
        for budget in BUDGETS:
            values = by_budget.get(str(budget))
            if values:
                spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
                cells.append(f"{statistics.mean(values):.4f}{spread}")
            else:
                cells.append(f"{statistics.mean(next(iter(by_budget.values()))):.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def search_wall(args: argparse.Namespace) -> None:
    """Wall time of `mnm search --trials 200` on the default checkpoint, in a fresh dir."""
    out = Path(args.out)
    command = ["mnm", "search", "--trials", "200", "--out", str(out), "--study", out.name]
    if args.profile:
        command += ["--profile", args.profile]
    else:
        command += ["--objectives", "loss,params"]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    _update_results(
        args.data_dir, "search_wall", {"command": " ".join(command), "seconds": seconds}
    )
    print(f"{' '.join(command)}: {seconds:.1f} s")


def wall(args: argparse.Namespace) -> None:
    """Run every missing (sampler, seed) search under the wall budget, then measure them all."""
    budgets = sorted(args.budgets)
    for sampler in args.samplers:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            run_dir = args.work / f"{sampler}-s{seed}"
            if (run_dir / "wall.json").is_file() and not args.rerun:
                continue
            _wall_run(run_dir, sampler, seed, budgets[-1], args)
    done = sorted(path.parent for path in args.work.glob("*/wall.json"))
    runs = {d.name: _wall_trials(d) for d in done}
    if args.truth:
        summary = _against_truth(runs, budgets, args.data_dir)
    else:
        summary = _against_pooled(runs, budgets)
    summary["budgets_s"] = budgets
    fixed = [r["hv_ratio"] for r in summary["runs"].values() if r["sampler"] != "auto"]
    summary["best_fixed_hv_ratio"] = {
        str(b): max((ratios[str(b)] for ratios in fixed), default=None) for b in budgets
    }
    summary["machine"] = {"cpu_count": os.cpu_count(), "loadavg_now": os.getloadavg()}
    _update_results(args.data_dir, args.key, summary)
    print(_wall_markdown(summary, budgets))


def _wall_run(run_dir: Path, sampler: str, seed: int, budget: float, args: argparse.Namespace):
    """One fresh `mnm search` (through bench/timed_search.py), Ctrl-C at `budget` seconds."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    command = [sys.executable, str(BENCH / "timed_search.py"), "search"]
    command += [args.checkpoint] if args.checkpoint else []
    command += ["--sampler", sampler, "--seed", str(seed), "--trials", str(args.trials)]
    command += ["--objectives", args.objectives, "--max-tokens", str(args.max_tokens)]
    command += ["--profile", args.profile] if args.profile else []
    command += ["--study", "wall", "--out", str(run_dir / "results")]
    env = {**os.environ, "MNM_BENCH_TIMINGS": str(run_dir / "timings.json")}
    load_before = os.getloadavg()
    busy_before = _cpu_busy_s()
    child_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"{sampler} seed {seed}: up to {budget:.0f} s ...", flush=True)
    with (run_dir / "search.log").open("w") as log:
        started_at = datetime.now()  # the clock Optuna stamps trials with
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        interrupted_s = None
        try:
            code = process.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            interrupted_s = time.perf_counter() - started
            process.send_signal(signal.SIGINT)  # mnm search saves its results and exits 130
            try:
                code = process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
        wall_s = time.perf_counter() - started
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    search_cpu_s = (child.ru_utime - child_before.ru_utime) + (
        child.ru_stime - child_before.ru_stime
    )
    busy_after = _cpu_busy_s()
    record = {
        "command": " ".join(["mnm", *command[3:]]),
        "sampler": sampler,
        "seed": seed,
        "started": started_at.isoformat(),
        "wall_s": wall_s,
        "interrupted_s": interrupted_s,
        "returncode": code,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "search_cpu_s": search_cpu_s,
        # CPU time the rest of the machine (and the hypervisor) took meanwhile: other jobs
        # slow a timed run down.
        "others_cpu_s": None if busy_after is None else busy_after - busy_before - search_cpu_s,
    }
    (run_dir / "wall.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"  exit {code} after {wall_s:.1f} s", flush=True)


def _cpu_busy_s() -> float | None:
    """Seconds all CPUs spent busy since boot (Linux /proc/stat), None elsewhere."""
    stat = Path("/proc/stat")
    if not stat.is_file():
        return None
    fields = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _wall_trials(run_dir: Path) -> dict[str, Any]:
    """A finished run: its record, run.json, hook timings, and its trials with their start
    and completion times in seconds since the process started (from the study's journal)."""
    record = json.loads((run_dir / "wall.json").read_text())
    results = run_dir / "results"
    info = json.loads((results / "run.json").read_text())
    timings_path = run_dir / "timings.json"
    record["timings"] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    space = SearchSpace.from_dict(info["space"])
    study = optuna.load_study(
        study_name=info["study"], storage=open_journal(results / JOURNAL_FILE)
    )
    trials = study.get_trials(deepcopy=False)
    frame = trials_frame(trials, space, info["objective_columns"])
    started = datetime.fromisoformat(record["started"])
    when = {t.number: (t.datetime_start, t.datetime_complete) for t in trials}
    frame["start_s"] = [_since(started, when[n][0]) for n in frame["trial"]]
    frame["done_s"] = [_since(started, when[n][1]) for n in frame["trial"]]
    done = frame.dropna(subset=["done_s"])
    timings = record["timings"]
    evaluate_s, sampler_s = timings.get("evaluate_s"), timings.get("sampler_s")
    # Start-up ends at the first trial, evaluation or sampler call, whichever comes first.
    firsts = [t for t in (timings.get("first_evaluate_at"), timings.get("first_sampler_at")) if t]
    ends = [datetime.fromtimestamp(t) for t in firsts] + [m[0] for m in when.values() if m[0]]
    startup_s = _since(started, min(ends)) if ends else None
    split = {"startup_s": startup_s, "evaluate_s": evaluate_s, "sampler_s": sampler_s}
    if None not in split.values():
        split["other_s"] = record["wall_s"] - startup_s - evaluate_s - sampler_s
    record.update(
        {
            "strategy": info.get("strategy"),
            "eval_tokens": info["eval_tokens"],
            "n_complete": int((done["state"] == "COMPLETE").sum()),
            "n_predicted": int((done["fidelity"] == "subset").sum()),
            "split": split,
        }
    )
    # A race rules configurations out with a predicted loss (fidelity "subset"): only the
    # evaluated ones count toward a front.
    evaluated = done[done["fidelity"] != "subset"]
    return {"record": record, "trials": evaluated.sort_values("done_s").reset_index(drop=True)}


def _since(started: datetime, moment: datetime | None) -> float | None:
    return None if moment is None else (moment - started).total_seconds()


def _curve_times(budgets: list[float]) -> list[float]:
    return [float(t) for t in range(CURVE_STEP_S, int(budgets[-1]) + 1, CURVE_STEP_S)]


def _against_truth(runs: dict[str, dict[str, Any]], budgets: list[float], data_dir: Path):
    """HV ratio vs the exhaustive truth at each budget, and when the exact front was found.
    The runs' own losses are used; where they were evaluated on the truth's tokens they must
    match its table, and the largest difference is reported."""
    truth, columns = _truth(data_dir)
    stored = json.loads((data_dir / RESULTS).read_text())["ground_truth"]
    true_front = set(pareto_front(truth, columns)["widths"])
    by_widths = truth.set_index("widths")
    ratio = _truth_scale(truth, columns)
    out: dict[str, Any] = {
        "reference": "exhaustive truth",
        "objectives": columns,
        "true_front_size": len(true_front),
        "truth_eval_tokens": stored["eval_tokens"],
        "runs": {},
    }
    for name, run in runs.items():
        frame = usable(run["trials"])
        record = run["record"]
        if record["eval_tokens"] == stored["eval_tokens"] and not frame.empty:
            expected = by_widths.loc[frame["widths"]]
            record["max_abs_diff_vs_truth"] = {
                c: float(abs(frame[c].to_numpy() - expected[c].to_numpy()).max()) for c in columns
            }
        record["hv_ratio"] = {str(b): ratio(frame[frame["done_s"] <= b]) for b in budgets}
        record["curve"] = [[t, ratio(frame[frame["done_s"] <= t])] for t in _curve_times(budgets)]
        record["hv_0.99_s"] = _first_reaching(frame, ratio, 0.99)
        record["exact_front_s"] = _exact_front_at(frame, columns, true_front)
        record["true_front_members_found"] = len(true_front & set(frame["widths"]))
        out["runs"][name] = record
    return out


def _first_reaching(
    frame: pd.DataFrame, ratio: Callable[[pd.DataFrame], float], target: float
) -> float | None:
    """Seconds since process start at which the HV ratio of the trials done (frame is in
    completion order) first reaches `target`; None if it never does. HV only grows with
    more trials, so a bisection over the prefixes finds it."""
    if frame.empty or ratio(frame) < target:
        return None
    low, high = 0, len(frame)  # ratio(head(low)) < target <= ratio(head(high))
    while high - low > 1:
        middle = (low + high) // 2
        if ratio(frame.head(middle)) >= target:
            high = middle
        else:
            low = middle
    return float(frame["done_s"].iloc[high - 1])


def _exact_front_at(frame: pd.DataFrame, columns: list[str], true_front: set[str]):
    """Seconds since process start at which the found front (as a set of configurations)
    first equals the true front; None if it never does."""
    if not true_front <= set(frame["widths"]):
        return None
    for i in range(len(frame)):  # frame is in completion order
        if frame["widths"].iloc[i] in true_front:
            front = set(pareto_front(frame.head(i + 1), columns)["widths"])
            if front == true_front:
                return float(frame["done_s"].iloc[i])
    return None


def _against_pooled(runs: dict[str, dict[str, Any]], budgets: list[float]) -> dict[str, Any]:
    """HV at each budget over the pooled front of every run (same ideal and nadir)."""
    front, ideal, nadir, reference = pooled_reference(r["trials"] for r in runs.values())
    out: dict[str, Any] = {
        "reference": "pooled front of all runs",
        "objectives": OBJECTIVES,
        "pooled_front_size": len(front),
        "runs": {},
    }

    def ratio(frame: pd.DataFrame, seconds: float) -> float:
        head = usable(frame[frame["done_s"] <= seconds])
        if head.empty:
            return 0.0
        return hypervolume(head, OBJECTIVES, ideal=ideal, nadir=nadir) / reference

    for name, run in runs.items():
        record, frame = run["record"], run["trials"]
        record["hv_ratio"] = {str(b): ratio(frame, b) for b in budgets}
        record["curve"] = [[t, ratio(frame, t)] for t in _curve_times(budgets)]
        record["pooled_front_members"] = int(front["widths"].isin(set(frame["widths"])).sum())
        out["runs"][name] = record
    return out


def _wall_markdown(summary: dict[str, Any], budgets: list[float]) -> str:
    truth = summary["reference"] == "exhaustive truth"
    head = ["run", "trials", "start-up s", "eval s", "sampler s", "other s"]
    head += [f"HV {b:g} s" for b in budgets]
    head += ["HV ≥ 0.99 at s", "exact front at s"] if truth else ["pooled-front members"]
    head += ["others' CPU s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, run in summary["runs"].items():
        split = run["split"]
        strategy = run.get("strategy")  # what --sampler auto chose (a dict with its name)
        if isinstance(strategy, dict):
            strategy = strategy.get("name")
        cells = [name + (f" ({strategy})" if strategy and strategy not in name else "")]
        predicted = run.get("n_predicted")
        cells.append(str(run["n_complete"]) + (f" ({predicted} ruled out)" if predicted else ""))
        for key in ("startup_s", "evaluate_s", "sampler_s", "other_s"):
            cells.append("-" if split.get(key) is None else f"{split[key]:.1f}")
        cells += [f"{run['hv_ratio'][str(b)]:.4f}" for b in budgets]
        if truth:
            for key in ("hv_0.99_s", "exact_front_s"):
                cells.append("-" if run[key] is None else f"{run[key]:.1f}")
        else:
            cells.append(str(run["pooled_front_members"]))
        others = run.get("others_cpu_s")
        cells.append("-" if others is None else f"{others:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    best = summary["best_fixed_hv_ratio"]
    cells = ["-" if best[str(b)] is None else f"{best[str(b)]:.4f}" for b in budgets]
    tail = " | | | |" if truth else " | | |"
    lines.append("| best fixed sampler |" + " |" * 5 + " " + " | ".join(cells) + tail)
    return "\n".join(lines)


def _update_results(data_dir: Path, key: str, value: dict) -> None:
    path = data_dir / RESULTS
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = value
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DATA, help="where results go")
    commands = parser.add_subparsers(dest="command", required=True)
    gt = commands.add_parser("ground-truth")
    gt.add_argument("--checkpoint", default=None, help="default: the embedded checkpoint")
    gt.add_argument("--profile", default=None)
    gt.add_argument("--tokens", type=int, default=8192)
    gt.add_argument("--threads", type=int, default=1)
    gt.add_argument("--cache-mb", type=float, default=1024.0)
    gt.add_argument("--plain-sample", type=int, default=32)
    gt.set_defaults(func=ground_truth)
    sm = commands.add_parser("samplers")
    sm.add_argument("--seeds", type=int, default=5)
    sm.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    sm.add_argument("--key", default="samplers", help="results key (parallel runs)")
    sm.add_argument("--first-seed", type=int, default=0)
    sm.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    sm.set_defaults(func=samplers)
    sw = commands.add_parser("search-wall")
    sw.add_argument("--profile", default=None)
    sw.add_argument("--out", default="results/bench-search-200")
    sw.set_defaults(func=search_wall)
    wl = commands.add_parser("wall", help="hypervolume vs wall time of real `mnm search` runs")
    wl.add_argument("checkpoint", nargs="?", default=None, help="default: the embedded one")
    wl.add_argument("--work", type=Path, required=True, help="one results dir per run here")
    wl.add_argument("--key", default="wall_default", help="results key in search_quality.json")
    wl.add_argument("--truth", action="store_true", help="against the exhaustive truth table")
    wl.add_argument("--samplers", nargs="*", default=list(WALL_SAMPLERS), help="none: analyse")
    wl.add_argument("--seeds", type=int, default=1)
    wl.add_argument("--first-seed", type=int, default=0)
    wl.add_argument("--budgets", type=float, nargs="+", default=list(WALL_BUDGETS))
    wl.add_argument("--profile", default=None)
    wl.add_argument("--objectives", default="loss,latency")
    wl.add_argument("--max-tokens", type=int, default=4096)
    wl.add_argument("--trials", type=int, default=100_000, help="more than the budget allows")
    wl.add_argument("--rerun", action="store_true", help="redo runs already in --work")
    wl.set_defaults(func=wall)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
