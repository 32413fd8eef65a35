"""Package a finished `mnm train` run as the embedded default checkpoint (a maintainer tool).

    python scripts/package_default_checkpoint.py /path/to/train-run

Stores the weights as float16 (the package must stay under 12 MB), evaluates the stored weights on
the bundled validation text (uniform S/M/L/XL and a few Mix'n'Match configurations) and records
those losses next to the training provenance in config.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from mnm_search.checkpoint import default_checkpoint_path, load_checkpoint, save_checkpoint
from mnm_search.config import format_widths, parse_widths
from mnm_search.data import load_eval_set
from mnm_search.evaluator import evaluate_loss

MAX_BYTES = 12 * 1024 * 1024
EVAL_TOKENS = 65_536
MIX_N_MATCH = ["S,S,M,M,L,L", "M,M,M,L,L,L", "S,M,L,XL,XL,XL", "L,L,L,XL,XL,XL", "M,L,L,L,XL,XL"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="directory written by `mnm train`")
    parser.add_argument("--out", type=Path, default=default_checkpoint_path())
    args = parser.parse_args()

    trained = load_checkpoint(args.run)
    training = dict(trained.metadata["training"])
    if not training.get("finished"):
        print(f"{args.run} is not a finished run (step {training.get('step')})", file=sys.stderr)
        return 1
    # Round-trip through float16 first so the recorded losses are those of the shipped weights.
    staged = save_checkpoint(
        trained.model,
        args.out.with_name(".staged-default"),
        storage_dtype="float16",
        overwrite=True,
    )
    shipped = load_checkpoint(staged)
    config = shipped.config
    eval_set = load_eval_set(None, seq_len=config.max_seq_len, max_tokens=EVAL_TOKENS)
    uniform = {
        name: round(evaluate_loss(shipped.model, eval_set, [g] * config.n_layers), 4)
        for name, g in zip(config.granularity_names, config.granularities)
    }
    mixes = {}
    for spec in MIX_N_MATCH:
        widths = parse_widths(spec, config)
        mixes[format_widths(widths, config)] = round(
            evaluate_loss(shipped.model, eval_set, widths), 4
        )
    training["shipped_weights"] = {
        "storage_dtype": "float16",
        "eval_tokens": eval_set.n_tokens,
        "val_losses_uniform": uniform,
        "val_losses_mix_n_match": mixes,
    }
    save_checkpoint(
        shipped.model,
        args.out,
        metadata={"training": training},
        storage_dtype="float16",
        overwrite=True,
    )
    shutil.rmtree(staged)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(json.dumps(training["shipped_weights"], indent=2))
    print(
        f"unigram baseline {training['unigram_val_loss']}, "
        f"XL perplexity {math.exp(uniform['XL']):.3f}"
    )
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")
    return 0 if size <= MAX_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
