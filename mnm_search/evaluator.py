"""Quality of a Mix'n'Match configuration: mean next-token cross-entropy on fixed eval data.

`evaluate_loss` is the plain forward (the reference). `CachedEvaluator` gives the same numbers
(within fp32 summation-order noise, tested to 1e-6) much faster when many configurations are
evaluated, with two exact tricks:

- prefix reuse: the hidden states after layer `i` depend only on the widths of layers `0..i`,
  so they are kept in a bounded LRU cache keyed by that widths prefix;
- nested partial sums: for one layer input, the widest FFN needed is run once; since the down
  projection is a sum over hidden neurons, every narrower nested width is a partial sum of the
  per-chunk contributions, so all sibling widths of a layer come almost for free.

Optionally it also reports label-free agreement with the full model: KL(full || config) and
top-1 agreement (the paper's "consistency").
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mnm_search.config import validate_widths
from mnm_search.data import EvalSet
from mnm_search.errors import ConfigError
from mnm_search.model import MatLM


@torch.inference_mode()
def perplexity(loss: float) -> float:
    """exp(LOSS), or inf where that overflows a float (a loss above ~709 nats/token)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


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


_Hidden = list[torch.Tensor]  # one [B, T, D] tensor per eval batch


class CachedEvaluator:
    """Evaluate many configurations of one universal model on one eval set, reusing work.

    `layer_widths[i]` lists the widths of layer `i` worth computing together (the search
    space's choices); when a layer is run for one of them, all of them are produced at once.
    `siblings="always"` does so at every layer (best for exhaustive, lexicographic sweeps);
    `"auto"` only at layers whose every prefix fits in half the cache (best for samplers,
    whose configurations share short prefixes only).
    `cache_mb` bounds the memory held by cached hidden states (least recently used first; a
    hit also refreshes the shorter prefixes on its path); the embeddings and the full
    model's outputs for the agreement metrics are kept outside that budget.
    """

    def __init__(
        self,
        model: MatLM,
        eval_set: EvalSet,
        *,
        batch_size: int = 16,
        cache_mb: float = 1024.0,
        layer_widths: Sequence[Sequence[int]] | None = None,
        agreement: bool = False,
        siblings: str = "always",
    ) -> None:
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if cache_mb < 0:
            raise ConfigError(f"cache_mb must be >= 0, got {cache_mb}")
        if siblings not in ("always", "auto"):
            raise ConfigError(f"siblings must be 'always' or 'auto', got {siblings!r}")
        config = model.config
        if not config.is_universal:
            raise ConfigError("CachedEvaluator needs a universal model (every layer at d_ff)")
        if layer_widths is not None and len(layer_widths) != config.n_layers:
            raise ConfigError(
                f"layer_widths has {len(layer_widths)} entries, the model {config.n_layers} layers"
            )
        self.model = model
        self.eval_set = eval_set
        self.batch_size = batch_size
        self.cache_bytes = int(cache_mb * 2**20)
        self.layer_widths = (
            [sorted(set(ws)) for ws in layer_widths]
            if layer_widths is not None
            else [list(config.granularities)] * config.n_layers
        )
        self.agreement = agreement
        state_bytes = eval_set.inputs.numel() * config.d_model * 4
        prefixes, self._sibling_layers = 0, []
        for layer, widths in enumerate(self.layer_widths):
            prefixes = (prefixes or 1) * len(widths)
            if siblings == "always" or prefixes * state_bytes * 2 <= self.cache_bytes:
                self._sibling_layers.append(layer)
        self.stats = CacheStats()
        self._cache: OrderedDict[tuple[int, ...], _Hidden] = OrderedDict()
        self._cached_bytes = 0
        self._embedded: _Hidden | None = None
        self._reference: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # -- public -----------------------------------------------------------------------------

    @torch.inference_mode()
    def evaluate(self, widths: Sequence[int]) -> Quality:
        """Loss (and, if enabled, KL and top-1 agreement with the full model) at `widths`."""
        widths = validate_widths(list(widths), self.model.config)
        self.stats.evaluations += 1
        hidden = self._hidden(tuple(widths))
        total = 0.0
        kl_total = 0.0
        agree_total = 0
        reference = self._reference_outputs() if self.agreement else None
        for index, x in enumerate(hidden):
            logits = self.model.lm_head(self.model.norm(x))
            targets = self.eval_set.targets[self._batch_slice(index)]
            total += F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"
            ).item()
            if reference is not None:
                ref_log_probs, ref_top1 = reference[index]
                log_probs = F.log_softmax(logits.float(), dim=-1)
                kl_total += F.kl_div(
                    log_probs, ref_log_probs, log_target=True, reduction="sum"
                ).item()
                agree_total += int((logits.argmax(dim=-1) == ref_top1).sum())
        n = self.eval_set.n_tokens
        if reference is None:
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

    def _embeddings(self) -> _Hidden:
        if self._embedded is None:
            model = self.model
            seq = self.eval_set.inputs.shape[1]
            positions = torch.arange(seq)
            self._embedded = [
                model.wte(self.eval_set.inputs[start : start + self.batch_size])
                + model.wpe(positions)
                for start in range(0, self.eval_set.inputs.shape[0], self.batch_size)
            ]
        return self._embedded

    def _reference_outputs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._reference is None:
            full = tuple(self.model.config.physical_widths)
            self._reference = []
            for x in self._hidden(full):
                logits = self.model.lm_head(self.model.norm(x)).float()
                self._reference.append((F.log_softmax(logits, dim=-1), logits.argmax(dim=-1)))
        return self._reference

    def _hidden(self, widths: tuple[int, ...]) -> _Hidden:
        """Hidden states after the last layer at `widths`, from the longest cached prefix."""
        depth = len(widths)
        while depth > 0 and widths[:depth] not in self._cache:
            depth -= 1
        if depth > 0:
            # Touch the shorter cached prefixes too: they are shared by even more configs.
            for shorter in range(1, depth + 1):
                if widths[:shorter] in self._cache:
                    self._cache.move_to_end(widths[:shorter])
            self.stats.prefix_hits += depth
            state = self._cache[widths[:depth]]
        else:
            state = self._embeddings()
        for layer in range(depth, len(widths)):
            siblings = self._run_layer(layer, state, widths[layer])
            for width, output in siblings.items():
                self._store((*widths[:layer], width), output)
            state = siblings[widths[layer]]
        return state

    def _run_layer(self, layer: int, state: _Hidden, width: int) -> dict[int, _Hidden]:
        """Outputs of `layer` for `width` and every sibling width, sharing one widest FFN pass."""
        block = self.model.blocks[layer]
        # Siblings are only worth computing if they can be kept for later.
        keep = self.cache_bytes and layer in self._sibling_layers
        widths = sorted({width, *self.layer_widths[layer]}) if keep else [width]
        positive = [w for w in widths if w > 0]
        outputs: dict[int, _Hidden] = {w: [] for w in widths}
        self.stats.layer_runs += 1
        for x in state:
            h = x + block.attn(block.attn_norm(x), layer=layer)
            if 0 in outputs:
                outputs[0].append(h)
            if not positive:
                continue
            assert block.ffn is not None and block.ffn_norm is not None
            up, down = block.ffn.up.weight, block.ffn.down.weight
            hidden = F.gelu(F.linear(block.ffn_norm(h), up[: positive[-1]]))  # [B, T, widest]
            running: torch.Tensor | None = None
            start = 0
            for w in positive:
                chunk = F.linear(hidden[..., start:w], down[:, start:w])  # [B, T, D]
                running = chunk if running is None else running + chunk
                outputs[w].append(h + running)
                start = w
        return outputs

    def _store(self, key: tuple[int, ...], value: _Hidden) -> None:
        size = sum(t.numel() * t.element_size() for t in value)
        if key in self._cache or size > self.cache_bytes:
            return
        self._cache[key] = value
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= sum(t.numel() * t.element_size() for t in evicted)
            self.stats.evictions += 1
