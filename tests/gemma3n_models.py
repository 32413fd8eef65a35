"""Tiny random Gemma 3n models for tests (nothing is downloaded). Needs transformers."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

SLIDING, FULL = "sliding_attention", "full_attention"
# 6 layers, types S F S F S F; the last 2 reuse KV, so layers 2 (S) and 3 (F) produce it.
PRODUCERS, CONSUMERS = [2, 3], [4, 5]
PLE_WIDTH = 16


def tiny_config(**overrides: object) -> Gemma3nTextConfig:
    kwargs: dict[str, object] = dict(
        vocab_size=300,
        vocab_size_per_layer_input=300,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        layer_types=[SLIDING, FULL] * 3,
        num_kv_shared_layers=2,
        activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0],
        hidden_size_per_layer_input=PLE_WIDTH,
        laurel_rank=8,
        sliding_window=8,  # shorter than the test sequences, so sliding masks matter
        max_position_embeddings=128,
    )
    kwargs.update(overrides)
    return Gemma3nTextConfig(**kwargs)


def random_model(config: Gemma3nTextConfig, seed: int = 0) -> Gemma3nForCausalLM:
    """Every parameter random: the default init zeroes AltUp's output scale, which would
    silence the per-layer embeddings and hide PLE slicing bugs."""
    torch.manual_seed(seed)
    model = Gemma3nForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    return model


def input_ids(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def save_tiny_checkpoint(path: Path, *, seed: int = 0, **overrides: object) -> Path:
    """A sharded CausalLM checkpoint of a tiny random model, as transformers writes it."""
    random_model(tiny_config(**overrides), seed=seed).save_pretrained(
        str(path), max_shard_size="200KB"
    )
    return path
