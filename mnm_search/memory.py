"""Memory of a configuration on a target, computed (not timed): weights, KV cache, activations.

Counts bytes at the target's dtype:
- weights: every parameter of the physically sliced model (`param_count`);
- KV cache: keys and values of every layer for the target's whole context
  (`context_len + seq_len` positions, times the batch);
- activations: a peak estimate for one forward pass at inference, the residual stream plus
  the largest intermediate alive beside it (attention: q, k, v and the score matrix; FFN:
  the hidden layer before and after GELU; head: the logits). Kernels that fuse attention
  (flash/SDPA) need less, so this is an upper-side estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mnm_search.config import ModelConfig, param_count, validate_widths
from mnm_search.targets import HardwareTarget

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def to_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "activations": self.activations,
            "total": self.total,
        }


def memory_bytes(
    config: ModelConfig, widths: Sequence[int], target: HardwareTarget
) -> MemoryEstimate:
    """Bytes the configuration `widths` needs to run on `target` (weights + cache + peak)."""
    widths = validate_widths(widths, config)
    size = DTYPE_BYTES[target.dtype]
    batch, new, context = target.batch, target.seq_len, target.total_len
    d = config.d_model
    kv = 2 * config.n_layers * batch * context * d * size
    residual = 2 * batch * new * d  # the stream and the normalised copy feeding a sub-block
    attention = 3 * batch * new * d + batch * config.n_heads * new * context
    ffn = 2 * batch * new * max(widths, default=0)
    head = batch * new * config.vocab_size
    activations = (residual + max(attention, ffn, head)) * size
    return MemoryEstimate(
        weights=param_count(config, widths) * size, kv_cache=kv, activations=activations
    )
