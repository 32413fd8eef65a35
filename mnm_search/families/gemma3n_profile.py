"""The latency probe of Gemma 3n: what `mnm_search.profiler.profile` times for this family.

The profiler writes the same profile JSON for every family, so `LatencyModel.from_profile`
loads it and predicts any Gemma 3n configuration. The table means something slightly
different from the native one, because a Gemma 3n configuration drops whole decoder layers
(width 0), never FFNs alone:

- `ffn_ms[layer][j]` is the time of the WHOLE decoder layer `layer` (attention, AltUp, Laurel,
  per-layer-embedding glue and FFN) when its FFN width is `measured_widths[j]`, so a dropped
  layer (width 0) correctly costs nothing;
- `fixed_ms` is everything outside the decoder layers (embeddings, per-layer-embedding
  projection, AltUp projections, final norm, LM head).

Layer times are measured in situ: whole in-place sliced models (`Gemma3nFamily.view_model`,
sharing the loaded weights) run transformers' own forward while forward hooks on every
decoder layer read the clock. That needs nothing from the decoder layer's call signature,
which differs between transformers 4.x and 5.x. Calibration on measured end-to-end latencies
and the held-out validation are the profiler's, with two skip anchors added here.

Decode targets keep a KV cache of `context_len` tokens per model; every timed call appends
`seq_len` tokens and crops them off again, so each call measures the same decode step. That
roll-back is checked against a full forward before anything is timed (`decode_check` in the
profile JSON).

The model is never copied: it must already be on the target's device and in its dtype
(`Gemma3nFamily.prepare_for_target`, or load it in the target's dtype).
"""

from __future__ import annotations

import gc
import math
import random
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import transformers
from torch import nn

from mnm_search.errors import ConfigError, ProfileError
from mnm_search.families.base import LatencyProbe, LayerTable, Widths
from mnm_search.families.gemma3n import _USE_CACHE, Gemma3nFamily
from mnm_search.profiler import TORCH_DTYPES, Clock, TimingStats, spread_configs
from mnm_search.targets import HardwareTarget

TABLE_MEANING = "whole decoder layer time at that FFN width; 0 = layer dropped"
Runner = Callable[[], object]


class Gemma3nProbe(LatencyProbe):
    """Whole decoder layers timed in situ, and in-place sliced models run end to end."""

    def __init__(self, family: Gemma3nFamily, target: HardwareTarget, device: torch.device) -> None:
        _check_target(family, target, device)
        self.family, self.target, self.device = family, target, device
        self._decode_check: dict[str, Any] | None = None

    def table_widths(self) -> list[int]:
        return table_widths(self.family)

    def measure_table(
        self, *, repeats: int, warmup: int, seed: int, on_round: Callable[[int], None]
    ) -> LayerTable:
        family, target, device = self.family, self.target, self.device
        if target.phase == "decode":
            self._decode_check = _check_decode(family, target, device)
        # One model per table width (all layers kept), every layer timed by hooks.
        widths = self.table_widths()
        uniform = [capped_widths(family, w) for w in widths]
        layer_stats, total_stats, outside_stats = _time_layers(
            family,
            target,
            device,
            uniform,
            repeats=repeats,
            warmup=warmup,
            seed=seed,
            on_round=on_round,
        )
        # The full model is the widest table model: its time outside the layers is fixed.
        return LayerTable(
            widths=widths,
            per_layer=_table_stats(family, widths, layer_stats),
            fixed={"outside_layers": outside_stats[-1], "full_forward": total_stats[-1]},
            fixed_ms=outside_stats[-1].median_ms,
            meaning=TABLE_MEANING,
            extra={
                "above_stored_width": "repeats the layer's time at its stored width "
                "(such widths are never queried)"
            },
        )

    def runner(self, widths: Sequence[int]) -> Runner:
        view = _view(self.family, widths, self.device)
        return _runner(view, self.family, self.target, self.device)

    def anchors(self, *, allow_skip: bool) -> list[Widths]:
        """The uniform models anchor both ends; the skip anchors the cost of a dropped layer."""
        uniform = [capped_widths(self.family, w) for w in self.table_widths()]
        return uniform + (skip_anchors(self.family) if allow_skip else [])

    def sample(
        self,
        n: int,
        rng: random.Random,
        *,
        allow_skip: bool,
        exclude: Sequence[Sequence[int]] = (),
    ) -> list[Widths]:
        return sample_gemma3n_configs(self.family, n, rng, allow_skip=allow_skip, exclude=exclude)

    def checkpoint_info(self) -> dict[str, Any]:
        family = self.family
        return {
            "d_ff": max(family.stored_widths),
            "step": family.step,
            "stored_widths": family.stored_widths,
            "kv_producer_layers": family.kv_producer_layers,
            "skippable_layers": family.skippable_layers,
        }

    def timing_info(self) -> dict[str, Any]:
        return {
            "table_clock": "perf_counter in forward hooks on every decoder layer"
            + (" (synchronized)" if self.device.type == "cuda" else ""),
            "transformers": transformers.__version__,
        }

    def extra_blocks(self) -> dict[str, Any]:
        return {"decode_check": self._decode_check}


# ------------------------------------------------------------------------ configurations


def table_widths(family: Gemma3nFamily) -> list[int]:
    """Every multiple of the family's step up to the widest stored FFN: the table's widths."""
    return list(range(family.step, max(family.stored_widths) + 1, family.step))


def capped_widths(family: Gemma3nFamily, width: int) -> list[int]:
    """Every layer at `width`, or at its stored width where that is smaller."""
    return [min(width, stored) for stored in family.stored_widths]


def skip_anchors(family: Gemma3nFamily) -> list[list[int]]:
    """The narrowest and the widest uniform model with every other skippable layer dropped.

    Randomly sampled configurations drop few layers; without these two the fit can hardly
    tell a layer's width-independent cost (attention, AltUp, Laurel, PLE: most of a narrow
    layer's time) from the constant, and prices dropping a layer at little more than its FFN.
    """
    dropped = set(family.skippable_layers[::2])
    widths = table_widths(family)
    anchors = []
    for width in dict.fromkeys((widths[0], widths[-1])):
        config = [0 if i in dropped else w for i, w in enumerate(capped_widths(family, width))]
        if any(config):
            anchors.append(config)
    return anchors


def sample_gemma3n_configs(
    family: Gemma3nFamily,
    n: int,
    rng: random.Random,
    *,
    allow_skip: bool = True,
    exclude: Sequence[Sequence[int]] = (),
) -> list[list[int]]:
    """Up to `n` distinct valid configurations spread from small to large.

    `profiler.spread_configs` over the step multiples, capped at each layer's stored width;
    with `allow_skip`, skippable layers (never KV producers) may be dropped.
    """
    return spread_configs(
        table_widths(family),
        family.stored_widths,
        n,
        rng,
        skippable=family.skippable_layers if allow_skip else (),
        exclude=exclude,
    )


# ---------------------------------------------------------------------------- the target


def _check_target(family: Gemma3nFamily, target: HardwareTarget, device: torch.device) -> None:
    """Check that the loaded model can run the target as is (it is never copied)."""
    if not family.has_weights:
        raise ConfigError(
            "this Gemma 3n checkpoint was loaded without weights (weights=False); load it with "
            "weights to profile it"
        )
    limit = int(family.config.max_position_embeddings)
    if target.total_len > limit:
        raise ConfigError(
            f"target {target.name!r} needs {target.total_len} positions (context_len "
            f"{target.context_len} + seq_len {target.seq_len}), but this Gemma 3n checkpoint "
            f"holds at most max_position_embeddings={limit}; lower seq_len/context_len"
        )
    weights = family.model.model.embed_tokens.weight
    if weights.device != device:
        raise ConfigError(
            f"target {target.name!r} runs on device {target.device!r}, but the Gemma 3n model "
            f"is on {weights.device}; move it first (family.prepare_for_target(target), in "
            f"place) or use a target for {weights.device.type}: profiling never copies the "
            f"model"
        )
    wanted = TORCH_DTYPES[target.dtype]
    if family.dtype != wanted:
        loaded = str(family.dtype).removeprefix("torch.")
        raise ConfigError(
            f"target {target.name!r} asks for dtype {target.dtype!r}, but the Gemma 3n model "
            f"is loaded as {loaded}; load it with Gemma3nFamily.load(path, "
            f"dtype={target.dtype!r}) or family.prepare_for_target(target) (in place), or use "
            f"a target with dtype: {loaded} (profiling never copies the model to convert it)"
        )


def _token_ids(
    family: Gemma3nFamily, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    # Ids inside the per-layer-embedding table too, as text tokens are (E4B's table is shorter
    # than its vocabulary).
    vocab = min(int(family.config.vocab_size), int(family.config.vocab_size_per_layer_input))
    generator = torch.Generator().manual_seed(length)
    return torch.randint(vocab, (batch, length), generator=generator).to(device)


def _view(family: Gemma3nFamily, widths: Sequence[int], device: torch.device) -> nn.Module:
    view = family.view_model(widths)
    # The weights already are on `device`; a view that drops layers creates a small index
    # buffer on the CPU, which must follow them.
    for module in view.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)
    return view


def _returned_cache(output: Any) -> tuple[str, Any]:
    """(keyword, cache) of a forward's output: `cache` in transformers 5.x,
    `past_key_values` in 4.x; the same keyword passes the cache back in."""
    for name in ("cache", "past_key_values"):
        cache = getattr(output, name, None)
        if cache is not None:
            return name, cache
    raise ConfigError(
        f"the model returned no KV cache with use_cache=True (transformers "
        f"{transformers.__version__}), so decode cannot be profiled; use a prefill target"
    )


def _runner(
    view: nn.Module, family: Gemma3nFamily, target: HardwareTarget, device: torch.device
) -> Runner:
    """A no-argument callable running one forward of `view` at the target's phase.

    Decode: the KV cache is filled with `context_len` tokens once; every call appends
    `seq_len` token(s) and crops them off again, so each call measures the same step.
    """
    ids = _token_ids(family, target.batch, target.total_len, device)
    if target.phase == "prefill":
        return lambda: view(input_ids=ids, use_cache=_USE_CACHE)
    context, new = ids[:, : target.context_len], ids[:, target.context_len :]
    name, cache = _returned_cache(view(input_ids=context, use_cache=True))
    # Sliding-window layers keep only the window; recording the past lets `crop` restore
    # the window as it was before the step (transformers 5.x; older caches keep everything).
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()

    def step() -> torch.Tensor:
        logits = view(input_ids=new, use_cache=True, **{name: cache}).logits
        cache.crop(-target.seq_len)  # a negative count removes that many tokens
        return logits

    return step


def _check_decode(
    family: Gemma3nFamily, target: HardwareTarget, device: torch.device
) -> dict[str, Any]:
    """Check that the decode step rolls back: two steps equal each other and, in float32,
    a full forward's logits at the same positions. Returns the evidence for the JSON."""
    view = _view(family, family.full_widths(), device)
    ids = _token_ids(family, target.batch, target.total_len, device)
    reference = view(input_ids=ids, use_cache=_USE_CACHE).logits[:, target.context_len :]
    try:
        step = _runner(view, family, target, device)
        first, second = step(), step()
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"decode profiling needs a KV cache that can be rolled back after each step, which "
            f"failed with transformers {transformers.__version__} ({exc}); use a target with "
            f"phase: prefill"
        ) from exc
    scale = max(1.0, reference.abs().max().item())
    repeat_diff = (second - first).abs().max().item()
    full_diff = (first.float() - reference.float()).abs().max().item()
    float32 = family.dtype == torch.float32
    # Half precision reorders enough arithmetic between a one-token step and a full forward
    # that only the repeat check is meaningful there.
    tolerance = 1e-3 * scale if float32 else 1e-2 * scale
    if repeat_diff > tolerance or (float32 and full_diff > tolerance):
        raise ConfigError(
            f"decode profiling: the KV cache of transformers {transformers.__version__} does not "
            f"roll back cleanly (step-to-step logit difference {repeat_diff:.3g}, vs a full "
            f"forward {full_diff:.3g}, tolerance {tolerance:.3g}); use a target with phase: "
            f"prefill"
        )
    return {
        "rollback": "crop the new tokens off the KV cache after every step",
        "max_abs_logit_diff_vs_full_forward": full_diff,
        "max_abs_logit_diff_between_steps": repeat_diff,
        "compared_with_full_forward": float32,
    }


# -------------------------------------------------------------------------------- timing


class _LayerClock:
    """Forward hooks reading the clock around every decoder layer of one model, while active."""

    def __init__(self, layers: nn.ModuleList, clock: Clock) -> None:
        self.clock = clock
        self.active = False
        self.started = [0.0] * len(layers)
        self.ms = [math.nan] * len(layers)
        self.handles = []
        for index, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(partial(self._pre, index)))
            self.handles.append(layer.register_forward_hook(partial(self._post, index)))

    def _pre(self, index: int, module: nn.Module, args: Any) -> None:
        if self.active:
            self.clock.synchronize()  # on GPU: the layer's own kernels only
            self.started[index] = time.perf_counter()

    def _post(self, index: int, module: nn.Module, args: Any, output: Any) -> None:
        if self.active:
            self.clock.synchronize()
            self.ms[index] = (time.perf_counter() - self.started[index]) * 1e3

    def timed(self, fn: Runner) -> tuple[float, list[float]]:
        """(total ms, ms of every layer) of one call of `fn`."""
        self.ms = [math.nan] * len(self.ms)
        self.active = True
        try:
            self.clock.synchronize()
            started = time.perf_counter()
            fn()
            self.clock.synchronize()
            total = (time.perf_counter() - started) * 1e3
        finally:
            self.active = False
        missed = [i for i, ms in enumerate(self.ms) if math.isnan(ms)]
        if missed:
            raise ProfileError(
                f"decoder layer(s) {missed} never ran through their module call, so they "
                f"cannot be timed (transformers {transformers.__version__})"
            )
        return total, list(self.ms)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _time_layers(
    family: Gemma3nFamily,
    target: HardwareTarget,
    device: torch.device,
    configs: Sequence[Sequence[int]],
    *,
    repeats: int,
    warmup: int,
    seed: int,
    on_round: Callable[[int], None],
) -> tuple[list[list[TimingStats]], list[TimingStats], list[TimingStats]]:
    """Per config (all layers kept): every layer's time, the total and the rest outside them.

    Timed like `profiler.time_interleaved`: warm-up first, rounds in a shuffled order, an
    untimed call (hooks off) before each timed one, gc off, medians. The time outside the
    layers is taken per call (total minus its layers), so each sample's noise cancels.
    """
    clock = Clock(device)
    rng = random.Random(seed)
    runners, hooks = [], []
    try:
        for widths in configs:
            view = _view(family, widths, device)
            runners.append(_runner(view, family, target, device))
            hooks.append(_LayerClock(view.model.layers, clock))
        n_layers = family.n_layers
        layer_samples = [[[] for _ in range(n_layers)] for _ in configs]
        totals: list[list[float]] = [[] for _ in configs]
        outside: list[list[float]] = [[] for _ in configs]
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection inside a timed call is noise, as in timeit
        try:
            for fn in runners:
                for _ in range(warmup):
                    fn()
            for round_index in range(repeats):
                order = list(range(len(configs)))
                rng.shuffle(order)
                for i in order:
                    runners[i]()  # untimed: the timed call then finds its weights in cache
                    total, layers = hooks[i].timed(runners[i])
                    for layer, ms in enumerate(layers):
                        layer_samples[i][layer].append(ms)
                    totals[i].append(total)
                    outside[i].append(total - sum(layers))
                on_round(round_index + 1)
        finally:
            if gc_was_enabled:
                gc.enable()
    finally:
        for hook in hooks:
            hook.remove()
    return (
        [[TimingStats.from_samples(s) for s in row] for row in layer_samples],
        [TimingStats.from_samples(s) for s in totals],
        [TimingStats.from_samples(s) for s in outside],
    )


def _table_stats(
    family: Gemma3nFamily, widths: Sequence[int], layer_stats: Sequence[Sequence[TimingStats]]
) -> list[list[TimingStats]]:
    """[layer][width] stats; widths above a layer's stored width repeat its stored one."""
    table = []
    for layer, stored in enumerate(family.stored_widths):
        at_stored = layer_stats[widths.index(stored)][layer]
        table.append(
            [layer_stats[j][layer] if w <= stored else at_stored for j, w in enumerate(widths)]
        )
    return table
