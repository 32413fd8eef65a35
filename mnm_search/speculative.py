"""Self-speculative decoding: a narrower configuration of the same checkpoint drafts.

A MatFormer's Mix'n'Match configurations are views of one set of weights, so a draft model
costs no extra memory: `family.decoder(draft_widths)` runs the same tensors with narrower
FFNs and its own KV cache. Each round the draft proposes `lookahead` tokens one at a time and
the target (the full model, or any wider configuration) scores them all in one pass:

- greedy: the longest prefix of proposals equal to the target's argmax is kept, then the
  target's own next token; the output is token-identical to plain greedy decoding;
- sampling: proposal x with draft probability q(x) is kept with probability
  min(1, p(x) / q(x)); the first rejected one is replaced by a sample of norm(max(0, p - q)),
  and a round whose proposals all pass adds a sample of p. The output is distributed exactly
  as the target's (Leviathan et al. 2023, Chen et al. 2023).

Speed-up model (DESIGN.md §6): with per-token acceptance rate a and lookahead K a round
yields (1 - a^(K+1)) / (1 - a) tokens on average and costs K draft steps plus one
verification, so the speed-up over plain decoding is that divided by (K * c + v), where c is
the draft step cost and v the verification cost, both relative to one target step (v = 1 in
the paper's model; `predicted_speedup` takes a measured one).

Batch rows decode one at a time: each row accepts a different number of tokens per round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mnm_search.errors import ConfigError

if TYPE_CHECKING:
    from mnm_search.families.base import Decoder, Family

__all__ = [
    "Sampling",
    "SpeculationStats",
    "best_lookahead",
    "check_context",
    "decode_plain",
    "decode_speculative",
    "expected_tokens",
    "generate",
    "predicted_speedup",
]

MAX_LOOKAHEAD = 64


@dataclass
class SpeculationStats:
    """What happened in speculative rounds (summed over rows and calls)."""

    lookahead: int
    rounds: int = 0  # target verifications of drafted tokens
    drafted: int = 0  # tokens the draft proposed
    accepted: int = 0  # proposals the target kept
    rejections: int = 0  # rounds that ended at a rejected proposal
    new_tokens: int = 0  # tokens the rounds added (accepted + one per round)

    @property
    def acceptance_rate(self) -> float:
        """Per-token acceptance probability a: accepted / (accepted + rejected).

        Proposals after the first rejection of a round are never judged, so this (the
        maximum-likelihood estimate of a geometric acceptance) is the `a` of the expected-tokens
        formula, unlike accepted / drafted, which is biased low for long lookaheads."""
        judged = self.accepted + self.rejections
        return self.accepted / judged if judged else math.nan

    @property
    def accepted_per_round(self) -> float:
        return self.accepted / self.rounds if self.rounds else math.nan

    @property
    def tokens_per_round(self) -> float:
        """Tokens each verification yields: accepted proposals plus the target's own token."""
        return self.new_tokens / self.rounds if self.rounds else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {
            "lookahead": self.lookahead,
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "rejections": self.rejections,
            "new_tokens": self.new_tokens,
            "acceptance_rate": _finite_or_none(self.acceptance_rate),
            "accepted_per_round": _finite_or_none(self.accepted_per_round),
            "tokens_per_round": _finite_or_none(self.tokens_per_round),
        }


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (`temperature == 0`) or sampled from the
    temperature-scaled distribution, optionally cut to the `top_k` most likely tokens."""

    temperature: float = 0.0
    top_k: int | None = None
    generator: torch.Generator | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise ConfigError(f"temperature must be a number, got {self.temperature!r:.80}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k <= 0):
            raise ConfigError(f"top_k must be a positive integer or None, got {self.top_k!r:.80}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampling distribution over the vocabulary [..., V], in float64 on the CPU
        (where the generator draws, whatever device the logits come from)."""
        scaled = logits.detach().double().cpu() / self.temperature
        if self.top_k is not None and self.top_k < scaled.shape[-1]:
            cutoff = torch.topk(scaled, self.top_k, dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < cutoff, -math.inf)
        return torch.softmax(scaled, dim=-1)

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs.float(), 1, generator=self.generator))

    def pick(self, logits: torch.Tensor) -> int:
        """One token from the logits of one position [V]."""
        return int(logits.argmax()) if self.greedy else self.draw(self.probs(logits))

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))


# ---------------------------------------------------------------------------- the loops


def decode_plain(
    target: Decoder,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    sampling: Sampling,
    eos_token_id: int | None = None,
) -> list[int]:
    """Plain autoregressive decoding: one target step per new token. Returns the new tokens."""
    new: list[int] = []
    if max_new_tokens == 0:
        return new
    logits = target.prefill(_ids(prompt))[0, -1]
    while True:
        token = sampling.pick(logits)
        new.append(token)
        if len(new) == max_new_tokens or token == eos_token_id:
            return new
        logits = target.step(_ids([token]))[0, -1]


def decode_speculative(
    target: Decoder,
    draft: Decoder,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    lookahead: int,
    sampling: Sampling,
    stats: SpeculationStats | None = None,
    eos_token_id: int | None = None,
) -> list[int]:
    """Speculative decoding of one sequence; returns the new tokens.

    Invariant at the top of each round: `tokens` is the prompt plus everything accepted, the
    target's cache holds all of it but the last token, and the draft's cache a prefix of it
    that is at most that long (rolled back to what is still valid).
    """
    _check_lookahead(lookahead)
    new: list[int] = []
    if max_new_tokens == 0:
        return new
    tokens = list(prompt)
    # The first token comes from the target's prefill, as in plain decoding.
    first = sampling.pick(target.prefill(_ids(tokens))[0, -1])
    draft.prefill(_ids(tokens))
    tokens.append(first)
    new.append(first)
    while len(new) < max_new_tokens and new[-1] != eos_token_id:
        k = min(lookahead, max_new_tokens - len(new) - 1)  # the round adds up to k + 1 tokens
        if k == 0:
            token = sampling.pick(target.step(_ids(tokens[-1:]))[0, -1])
            added = [token]
        else:
            added = _round(target, draft, tokens, k, sampling, stats)
        if eos_token_id is not None and eos_token_id in added:
            added = added[: added.index(eos_token_id) + 1]
        tokens += added
        new += added
        target.rollback(len(tokens) - 1)
        draft.rollback(min(draft.length, len(tokens) - 1))
    return new


def _round(
    target: Decoder,
    draft: Decoder,
    tokens: list[int],
    k: int,
    sampling: Sampling,
    stats: SpeculationStats | None,
) -> list[int]:
    """Draft k tokens, verify them in one target pass; the tokens this round adds."""
    proposals: list[int] = []
    draft_probs: list[torch.Tensor] = []
    feed = tokens[draft.length :]  # at least the last token: the draft's cache lags by one
    for _ in range(k):
        logits = draft.step(_ids(feed))[0, -1]
        if sampling.greedy:
            token = int(logits.argmax())
        else:
            q = sampling.probs(logits)
            token = sampling.draw(q)
            draft_probs.append(q)
        proposals.append(token)
        feed = [token]
    verified = target.step(_ids([tokens[-1], *proposals]))[0]  # [k + 1, V]
    accepted = 0
    extra: int | None = None
    for i, token in enumerate(proposals):
        if sampling.greedy:
            best = int(verified[i].argmax())
            if best != token:
                extra = best
                break
        else:
            p, q = sampling.probs(verified[i]), draft_probs[i]
            if sampling.uniform() >= float(p[token] / q[token]):  # q[token] > 0: it was drawn
                residual = (p - q).clamp_min(0)
                total = float(residual.sum())
                # p == q up to rounding leaves nothing to correct towards: sample p itself.
                extra = sampling.draw(residual / total if total > 0 else p)
                break
        accepted += 1
    if extra is None:  # every proposal passed: the verification's last position is free
        extra = sampling.pick(verified[k])
    if stats is not None:
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += accepted
        stats.rejections += accepted < k
        stats.new_tokens += accepted + 1
    return [*proposals[:accepted], extra]


# ----------------------------------------------------------------------- the Python API


def generate(
    model: Any,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int = 64,
    widths: Sequence[int] | str | None = None,
    draft_widths: Sequence[int] | str | None = None,
    lookahead: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    stats: SpeculationStats | None = None,
) -> torch.Tensor:
    """Decode `max_new_tokens` after each prompt row; returns [B, T + new] (DESIGN.md §4).

    `model` is what `load_model` returned, or a loaded family. `widths` picks the target
    configuration (None: the checkpoint as stored). With `draft_widths` the target verifies
    `lookahead` tokens drafted by that configuration of the same weights: with greedy
    decoding (`temperature=0`, the default) the result is token-identical to decoding
    without a draft, and with sampling it has the same distribution. `stats` collects the
    acceptance of the speculative rounds. Rows that stop at `eos_token_id` early are padded
    with it.
    """
    family = _family(model)
    ids = _check_input_ids(input_ids)
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r:.80}")
    check_context(family, ids.shape[1], max_new_tokens)
    sampling = Sampling(temperature=temperature, top_k=top_k, generator=generator)
    target_widths = None if widths is None else family.parse_widths(widths)
    target = family.decoder(target_widths)
    draft = None
    if draft_widths is not None:
        _check_lookahead(lookahead)
        draft = family.decoder(family.parse_widths(draft_widths))
        if stats is None:
            stats = SpeculationStats(lookahead=lookahead)
        elif stats.lookahead != lookahead:
            raise ConfigError(
                f"stats were collected with lookahead {stats.lookahead}, not {lookahead}"
            )
    rows = []
    for row in ids.tolist():
        if draft is None:
            new = decode_plain(
                target, row, max_new_tokens=max_new_tokens, sampling=sampling,
                eos_token_id=eos_token_id,
            )  # fmt: skip
        else:
            new = decode_speculative(
                target, draft, row, max_new_tokens=max_new_tokens, lookahead=lookahead,
                sampling=sampling, stats=stats, eos_token_id=eos_token_id,
            )  # fmt: skip
        rows.append(row + new)
    longest = max(len(r) for r in rows)
    pad = 0 if eos_token_id is None else eos_token_id
    return torch.tensor([r + [pad] * (longest - len(r)) for r in rows], dtype=torch.long)


def check_context(family: Family, prompt_tokens: int, max_new_tokens: int) -> None:
    """ConfigError unless a prompt and its new tokens fit the model's positions (the last new
    token is never fed back, so prompt + new - 1 positions are used)."""
    limit = family.max_positions
    needed = prompt_tokens + max_new_tokens - 1
    if limit is not None and needed > limit:
        raise ConfigError(
            f"a prompt of {prompt_tokens} tokens plus max_new_tokens={max_new_tokens} needs "
            f"{needed} positions, but the model holds at most {limit} (its max_seq_len / "
            f"max_position_embeddings); shorten the prompt or generate fewer tokens"
        )


# ------------------------------------------------------------------------- predictions


def expected_tokens(acceptance: float, lookahead: int) -> float:
    """Mean tokens per verification: (1 - a^(K+1)) / (1 - a), K + 1 when a = 1."""
    _check_acceptance(acceptance)
    _check_lookahead(lookahead)
    if acceptance >= 1:
        return float(lookahead + 1)
    return (1 - acceptance ** (lookahead + 1)) / (1 - acceptance)


def predicted_speedup(
    acceptance: float, lookahead: int, cost_ratio: float, verify_ratio: float = 1.0
) -> float:
    """Speed-up over plain decoding: expected tokens / (K * c + v).

    `cost_ratio` c is a draft step's cost relative to a target step, `verify_ratio` v the cost
    of verifying K + 1 tokens in one target pass relative to one target step (1 in the
    standard model; a little more in practice)."""
    for name, value in (("cost_ratio", cost_ratio), ("verify_ratio", verify_ratio)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be finite and positive, got {value!r}")
    return expected_tokens(acceptance, lookahead) / (lookahead * cost_ratio + verify_ratio)


def best_lookahead(
    acceptance: float, cost_ratio: float, *, max_lookahead: int = 16
) -> tuple[int, float]:
    """The lookahead with the highest predicted speed-up, and that speed-up."""
    return max(
        ((k, predicted_speedup(acceptance, k, cost_ratio)) for k in range(1, max_lookahead + 1)),
        key=lambda pair: pair[1],
    )


# ------------------------------------------------------------------------------ helpers


def _family(model: Any) -> Family:
    from mnm_search.families import family_for_module

    return family_for_module(model)


def _ids(tokens: Sequence[int]) -> torch.Tensor:
    return torch.tensor([list(tokens)], dtype=torch.long)  # [1, t]; decoders move it


def _check_input_ids(input_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else None
        raise ConfigError(
            f"input_ids must be a 2-D tensor [batch, tokens], got {shape or type(input_ids)}"
        )
    if input_ids.dtype not in (torch.int32, torch.int64) or input_ids.shape[1] == 0:
        raise ConfigError(
            f"input_ids must hold at least one integer token per row, got dtype "
            f"{input_ids.dtype} and shape {tuple(input_ids.shape)}"
        )
    return input_ids.cpu()


def _check_lookahead(lookahead: int) -> None:
    if not _is_int(lookahead) or not 1 <= lookahead <= MAX_LOOKAHEAD:
        raise ConfigError(
            f"lookahead must be an integer in [1, {MAX_LOOKAHEAD}], got {lookahead!r:.80}"
        )


def _check_acceptance(acceptance: float) -> None:
    if not (math.isfinite(acceptance) and 0 <= acceptance <= 1):
        raise ConfigError(f"acceptance rate must lie in [0, 1], got {acceptance!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
