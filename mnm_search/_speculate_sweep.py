"""Measuring self-speculative decoding on a hardware target: the sweep behind `mnm speculate`.

For one checkpoint, the full model is the target and each candidate draft is a narrower
configuration of the same weights (`family.decoder(widths)`). The sweep times, at batch 1:

- plain decoding with the full model (the baseline every speed-up divides), again beside
  each draft, so that a long sweep on a busy machine does not turn drift into speed-up;
- each draft decoding alone, for its cost ratio c = draft step / full step (unless a latency
  profile predicts c instead);
- one target step over K + 1 tokens against one over a single token, for the verification
  cost v of each lookahead K;
- speculative decoding for every (draft, K) pair: tokens/s, acceptance, tokens per round.

Measured speed-ups sit next to the model's prediction, expected tokens / (K * c + v), and the
paper's (v = 1). Rows are appended to a `SweepResult` as they are measured, so a caller that
is interrupted still holds everything measured so far.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mnm_search.errors import CheckpointError, ConfigError, DataError, MnmError, WidthsError
from mnm_search.families.base import Decoder
from mnm_search.options import DEFAULT_N_PROMPTS, DEFAULT_PROMPT_TOKENS
from mnm_search.profiler import Clock, pinned_threads, select_device
from mnm_search.speculative import (
    MAX_LOOKAHEAD,
    Sampling,
    SpeculationStats,
    check_context,
    decode_plain,
    decode_speculative,
    predicted_speedup,
)

if TYPE_CHECKING:
    from mnm_search.families.base import Family
    from mnm_search.latency import LatencyModel
    from mnm_search.targets import HardwareTarget

SHIPPED_KEY = "speculative"  # config.json key that `mnm export --draft` writes
# Rounds of the verification timing: single steps are short and noisy, and cheap (one
# step each), so take many.
VERIFY_ROUNDS = 25
VERIFY_WARMUP = 2
MAX_PROMPT_FILE_BYTES = 4 * 2**20  # a prompts file is text for a few dozen prompts


class SpeculationMismatch(MnmError):
    """Greedy speculative decoding produced other tokens than plain greedy decoding."""


# ---------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Candidate:
    """A draft configuration and where it came from ("--draft", "uniform S", "trial 12")."""

    widths: tuple[int, ...]
    source: str


def shipped_draft(family: Family) -> tuple[list[int], int] | None:
    """The draft widths and lookahead stored in the checkpoint's config.json (written by
    `mnm export --draft W`), or None when it ships none."""
    if family.path is None:
        return None
    path = Path(family.path) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # loading the checkpoint already judged its config; nothing shipped here
    entry = config.get(SHIPPED_KEY) if isinstance(config, dict) else None
    if entry is None:
        return None
    widths = entry.get("draft_widths") if isinstance(entry, dict) else None
    lookahead = entry.get("lookahead") if isinstance(entry, dict) else None
    if (
        not isinstance(widths, list)
        or not all(_is_int(w) for w in widths)
        or not _is_int(lookahead)
        or not 1 <= lookahead <= MAX_LOOKAHEAD
    ):
        raise CheckpointError(
            f"{path}: {SHIPPED_KEY!r} must be {{'draft_widths': [one integer per layer], "
            f"'lookahead': 1..{MAX_LOOKAHEAD}}}, got {entry!r:.200}; export it again with "
            f"`mnm export --draft W`"
        )
    try:
        return family.validate_widths(widths), int(lookahead)
    except WidthsError as exc:
        raise CheckpointError(f"{path}: {SHIPPED_KEY!r} draft_widths: {exc}") from None


def uniform_candidates(family: Family) -> list[Candidate]:
    """The family's uniform configurations narrower than the full model."""
    full = tuple(family.full_widths())
    return [
        Candidate(tuple(widths), f"uniform {name}")
        for name, widths in family.uniform_configs().items()
        if tuple(widths) != full
    ]


def distinct_drafts(family: Family, candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates without the full model itself and without repeats (the first one's source
    is kept), ordered from the cheapest (fewest parameters) up."""
    full = tuple(family.full_widths())
    seen: dict[tuple[int, ...], Candidate] = {}
    for candidate in candidates:
        if candidate.widths != full and candidate.widths not in seen:
            seen[candidate.widths] = candidate
    return sorted(seen.values(), key=lambda c: family.param_count(list(c.widths)))


def parse_lookaheads(spec: str) -> list[int]:
    """`4` or `1,2,4,8` -> sorted distinct lookaheads, each in [1, MAX_LOOKAHEAD]."""
    values: list[int] = []
    for item in spec.split(","):
        item = item.strip()
        try:
            value = int(item)
        except ValueError:
            value = -1
        if not 1 <= value <= MAX_LOOKAHEAD:
            raise ConfigError(
                f"--lookahead takes integers from 1 to {MAX_LOOKAHEAD}, one or comma-separated "
                f"(e.g. 4 or 1,2,4,8); got {item!r:.40} in {spec!r:.80}"
            )
        values.append(value)
    return sorted(set(values))


# -------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompts:
    """Token ids of each prompt, and what they were taken from (for reports)."""

    tokens: list[list[int]]
    source: str

    @property
    def longest(self) -> int:
        return max(len(t) for t in self.tokens)


def read_prompt_file(path: Path) -> list[str]:
    """The prompts of a text file: each non-empty paragraph (blank-line separated) is one."""
    if not path.is_file():
        raise DataError(f"prompts file {path} does not exist (or is not a file)")
    size = path.stat().st_size
    if size > MAX_PROMPT_FILE_BYTES:
        raise DataError(
            f"prompts file {path} is {size:,} bytes; prompts are a few paragraphs (at most "
            f"{MAX_PROMPT_FILE_BYTES:,} bytes accepted); is it the right file?"
        )
    text = path.read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in re.split(r"\n[ \t\r\f\v]*\n", text)]
    prompts = [p for p in paragraphs if p]
    if not prompts:
        raise DataError(f"prompts file {path} holds no text (one prompt per paragraph)")
    return prompts


def load_prompts(
    family: Family,
    *,
    prompts_file: Path | None,
    n_prompts: int | None,
    prompt_tokens: int | None,
) -> Prompts:
    """The paragraphs of `prompts_file` (the first `n_prompts`, if given), encoded by the
    family, else the first `prompt_tokens` tokens of `n_prompts` (default 8) windows of the
    family's bundled eval text."""
    if prompts_file is not None:
        texts = read_prompt_file(prompts_file)[:n_prompts]
        tokens = []
        for i, text in enumerate(texts):
            ids = [int(t) for t in family.encode(text).reshape(-1).tolist()]
            if not ids:
                raise DataError(f"{prompts_file}: prompt {i + 1} encodes to no tokens")
            tokens.append(ids)
        return Prompts(tokens, str(prompts_file))
    n_prompts = n_prompts or DEFAULT_N_PROMPTS
    seq_len = family.eval_seq_len
    # By default 64 tokens, or half a short model's window, leaving room for new tokens.
    length = prompt_tokens or min(DEFAULT_PROMPT_TOKENS, max(1, seq_len // 2))
    if length > seq_len:
        raise ConfigError(
            f"--prompt-tokens {length} is longer than the evaluation windows of this model "
            f"({seq_len} tokens); use at most {seq_len}, or pass --prompts FILE"
        )
    windows = family.load_eval_set(None, max_tokens=n_prompts * seq_len).inputs
    if windows.shape[0] < n_prompts:
        raise DataError(
            f"the bundled validation text holds {windows.shape[0]} windows of {seq_len} "
            f"tokens, fewer than --n-prompts {n_prompts}; ask for fewer or pass --prompts FILE"
        )
    tokens = [row[:length].tolist() for row in windows[:n_prompts]]
    return Prompts(tokens, f"bundled validation text, {length} tokens each")


# --------------------------------------------------------------------- measurements


@dataclass
class RunTimes:
    """Wall times of repeated runs over every prompt, and the tokens each run produced."""

    seconds: list[float]
    tokens: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.median_s

    @property
    def spread_pct(self) -> float:
        """(slowest - fastest) / median: how noisy the runs were."""
        return 100.0 * (max(self.seconds) - min(self.seconds)) / self.median_s

    def merged(self, other: RunTimes) -> RunTimes:
        """Both sets of runs (of the same work) as one."""
        return RunTimes([*self.seconds, *other.seconds], self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens_per_s": self.tokens_per_s,
            "median_s": self.median_s,
            "runs_s": [round(s, 6) for s in self.seconds],
            "spread_pct": self.spread_pct,
            "tokens_per_run": self.tokens,
        }


@dataclass
class DraftCost:
    """A draft's step cost relative to the full model's, and where it came from."""

    candidate: Candidate
    cost_ratio: float
    alone: RunTimes | None  # plain decoding at the draft's widths (None: from a profile)


@dataclass
class Divergence:
    """Where greedy speculative output first differed from plain greedy output."""

    prompt: int
    token: int
    plain_token: int
    speculative_token: int
    logit_gap: float  # the full model's logit of the plain token minus the other's

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SpeculationRow:
    """One (draft, lookahead) pair measured."""

    draft: Candidate
    draft_compact: str
    lookahead: int
    cost_ratio: float
    verify_ratio: float
    stats: SpeculationStats
    plain: RunTimes
    speculative: RunTimes
    divergences: list[Divergence] = field(default_factory=list)

    @property
    def measured_speedup(self) -> float:
        return self.speculative.tokens_per_s / self.plain.tokens_per_s

    @property
    def predicted_speedup(self) -> float | None:
        """expected tokens / (K c + v), v measured."""
        return self._predicted(self.verify_ratio)

    @property
    def predicted_speedup_paper(self) -> float | None:
        """The paper's model: v = 1."""
        return self._predicted(1.0)

    def _predicted(self, verify_ratio: float) -> float | None:
        acceptance = self.stats.acceptance_rate
        if not math.isfinite(acceptance):
            return None  # no round was run (one new token): nothing to predict from
        return predicted_speedup(acceptance, self.lookahead, self.cost_ratio, verify_ratio)

    def to_dict(self) -> dict[str, Any]:
        return {
            "draft_widths": list(self.draft.widths),
            "draft": self.draft_compact,
            "source": self.draft.source,
            "lookahead": self.lookahead,
            "cost_ratio": self.cost_ratio,
            "verify_ratio": self.verify_ratio,
            "acceptance_rate": self.stats.acceptance_rate,
            "tokens_per_round": self.stats.tokens_per_round,
            "accepted_per_round": self.stats.accepted_per_round,
            "plain_tokens_per_s": self.plain.tokens_per_s,
            "speculative_tokens_per_s": self.speculative.tokens_per_s,
            "measured_speedup": self.measured_speedup,
            "predicted_speedup": self.predicted_speedup,
            "predicted_speedup_paper": self.predicted_speedup_paper,
            "speculative_runs_s": [round(s, 6) for s in self.speculative.seconds],
            "stats": self.stats.as_dict(),
            "divergences": [d.to_dict() for d in self.divergences],
        }


@dataclass
class SweepResult:
    """What the sweep measured so far (filled in place, so an interruption keeps it)."""

    plain: RunTimes | None = None  # every plain run of the sweep
    verify_ratios: dict[int, float] = field(default_factory=dict)
    step_ms: float | None = None  # one full-model step over one token, median
    drafts: list[DraftCost] = field(default_factory=list)
    rows: list[SpeculationRow] = field(default_factory=list)
    cost_source: str = "measured"

    @property
    def best(self) -> SpeculationRow | None:
        return max(self.rows, key=lambda r: r.measured_speedup, default=None)

    def best_per_draft(self) -> list[SpeculationRow]:
        """Each draft's row at its best lookahead (by measured speed-up), in draft order."""
        best: dict[tuple[int, ...], SpeculationRow] = {}
        for row in self.rows:
            kept = best.get(row.draft.widths)
            if kept is None or row.measured_speedup > kept.measured_speedup:
                best[row.draft.widths] = row
        return list(best.values())

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "plain": self.plain.to_dict() if self.plain else None,
            "step_ms": self.step_ms,
            "verify_ratios": {str(k): v for k, v in self.verify_ratios.items()},
            "cost_source": self.cost_source,
            "drafts": [
                {
                    "draft_widths": list(d.candidate.widths),
                    "source": d.candidate.source,
                    "cost_ratio": d.cost_ratio,
                    "tokens_per_s_alone": d.alone.tokens_per_s if d.alone else None,
                }
                for d in self.drafts
            ],
            "rows": [r.to_dict() for r in self.rows],
            "best": best.to_dict() if best else None,
        }


ProgressFn = Callable[[int, int, str], None]  # (done, total, what is being measured)


class SpeculationBench:
    """Times plain and speculative decoding of `prompts` with one family on one device."""

    def __init__(
        self,
        family: Family,
        prompts: Prompts,
        *,
        max_new_tokens: int,
        repeats: int,
        temperature: float,
        seed: int,
        target: HardwareTarget,
    ) -> None:
        self.family = family
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.repeats = repeats
        self.temperature = temperature
        self.seed = seed
        self.target = target
        self.device = select_device(target.device)
        Sampling(temperature=temperature)  # a bad temperature fails before any timing
        self.full = family.decoder(None)
        self.tokens_per_run = len(prompts.tokens) * max_new_tokens
        self.plain_outputs: list[list[int]] = []

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def _sampling(self, run: int) -> Sampling:
        """Greedy, or sampling from a generator seeded per run (every configuration sees the
        same random stream in its run of the same index)."""
        if self.greedy:
            return Sampling()
        # `Sampling` draws on the CPU whatever the logits' device: a CPU generator.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + run)
        return Sampling(temperature=self.temperature, generator=generator)

    def _decoder(self, widths: Sequence[int] | None) -> Decoder:
        return self.full if widths is None else self.family.decoder(list(widths))

    def check_fits(self) -> None:
        """Warm up plain decoding on the longest prompt; a prompt that does not fit the model
        with the new tokens is a clear error here, before any timing."""
        longest = max(self.prompts.tokens, key=len)
        check_context(self.family, len(longest), self.max_new_tokens)
        try:
            decode_plain(
                self._decoder(None),
                longest,
                max_new_tokens=self.max_new_tokens,
                sampling=self._sampling(0),
            )
        except (ValueError, IndexError, RuntimeError, MnmError) as exc:
            raise ConfigError(
                f"decoding a prompt of {len(longest)} tokens plus --max-new-tokens "
                f"{self.max_new_tokens} failed ({type(exc).__name__}: {exc!s:.300}); the "
                f"prompts and new tokens may not fit the model: use shorter prompts "
                f"(--prompt-tokens, --prompts) or fewer --max-new-tokens"
            ) from None

    def _run_plain(self, decoder: Decoder, run: int) -> tuple[float, list[list[int]]]:
        sampling = self._sampling(run)
        outputs = []
        started = time.perf_counter()
        for prompt in self.prompts.tokens:
            outputs.append(
                decode_plain(decoder, prompt, max_new_tokens=self.max_new_tokens, sampling=sampling)
            )
        return time.perf_counter() - started, outputs

    def plain(self, widths: Sequence[int] | None = None) -> RunTimes:
        """Plain decoding of every prompt, `repeats` times (after one warm-up prompt)."""
        decoder = self._decoder(widths)
        decode_plain(
            decoder,
            self.prompts.tokens[0],
            max_new_tokens=self.max_new_tokens,
            sampling=self._sampling(0),
        )
        seconds = []
        for run in range(self.repeats):
            elapsed, outputs = self._run_plain(decoder, run)
            seconds.append(elapsed)
            if widths is None and run == 0:
                self.plain_outputs = outputs  # the reference for the greedy identity check
        return RunTimes(seconds, self.tokens_per_run)

    def verify_ratios(self, lookaheads: Sequence[int]) -> tuple[float, dict[int, float]]:
        """One full step over 1 token in ms, and per lookahead K: one full step over K + 1
        tokens / one over 1 token, against the cache of the first prompt.

        Each round times every size once, in a shuffled order, and the ratio is the median of
        the rounds' own ratios: on a shared machine the load drifts between rounds, and a
        ratio within one round cancels it. K is capped as the decoding loop caps it: a round
        never drafts past `max_new_tokens`."""
        prompt = self.prompts.tokens[0]
        decoder = self.full
        sizes = sorted({1} | {self._verified(k) for k in lookaheads})
        feed = (prompt * (max(sizes) // len(prompt) + 1))[: max(sizes)]
        decoder.prefill(torch.tensor([prompt], dtype=torch.long))
        length = decoder.length
        inputs = {size: torch.tensor([feed[:size]], dtype=torch.long) for size in sizes}

        def step(size: int) -> None:
            decoder.step(inputs[size])
            decoder.rollback(length)

        clock = Clock(self.device)
        rng = random.Random(self.seed)
        for size in sizes * VERIFY_WARMUP:
            step(size)
        samples: dict[int, list[float]] = {size: [] for size in sizes}
        for _ in range(VERIFY_ROUNDS):
            order = list(sizes)
            rng.shuffle(order)
            for size in order:
                samples[size].append(clock.time_ms(functools.partial(step, size)))
        ratios = {
            size: statistics.median(t / one for t, one in zip(samples[size], samples[1]))
            for size in sizes
        }
        return statistics.median(samples[1]), {k: ratios[self._verified(k)] for k in lookaheads}

    def _verified(self, lookahead: int) -> int:
        """Tokens one verification of this lookahead feeds the target."""
        return min(lookahead, max(1, self.max_new_tokens - 1)) + 1

    def speculative(
        self, widths: Sequence[int], lookahead: int
    ) -> tuple[RunTimes, SpeculationStats, list[Divergence]]:
        """Speculative decoding of every prompt with this draft, `repeats` times (after a
        short warm-up); stats summed over the timed runs. Greedy output is checked against
        plain greedy output token for token."""
        target, draft = self._decoder(None), self._decoder(widths)
        warm = min(self.max_new_tokens, 2 * (lookahead + 1))
        decode_speculative(
            target,
            draft,
            self.prompts.tokens[0],
            max_new_tokens=warm,
            lookahead=lookahead,
            sampling=self._sampling(0),
        )
        stats = SpeculationStats(lookahead=lookahead)
        seconds = []
        divergences: list[Divergence] = []
        for run in range(self.repeats):
            sampling = self._sampling(run)
            outputs = []
            started = time.perf_counter()
            for prompt in self.prompts.tokens:
                outputs.append(
                    decode_speculative(
                        target,
                        draft,
                        prompt,
                        max_new_tokens=self.max_new_tokens,
                        lookahead=lookahead,
                        sampling=sampling,
                        stats=stats,
                    )
                )
            seconds.append(time.perf_counter() - started)
            if self.greedy and run == 0:
                divergences = self._check_identical(outputs, widths, lookahead)
        return RunTimes(seconds, self.tokens_per_run), stats, divergences

    def _check_identical(
        self, outputs: list[list[int]], widths: Sequence[int], lookahead: int
    ) -> list[Divergence]:
        """Greedy speculation must reproduce plain greedy decoding. A difference is accepted
        only at a near-tie of the full model's two candidate tokens: verifying K + 1 tokens in
        one pass sums in another order than single steps, which can flip an exact tie."""
        divergences = []
        for index, (plain, spec) in enumerate(zip(self.plain_outputs, outputs)):
            if plain == spec:
                continue
            at = next(i for i, (a, b) in enumerate(zip(plain, spec)) if a != b)
            prefix = self.prompts.tokens[index] + plain[:at]
            logits = self.full.prefill(torch.tensor([prefix], dtype=torch.long))[0, -1]
            gap = float(logits[plain[at]] - logits[spec[at]])
            divergence = Divergence(index, at, plain[at], spec[at], gap)
            if abs(gap) > self._tie_tolerance(logits):
                raise SpeculationMismatch(
                    f"internal error: greedy speculative decoding (draft "
                    f"{self.family.format_widths(widths)}, lookahead {lookahead}) differs from "
                    f"plain greedy decoding at prompt {index + 1}, new token {at + 1}: "
                    f"{spec[at]} instead of {plain[at]}, whose logit is higher by {gap:.3g} "
                    f"(not a rounding tie); run `mnm --debug speculate ...` and report it"
                )
            divergences.append(divergence)
        return divergences

    def _tie_tolerance(self, logits: torch.Tensor) -> float:
        # Relative rounding of the target's dtype, with a wide margin for sums over the model.
        relative = 1e-4 if self.target.dtype == "float32" else 3e-2
        return relative * max(1.0, float(logits.abs().max()))


def sweep_steps(n_drafts: int, n_lookaheads: int, *, timed_drafts: bool) -> int:
    """Measurements the sweep makes (for a progress bar)."""
    per_draft = 1 + (1 if timed_drafts else 0) + n_lookaheads
    return 1 + n_drafts * per_draft


def run_sweep(
    bench: SpeculationBench,
    candidates: Sequence[Candidate],
    lookaheads: Sequence[int],
    result: SweepResult,
    *,
    latency_model: LatencyModel | None = None,
    on_progress: ProgressFn | None = None,
) -> SweepResult:
    """Measure the verification cost, then per draft: plain decoding, the draft's cost ratio
    and every lookahead, into `result` (in place: an interruption leaves what was measured).

    Plain decoding is timed again beside each draft, and that draft's speed-ups and cost
    ratio divide by it: on a shared machine the load drifts over a long sweep, and a baseline
    timed minutes earlier would turn that drift into speed-up. With `latency_model`, each
    draft's cost ratio is its predicted latency over the full model's instead of a timing
    of the draft alone."""
    family = bench.family
    total = sweep_steps(len(candidates), len(lookaheads), timed_drafts=latency_model is None)
    done = 0

    def progress(what: str) -> None:
        if on_progress is not None:
            on_progress(done, total, what)

    with pinned_threads(bench.target.threads), torch.inference_mode():
        progress("warm-up")
        bench.check_fits()
        progress("verification cost")
        result.step_ms, result.verify_ratios = bench.verify_ratios(lookaheads)
        done += 1
        full_ms = latency_model.predict_ms(family.full_widths()) if latency_model else None
        for candidate in candidates:
            compact = family.format_widths(candidate.widths)
            progress(f"plain decoding (beside draft {compact})")
            plain = bench.plain()
            result.plain = plain if result.plain is None else result.plain.merged(plain)
            done += 1
            if latency_model is None or full_ms is None:
                progress(f"draft {compact} alone")
                alone = bench.plain(candidate.widths)
                cost = DraftCost(candidate, alone.median_s / plain.median_s, alone)
                done += 1
            else:
                ratio = latency_model.predict_ms(list(candidate.widths)) / full_ms
                cost = DraftCost(candidate, ratio, None)
            if not (math.isfinite(cost.cost_ratio) and cost.cost_ratio > 0):
                raise ConfigError(
                    f"draft {compact}: its cost ratio came out as {cost.cost_ratio!r}; "
                    f"re-measure (a broken --profile?)"
                )
            result.drafts.append(cost)
            for lookahead in lookaheads:
                progress(f"draft {compact}, K={lookahead}")
                timing, stats, divergences = bench.speculative(candidate.widths, lookahead)
                result.rows.append(
                    SpeculationRow(
                        draft=candidate,
                        draft_compact=compact,
                        lookahead=lookahead,
                        cost_ratio=cost.cost_ratio,
                        verify_ratio=result.verify_ratios[lookahead],
                        stats=stats,
                        plain=plain,
                        speculative=timing,
                        divergences=divergences,
                    )
                )
                done += 1
        progress("done")
    return result


# ---------------------------------------------------------------------------- memory


def memory_facts(
    family: Family, target: HardwareTarget, drafts: Sequence[Candidate], positions: int
) -> dict[str, Any] | None:
    """The model's weight bytes (the draft shares them: it adds none) and the KV cache of a
    draft holding `positions` tokens, the only extra memory speculation needs. None where
    the family cannot estimate memory."""
    context = dataclasses.replace(
        target, phase="decode", seq_len=1, context_len=max(1, positions - 1), batch=1
    )
    try:
        full = family.memory_bytes(family.full_widths(), context)
        caches = [family.memory_bytes(list(d.widths), context).kv_cache for d in drafts]
    except MnmError:
        return None
    return {
        "weights_bytes": full.weights,
        "extra_weight_bytes_for_draft": 0,
        "draft_kv_cache_bytes": max(caches, default=0),
        "full_kv_cache_bytes": full.kv_cache,
        "positions": positions,
        "dtype": target.dtype,
    }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
