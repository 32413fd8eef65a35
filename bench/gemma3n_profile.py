"""Benchmark of the Gemma 3n latency profile on a medium random Gemma 3n (nothing downloaded).

Builds an E4B-shaped but small Gemma 3n text model (8 layers, hidden 512, FFN 4096 in steps of
512, KV sharing, sliding windows, AltUp, Laurel, per-layer embeddings, activation sparsity in
the first two layers), profiles it with `profiler.profile` on a target and prints the held-out
accuracy (MAPE, Spearman, share within ±10 %) next to the naive table and the noise floor,
the profile's wall time and the peak RSS. The load average is printed next to the numbers:
on a shared 2-core machine timings under load mean little.

`--skip-check` also measures how much dropping skippable layers saves, against the model's
prediction. `--contiguous` also times a few configurations as in-place views (what the
profile times) against contiguous copies of the same weights (what an export ships).

Usage:
    python bench/gemma3n_profile.py [--quick] [--target profiles/cpu-prefill.yaml]
        [--json OUT.json] [--skip-check] [--contiguous]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

from mnm_search import profiler
from mnm_search.families.gemma3n import Gemma3nFamily
from mnm_search.families.gemma3n_profile import _runner, sample_gemma3n_configs
from mnm_search.latency import LatencyModel
from mnm_search.profiler import measure_latency, pinned_threads, select_device, time_interleaved
from mnm_search.targets import load_target, machine_facts

ROOT = Path(__file__).resolve().parent.parent
SLIDING, FULL = "sliding_attention", "full_attention"


def medium_config() -> Gemma3nTextConfig:
    """E4B's structure at about 1/30 of its width: every Gemma 3n feature is exercised."""
    return Gemma3nTextConfig(
        vocab_size=4096,
        vocab_size_per_layer_input=4096,
        hidden_size=512,
        intermediate_size=[4096] * 8,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=128,
        layer_types=[SLIDING, FULL] * 4,
        num_kv_shared_layers=2,
        activation_sparsity_pattern=[0.95, 0.95] + [0.0] * 6,
        hidden_size_per_layer_input=64,
        laurel_rank=64,
        sliding_window=64,
        max_position_embeddings=512,
    )


def medium_family(seed: int = 0) -> Gemma3nFamily:
    torch.manual_seed(seed)
    model = Gemma3nForCausalLM(medium_config()).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            # Small random weights: finite activations (no inf/NaN or denormal slow paths).
            parameter.normal_(0.0, 0.02)
    return Gemma3nFamily(model=model)


def skip_check(
    family: Gemma3nFamily, target_path: Path, latency: LatencyModel
) -> list[dict[str, Any]]:
    """Measured vs predicted saving of dropping skippable layers from uniform models.

    Random validation samples drop few layers, so their MAPE hardly tests how a dropped layer
    is priced; the search (and E2B-style sub-models) depends on it.
    """
    target = load_target(target_path)
    skippable = family.skippable_layers
    drops = [skippable[:1], skippable[-2:], skippable[1::2]]
    pairs = []
    for width in (family.step, max(family.stored_widths)):
        base = [min(width, s) for s in family.stored_widths]
        for dropped in drops:
            pairs.append((base, [0 if i in dropped else w for i, w in enumerate(base)]))
    configs = list(dict.fromkeys(tuple(c) for pair in pairs for c in pair))
    stats = measure_latency(family, target, [list(c) for c in configs])
    ms = {c: s.median_ms for c, s in zip(configs, stats)}
    rows = []
    for base, dropped in pairs:
        measured = ms[tuple(base)] - ms[tuple(dropped)]
        predicted = latency.predict_ms(base) - latency.predict_ms(dropped)
        naive = latency.naive_ms(base) - latency.naive_ms(dropped)
        rows.append(
            {
                "base_width": base[0],
                "dropped_layers": [i for i, w in enumerate(dropped) if w == 0],
                "measured_saving_ms": round(measured, 2),
                "predicted_saving_ms": round(predicted, 2),
                "naive_saving_ms": round(naive, 2),
                "base_ms": round(ms[tuple(base)], 2),
            }
        )
    return rows


def contiguous_check(family: Gemma3nFamily, target_path: Path, n: int = 6) -> list[dict[str, Any]]:
    """End-to-end ms of in-place views vs contiguous copies of the same configurations."""
    target = load_target(target_path)
    device = select_device(target.device)
    configs = [family.full_widths(), *sample_gemma3n_configs(family, n - 1, random.Random(7))]
    runners, names = [], []
    with pinned_threads(target.threads), torch.inference_mode():
        for widths in configs:
            view = family.view_model(widths)
            dense = copy.deepcopy(view)
            for parameter in dense.parameters():
                parameter.data = parameter.data.contiguous()
            runners += [
                _runner(view, family, target, device),
                _runner(dense, family, target, device),
            ]
            names.append(widths)
        stats = time_interleaved(
            runners, device=device, repeats=target.repeats, warmup=max(1, target.warmup)
        )
    return [
        {
            "widths": widths,
            "view_ms": round(stats[2 * i].median_ms, 3),
            "contiguous_ms": round(stats[2 * i + 1].median_ms, 3),
            "ratio": round(stats[2 * i].median_ms / stats[2 * i + 1].median_ms, 4),
        }
        for i, widths in enumerate(names)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="profile with --quick settings")
    parser.add_argument("--target", type=Path, default=ROOT / "profiles" / "cpu-prefill.yaml")
    parser.add_argument("--json", type=Path, help="also write the whole profile here")
    parser.add_argument("--contiguous", action="store_true", help="views vs contiguous copies")
    parser.add_argument(
        "--skip-check", action="store_true", help="measured vs predicted saving of dropped layers"
    )
    args = parser.parse_args()

    target = load_target(args.target)
    family = medium_family().prepare_for_target(target)
    load_before = os.getloadavg()
    started = time.perf_counter()
    profile = profiler.profile(family, target, quick=args.quick)
    seconds = time.perf_counter() - started
    load_after = os.getloadavg()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    validation = profile["validation"]
    facts = machine_facts(target)
    params = family.param_count()
    print(f"target: {target.describe()}{' (quick)' if args.quick else ''}")
    print(f"machine: {facts['cpu_model']}, {facts['cpu_count']} cores, torch {torch.__version__}")
    print(f"model: medium random Gemma 3n, {params:,} parameters, widths {family.stored_widths}")
    print(f"load average before / after: {load_before} / {load_after}")
    print(f"profile wall time: {seconds:.1f} s   peak RSS: {peak_mib:.0f} MiB")
    print(
        f"held-out ({validation['n']} configs): MAPE {validation['mape_pct']:.2f} %, "
        f"Spearman {validation['spearman']}, within ±10 % {validation['within_10pct']:.0%}, "
        f"max error {validation['max_abs_pct_err']:.2f} %"
    )
    print(
        f"naive table: MAPE {validation['naive']['mape_pct']:.2f} %, "
        f"Spearman {validation['naive']['spearman']}"
    )
    noise = validation["noise_floor"]
    print(f"noise floor: MAPE {noise['mape_pct']:.2f} %, Spearman {noise['spearman']}")
    fit = profile["calibration"]["fit"]
    coefficients = [round(c, 4) for c in profile["latency_model"]["coefficients"]]
    print(f"calibration fit ({fit['n']} configs): MAPE {fit['mape_pct']:.2f} %, {coefficients}")
    fixed = profile["fixed_costs_ms"]
    print(
        f"full forward {fixed['full_forward']['median_ms']:.2f} ms, outside the layers "
        f"{fixed['outside_layers']['median_ms']:.2f} ms"
    )
    if args.json:
        args.json.write_text(json.dumps(profile, indent=2) + "\n")
    if args.skip_check:
        latency = LatencyModel.from_profile(profile)
        for row in skip_check(family, args.target, latency):
            print(f"skip check: {row}")
        print(f"load average after the skip check: {os.getloadavg()}")
    if args.contiguous:
        for row in contiguous_check(family, args.target):
            print(f"view vs contiguous: {row}")
        print(f"load average after the check: {os.getloadavg()}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
