"""The paper's consistency claim, measured as draft acceptance (issue 14).

A nested draft (a uniform configuration cut from the universal checkpoint) against an
independently trained dense model of the same size (`mnm train --granularities dense
--d-ff N`, same preset, corpus and token budget), both drafting for the universal model's
full width. Greedy decoding on the same prompts and lookaheads; both outputs equal the full
model's plain greedy output, so only the acceptance differs. Also: the drafts' own losses on
the bundled validation text, and their top-1 agreement with the full model (teacher-forced).

    python bench/speculate_consistency.py INDEPENDENT_DIR [--draft S*6] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mnm_search import load_family
from mnm_search._speculate_sweep import load_prompts
from mnm_search.speculative import Sampling, SpeculationStats, decode_plain, decode_speculative


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("independent", type=Path, help="dense model trained with mnm train")
    parser.add_argument("--universal", type=Path, default=None, help="default: embedded")
    parser.add_argument("--draft", default="S*6", help="nested draft widths of the universal")
    parser.add_argument("--lookaheads", default="1,2,3,4,6,8")
    parser.add_argument("--n-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=65_536)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    universal = load_family(args.universal)
    independent = load_family(args.independent)
    nested_widths = universal.parse_widths(args.draft)
    if independent.param_count() != universal.param_count(nested_widths):
        raise SystemExit(
            f"the independent model has {independent.param_count():,} parameters, the nested "
            f"draft {universal.param_count(nested_widths):,}: not the same size"
        )
    prompts = load_prompts(universal, prompts_file=None, n_prompts=args.n_prompts,
                           prompt_tokens=None).tokens  # fmt: skip
    greedy = Sampling()
    plain = [
        decode_plain(universal.decoder(), p, max_new_tokens=args.max_new_tokens, sampling=greedy)
        for p in prompts
    ]
    drafts = {
        f"nested {universal.format_widths(nested_widths)}": universal.decoder(nested_widths),
        f"independent {args.independent.name}": independent.decoder(),
    }
    rows = []
    for lookahead in [int(k) for k in args.lookaheads.split(",")]:
        for name, draft in drafts.items():
            stats = SpeculationStats(lookahead=lookahead)
            started = time.perf_counter()
            for prompt, expected in zip(prompts, plain):
                out = decode_speculative(
                    universal.decoder(), draft, prompt, max_new_tokens=args.max_new_tokens,
                    lookahead=lookahead, sampling=greedy, stats=stats,
                )  # fmt: skip
                assert out == expected, f"{name}: speculative output differs from plain greedy"
            rows.append({
                "draft": name, "lookahead": lookahead, **stats.as_dict(),
                "wall_s": round(time.perf_counter() - started, 2),
            })  # fmt: skip

    eval_set = universal.load_eval_set(None, max_tokens=args.eval_tokens)
    quality = {}
    with torch.inference_mode():
        full_top1 = []
        for name, logits_of in (
            ("full", lambda x: universal.logits(x)),
            (next(iter(drafts)), lambda x: universal.logits(x, nested_widths)),
            (list(drafts)[1], lambda x: independent.logits(x)),
        ):
            loss, agree, n = 0.0, 0, 0
            for start in range(0, eval_set.inputs.shape[0], 16):
                x = eval_set.inputs[start : start + 16]
                y = eval_set.targets[start : start + 16]
                logits = logits_of(x)  # [B, T, V]
                loss += float(torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), y.flatten(), reduction="sum"))  # fmt: skip
                top1 = logits.argmax(-1)
                if name == "full":
                    full_top1.append(top1)
                else:
                    agree += int((top1 == full_top1[start // 16]).sum())
                n += y.numel()
            quality[name] = {"loss": round(loss / n, 4), "tokens": n}
            if name != "full":
                quality[name]["top1_agreement_with_full"] = round(agree / n, 4)

    print(f"prompts: {len(prompts)} x {args.max_new_tokens} new tokens, greedy")
    print("| draft | K | acceptance | tokens/round |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['draft']} | {row['lookahead']} | {row['acceptance_rate']:.3f} | "
              f"{row['tokens_per_round']:.2f} |")  # fmt: skip
    print(json.dumps(quality, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "quality": quality}, indent=2) + "\n")


if __name__ == "__main__":
    main()
