"""Quality of a Mix'n'Match configuration: mean next-token cross-entropy on fixed eval data."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mnm_search.data import EvalSet
from mnm_search.model import MatLM


@torch.inference_mode()
def evaluate_loss(
    model: MatLM,
    eval_set: EvalSet,
    widths: Sequence[int] | None = None,
    *,
    batch_size: int = 16,
) -> float:
    """Mean cross-entropy in nats/token of `model` at `widths` over every eval window."""
    total = 0.0
    for start in range(0, eval_set.inputs.shape[0], batch_size):
        inputs = eval_set.inputs[start : start + batch_size]
        targets = eval_set.targets[start : start + batch_size]
        logits = model(inputs, widths)  # [B, T, vocab]
        total += F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"
        ).item()
    return total / eval_set.n_tokens


def unigram_loss(train_tokens: torch.Tensor, eval_set: EvalSet, vocab_size: int = 256) -> float:
    """Cross-entropy of the add-one-smoothed unigram model of `train_tokens`: a floor to beat."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    return float(-log_probs[eval_set.targets.flatten()].mean())
