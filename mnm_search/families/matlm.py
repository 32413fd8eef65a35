"""The native MatFormer LM (`mnm_search.model.MatLM`) as a `Family`.

The model, its checkpoint files and its training live in `model.py`, `checkpoint.py` and
`train.py`; this module is what the commands see of them: the search space, exact costs, the
forward cut at layer boundaries (prefix caching), the latency probe, decoding and export.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mnm_search.checkpoint import Checkpoint, load_checkpoint
from mnm_search.config import (
    ModelConfig,
    format_widths,
    param_count,
    parse_widths,
    validate_widths,
)
from mnm_search.data import EvalSet, load_eval_set
from mnm_search.errors import ConfigError, ProfileError
from mnm_search.families.base import (
    Decoder,
    Family,
    LatencyProbe,
    LayerSteps,
    LayerTable,
    Widths,
)
from mnm_search.memory import MemoryEstimate, memory_bytes
from mnm_search.model import KVCache, MatLM
from mnm_search.profiler import TORCH_DTYPES, select_device, spread_configs, time_interleaved
from mnm_search.slicing import slice_model
from mnm_search.space import SearchSpace
from mnm_search.targets import HardwareTarget


class MatLMFamily(Family):
    """A loaded native checkpoint (universal, or an exported dense submodel)."""

    name = "matlm"
    summary = "native MatFormer LM (config.json `format: mnm-matlm`, from `mnm train`)"
    export_formats = ("safetensors", "onnx")

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.model: MatLM = checkpoint.model
        self.config: ModelConfig = checkpoint.config
        self.path = checkpoint.path
        self.fingerprint = checkpoint.fingerprint

    # -- loading ----------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: Path | None,
        *,
        weights: bool = True,
        dtype: str | None = None,
        step: int | None = None,
    ) -> MatLMFamily:
        if step is not None:
            raise ConfigError(
                f"--step (step={step}) does not apply to native checkpoints: their widths are "
                f"their trained granularities, plus --interpolate (see mnm info)"
            )
        if dtype not in (None, "float32", "auto"):
            raise ConfigError(
                f"native checkpoints load in float32 (dtype={dtype!r}); the hardware target's "
                f"dtype is applied when profiling and exporting"
            )
        # Native checkpoints are small: `weights=False` still reads them (fingerprint needs it).
        return cls(load_checkpoint(path))

    @classmethod
    def from_model(cls, model: MatLM, *, path: Path | None = None) -> MatLMFamily:
        """An in-memory model as a family (tests, training), fingerprinted like a file."""
        from mnm_search.checkpoint import fingerprint

        return cls(
            Checkpoint(model=model, config=model.config, fingerprint=fingerprint(model), path=path)
        )

    @classmethod
    def from_module(cls, module: nn.Module) -> MatLMFamily:
        if not isinstance(module, MatLM):
            raise ConfigError(f"expected a MatLM, got a {type(module).__name__}")
        return cls.from_model(module)

    # -- facts ------------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @property
    def has_weights(self) -> bool:
        return True

    @property
    def is_universal(self) -> bool:
        return self.config.is_universal

    @property
    def max_positions(self) -> int:
        return self.config.max_seq_len

    @property
    def eval_seq_len(self) -> int:
        return self.config.max_seq_len

    def describe(self) -> dict[str, Any]:
        config = self.config
        return {
            "family": self.name,
            "path": str(self.path) if self.path else None,
            "fingerprint": self.fingerprint,
            "universal": config.is_universal,
            "config": config.to_dict(),
            "metadata": self.checkpoint.metadata,
            "params_full": param_count(config),
            "uniform_params": {
                name: param_count(config, config.uniform_widths(g))
                for name, g in zip(config.granularity_names, config.granularities)
            }
            if config.is_universal
            else {},
        }

    # -- widths and the search space ----------------------------------------------------

    def full_widths(self) -> Widths:
        return list(self.config.physical_widths)

    def parse_widths(self, spec: str | Sequence[int | str]) -> Widths:
        return parse_widths(spec, self.config)

    def format_widths(self, widths: Sequence[int]) -> str:
        return format_widths(widths, self.config)

    def validate_widths(self, widths: Sequence[int]) -> Widths:
        return validate_widths(widths, self.config)

    def search_space(
        self,
        *,
        allow_skip: bool = False,
        interpolate: int = 0,
        min_widths: Sequence[int] | None = None,
        max_widths: Sequence[int] | None = None,
    ) -> SearchSpace:
        return SearchSpace.from_config(
            self.config,
            allow_skip=allow_skip,
            interpolate=interpolate,
            min_widths=min_widths,
            max_widths=max_widths,
        )

    def uniform_configs(self) -> dict[str, Widths]:
        config = self.config
        return {
            name: config.uniform_widths(g)
            for name, g in zip(config.granularity_names, config.granularities)
        }

    # -- costs ------------------------------------------------------------------------

    def param_count(self, widths: Sequence[int] | None = None) -> int:
        return param_count(self.config, widths)

    def memory_bytes(self, widths: Sequence[int], target: HardwareTarget) -> MemoryEstimate:
        return memory_bytes(self.config, widths, target)

    # -- quality ----------------------------------------------------------------------

    def load_eval_set(self, data: str | Path | None, *, max_tokens: int | None) -> EvalSet:
        return load_eval_set(data, seq_len=self.eval_seq_len, max_tokens=max_tokens)

    def layer_steps(self) -> LayerSteps:
        return MatLMSteps(self.model)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, widths: Sequence[int] | None = None) -> torch.Tensor:
        return self.model(input_ids, widths).float()

    # -- latency, decoding, export ------------------------------------------------------

    def latency_probe(self, target: HardwareTarget, device: torch.device) -> LatencyProbe:
        return MatLMProbe(self.model, target, device)

    def prepare_for_target(self, target: HardwareTarget) -> MatLMFamily:
        """A copy on the target's device and dtype (this one stays float32 for evaluation);
        the fingerprint is the checkpoint's, so its profile still matches."""
        from dataclasses import replace

        model = _on_target(self.model, target, select_device(target.device))
        return self if model is self.model else MatLMFamily(replace(self.checkpoint, model=model))

    def decoder(self, widths: Sequence[int] | None = None) -> Decoder:
        return MatLMDecoder(self.model, widths)

    def module(self) -> nn.Module:
        return self.model

    def sliced_module(self, widths: Sequence[int]) -> nn.Module:
        return slice_model(self.model, widths)

    def write_export(
        self, directory: Path, widths: Sequence[int], *, fmt: str, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        return write_native_export(self, directory, widths, fmt=fmt, metadata=metadata)


class MatLMSteps(LayerSteps):
    """MatLM cut at layer boundaries; the state is the residual stream [B, T, D].

    Sibling widths of one layer share a single widest FFN pass: the down projection is a sum
    over hidden neurons, so every narrower nested width is a partial sum of it.
    """

    cheap_siblings = True

    def __init__(self, model: MatLM) -> None:
        if not model.config.is_universal:
            raise ConfigError("prefix caching needs a universal model (every layer at d_ff)")
        self.model = model
        self.n_layers = model.config.n_layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.model.wte(input_ids) + self.model.wpe(positions)  # [B, T, D]

    def layer(self, index: int, state: torch.Tensor, widths: Sequence[int]) -> dict[int, Any]:
        block = self.model.blocks[index]
        h = state + block.attn(block.attn_norm(state), layer=index)
        outputs: dict[int, Any] = {}
        positive = sorted(w for w in set(widths) if w > 0)
        if 0 in widths:
            outputs[0] = h
        if not positive:
            return outputs
        assert block.ffn is not None and block.ffn_norm is not None
        up, down = block.ffn.up.weight, block.ffn.down.weight
        hidden = F.gelu(F.linear(block.ffn_norm(h), up[: positive[-1]]))  # [B, T, widest]
        running: torch.Tensor | None = None
        start = 0
        for width in positive:
            chunk = F.linear(hidden[..., start:width], down[:, start:width])  # [B, T, D]
            running = chunk if running is None else running + chunk
            outputs[width] = h + running
            start = width
        return outputs

    def hidden(self, state: torch.Tensor) -> torch.Tensor:
        return self.model.norm(state)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()


class MatLMDecoder(Decoder):
    """Greedy decoding of one configuration with MatLM's pre-allocated KV cache."""

    def __init__(self, model: MatLM, widths: Sequence[int] | None) -> None:
        self.model = model
        self.widths = validate_widths(widths, model.config) if widths is not None else None
        self._cache: KVCache | None = None

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        self._cache = KVCache.empty(
            self.model.config, batch=input_ids.shape[0], device=param.device, dtype=param.dtype
        )
        return self.step(input_ids)

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._cache is None:
            raise ConfigError("call prefill(prompt) before step()")
        ids = input_ids.to(self.model.wte.weight.device)
        return self.model(ids, self.widths, cache=self._cache).float()

    def rollback(self, length: int) -> None:
        if self._cache is None or not 0 <= length <= self._cache.length:
            raise ConfigError(f"cannot roll the cache back to {length} positions")
        self._cache.length = length

    @property
    def length(self) -> int:
        return 0 if self._cache is None else self._cache.length


# ------------------------------------------------------------------------------ export
# What `MatLMFamily.write_export` writes: the physically sliced model as a native checkpoint
# (config.json + model.safetensors), reloaded and compared with the universal model, and with
# `fmt="onnx"` also model.onnx, checked through onnxruntime. `mnm_search.export` does the rest.

LOGITS_TOLERANCE = 1e-5  # exported vs universal, fp32: the same arithmetic, up to op order
ONNX_TOLERANCE = 1e-4  # onnxruntime fuses and reorders ops; differences stay ~1e-7 in practice
ONNX_FILE = "model.onnx"


def write_native_export(
    family: MatLMFamily,
    directory: Path,
    widths: Sequence[int],
    *,
    fmt: str,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """Write and verify the sliced configuration in `directory`; the facts for the report."""
    import json

    from mnm_search import __version__
    from mnm_search._files import json_text, user_path
    from mnm_search.checkpoint import CONFIG_FILE, WEIGHTS_FILE, write_checkpoint_files
    from mnm_search.errors import CheckpointError, ExportError

    if fmt not in family.export_formats:
        raise ExportError(f"a native checkpoint exports as safetensors or onnx, not {fmt!r}")
    universal, config = family.model, family.config
    widths = validate_widths(list(widths), config)
    compact = format_widths(widths, config)
    sliced = slice_model(universal, widths)
    try:
        write_checkpoint_files(directory, sliced, metadata=metadata)
    except CheckpointError as exc:  # e.g. disk full; the message names the file
        raise ExportError(str(exc)) from exc
    try:
        exported = load_checkpoint(directory).model
    except CheckpointError as exc:  # written a moment ago: the disk or a library failed
        raise ExportError(
            f"the export does not read back ({user_path(str(exc))}); nothing was written"
        ) from exc
    diff = _logits_difference(universal, widths, exported)
    if not diff <= LOGITS_TOLERANCE:
        raise ExportError(
            f"exported {compact} differs from the universal model by {diff:.3g} "
            f"(> {LOGITS_TOLERANCE:g}); nothing was written"
        )
    params = sum(p.numel() for p in exported.parameters())
    expected_params = param_count(config, widths)
    if params != expected_params:
        raise ExportError(
            f"exported {compact} holds {params:,} parameters, expected {expected_params:,}; "
            f"nothing was written"
        )
    files = [CONFIG_FILE, WEIGHTS_FILE]
    onnx_diff = None
    if fmt == "onnx":
        write_onnx(exported, directory / ONNX_FILE)
        onnx_diff = verify_onnx(directory / ONNX_FILE, exported)
        files.append(ONNX_FILE)
    verification = {
        "logits_max_abs_diff": diff,
        "logits_tolerance": LOGITS_TOLERANCE,
        "params_expected": expected_params,
        "onnx_max_abs_diff": onnx_diff,
    }
    path = directory / CONFIG_FILE
    written = json.loads(path.read_text(encoding="utf-8"))
    written["verification"] = verification
    path.write_text(json_text(written) + "\n", encoding="utf-8")
    rows = []
    if onnx_diff is not None:
        rows.append(
            [
                "ONNX",
                f"`{ONNX_FILE}` checked with onnxruntime: max abs diff {onnx_diff:.2e}",
            ]
        )
    return {
        "verified_max_abs_diff": diff,
        "onnx_max_abs_diff": onnx_diff,
        "verification": verification,
        "files": files,
        "metadata_file": CONFIG_FILE,
        "card": {
            "title": f"MatLM Mix'n'Match submodel {compact}",
            "about": (
                f"Physically sliced from the universal MatFormer checkpoint "
                f"`{family.fingerprint}` ({config.n_layers} layers, d_model {config.d_model}, "
                f"d_ff {config.d_ff}) by `mnm export` {__version__}."
            ),
            "rows": rows,
            "verified": (
                f"logits max abs diff {diff:.2e} vs the universal model at these widths "
                f"(tolerance {LOGITS_TOLERANCE:g}); exact parameter count"
            ),
            "usage": _native_usage(onnx=onnx_diff is not None),
        },
    }


def _native_usage(*, onnx: bool) -> str:
    lines = [
        "```python",
        "import torch",
        "from mnm_search import load_model",
        "",
        'model = load_model("path/to/this/directory")  # dense: no widths needed',
        "logits = model(torch.tensor([list(b'Hello')]))  # [batch, seq, 256], byte tokens",
        "```",
    ]
    if onnx:
        lines += [
            "",
            "```python",
            "import numpy as np, onnxruntime as ort",
            "",
            f'session = ort.InferenceSession("{ONNX_FILE}")',
            'ids = np.frombuffer(b"Hello", dtype=np.uint8).astype(np.int64)[None]',
            '(logits,) = session.run(["logits"], {"input_ids": ids})',
            "```",
        ]
    return "\n".join(lines)


@torch.inference_mode()
def _logits_difference(universal: MatLM, widths: list[int], exported: MatLM) -> float:
    config = universal.config
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, min(64, config.max_seq_len)), generator=generator)
    return float((exported(ids) - universal(ids, widths)).abs().max())


def write_onnx(model: MatLM, path: Path) -> None:
    """`input_ids` int64 [batch, seq] -> `logits` float32 [batch, seq, vocab], dynamic axes."""
    from mnm_search.families import _onnx

    _onnx.write_onnx(model, path, max_len=model.config.max_seq_len)


def verify_onnx(path: Path, model: MatLM) -> float:
    """Max abs difference between onnxruntime and torch logits on two input shapes."""
    from mnm_search.families import _onnx

    config = model.config
    return _onnx.verify_onnx(
        path,
        model,
        vocab_size=config.vocab_size,
        max_len=config.max_seq_len,
        tolerance=ONNX_TOLERANCE,
    )


# ------------------------------------------------------------------------------ latency
# What `mnm_search.profiler` times for a native checkpoint: the fixed costs (embedding,
# attention of every layer, head) and every layer's FFN at every table width in isolation, and
# whole configurations as physically sliced models (what export ships).

TABLE_MEANING = "FFN time at that width, isolated"


class MatLMProbe(LatencyProbe):
    """The latency probe of a universal native model on one target.

    The model may be on any device and in any dtype: every timed model is a sliced copy on
    the target's (native models are small).
    """

    def __init__(self, model: MatLM, target: HardwareTarget, device: torch.device) -> None:
        config = model.config
        if not config.is_universal:
            raise ProfileError(
                "profile the universal checkpoint, not an exported submodel: the profile must "
                "cover every width the search can choose"
            )
        if target.total_len > config.max_seq_len:
            raise ConfigError(
                f"target {target.name!r} needs {target.total_len} positions (context_len "
                f"{target.context_len} + seq_len {target.seq_len}), but the checkpoint holds at "
                f"most max_seq_len={config.max_seq_len}"
            )
        self.model, self.config, self.target, self.device = model, config, target, device
        self._widths = sorted(config.granularities)
        self._table_repeats: int | None = None

    def measure_extra_widths(self, widths: Sequence[int]) -> None:
        """Also measure these FFN widths in the table (others are interpolated)."""
        for width in widths:
            if not 0 < width <= self.config.d_ff:
                raise ConfigError(f"extra width {width} is outside (0, {self.config.d_ff}]")
        self._widths = sorted(set(self._widths) | {int(w) for w in widths})

    def table_widths(self) -> list[int]:
        return list(self._widths)

    def measure_table(
        self, *, repeats: int, warmup: int, seed: int, on_round: Callable[[int], None]
    ) -> LayerTable:
        widths = self.table_widths()
        fixed_fns, ffn_fns = self._component_runners(widths)
        flat = list(fixed_fns.values()) + [fn for row in ffn_fns for fn in row]
        # Isolated ops are cheap: twice the repeats steady the table every prediction uses
        # (progress still counts `repeats` rounds, one per two timed).
        self._table_repeats = 2 * repeats
        stats = time_interleaved(
            flat,
            device=self.device,
            repeats=self._table_repeats,
            warmup=warmup,
            seed=seed,
            on_round=lambda done: on_round(done // 2) if done % 2 == 0 else None,
        )
        fixed = dict(zip(fixed_fns, stats[: len(fixed_fns)]))
        ffn_stats = stats[len(fixed_fns) :]
        per_layer = [
            ffn_stats[layer * len(widths) : (layer + 1) * len(widths)]
            for layer in range(self.config.n_layers)
        ]
        return LayerTable(
            widths=widths,
            per_layer=per_layer,
            fixed=fixed,
            fixed_ms=sum(s.median_ms for s in fixed.values()),
            meaning=TABLE_MEANING,
            extra={
                "trained_granularities": list(self.config.granularities),
                "extra_measured_widths": sorted(set(widths) - set(self.config.granularities)),
            },
        )

    def runner(self, widths: Sequence[int]) -> Callable[[], object]:
        sliced = _on_target(slice_model(self.model, list(widths)), self.target, self.device)
        return make_runner(sliced, self.target, self.device)

    def anchors(self, *, allow_skip: bool) -> list[Widths]:
        return [self.config.uniform_widths(g) for g in self.config.granularities]

    def sample(
        self,
        n: int,
        rng: random.Random,
        *,
        allow_skip: bool,
        exclude: Sequence[Sequence[int]] = (),
    ) -> list[Widths]:
        return sample_configs(
            self.config,
            n,
            rng,
            widths=self._widths,
            allow_skip=allow_skip,
            exclude=exclude,
        )

    def checkpoint_info(self) -> dict[str, Any]:
        config = self.config
        return {
            "d_model": config.d_model,
            "d_ff": config.d_ff,
            "granularities": list(config.granularities),
        }

    def timing_info(self) -> dict[str, Any]:
        return {} if self._table_repeats is None else {"table_repeats": self._table_repeats}

    def extra_blocks(self) -> dict[str, Any]:
        config, target = self.config, self.target
        return {
            "memory_uniform_bytes": {
                name: memory_bytes(config, config.uniform_widths(g), target).to_dict()
                for name, g in zip(config.granularity_names, config.granularities)
            }
        }

    def _component_runners(
        self, widths: Sequence[int]
    ) -> tuple[dict[str, Callable[[], object]], list[list[Callable[[], object]]]]:
        """Isolated callables for the fixed costs and for every layer's FFN at every width."""
        model, config, target, device = self.model, self.config, self.target, self.device
        dtype = TORCH_DTYPES[target.dtype]
        batch, seq, context = target.batch, target.seq_len, target.context_len
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(batch, seq, config.d_model, generator=generator).to(device, dtype)
        ids = token_ids(config, batch, seq, device)
        positions = torch.arange(context, context + seq, device=device)
        full = _on_target(slice_model(model, [config.d_ff] * config.n_layers), target, device)
        cache = None
        if target.phase == "decode":
            cache = KVCache.empty(config, batch=batch, device=device, dtype=dtype)
            with torch.inference_mode():
                full(token_ids(config, batch, context, device), cache=cache)

        def attention(block: Any, layer: int) -> Callable[[], object]:
            # The cache length stays at `context`: every call writes the same new position.
            return lambda: x + block.attn(block.attn_norm(x), cache=cache, layer=layer)

        fixed: dict[str, Callable[[], object]] = {
            "embedding": lambda: full.wte(ids) + full.wpe(positions),
            "head": lambda: full.lm_head(full.norm(x)),
        }
        for layer, block in enumerate(full.blocks):
            fixed[f"attention.{layer}"] = attention(block, layer)

        def ffn(block: Any, width: int) -> Callable[[], object]:
            return lambda: x + block.ffn(block.ffn_norm(x), width)

        per_layer: list[list[Callable[[], object]]] = [[] for _ in range(config.n_layers)]
        for width in widths:
            sliced = _on_target(slice_model(model, [width] * config.n_layers), target, device)
            for layer, block in enumerate(sliced.blocks):
                per_layer[layer].append(ffn(block, width))
        return fixed, per_layer


def _on_target(model: MatLM, target: HardwareTarget, device: torch.device) -> MatLM:
    """The model on the target's device and dtype (a copy if anything must change)."""
    dtype = TORCH_DTYPES[target.dtype]
    param = next(model.parameters())
    if param.device != device or param.dtype != dtype:
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    return model.eval()


def token_ids(config: ModelConfig, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Fixed random token ids [batch, length] (the same for the same length)."""
    generator = torch.Generator().manual_seed(length)
    return torch.randint(config.vocab_size, (batch, length), generator=generator).to(device)


def make_runner(
    model: MatLM,
    target: HardwareTarget,
    device: torch.device,
    widths: Sequence[int] | None = None,
) -> Callable[[], object]:
    """A no-argument callable running one forward of `model` at the target's phase.

    Decode: the KV cache is filled with `context_len` tokens once; every call then appends
    `seq_len` token(s) at the same position (resetting the cache length), so each call
    measures the same decode step.
    """
    config = model.config
    ids = token_ids(config, target.batch, target.seq_len, device)
    widths = list(widths) if widths is not None else None
    if target.phase == "prefill":
        return lambda: model(ids, widths)
    cache = KVCache.empty(
        config, batch=target.batch, device=device, dtype=TORCH_DTYPES[target.dtype]
    )
    with torch.inference_mode():
        model(token_ids(config, target.batch, target.context_len, device), widths, cache=cache)

    def step() -> torch.Tensor:
        cache.length = target.context_len
        return model(ids, widths, cache=cache)

    return step


def sample_configs(
    config: ModelConfig,
    n: int,
    rng: random.Random,
    *,
    widths: Sequence[int] | None = None,
    allow_skip: bool = True,
    exclude: Sequence[Sequence[int]] = (),
) -> list[list[int]]:
    """`n` distinct configurations spread from small to large (`profiler.spread_configs`);
    with `allow_skip`, any layer's FFN may be skipped."""
    return spread_configs(
        widths or config.granularities,
        [config.d_ff] * config.n_layers,
        n,
        rng,
        skippable=range(config.n_layers) if allow_skip else (),
        exclude=exclude,
    )
