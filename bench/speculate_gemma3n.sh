#!/usr/bin/env bash
# Self-speculative decoding where FFNs dominate the decode cost (issue 14): the medium random
# Gemma 3n of bench/gemma3n_profile.py (8 layers, hidden 512, FFN 4096 in steps of 512),
# saved once as a transformers checkpoint, then `mnm speculate` with uniform drafts.
# Its weights are random (nothing can be downloaded): the draft cost c and the verification
# cost v are real measurements, the acceptance is not evidence of quality.
#
#   bash bench/speculate_gemma3n.sh [WORK_DIR]     # default: results/speculate-gemma3n
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-results/speculate-gemma3n}"
mkdir -p "$work"
[ -f "$work/medium/config.json" ] || python - "$work/medium" <<'EOF'
import sys
sys.path.insert(0, "bench")
from gemma3n_profile import medium_family

medium_family().model.save_pretrained(sys.argv[1])
EOF
/usr/bin/time -f "%e s wall, %M KiB peak RSS" -o "$work/speculate.time" \
  mnm speculate "$work/medium" --draft "${DRAFT:-512*8}" --lookahead 1,2,4,6,8 \
    --n-prompts "${PROMPTS:-4}" --max-new-tokens "${NEW_TOKENS:-32}" --repeats "${REPEATS:-3}" \
    --json > "$work/speculate.json"
echo "speculate: $(cat "$work/speculate.time") (load average now: $(cut -d' ' -f1-3 /proc/loadavg))"
python -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['best'], indent=2))" \
  "$work/speculate.json"
