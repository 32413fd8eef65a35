"""Memory per configuration: weights, KV cache and a peak-activation estimate, without timing."""

from __future__ import annotations

import pytest

from mnm_search.config import ModelConfig, param_count
from mnm_search.errors import WidthsError
from mnm_search.memory import memory_bytes
from mnm_search.model import KVCache, MatLM
from mnm_search.slicing import slice_model
from mnm_search.targets import HardwareTarget

PREFILL = HardwareTarget(name="p", phase="prefill", seq_len=16, batch=2)
DECODE = HardwareTarget(name="d", phase="decode", context_len=20, seq_len=1, batch=3)


@pytest.mark.parametrize("widths", [[8, 8, 8], [64, 0, 16], [64, 64, 64], [0, 0, 0]])
def test_weights_equal_the_sliced_model_bytes(tiny_model: MatLM, widths: list[int]) -> None:
    sliced = slice_model(tiny_model, widths)
    actual = sum(p.numel() * p.element_size() for p in sliced.parameters())
    assert memory_bytes(tiny_model.config, widths, PREFILL).weights == actual


@pytest.mark.parametrize(("dtype", "size"), [("float32", 4), ("bfloat16", 2), ("float16", 2)])
def test_bytes_scale_with_dtype(tiny_config: ModelConfig, dtype: str, size: int) -> None:
    target = HardwareTarget(name="t", phase="prefill", seq_len=16, dtype=dtype)
    estimate = memory_bytes(tiny_config, [16, 32, 64], target)
    assert estimate.weights == param_count(tiny_config, [16, 32, 64]) * size


@pytest.mark.parametrize(("target", "positions"), [(PREFILL, 16), (DECODE, 21)])
def test_kv_cache_covers_the_target_context(
    tiny_config: ModelConfig, target: HardwareTarget, positions: int
) -> None:
    estimate = memory_bytes(tiny_config, [8, 8, 8], target)
    cache = KVCache.empty(tiny_config, batch=target.batch)
    per_position = (cache.keys.nbytes + cache.values.nbytes) // tiny_config.max_seq_len
    assert estimate.kv_cache == per_position * positions
    assert estimate.kv_cache == 2 * 3 * target.batch * positions * 32 * 4


def test_kv_cache_does_not_depend_on_ffn_widths(tiny_config: ModelConfig) -> None:
    small = memory_bytes(tiny_config, [8, 8, 8], DECODE)
    large = memory_bytes(tiny_config, [64, 64, 64], DECODE)
    assert small.kv_cache == large.kv_cache
    assert small.weights < large.weights


def test_activations_grow_with_batch_and_tokens(tiny_config: ModelConfig) -> None:
    one = memory_bytes(tiny_config, [64, 64, 64], HardwareTarget(name="a", seq_len=16))
    batch = memory_bytes(tiny_config, [64, 64, 64], HardwareTarget(name="b", seq_len=16, batch=4))
    longer = memory_bytes(tiny_config, [64, 64, 64], HardwareTarget(name="c", seq_len=32))
    assert batch.activations == 4 * one.activations
    assert longer.activations > one.activations
    assert one.activations > 0


def test_activation_estimate_covers_the_real_tensors(tiny_config: ModelConfig) -> None:
    # The largest tensors of one forward (logits; the FFN hidden layer) fit in the estimate.
    target = HardwareTarget(name="t", seq_len=32, batch=2)
    estimate = memory_bytes(tiny_config, [64, 64, 64], target).activations
    logits = 2 * 32 * tiny_config.vocab_size * 4
    hidden = 2 * 32 * 64 * 4
    residual = 2 * 32 * tiny_config.d_model * 4
    assert estimate >= residual + max(logits, 2 * hidden)


def test_total_and_dict(tiny_config: ModelConfig) -> None:
    estimate = memory_bytes(tiny_config, [8, 16, 32], DECODE)
    assert estimate.total == estimate.weights + estimate.kv_cache + estimate.activations
    assert estimate.to_dict()["total"] == estimate.total


def test_widths_are_validated(tiny_config: ModelConfig) -> None:
    with pytest.raises(WidthsError, match="layer 2"):
        memory_bytes(tiny_config, [8, 8, 65], PREFILL)
