"""Self-speculative decoding: exactness (greedy and sampled), statistics and predictions.

The sampling correction is checked statistically: tokens drawn with a draft must follow the
target's own distribution, computed exactly here by enumeration. The first tests use
Markov-chain "models" (logits depend on the last token only) so that thousands of samples
take a second; a tiny MatLM repeats the check on a real decoder with its own KV cache.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence

import pytest
import torch
from scipy.stats import chi2

from mnm_search import generate
from mnm_search.config import ModelConfig
from mnm_search.errors import ConfigError, MnmError
from mnm_search.families.base import Decoder
from mnm_search.families.matlm import MatLMFamily
from mnm_search.model import MatLM
from mnm_search.speculative import (
    Sampling,
    SpeculationStats,
    best_lookahead,
    decode_plain,
    decode_speculative,
    expected_tokens,
    predicted_speedup,
)

P_VALUE = 1e-4  # a correct sampler fails one run in 10,000; a wrong one fails every run


class MarkovDecoder(Decoder):
    """Logits of the next token depend only on the current token: `table[current]`."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # [V, V]
        self.cached: list[int] = []

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.cached = []
        return self.step(input_ids)

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        tokens = input_ids[0].tolist()
        self.cached += tokens
        return self.table[tokens][None]  # [1, t, V]

    def rollback(self, length: int) -> None:
        assert 0 <= length <= len(self.cached)
        self.cached = self.cached[:length]

    @property
    def length(self) -> int:
        return len(self.cached)


def markov_tables(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A target and a draft that agree loosely (the draft is a noisy, flatter target)."""
    generator = torch.Generator().manual_seed(seed)
    target = 2 * torch.randn(vocab, vocab, generator=generator)
    draft = 0.6 * target + torch.randn(vocab, vocab, generator=generator)
    return target, draft


def exact_distribution(
    probs_of: dict[tuple[int, ...], torch.Tensor], prompt: Sequence[int], n_new: int, vocab: int
) -> dict[tuple[int, ...], float]:
    """P(new tokens) under the target, by enumeration; `probs_of[prefix]` is p(next | prefix)."""
    exact = {}
    for outcome in itertools.product(range(vocab), repeat=n_new):
        p, prefix = 1.0, tuple(prompt)
        for token in outcome:
            p *= float(probs_of[prefix][token])
            prefix += (token,)
        exact[outcome] = p
    return exact


def chi_square_p_value(counts: Counter, exact: dict[tuple[int, ...], float], n: int) -> float:
    """Pearson's test; outcomes expected fewer than 5 times are pooled into one cell, and an
    impossible outcome (top-k cut) that was drawn fails outright."""
    assert all(exact[outcome] > 0 for outcome in counts), "an impossible sequence was drawn"
    cells = [(counts.get(o, 0), n * p) for o, p in exact.items() if n * p >= 5]
    rare = [(counts.get(o, 0), n * p) for o, p in exact.items() if 0 < n * p < 5]
    if rare:
        cells.append((sum(c for c, _ in rare), sum(e for _, e in rare)))
    statistic = sum((observed - expected) ** 2 / expected for observed, expected in cells)
    return float(chi2.sf(statistic, df=len(cells) - 1))


def markov_probs(
    table: torch.Tensor, sampling: Sampling, prompt: Sequence[int], n_new: int
) -> dict[tuple[int, ...], torch.Tensor]:
    vocab = table.shape[0]
    probs_of = {}
    for length in range(n_new):
        for tail in itertools.product(range(vocab), repeat=length):
            prefix = (*prompt, *tail)
            probs_of[prefix] = sampling.probs(table[prefix[-1]])
    return probs_of


# ================================================================= sampling is exact


@pytest.mark.parametrize(
    ("lookahead", "temperature", "top_k"),
    [(1, 1.0, None), (3, 0.7, None), (2, 1.3, 3)],
)
def test_speculative_samples_follow_the_target_distribution(
    lookahead: int, temperature: float, top_k: int | None
) -> None:
    vocab, n_new, n = 4, 3, 5_000
    target_table, draft_table = markov_tables(vocab, seed=lookahead)
    sampling = Sampling(temperature, top_k, torch.Generator().manual_seed(7))
    prompt = [1]
    exact = exact_distribution(
        markov_probs(target_table, sampling, prompt, n_new), prompt, n_new, vocab
    )
    target, draft = MarkovDecoder(target_table), MarkovDecoder(draft_table)
    stats = SpeculationStats(lookahead=lookahead)
    counts = Counter(
        tuple(
            decode_speculative(
                target,
                draft,
                prompt,
                max_new_tokens=n_new,
                lookahead=lookahead,
                sampling=sampling,
                stats=stats,
            )
        )
        for _ in range(n)
    )
    assert chi_square_p_value(counts, exact, n) > P_VALUE
    assert 0 < stats.rejections < stats.rounds  # both branches of the correction ran


def test_the_check_has_power_sampling_the_draft_alone_fails() -> None:
    """Without the correction (plain sampling from the draft) the same check must fail."""
    vocab, n_new, n = 4, 3, 5_000
    target_table, draft_table = markov_tables(vocab, seed=2)
    sampling = Sampling(1.0, None, torch.Generator().manual_seed(7))
    prompt = [1]
    exact = exact_distribution(
        markov_probs(target_table, sampling, prompt, n_new), prompt, n_new, vocab
    )
    draft = MarkovDecoder(draft_table)
    counts = Counter(
        tuple(decode_plain(draft, prompt, max_new_tokens=n_new, sampling=sampling))
        for _ in range(n)
    )
    assert chi_square_p_value(counts, exact, n) < P_VALUE


def test_tiny_matlm_sampling_matches_its_full_model() -> None:
    """A real decoder pair (a narrow configuration drafting for the full one, two KV
    caches over one set of weights) samples from the full model's distribution."""
    config = ModelConfig(
        d_model=16, n_layers=2, n_heads=2, d_ff=32, granularities=(4, 8, 16, 32),
        vocab_size=3, max_seq_len=16,
    )  # fmt: skip
    torch.manual_seed(3)
    model = MatLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # sharper distributions: the draft differs visibly
    family = MatLMFamily.from_model(model)
    prompt, n_new, n, vocab = [0, 2, 1], 3, 1_500, config.vocab_size
    sampling = Sampling(1.0, None, torch.Generator().manual_seed(11))
    probs_of = {}
    with torch.no_grad():
        for length in range(n_new):
            for tail in itertools.product(range(vocab), repeat=length):
                prefix = (*prompt, *tail)
                probs_of[prefix] = sampling.probs(model(torch.tensor([prefix]))[0, -1])
    exact = exact_distribution(probs_of, prompt, n_new, vocab)
    stats = SpeculationStats(lookahead=2)
    target, draft = family.decoder(), family.decoder([4, 4])
    counts = Counter(
        tuple(
            decode_speculative(
                target,
                draft,
                prompt,
                max_new_tokens=n_new,
                lookahead=2,
                sampling=sampling,
                stats=stats,
            )
        )
        for _ in range(n)
    )
    assert chi_square_p_value(counts, exact, n) > P_VALUE
    assert stats.rejections > 0  # the draft is wrong sometimes: the correction was exercised


# ================================================================== greedy is identical


@pytest.mark.parametrize("lookahead", [1, 2, 5, 9])
def test_greedy_markov_equals_plain_greedy(lookahead: int) -> None:
    target_table, draft_table = markov_tables(6, seed=lookahead)
    sampling = Sampling()
    plain = decode_plain(MarkovDecoder(target_table), [3], max_new_tokens=40, sampling=sampling)
    stats = SpeculationStats(lookahead=lookahead)
    spec = decode_speculative(
        MarkovDecoder(target_table), MarkovDecoder(draft_table), [3], max_new_tokens=40,
        lookahead=lookahead, sampling=sampling, stats=stats,
    )  # fmt: skip
    assert spec == plain
    assert stats.accepted + stats.rounds == stats.new_tokens
    assert stats.new_tokens <= 40 - 1  # the first token comes from the prefill


def test_a_perfect_draft_is_always_accepted() -> None:
    table, _ = markov_tables(5, seed=0)
    stats = SpeculationStats(lookahead=4)
    decode_speculative(
        MarkovDecoder(table), MarkovDecoder(table), [0], max_new_tokens=21, lookahead=4,
        sampling=Sampling(), stats=stats,
    )  # fmt: skip
    assert stats.acceptance_rate == 1.0
    assert stats.rounds == 4 and stats.tokens_per_round == 5.0  # 1 + 4 rounds x 5 tokens


def test_acceptance_rate_counts_only_judged_proposals() -> None:
    stats = SpeculationStats(lookahead=4, rounds=2, drafted=8, accepted=3, rejections=2)
    assert stats.acceptance_rate == pytest.approx(3 / 5)  # not 3 / 8: 3 proposals never judged
    assert stats.as_dict()["accepted_per_round"] == 1.5


def test_eos_stops_and_pads_rows() -> None:
    table, draft_table = markov_tables(4, seed=5)
    family_free = decode_plain(MarkovDecoder(table), [0], max_new_tokens=30, sampling=Sampling())
    eos = family_free[5]
    first = family_free.index(eos)
    spec = decode_speculative(
        MarkovDecoder(table), MarkovDecoder(draft_table), [0], max_new_tokens=30, lookahead=3,
        sampling=Sampling(), eos_token_id=eos,
    )  # fmt: skip
    assert spec == family_free[: first + 1]


# ==================================================================== generate(), the API


@pytest.fixture(scope="module")
def tiny() -> MatLMFamily:
    config = ModelConfig(
        d_model=32, n_layers=3, n_heads=2, d_ff=64, granularities=(8, 16, 32, 64), max_seq_len=64
    )
    torch.manual_seed(0)
    return MatLMFamily.from_model(MatLM(config).eval())


@pytest.mark.parametrize("draft", [[8, 8, 8], [16, 64, 8], [64, 64, 64]])
@pytest.mark.parametrize("lookahead", [1, 3, 8])
def test_generate_with_draft_is_token_identical(
    tiny: MatLMFamily, draft: list[int], lookahead: int
) -> None:
    ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(lookahead))
    plain = generate(tiny.model, ids, max_new_tokens=20)
    assert plain.shape == (3, 27) and torch.equal(plain[:, :7], ids)
    spec = generate(tiny.model, ids, max_new_tokens=20, draft_widths=draft, lookahead=lookahead)
    assert torch.equal(spec, plain)


def test_generate_accepts_a_family_widths_and_names(tiny: MatLMFamily) -> None:
    ids = torch.tensor([[1, 2, 3]])
    by_module = generate(tiny.model, ids, max_new_tokens=5, widths="M,M,M")
    by_family = generate(tiny, ids, max_new_tokens=5, widths=[16, 16, 16], draft_widths="S*3")
    assert torch.equal(by_module, by_family)
    assert torch.equal(generate(tiny, ids, max_new_tokens=0), ids)


def test_generate_sampling_is_seeded(tiny: MatLMFamily) -> None:
    ids = torch.tensor([[5, 6]])

    def sample(seed: int) -> torch.Tensor:
        return generate(
            tiny, ids, max_new_tokens=12, draft_widths="S*3", temperature=1.0,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lookahead": 0, "draft_widths": "S*3"}, "lookahead must be an integer in [1, 64]"),
        ({"lookahead": 2.5, "draft_widths": "S*3"}, "lookahead must be an integer"),
        ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
        ({"temperature": -0.5}, "temperature must be finite and >= 0"),
        ({"temperature": 1.0, "top_k": 0}, "top_k must be a positive integer"),
        ({"draft_widths": "S*2"}, "layer"),
        ({"draft_widths": [8, 8, 65]}, "layer 2: width 65"),
        ({"max_new_tokens": 64}, "needs 65 positions, but the model holds at most 64"),
    ],
)
def test_generate_rejects_bad_arguments(
    tiny: MatLMFamily, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(MnmError) as info:  # ConfigError, or WidthsError for the widths
        generate(tiny, torch.tensor([[1, 2]]), **{"max_new_tokens": 4, **kwargs})  # type: ignore[arg-type]
    assert message in str(info.value)


@pytest.mark.parametrize("bad", [torch.tensor([1, 2]), torch.zeros(1, 0, dtype=torch.long)])
def test_generate_rejects_bad_input_ids(tiny: MatLMFamily, bad: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="input_ids"):
        generate(tiny, bad)


def test_generate_names_the_fix_for_an_unknown_module() -> None:
    with pytest.raises(ConfigError, match=r"mnm_search\.load_model"):
        generate(torch.nn.Linear(2, 2), torch.tensor([[1]]))


def test_the_draft_shares_the_weights(tiny: MatLMFamily) -> None:
    """No weight memory for the draft: both decoders read the model's own tensors."""
    before = {p.data_ptr() for p in tiny.model.parameters()}
    draft, target = tiny.decoder([8, 8, 8]), tiny.decoder()
    assert draft.model is target.model is tiny.model  # type: ignore[attr-defined]
    assert {p.data_ptr() for p in tiny.model.parameters()} == before


# ============================================================================ predictions


@pytest.mark.parametrize(
    ("acceptance", "lookahead", "expected"),
    [(0.0, 4, 1.0), (1.0, 4, 5.0), (0.5, 1, 1.5), (0.5, 3, 1.875), (0.8, 4, 3.3616)],
)
def test_expected_tokens(acceptance: float, lookahead: int, expected: float) -> None:
    assert expected_tokens(acceptance, lookahead) == pytest.approx(expected)


def test_predicted_speedup_and_best_lookahead() -> None:
    assert predicted_speedup(0.8, 4, 0.3) == pytest.approx(3.3616 / 2.2)
    assert predicted_speedup(1.0, 3, 1.0) == pytest.approx(1.0)  # the full model drafting
    assert predicted_speedup(0.8, 4, 0.3, verify_ratio=1.2) < predicted_speedup(0.8, 4, 0.3)
    k, speedup = best_lookahead(0.8, 0.3)
    assert speedup == max(predicted_speedup(0.8, j, 0.3) for j in range(1, 17))
    assert predicted_speedup(0.8, k, 0.3) == speedup
    # A free, perfect draft: the bound is the lookahead itself, so the largest one wins.
    assert best_lookahead(1.0, 1e-9, max_lookahead=8)[0] == 8


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: expected_tokens(1.5, 2), "acceptance rate must lie in [0, 1]"),
        (lambda: expected_tokens(math.nan, 2), "acceptance rate"),
        (lambda: predicted_speedup(0.5, 2, 0.0), "cost_ratio must be finite and positive"),
        (lambda: predicted_speedup(0.5, 2, 0.5, verify_ratio=-1), "verify_ratio"),
    ],
)
def test_predictions_reject_bad_numbers(call: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        call()  # type: ignore[operator]
    assert message in str(info.value)
