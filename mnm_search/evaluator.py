"""Quality of a Mix'n'Match configuration: mean next-token cross-entropy on fixed eval data.

`evaluate_loss` is the plain forward (the reference). `CachedEvaluator` gives the same numbers
(within fp32 summation-order noise, tested to 1e-6) much faster when many configurations are
evaluated, with two exact tricks:

- prefix reuse: the hidden states after layer `i` depend only on the widths of layers `0..i`,
  so they are kept in a bounded LRU cache keyed by that widths prefix;
- nested partial sums (families whose `LayerSteps.cheap_siblings` says so, e.g. MatLM): for
  one layer input, the widest FFN needed is run once; since the down projection is a sum over
  hidden neurons, every narrower nested width is a partial sum of the per-chunk
  contributions, so all sibling widths of a layer come almost for free. Where siblings cost a
  full layer each (Gemma 3n's activation sparsity breaks the partial sums), only the width
  asked for is computed.

Optionally it also reports label-free agreement with the full model: KL(full || config) and
top-1 agreement (the paper's "consistency").
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mnm_search.data import EvalSet
from mnm_search.errors import ConfigError

if TYPE_CHECKING:
    from mnm_search.families.base import Family


@torch.inference_mode()
def perplexity(loss: float) -> float:
    """exp(LOSS), or inf where that overflows a float (a loss above ~709 nats/token)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def evaluate_loss(
    model: Callable[..., torch.Tensor],
    eval_set: EvalSet,
    widths: Sequence[int] | None = None,
    *,
    batch_size: int = 16,
) -> float:
    """Mean cross-entropy in nats/token of `model(inputs, widths)` over every eval window."""
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


def eval_subset(eval_set: EvalSet, max_tokens: int) -> EvalSet:
    """The first windows of `eval_set` holding at most `max_tokens` targets (at least one)."""
    seq_len = eval_set.inputs.shape[1]
    n = max(1, min(eval_set.inputs.shape[0], max_tokens // seq_len))
    return EvalSet(inputs=eval_set.inputs[:n], targets=eval_set.targets[:n])


@dataclass(frozen=True)
class Quality:
    """Quality of one configuration. `kl`/`agreement` are set when the evaluator computes them."""

    loss: float
    kl: float | None = None
    agreement: float | None = None


@dataclass
class CacheStats:
    evaluations: int = 0
    prefix_hits: int = 0  # layers skipped thanks to a cached prefix
    layer_runs: int = 0  # attention + widest-FFN passes actually computed
    evictions: int = 0


_States = list[Any]  # one family state per eval batch
_HEAD_CHUNK_BYTES = 64 * 2**20  # float logits computed at once


def state_bytes(state: Any) -> int:
    """Bytes held by the tensors of a family's between-layer state (each tensor once)."""
    seen: set[int] = set()
    total = 0
    stack = [state]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if id(item) not in seen:
                seen.add(id(item))
                total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


class CachedEvaluator:
    """Evaluate many configurations of one universal model on one eval set, reusing work.

    Works for every family through its `LayerSteps` (the forward cut at layer boundaries;
    the state between layers is the family's own).
    `layer_widths[i]` lists the widths of layer `i` worth computing together (the search
    space's choices); when a layer is run for one of them, all of them are produced at once.
    `siblings="always"` does so at every layer (best for exhaustive, lexicographic sweeps);
    `"auto"` only at layers whose every prefix fits in half the cache (best for samplers,
    whose configurations share short prefixes only).
    `cache_mb` bounds the memory held by cached states (least recently used first; a
    hit also refreshes the shorter prefixes on its path); the embeddings and the full
    model's outputs for the agreement metrics are kept outside that budget.
    `batch_size` is eval windows per forward (default: the family's `eval_batch_size`).
    """

    def __init__(
        self,
        family: Family,
        eval_set: EvalSet,
        *,
        batch_size: int | None = None,
        cache_mb: float = 1024.0,
        layer_widths: Sequence[Sequence[int]] | None = None,
        agreement: bool = False,
        siblings: str = "always",
    ) -> None:
        if batch_size is None:
            batch_size = family.eval_batch_size
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if cache_mb < 0:
            raise ConfigError(f"cache_mb must be >= 0, got {cache_mb}")
        if siblings not in ("always", "auto"):
            raise ConfigError(f"siblings must be 'always' or 'auto', got {siblings!r}")
        if not family.is_universal:
            raise ConfigError(
                "CachedEvaluator needs a universal checkpoint (every layer at its widest)"
            )
        n_layers = family.n_layers
        if layer_widths is not None and len(layer_widths) != n_layers:
            raise ConfigError(
                f"layer_widths has {len(layer_widths)} entries, the model {n_layers} layers"
            )
        self.family = family
        self.steps = family.layer_steps()
        self.eval_set = eval_set
        self.batch_size = batch_size
        self.cache_bytes = int(cache_mb * 2**20)
        self.layer_widths = (
            [sorted(set(ws)) for ws in layer_widths]
            if layer_widths is not None
            else [sorted(set(family.search_space().choices[i])) for i in range(n_layers)]
        )
        self.agreement = agreement
        self.siblings = siblings
        self.stats = CacheStats()
        self._cache: OrderedDict[tuple[int, ...], _States] = OrderedDict()
        self._cached_bytes = 0
        self._embedded: _States | None = None
        self._sibling_layers: set[int] | None = None
        self._reference: list[torch.Tensor] | None = None
        self._head_rows: int | None = None  # tokens per head call, from the vocabulary size

    # -- public -----------------------------------------------------------------------------

    @torch.inference_mode()
    def evaluate(self, widths: Sequence[int]) -> Quality:
        """Loss (and, if enabled, KL and top-1 agreement with the full model) at `widths`."""
        widths = self.family.validate_widths(list(widths))
        self.stats.evaluations += 1
        states = self._states(tuple(widths))
        references = self._reference_hidden() if self.agreement else None
        total = kl_total = 0.0
        agree_total = 0
        for index, state in enumerate(states):
            hidden = self.steps.hidden(state).flatten(0, 1)  # [B * T, D]
            targets = self.eval_set.targets[self._batch_slice(index)].flatten()  # [B * T]
            targets = targets.to(hidden.device)
            reference = references[index] if references is not None else None
            # The head a few thousand tokens at a time: a 262k vocabulary's logits for a
            # whole batch would take gigabytes.
            if self._head_rows is None:  # one token's logits tell the vocabulary size
                vocab = self.steps.head(hidden[:1]).shape[-1]
                self._head_rows = max(1, _HEAD_CHUNK_BYTES // (4 * vocab))
            for start in range(0, hidden.shape[0], self._head_rows):
                rows = slice(start, start + self._head_rows)
                logits = self.steps.head(hidden[rows])  # [rows, vocab], float
                total += F.cross_entropy(logits, targets[rows], reduction="sum").item()
                if reference is None:
                    continue
                full = self.steps.head(reference[rows])  # the full model's logits
                kl_total += F.kl_div(
                    F.log_softmax(logits, dim=-1),
                    F.log_softmax(full, dim=-1),
                    log_target=True,
                    reduction="sum",
                ).item()
                agree_total += int((logits.argmax(dim=-1) == full.argmax(dim=-1)).sum())
        n = self.eval_set.n_tokens
        if references is None:
            return Quality(loss=total / n)
        return Quality(loss=total / n, kl=kl_total / n, agreement=agree_total / n)

    def clear(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    # -- internals --------------------------------------------------------------------------

    def _batch_slice(self, index: int) -> slice:
        start = index * self.batch_size
        return slice(start, start + self.batch_size)

    def _embeddings(self) -> _States:
        if self._embedded is None:
            inputs = self.eval_set.inputs
            self._embedded = [
                self.steps.embed(inputs[start : start + self.batch_size])
                for start in range(0, inputs.shape[0], self.batch_size)
            ]
        return self._embedded

    def _siblings_at(self, layer: int) -> bool:
        """Whether siblings of `layer` are worth computing (they can be kept for later)."""
        if not self.cache_bytes or not self.steps.cheap_siblings:
            return False
        if self._sibling_layers is None:
            one_state = state_bytes(self._embeddings())
            prefixes, chosen = 0, set()
            for index, options in enumerate(self.layer_widths):
                prefixes = (prefixes or 1) * len(options)
                if self.siblings == "always" or prefixes * one_state * 2 <= self.cache_bytes:
                    chosen.add(index)
            self._sibling_layers = chosen
        return layer in self._sibling_layers

    def _reference_hidden(self) -> list[torch.Tensor]:
        """The full model's head inputs per batch ([B * T, D]): its logits are recomputed
        chunk by chunk, so agreement costs no full-vocabulary memory."""
        if self._reference is None:
            full = tuple(self.family.full_widths())
            self._reference = [self.steps.hidden(s).flatten(0, 1) for s in self._states(full)]
        return self._reference

    def _states(self, widths: tuple[int, ...]) -> _States:
        """States after the last layer at `widths`, from the longest cached prefix."""
        depth = len(widths)
        while depth > 0 and widths[:depth] not in self._cache:
            depth -= 1
        if depth > 0:
            # Touch the shorter cached prefixes too: they are shared by even more configs.
            for shorter in range(1, depth + 1):
                if widths[:shorter] in self._cache:
                    self._cache.move_to_end(widths[:shorter])
            self.stats.prefix_hits += depth
            states = self._cache[widths[:depth]]
        else:
            states = self._embeddings()
        for layer in range(depth, len(widths)):
            siblings = self._run_layer(layer, states, widths[layer])
            for width, output in siblings.items():
                self._store((*widths[:layer], width), output)
            states = siblings[widths[layer]]
        return states

    def _run_layer(self, layer: int, states: _States, width: int) -> dict[int, _States]:
        """Outputs of `layer` for `width` and every sibling width, one family call per batch."""
        widths = sorted({width, *self.layer_widths[layer]}) if self._siblings_at(layer) else [width]
        outputs: dict[int, _States] = {w: [] for w in widths}
        self.stats.layer_runs += 1
        for state in states:
            for w, out in self.steps.layer(layer, state, widths).items():
                outputs[w].append(out)
        return outputs

    def _store(self, key: tuple[int, ...], value: _States) -> None:
        size = state_bytes(value)
        if key in self._cache or size > self.cache_bytes:
            return
        self._cache[key] = value
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= state_bytes(evicted)
            self.stats.evictions += 1
