"""The cached evaluator computes what the plain forward computes, with far less work."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from mnm_search.data import EvalSet, load_eval_set
from mnm_search.errors import ConfigError
from mnm_search.evaluator import CachedEvaluator, eval_subset, evaluate_loss, perplexity
from mnm_search.families.matlm import MatLMFamily
from mnm_search.model import MatLM
from mnm_search.space import SearchSpace


@pytest.fixture
def trained_like_model(tiny_model: MatLM) -> MatLM:
    """The tiny model with larger FFN weights, so that widths change the loss clearly."""
    with torch.no_grad():
        for block in tiny_model.blocks:
            block.ffn.up.weight.mul_(8)
            block.ffn.down.weight.mul_(30)
    return tiny_model


@pytest.fixture
def eval_set(tiny_model: MatLM) -> EvalSet:
    return load_eval_set(None, seq_len=tiny_model.config.max_seq_len, max_tokens=40 * 32)


def _configs(space: SearchSpace, n: int, seed: int = 0) -> list[list[int]]:
    configs = list(space.all_configs())
    random.Random(seed).shuffle(configs)
    return configs[:n]


@pytest.mark.parametrize(
    ("space_kwargs", "cache_mb", "batch_size"),
    [
        ({}, 64.0, 16),  # everything cached
        ({"allow_skip": True}, 64.0, 7),  # skipped FFNs, ragged last batch
        ({"interpolate": 1}, 64.0, 16),  # widths between granularities
        ({}, 0.2, 16),  # cache smaller than all states: evictions
        ({}, 0.0, 16),  # cache off
    ],
)
def test_cached_loss_matches_plain_forward(
    trained_like_model: MatLM,
    eval_set: EvalSet,
    space_kwargs: dict,
    cache_mb: float,
    batch_size: int,
) -> None:
    space = SearchSpace.from_config(trained_like_model.config, **space_kwargs)
    evaluator = CachedEvaluator(
        MatLMFamily.from_model(trained_like_model),
        eval_set,
        batch_size=batch_size,
        cache_mb=cache_mb,
        layer_widths=space.choices,
    )
    for widths in _configs(space, 30):
        plain = evaluate_loss(trained_like_model, eval_set, widths, batch_size=batch_size)
        cached = evaluator.evaluate(widths).loss
        assert cached == pytest.approx(plain, rel=1e-6, abs=0), widths
        # Asking again (now from the cache) gives the same number.
        assert evaluator.evaluate(widths).loss == cached
    assert evaluator.cached_bytes <= evaluator.cache_bytes


def test_widths_really_change_the_loss(trained_like_model: MatLM, eval_set: EvalSet) -> None:
    """Guards the test above against a model where every width gives the same loss."""
    evaluator = CachedEvaluator(MatLMFamily.from_model(trained_like_model), eval_set)
    losses = {evaluator.evaluate([w] * 3).loss for w in (8, 16, 32, 64)}
    assert max(losses) - min(losses) > 1e-2


def test_exhaustive_sweep_reuses_prefixes_and_siblings(
    trained_like_model: MatLM, eval_set: EvalSet
) -> None:
    space = SearchSpace.from_config(trained_like_model.config)
    evaluator = CachedEvaluator(
        MatLMFamily.from_model(trained_like_model), eval_set, layer_widths=space.choices
    )
    for widths in space.all_configs():
        evaluator.evaluate(widths)
    # One attention + widest-FFN pass per distinct layer input: 1 + 4 + 16 of them,
    # instead of 3 per configuration (192) in the plain forward.
    assert evaluator.stats.layer_runs == 1 + 4 + 16
    assert evaluator.stats.evaluations == 64
    assert evaluator.stats.evictions == 0


def test_auto_siblings_only_where_every_prefix_fits(
    trained_like_model: MatLM, eval_set: EvalSet
) -> None:
    state_mb = eval_set.inputs.numel() * trained_like_model.config.d_model * 4 / 2**20
    space = SearchSpace.from_config(trained_like_model.config)
    # room for 2 x (4 + 16) states: siblings at layers 0 and 1, not at layer 2 (64 prefixes)
    evaluator = CachedEvaluator(
        MatLMFamily.from_model(trained_like_model),
        eval_set,
        cache_mb=40.5 * state_mb,
        siblings="auto",
    )
    assert [layer for layer in range(4) if evaluator._siblings_at(layer)] == [0, 1]
    for widths in _configs(space, 12):
        plain = evaluate_loss(trained_like_model, eval_set, widths)
        assert evaluator.evaluate(widths).loss == pytest.approx(plain, rel=1e-6, abs=0)
    with pytest.raises(ConfigError, match="siblings must be"):
        CachedEvaluator(MatLMFamily.from_model(trained_like_model), eval_set, siblings="never")


def test_cache_is_bounded(trained_like_model: MatLM, eval_set: EvalSet) -> None:
    one_state_mb = eval_set.inputs.numel() * trained_like_model.config.d_model * 4 / 2**20
    evaluator = CachedEvaluator(
        MatLMFamily.from_model(trained_like_model), eval_set, cache_mb=3.5 * one_state_mb
    )
    for widths in itertools.islice(
        SearchSpace.from_config(trained_like_model.config).all_configs(), 20
    ):
        evaluator.evaluate(widths)
        assert evaluator.cached_bytes <= evaluator.cache_bytes
    assert len(evaluator._cache) == 3
    assert evaluator.stats.evictions > 0


def test_agreement_with_the_full_model(trained_like_model: MatLM, eval_set: EvalSet) -> None:
    evaluator = CachedEvaluator(
        MatLMFamily.from_model(trained_like_model), eval_set, agreement=True
    )
    full = evaluator.evaluate([64, 64, 64])
    assert full.kl == pytest.approx(0.0, abs=1e-6)
    assert full.agreement == 1.0
    small = evaluator.evaluate([8, 8, 8])
    assert small.kl > 1e-3
    assert 0.0 <= small.agreement < 1.0
    # Cross-check KL and agreement against a direct computation.
    with torch.no_grad():
        ref = torch.log_softmax(trained_like_model(eval_set.inputs, [64, 64, 64]), dim=-1)
        sub = torch.log_softmax(trained_like_model(eval_set.inputs, [8, 8, 8]), dim=-1)
    kl = (ref.exp() * (ref - sub)).sum(-1).mean().item()
    agreement = (ref.argmax(-1) == sub.argmax(-1)).float().mean().item()
    assert small.kl == pytest.approx(kl, rel=1e-4)
    assert small.agreement == pytest.approx(agreement)
    assert small.loss == pytest.approx(evaluate_loss(trained_like_model, eval_set, [8, 8, 8]))


def test_eval_subset(eval_set: EvalSet) -> None:
    subset = eval_subset(eval_set, 100)
    assert subset.inputs.shape[0] == 3
    assert torch.equal(subset.inputs, eval_set.inputs[:3])
    assert eval_subset(eval_set, 1).inputs.shape[0] == 1
    assert eval_subset(eval_set, 10**9).inputs.shape[0] == eval_set.inputs.shape[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be positive, got 0"),
        ({"cache_mb": -1}, "cache_mb must be >= 0, got -1"),
        ({"layer_widths": [[8]]}, "layer_widths has 1 entries"),
    ],
)
def test_bad_settings(tiny_model: MatLM, eval_set: EvalSet, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CachedEvaluator(MatLMFamily.from_model(tiny_model), eval_set, **kwargs)


@pytest.mark.parametrize(
    ("loss", "expected"),
    [(0.0, 1.0), (1.0, math.e), (800.0, math.inf), (math.inf, math.inf)],
)
def test_perplexity_never_overflows(loss: float, expected: float) -> None:
    assert perplexity(loss) == pytest.approx(expected)


def test_perplexity_of_nan_is_nan() -> None:
    assert math.isnan(perplexity(math.nan))


def test_head_in_chunks_gives_the_same_numbers(
    trained_like_model: MatLM, eval_set: EvalSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large vocabulary's head runs a few tokens at a time; the numbers must not change."""
    import mnm_search.evaluator as evaluator_module

    family = MatLMFamily.from_model(trained_like_model)
    widths = [trained_like_model.config.granularities[0]] * trained_like_model.config.n_layers
    whole = CachedEvaluator(family, eval_set, agreement=True).evaluate(widths)
    vocab = trained_like_model.config.vocab_size
    monkeypatch.setattr(evaluator_module, "_HEAD_CHUNK_BYTES", 4 * vocab * 7)  # 7 tokens a call
    chunked_evaluator = CachedEvaluator(family, eval_set, agreement=True)
    chunked = chunked_evaluator.evaluate(widths)
    assert chunked_evaluator._head_rows == 7
    assert chunked.loss == pytest.approx(whole.loss, rel=1e-6)
    assert chunked.kl == pytest.approx(whole.kl, rel=1e-5, abs=1e-9)
    assert chunked.agreement == whole.agreement
    assert 0 < whole.agreement < 1 and whole.kl > 0
