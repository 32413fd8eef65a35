#!/usr/bin/env bash
# Self-speculative decoding on the embedded default checkpoint, cpu-decode, batch 1 (issue 14).
# Numbers: docs/benchmarks.md "Self-speculative decoding (issue 14)".
#
#   bash bench/speculate_default.sh [WORK_DIR]     # default: results/speculate
#
# 1. a decode latency profile (1 thread, 1 token after 128 cached);
# 2. `mnm search --objectives speedup`: the draft with the best predicted speed-up, from each
#    configuration's top-1 agreement with the full model and its cost in the profile;
# 3. `mnm speculate --from`: that draft and the uniform S/M/L drafts x lookahead 1..8, timed
#    (plain vs speculative tokens/s), with the predicted speed-up from the profile beside it.
# Settings (environment): TRIALS (60), PROMPTS (8), NEW_TOKENS (64), REPEATS (5).
# Every step is skipped when its output exists. Wall time on the 2-core machine: ~6 min.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-results/speculate}"
mkdir -p "$work"
timed() {  # timed NAME COMMAND...: wall time and peak memory into $work/NAME.time
  local name="$1"
  shift
  /usr/bin/time -f "%e s wall, %M KiB peak RSS" -o "$work/$name.time" "$@"
  echo "$name: $(cat "$work/$name.time") (load average now: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
}

[ -f "$work/decode.json" ] ||
  timed profile mnm profile --target cpu-decode --out "$work/decode.json"
[ -f "$work/draft-search/pareto.csv" ] ||
  timed search mnm search --profile "$work/decode.json" --objectives speedup \
    --trials "${TRIALS:-60}" --out "$work/draft-search"
timed speculate mnm speculate --from "$work/draft-search" --profile "$work/decode.json" \
  --lookahead 1,2,3,4,6,8 --n-prompts "${PROMPTS:-8}" --max-new-tokens "${NEW_TOKENS:-64}" \
  --repeats "${REPEATS:-5}" --plot "$work/speculate.png" --json > "$work/speculate.json"
python - "$work/speculate.json" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
print(json.dumps(data.get("best"), indent=2))
EOF
