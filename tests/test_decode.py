"""Incremental decoding with a KV cache computes what the full forward computes."""

from __future__ import annotations

import pytest
import torch

from mnm_search.config import ModelConfig
from mnm_search.model import KVCache, MatLM
from mnm_search.slicing import slice_model

WIDTHS = [
    pytest.param(None, id="full-width"),
    pytest.param([8, 32, 64], id="mix-n-match"),
    pytest.param([16, 0, 8], id="with-skip"),
]


def _ids(config: ModelConfig, batch: int, seq: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(config.vocab_size, (batch, seq), generator=generator)


@pytest.mark.parametrize("widths", WIDTHS)
@pytest.mark.parametrize("prefix", [1, 5, 12])
@torch.inference_mode()
def test_prefill_then_decode_matches_full_forward(
    tiny_model: MatLM, widths: list[int] | None, prefix: int
) -> None:
    config = tiny_model.config
    ids = _ids(config, batch=2, seq=16)
    full = tiny_model(ids, widths)
    cache = KVCache.empty(config, batch=2)
    logits = [tiny_model(ids[:, :prefix], widths, cache=cache)]
    for position in range(prefix, ids.shape[1]):
        logits.append(tiny_model(ids[:, position : position + 1], widths, cache=cache))
    assert cache.length == ids.shape[1]
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("widths", WIDTHS)
@torch.inference_mode()
def test_token_by_token_from_empty_cache_matches_full_forward(
    tiny_model: MatLM, widths: list[int] | None
) -> None:
    config = tiny_model.config
    ids = _ids(config, batch=1, seq=config.max_seq_len)
    full = tiny_model(ids, widths)
    cache = KVCache.empty(config, batch=1)
    steps = [tiny_model(ids[:, t : t + 1], widths, cache=cache) for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunks", [[4, 3, 5], [1, 7, 1, 3]])
@torch.inference_mode()
def test_multi_token_chunks_after_a_cache_match_full_forward(
    tiny_model: MatLM, chunks: list[int]
) -> None:
    # Chunks after a non-empty cache need the offset causal mask (speculative/chunked decode).
    config = tiny_model.config
    ids = _ids(config, batch=2, seq=sum(chunks))
    widths = [16, 64, 8]
    full = tiny_model(ids, widths)
    cache = KVCache.empty(config, batch=2)
    outputs, start = [], 0
    for size in chunks:
        outputs.append(tiny_model(ids[:, start : start + size], widths, cache=cache))
        start += size
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("widths", [[8, 32, 64], [64, 0, 16]])
@torch.inference_mode()
def test_sliced_model_decodes_like_the_universal_one(tiny_model: MatLM, widths: list[int]) -> None:
    config = tiny_model.config
    sliced = slice_model(tiny_model, widths)
    ids = _ids(config, batch=1, seq=10)
    universal_cache = KVCache.empty(config, batch=1)
    sliced_cache = KVCache.empty(sliced.config, batch=1)
    tiny_model(ids[:, :6], widths, cache=universal_cache)
    sliced(ids[:, :6], cache=sliced_cache)
    for t in range(6, 10):
        expected = tiny_model(ids[:, t : t + 1], widths, cache=universal_cache)
        got = sliced(ids[:, t : t + 1], cache=sliced_cache)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@torch.inference_mode()
def test_rewinding_the_cache_repeats_the_same_decode_step(tiny_model: MatLM) -> None:
    # The profiler times one decode step repeatedly by resetting `cache.length`.
    config = tiny_model.config
    ids = _ids(config, batch=1, seq=9)
    cache = KVCache.empty(config, batch=1)
    tiny_model(ids[:, :8], cache=cache)
    first = tiny_model(ids[:, 8:9], cache=cache)
    cache.length = 8
    again = tiny_model(ids[:, 8:9], cache=cache)
    assert cache.length == 9
    torch.testing.assert_close(again, first)


@torch.inference_mode()
def test_decoding_past_the_context_is_refused(tiny_model: MatLM) -> None:
    config = tiny_model.config
    cache = KVCache.empty(config, batch=1)
    tiny_model(_ids(config, batch=1, seq=config.max_seq_len), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model(_ids(config, batch=1, seq=1), cache=cache)
