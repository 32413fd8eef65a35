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
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import torch

from mnm_search.evaluator import CachedEvaluator, evaluate_loss
from mnm_search.families import load_family
from mnm_search.pareto import format_widths_column, hypervolume, pareto_front
from mnm_search.space import SearchSpace
from mnm_search.study import make_sampler

DATA = Path(__file__).resolve().parent / "data"
GROUND_TRUTH = "ground_truth_default.csv"
RESULTS = "search_quality.json"
SAMPLERS = ("random", "nsga2", "tpe", "gp")
BUDGETS = (50, 100, 200)


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
    ideal = truth[columns].min().tolist()
    nadir = truth[columns].max().tolist()
    true_hv = hypervolume(pareto_front(truth, columns), columns, ideal=ideal, nadir=nadir)
    return hypervolume(found, columns, ideal=ideal, nadir=nadir) / true_hv


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
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
