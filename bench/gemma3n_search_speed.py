"""Benchmark: how fast a search evaluates Gemma 3n configurations, before and after prefix caching.

Builds the medium random Gemma 3n of `bench/gemma3n_profile.py` (8 layers, hidden 512, FFN
4096 in steps of 512, KV sharing, sliding windows, AltUp, Laurel, per-layer embeddings,
activation sparsity; nothing downloaded) and evaluates the same sampler-like sequence of
configurations on the same eval set both ways, interleaved config by config:

- before: the plain forward per configuration (`family.evaluate_loss`, what the study ran
  through `Gemma3nEvaluator` until issue 12);
- after: `CachedEvaluator(family, ...)` with `layer_widths=space.choices`, `siblings="auto"`,
  `cache_mb=1024` (what the study runs for every family since issue 12).

The sequence is the study's: the uniform and minimum-slope seeds first (the first
`--max-seeds` of the 57 the study would evaluate on this model), then seeded random
configurations (each layer's width drawn uniformly from its choices, as Optuna's random
sampler and the first trials of TPE/NSGA-II do). Prints s/config, configs/s, the speed-up, the
largest relative loss difference and the load average (on a shared machine timings under load
mean little).

Usage:
    python bench/gemma3n_search_speed.py [--configs 40] [--max-seeds 20] [--tokens 2048]
        [--threads N] [--no-skip] [--agreement] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mnm_search.evaluator import CachedEvaluator
from mnm_search.families.gemma3n import Gemma3nFamily
from mnm_search.space import SearchSpace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemma3n_profile import medium_family


def sampler_sequence(
    family: Gemma3nFamily, space: SearchSpace, n: int, seed: int, *, max_seeds: int
) -> list[tuple[str, list[int]]]:
    """The study's order: seeds (uniform, min-slope), then distinct seeded random configs."""
    seeds = family.seed_configs(space)[: min(n, max_seeds)]
    sequence = [(s.label, list(s.widths)) for s in seeds]
    seen = {tuple(w) for _, w in sequence}
    rng = random.Random(seed)
    while len(sequence) < n:
        widths = [rng.choice(choices) for choices in space.choices]
        if tuple(widths) in seen or not any(widths):
            continue
        seen.add(tuple(widths))
        sequence.append(("random", widths))
    return sequence


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=2048, help="eval tokens (512 per window)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-seeds",
        type=int,
        default=20,
        help="study seeds first (8 uniform, then min-slope; the medium model has 57), then random",
    )
    parser.add_argument("--no-skip", action="store_true", help="search space without dropping")
    parser.add_argument("--agreement", action="store_true", help="also KL/top-1 vs full (after)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    load_before = load_average()

    family = medium_family()
    eval_set = family.load_eval_set(None, max_tokens=args.tokens)
    space = family.search_space(allow_skip=not args.no_skip)
    sequence = sampler_sequence(family, space, args.configs, args.seed, max_seeds=args.max_seeds)
    print(
        f"model: medium random Gemma 3n, {family.param_count():,} parameters, "
        f"widths {family.stored_widths} (step {family.step}), producers "
        f"{family.kv_producer_layers}, consumers {family.kv_consumer_layers}"
    )
    seeds = sum(1 for kind, _ in sequence if kind != "random")
    print(
        f"eval: {eval_set.inputs.shape[0]} windows x {eval_set.inputs.shape[1]} tokens, batch "
        f"{family.eval_batch_size}; {len(sequence)} configs ({seeds} seeds), skip "
        f"{'off' if args.no_skip else 'on'}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s)"
    )

    # Warm-up outside the timings (first-call allocations, kernels).
    family.evaluate_loss(sequence[0][1], eval_set)

    evaluator = CachedEvaluator(
        family,
        eval_set,
        layer_widths=space.choices,
        siblings="auto",
        cache_mb=1024,
        agreement=args.agreement,
    )
    # Interleaved (plain, then cached, config by config): a load change on a shared machine
    # slows both alike. The plain forward leaves the evaluator's cache untouched.
    before: list[float] = []
    before_s: list[float] = []
    after: list[float] = []
    after_s: list[float] = []
    for _, widths in sequence:
        t0 = time.perf_counter()
        before.append(family.evaluate_loss(widths, eval_set))
        t1 = time.perf_counter()
        after.append(evaluator.evaluate(widths).loss)
        t2 = time.perf_counter()
        before_s.append(t1 - t0)
        after_s.append(t2 - t1)

    worst = max(abs(a - b) / abs(b) for a, b in zip(after, before))
    total_before, total_after = sum(before_s), sum(after_s)
    n = len(sequence)
    rows = [
        ("before: plain forward", total_before),
        ("after: CachedEvaluator", total_after),
    ]
    print()
    print(f"{'mode':<24} {'total s':>8} {'s/config':>9} {'configs/s':>10}")
    for name, total in rows:
        print(f"{name:<24} {total:>8.2f} {total / n:>9.3f} {n / total:>10.2f}")
    speedup = total_before / total_after
    parts = [f"speed-up {speedup:.2f}x"]
    for name, part in (("seeds", slice(None, seeds)), ("random configs", slice(seeds, None))):
        if sum(after_s[part]) > 0:
            parts.append(f"{name} {sum(before_s[part]) / sum(after_s[part]):.2f}x")
    print("; ".join(parts))
    stats = evaluator.stats
    print(
        f"cache: {stats.evaluations} evaluations, {stats.prefix_hits} layers reused, "
        f"{stats.layer_runs} layer runs (of {n * family.n_layers} plain), "
        f"{stats.evictions} evictions, {evaluator.cached_bytes / 2**20:.0f} MiB held"
    )
    print(f"losses agree: max relative difference {worst:.2e}")
    wall = time.monotonic() - started
    load_after = load_average()
    print(f"wall {wall:.1f} s; load average before {load_before}, after {load_after}")
    if args.json is not None:
        result: dict[str, Any] = {
            "configs": n,
            "seeds": seeds,
            "eval_tokens": eval_set.n_tokens,
            "threads": torch.get_num_threads(),
            "allow_skip": not args.no_skip,
            "before_s": total_before,
            "after_s": total_after,
            "speedup": speedup,
            "max_rel_loss_diff": worst,
            "cache_stats": vars(stats),
            "wall_s": wall,
            "load_before": load_before,
            "load_after": load_after,
            "per_config": [
                {"kind": kind, "widths": w, "loss": loss, "before_s": b, "after_s": a}
                for (kind, w), loss, b, a in zip(sequence, before, before_s, after_s)
            ],
        }
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
