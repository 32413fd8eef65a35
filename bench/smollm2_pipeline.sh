#!/usr/bin/env bash
# The whole pipeline on a real pretrained model: SmolLM2-135M-Instruct (30 layers, hidden 576,
# FFN 1536), matformerized, profiled on cpu-prefill, searched with four samplers, exported.
# Numbers: docs/benchmarks.md "A real model: SmolLM2-135M (issue 13)". Every step is skipped
# when its output exists, so an interrupted run continues where it stopped.
#
#   bash bench/smollm2_pipeline.sh [WORK_DIR]     # default: results/smollm2
#
# Settings (environment): TRIALS (50), TOKENS (1024 evaluation tokens per trial), SAMPLERS
# ("gp tpe nsga2 random"). Wall time on the 2-core machine: about 1 h 15 min.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-results/smollm2}"
trials="${TRIALS:-50}"
tokens="${TOKENS:-1024}"
samplers="${SAMPLERS:-gp tpe nsga2 random}"
mkdir -p "$work"
timed() {  # timed NAME COMMAND...: wall time and peak memory into $work/NAME.time
  local name="$1"
  shift
  /usr/bin/time -f "%e s wall, %M KiB peak RSS" -o "$work/$name.time" "$@"
  echo "$name: $(cat "$work/$name.time") (load average now: $(cut -d' ' -f1-3 /proc/loadavg))"
}

gguf="$(bash scripts/real_model.sh | tail -1)"
[ -d "$work/nested" ] || timed matformerize mnm matformerize "$gguf" --out "$work/nested"
[ -f "$work/profile-cpu-prefill.json" ] ||
  timed profile mnm profile "$work/nested" --target cpu-prefill \
    --out "$work/profile-cpu-prefill.json"
for sampler in $samplers; do
  [ -f "$work/search-$sampler/pareto.csv" ] ||
    timed "search-$sampler" mnm search "$work/nested" \
      --profile "$work/profile-cpu-prefill.json" --sampler "$sampler" --trials "$trials" \
      --max-tokens "$tokens" --out "$work/search-$sampler"
done
main="$work/search-gp"
mnm pareto "$main" > "$work/pareto.txt"
python bench/smollm2_search_quality.py "$work"/search-*/ --json "$work/search_quality.json" \
  | tee "$work/search_quality.md"

# Exports: the best searched slice within the predicted latency of each uniform 75/50/25 %
# slice, and those uniform slices themselves; safetensors + ONNX for the searched ones, GGUF
# (llama.cpp) for one searched and one uniform.
budgets="$(python - "$main" <<'PY'
import sys
import pandas as pd
trials = pd.read_csv(f"{sys.argv[1]}/trials.csv", dtype={"widths": str})
for share, width in (("75", 1152), ("50", 768), ("25", 384)):
    row = trials[trials["widths"] == ",".join([str(width)] * 30)].iloc[0]
    print(share, width, row["latency_ms"])
PY
)"
while read -r share width latency; do
  [ -d "$work/export-front-$share" ] ||
    timed "export-front-$share" mnm export --from "$main" --max-latency-ms "$latency" \
      --max-tokens 4096 --format "$([ "$share" = 50 ] && echo gguf || echo onnx)" \
      --out "$work/export-front-$share"
  [ -d "$work/export-uniform-$share" ] ||
    timed "export-uniform-$share" mnm export "$work/nested" --widths "$width*30" \
      --profile "$work/profile-cpu-prefill.json" --max-tokens 4096 \
      --format "$([ "$share" = 50 ] && echo gguf || echo safetensors)" \
      --out "$work/export-uniform-$share"
done <<< "$budgets"
python bench/smollm2_front.py "$main" --exports "$work"/export-*/ --json "$work/front.json" \
  | tee "$work/front.md"
