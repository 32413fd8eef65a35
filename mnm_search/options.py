"""The choices and defaults that commands offer: objectives, samplers, training presets,
speculative-decoding defaults.

They live here, in a module that imports nothing heavy, because the command line builds its
help texts from them: `mnm --help` must not wait for torch, pandas or Optuna. The modules
that act on them (`study`, `pareto`, `train`, `export`, `_speculate_sweep`) import them from
here; this is their one definition.
"""

from __future__ import annotations

from mnm_search.config import ModelConfig

# Search objective name -> its result column (trials.csv, pareto.csv).
OBJECTIVES = {
    "loss": "loss",
    "latency": "latency_ms",
    "params": "params",
    "memory": "memory_bytes",
    "kl": "kl",
    "disagreement": "disagreement",
    # Self-speculative decoding with the configuration as the draft of the full model:
    # top-1 agreement with the full model (a proxy of the greedy acceptance rate), and the
    # predicted speed-up at the best lookahead (`speculative.best_lookahead`).
    "acceptance": "acceptance",
    "speedup": "speedup",
}
# Result columns where higher is better; every other objective column is minimised.
MAXIMISED_COLUMNS = frozenset({"acceptance", "speedup"})
# The objectives where higher is better; every other one is minimised.
MAXIMISED = frozenset(name for name, column in OBJECTIVES.items() if column in MAXIMISED_COLUMNS)
# Objectives that may be searched alone: they weigh quality against cost themselves.
SINGLE_OBJECTIVES = ("speedup",)
# `auto` enumerates the space when that is estimated to cost no more than the trials asked
# for, else runs the GP sampler (TPE once the GP's own time outgrows an evaluation's).
SAMPLERS = ("auto", "nsga2", "tpe", "gp", "random", "exhaustive")
DEFAULT_SAMPLER = "auto"


def _model_preset(d_model: int, n_layers: int, n_heads: int, seq: int) -> ModelConfig:
    d_ff = 4 * d_model
    return ModelConfig(
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        d_ff=d_ff,
        granularities=(d_ff // 8, d_ff // 4, d_ff // 2, d_ff),
        max_seq_len=seq,
    )


# `mnm train --preset`: name -> (model config, batch size)
PRESETS: dict[str, tuple[ModelConfig, int]] = {
    "tiny": (_model_preset(32, 2, 2, 32), 8),
    "small": (_model_preset(128, 4, 4, 128), 16),
    "default": (_model_preset(256, 6, 4, 256), 16),
}

# Tokens a shipped self-speculative draft proposes per verification (`mnm export --draft`).
DEFAULT_LOOKAHEAD = 4
# `mnm speculate`: the lookaheads swept, and the prompts cut from the bundled text.
DEFAULT_LOOKAHEADS = (1, 2, 3, 4, 6, 8)
DEFAULT_PROMPT_TOKENS = 64
DEFAULT_N_PROMPTS = 8
