"""Peak memory of `mnm info/eval/profile/search/export` on random Gemma 3n checkpoints.

Each command runs in its own process; its peak resident set (ru_maxrss from wait4) minus that
of a process that only imports the same libraries is what the command itself costs. Dividing
by the checkpoint's weight bytes gives a ratio that, times E4B's text weights, extrapolates to
a real E4B (the fixed, size-independent costs are then overestimated, not hidden).

    python bench/gemma3n_memory.py                  # tiny and medium
    python bench/gemma3n_memory.py --sizes medium
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# This driver imports no torch: a forked child starts with its parent's resident pages, which
# ru_maxrss would count. Models are built in child processes (`--make`).

SLIDING, FULL = "sliding_attention", "full_attention"
SIZES = {
    "tiny": {},
    "medium": dict(
        vocab_size=16384,
        vocab_size_per_layer_input=16384,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        layer_types=[SLIDING, SLIDING, SLIDING, FULL] * 2,
        num_kv_shared_layers=4,
        activation_sparsity_pattern=[0.95, 0.95] + [0.0] * 6,
        hidden_size_per_layer_input=128,
        laurel_rank=64,
        sliding_window=64,
        max_position_embeddings=1024,
    ),
}
TARGET = (
    "device: cpu\nphase: prefill\nseq_len: 64\nrepeats: 3\nwarmup: 1\n"
    "calibration: 8\nvalidation: 4\n"
)
BASELINE = "imports only (baseline)"
IMPORTS = "import mnm_search.cli, mnm_search.families.gemma3n_profile"


def peak_rss_mb(args: list[str], cwd: Path) -> float:
    """Peak resident memory (MiB) of one child process; fails loudly if the command fails."""
    process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{process.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024  # kB on Linux


def make(size: str, ckpt: str) -> None:
    """(child process) Save a random checkpoint; print its and E4B's parameter counts."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from gemma3n_models import random_model, tiny_config
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    from mnm_search.families.gemma3n import Gemma3nFamily

    model = random_model(tiny_config(**SIZES[size]))
    model.save_pretrained(ckpt, max_shard_size="200MB")
    family = Gemma3nFamily(model=model)
    with torch.device("meta"):  # E4B's shapes only; nothing is downloaded
        e4b = Gemma3nForCausalLM(Gemma3nTextConfig(layer_types=([SLIDING] * 4 + [FULL]) * 7))
    info = {
        "params": family.param_count(),
        "n_layers": family.n_layers,
        "top": max(family.stored_widths),
        "step": family.step,
        "e4b_params": Gemma3nFamily(model=e4b).param_count(),
    }
    print(json.dumps(info))


def measure(size: str, workdir: Path) -> dict[str, object]:
    ckpt = workdir / size
    made = subprocess.run(
        [sys.executable, __file__, "--make", size, str(ckpt)],
        check=True,
        capture_output=True,
        text=True,
    )
    info = json.loads(made.stdout.strip().splitlines()[-1])
    weight_bytes = info["params"] * 4  # float32
    n, top, step = info["n_layers"], info["top"], info["step"]
    half = ",".join(str(max(step, top // 2)) for _ in range(n))
    full = ",".join(str(top) for _ in range(n))
    # Drops the second-to-last layer: a KV consumer in both sizes (never a producer).
    dropped = ",".join("0" if i == n - 2 else str(top) for i in range(n))
    (workdir / "target.yaml").write_text(TARGET)
    mnm = [sys.executable, "-m", "mnm_search"]
    load = f"{IMPORTS}; mnm_search.families.gemma3n.Gemma3nFamily.load({str(ckpt)!r})"
    profile = f"{size}.json"
    commands = {
        BASELINE: [sys.executable, "-c", IMPORTS],
        "info": [*mnm, "info", str(ckpt)],
        "load": [sys.executable, "-c", load],
        "eval": [*mnm, "eval", str(ckpt), "--widths", half, "--max-tokens", "2048"],
        "profile --quick": [
            *mnm, "profile", str(ckpt), "--quick", "--target", "target.yaml", "--out", profile
        ],
        "search": [
            *mnm, "search", str(ckpt), "--objectives", "loss,latency", "--profile", profile,
            "--trials", "6", "--sampler", "tpe", "--max-tokens", "1024", "--out", f"res-{size}",
        ],
        "export --format hf": [
            *mnm, "export", str(ckpt), "--widths", half, "--out", f"export-{size}",
            "--max-tokens", "1024",
        ],
        # Dropping layers cuts the PLE table (34 % of E4B's weights) as well.
        "export, layers dropped": [
            *mnm, "export", str(ckpt), "--widths", dropped, "--out", f"export-drop-{size}",
            "--max-tokens", "1024",
        ],
        # The worst case for "never held twice": the written slice is as large as the source.
        "export, full width": [
            *mnm, "export", str(ckpt), "--widths", full, "--out", f"export-full-{size}",
            "--max-tokens", "1024",
        ],
    }  # fmt: skip
    peaks = {name: peak_rss_mb(args, workdir) for name, args in commands.items()}
    base = peaks[BASELINE]
    model_mb = weight_bytes / 2**20
    return {
        "size": size,
        "params": info["params"],
        "e4b_params": info["e4b_params"],
        "weights_mb_float32": round(model_mb, 1),
        "peak_rss_mb": {k: round(v, 1) for k, v in peaks.items()},
        "over_baseline_per_model": {
            k: round((v - base) / model_mb, 3) for k, v in peaks.items() if k != BASELINE
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,medium")
    parser.add_argument("--make", nargs=2, metavar=("SIZE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make(*args.make)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            result = measure(size, Path(tmp))
            results.append(result)
            print(json.dumps(result, indent=2))
    medium = results[-1]
    e4b = int(medium["e4b_params"]) * 2  # bfloat16
    base = medium["peak_rss_mb"][BASELINE]
    print(f"\nE4B text weights, bfloat16: {e4b / 2**30:.2f} GiB")
    print(f"extrapolated from {medium['size']} (baseline {base:.0f} MiB + ratio x E4B weights):")
    for name, ratio in medium["over_baseline_per_model"].items():
        estimate = (base + ratio * e4b / 2**20) / 1024
        print(f"  {name:20s} {ratio:6.3f} x model -> {estimate:6.2f} GiB")


if __name__ == "__main__":
    main()
