"""Dense Llama-architecture models (Llama, SmolLM, Mistral, Qwen2) as a Mix'n'Match family.

These models share the gated FFN `down(silu(gate(x)) * up(x))`: a prefix of its hidden neurons
is a smaller FFN. Trained densely, those prefixes are arbitrary; `mnm matformerize` reorders
each layer's neurons by importance on calibration text (Minitron/Flextron style), which leaves
the full-width function unchanged and makes every prefix the best neurons to keep. The
checkpoint then says `"mnm": {"nested": true, ...}` in its config.json; a dense one still
loads, and `mnm search` warns that its prefixes are not ordered.

A configuration is one FFN width per layer, a multiple of `step` (default 1/8 of the FFN)
up to the stored width; 0 drops that layer's FFN (and its norm), never its attention: every
layer's attention keeps its own KV cache, so dropping whole layers would change the cache the
exported model needs (left to a later version).

The forward pass is this module's own (`LlamaLM`, nanoGPT-sized), equal to transformers'
`LlamaForCausalLM` on the same weights (the tests check it), because transformers cannot hold
per-layer FFN sizes. Its parameter names are transformers', so a checkpoint's safetensors load
as they are, and an export with one width for every layer is a plain `LlamaForCausalLM`
directory. Sources: a local transformers directory (config.json + safetensors) or a GGUF
file (dequantized to float32 by `llama_gguf.read_gguf`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mnm_search.config import (
    MAX_LAYERS,
    expand_widths_spec,
    format_bytes,
    is_int,
    physical_memory_bytes,
    run_length_widths,
)
from mnm_search.data import (
    EvalSet,
    builtin_split,
    bundled_validation_text,
    make_eval_set,
    read_tokens,
    window_tokens,
)
from mnm_search.errors import CheckpointError, ConfigError, ProfileError, WidthsError
from mnm_search.families.base import (
    Decoder,
    Family,
    LatencyProbe,
    LayerSteps,
    LayerTable,
    Widths,
)
from mnm_search.families.llama_nest import CRITERIA
from mnm_search.memory import DTYPE_BYTES, MemoryEstimate
from mnm_search.profiler import TORCH_DTYPES, spread_configs, time_interleaved
from mnm_search.space import SearchSpace
from mnm_search.targets import HardwareTarget

MODEL_TYPES = ("llama", "mistral", "qwen2")
FORMAT = "mnm-llama"  # the `mnm.format` of checkpoints this family writes
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
DEFAULT_STEPS_PER_FFN = 8  # default width step: 1/8 of the FFN
DEFAULT_EVAL_SEQ_LEN = 512
_HEAD_CHUNK = 256  # tokens per LM-head call in evaluation (a 49k vocabulary is 200 KB a token)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class LlamaSpec:
    """What the forward pass needs from a checkpoint's config.json (validated)."""

    vocab_size: int
    hidden_size: int
    intermediate_sizes: tuple[int, ...]  # stored FFN width of each layer (0: no FFN)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_positions: int
    tie_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    model_type: str = "llama"
    mnm: dict[str, Any] = field(default_factory=dict)  # the config's own `mnm` block

    @property
    def n_layers(self) -> int:
        return len(self.intermediate_sizes)

    @classmethod
    def from_config(cls, data: dict[str, Any], *, where: str) -> LlamaSpec:
        """Validate a transformers config.json of a Llama-architecture model."""

        def fail(message: str) -> CheckpointError:
            return CheckpointError(f"{where}: {message}")

        model_type = data.get("model_type")
        if model_type not in MODEL_TYPES:
            raise fail(f"model_type {model_type!r:.60} is not one of {MODEL_TYPES}")

        def positive(name: str, default: Any = None) -> int:
            value = data.get(name, default)
            if not is_int(value) or value <= 0:
                raise fail(f"{name} must be a positive integer, got {value!r:.60}")
            return int(value)

        hidden = positive("hidden_size")
        n_layers = positive("num_hidden_layers")
        if n_layers > MAX_LAYERS:
            raise fail(f"num_hidden_layers {n_layers} is above {MAX_LAYERS}")
        heads = positive("num_attention_heads")
        kv_heads = positive("num_key_value_heads", heads)
        if heads % kv_heads:
            raise fail(f"num_attention_heads {heads} is not a multiple of num_key_value_heads")
        head_dim = data.get("head_dim") or hidden // heads
        if not is_int(head_dim) or head_dim <= 0 or head_dim % 2:
            raise fail(f"head_dim must be a positive even integer, got {head_dim!r}")
        mnm = data.get("mnm") if isinstance(data.get("mnm"), dict) else {}
        sizes = mnm.get("intermediate_sizes", data.get("intermediate_size"))
        if is_int(sizes):
            sizes = [sizes] * n_layers
        if (
            not isinstance(sizes, list)
            or len(sizes) != n_layers
            or not all(is_int(s) and s >= 0 for s in sizes)
            or not any(sizes)
        ):
            raise fail(
                f"intermediate_size must be a positive integer or one per layer "
                f"({n_layers}), got {sizes!r:.80}"
            )
        act = data.get("hidden_act", "silu")
        if act != "silu":
            raise fail(f"hidden_act {act!r} is not supported (Llama-architecture FFNs use silu)")
        if data.get("mlp_bias"):
            raise fail("mlp_bias is not supported (no Llama-architecture release uses it)")
        window = data.get("sliding_window")
        uses_window = data.get("use_sliding_window", model_type == "mistral")
        if uses_window and window is not None and window < data.get("max_position_embeddings", 0):
            raise fail(
                f"sliding-window attention (sliding_window={window}) is not supported; "
                f"mnm runs full causal attention"
            )
        rope = data.get("rope_parameters") or {}
        theta = data.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = data.get("rope_scaling") or (rope if rope.get("rope_type") else None)
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise fail(
                f"RoPE scaling {rope_type!r} is not supported (default, linear and llama3 are)"
            )
        if data.get("partial_rotary_factor", 1.0) != 1.0:
            raise fail("partial rotary embeddings are not supported")
        attention_bias = bool(data.get("attention_bias", False))
        return cls(
            vocab_size=positive("vocab_size"),
            hidden_size=hidden,
            intermediate_sizes=tuple(int(s) for s in sizes),
            n_heads=heads,
            n_kv_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else dict(scaling),
            max_positions=positive("max_position_embeddings", 2048),
            tie_embeddings=bool(data.get("tie_word_embeddings", False)),
            # Qwen2 has q/k/v biases and none on o; Llama's `attention_bias` covers all four.
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            model_type=str(model_type),
            mnm=dict(mnm),
        )

    def sliced(self, widths: Sequence[int]) -> LlamaSpec:
        from dataclasses import replace

        return replace(self, intermediate_sizes=tuple(int(w) for w in widths))


# ------------------------------------------------------------------------------- model


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: normalised in float32, scaled in the input dtype."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(spec: LlamaSpec) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim / 2], with linear or llama3 scaling."""
    dim = spec.head_dim
    # An explicit CPU device: models are built under `torch.device("meta")` before loading.
    steps = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu")
    inv_freq = 1.0 / spec.rope_theta ** (steps / dim)
    scaling = spec.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        return inv_freq / factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class KVCache:
    """Keys and values of every layer, grown by doubling; `length` positions are filled."""

    keys: list[torch.Tensor]  # per layer [batch, kv_heads, capacity, head_dim]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(
        cls, spec: LlamaSpec, *, batch: int, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (batch, spec.n_kv_heads, capacity, spec.head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.n_layers)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.n_layers)],
        )

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, kv_heads, t, head_dim] at `length`; every key and value so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.keys[layer].shape[2]:
            grown = max(end, 2 * self.keys[layer].shape[2])
            for store in (self.keys, self.values):
                old = store[layer]
                store[layer] = old.new_zeros((*old.shape[:2], grown, old.shape[3]))
                store[layer][:, :, :start] = old[:, :, :start]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, spec: LlamaSpec) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        d, q_dim, kv_dim = (
            spec.hidden_size,
            spec.n_heads * spec.head_dim,
            spec.n_kv_heads * spec.head_dim,
        )
        self.q_proj = nn.Linear(d, q_dim, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(q_dim, d, bias=spec.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        *,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        # [B, T, H * hd] -> [B, H, T, hd]
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = (t.to(x.dtype) for t in rope)  # [T, hd]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        start = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.write(layer, k, v)  # [B, kvH, start + T, hd]
        # Grouped-query attention: query head h reads key/value head h // (H / kvH).
        repeat = self.n_heads // self.n_kv_heads
        if repeat > 1:
            k = k.repeat_interleave(repeat, dim=1)  # [B, H, S, hd]
            v = v.repeat_interleave(repeat, dim=1)
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif seq == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            # New query i sits at absolute position start + i and sees keys 0..start + i.
            positions = torch.arange(start + seq, device=x.device)
            mask = positions[None, :] <= (start + torch.arange(seq, device=x.device))[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # [B, H, T, hd] -> [B, T, H * hd]
        y = y.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
        return self.o_proj(y)


class NestedMLP(nn.Module):
    """Gated FFN whose first `m` hidden neurons form a smaller FFN for every `m`."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def activations(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """The hidden activations [..., width] of the first `width` neurons."""
        gate = F.linear(x, self.gate_proj.weight[:width])
        return F.silu(gate) * F.linear(x, self.up_proj.weight[:width])

    def forward(self, x: torch.Tensor, width: int) -> torch.Tensor:
        if width == self.gate_proj.out_features:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return F.linear(self.activations(x, width), self.down_proj.weight[:, :width])


class DecoderLayer(nn.Module):
    def __init__(self, spec: LlamaSpec, width: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        # A layer sliced to width 0 stores no FFN at all.
        self.post_attention_layernorm = (
            RMSNorm(spec.hidden_size, spec.rms_norm_eps) if width else None
        )
        self.mlp = NestedMLP(spec.hidden_size, width) if width else None

    def attend(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        *,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        return x + self.self_attn(self.input_layernorm(x), rope, cache=cache, layer=layer)

    def feed_forward(self, h: torch.Tensor, width: int) -> torch.Tensor:
        if width == 0 or self.mlp is None or self.post_attention_layernorm is None:
            return h
        return h + self.mlp(self.post_attention_layernorm(h), width)


class _Backbone(nn.Module):
    """transformers' `model.` prefix, so parameter names match checkpoints as stored."""

    def __init__(self, spec: LlamaSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, w) for w in spec.intermediate_sizes)
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class LlamaLM(nn.Module):
    """A Llama-architecture LM; `forward(ids, widths=[...])` runs any Mix'n'Match config."""

    def __init__(self, spec: LlamaSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = _Backbone(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Not a buffer: it is derived from the config, never stored, and stays float32.
        self._inv_freq = rope_inv_freq(spec)

    def rope(self, start: int, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [seq, head_dim] (float32) of positions start..start + seq."""
        positions = torch.arange(start, start + seq, device=device, dtype=torch.float32)
        freqs = positions[:, None] * self._inv_freq.to(device)[None, :]  # [T, hd / 2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
        return angles.cos(), angles.sin()

    def forward(
        self,
        input_ids: torch.Tensor,
        widths: Sequence[int] | None = None,
        *,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab] of `input_ids` [batch, seq] (with `cache`: continuing
        the cached sequence, and extending the cache in place)."""
        stored = self.spec.intermediate_sizes
        widths = stored if widths is None else widths
        if len(widths) != len(stored) or any(w < 0 or w > s for w, s in zip(widths, stored)):
            raise WidthsError(f"widths {list(widths)} do not fit the stored widths {list(stored)}")
        start = 0 if cache is None else cache.length
        rope = self.rope(start, input_ids.shape[1], input_ids.device)
        x = self.model.embed_tokens(input_ids)  # [B, T, D]
        for index, (layer, width) in enumerate(zip(self.model.layers, widths)):
            x = layer.feed_forward(layer.attend(x, rope, cache=cache, layer=index), width)
        if cache is not None:
            cache.length = start + input_ids.shape[1]
        return self.lm_head(self.model.norm(x))

    def weights(self) -> dict[str, torch.Tensor]:
        """Parameters by their checkpoint names (a tied head is stored once, as transformers
        does)."""
        state = self.state_dict()
        if self.spec.tie_embeddings:
            state.pop("lm_head.weight", None)
        return state


def slice_llama(model: LlamaLM, widths: Sequence[int]) -> LlamaLM:
    """A physically sliced copy of `model`: layer i keeps its first `widths[i]` neurons."""
    return _sliced(model, widths, lambda tensor: tensor.detach().clone())


def shared_slice(
    model: LlamaLM, widths: Sequence[int], downs: dict[tuple[int, int], torch.Tensor]
) -> LlamaLM:
    """A sliced model sharing `model`'s memory, laid out like a physically sliced one.

    Gate/up rows `[:w]` are contiguous views already; a down projection's columns `[:, :w]`
    are not, so each (layer, width) gets one contiguous copy, kept in `downs` for every later
    configuration. The profiler times dozens of configurations this way in the memory of one
    model plus one set of down projections per width, with the arithmetic of an export.
    """

    def layout(name: str, tensor: torch.Tensor) -> torch.Tensor:
        parts = name.split(".")
        if parts[-2:] != ["down_proj", "weight"] or tensor.is_contiguous():
            return tensor
        key = (int(parts[2]), tensor.shape[1])
        if key not in downs:
            downs[key] = tensor.contiguous()
        return downs[key]

    return _sliced(model, widths, lambda tensor: tensor, layout=layout)


def _sliced(
    model: LlamaLM,
    widths: Sequence[int],
    materialize: Callable[[torch.Tensor], torch.Tensor],
    *,
    layout: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> LlamaLM:
    spec = model.spec.sliced(widths)
    with torch.device("meta"):
        sliced = LlamaLM(spec)
    state = {}
    for name, tensor in model.weights().items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and parts[3] in ("mlp", "post_attention_layernorm"):
            width = spec.intermediate_sizes[int(parts[2])]
            if width == 0:
                continue
            if parts[4] in ("gate_proj", "up_proj"):
                tensor = tensor[:width]
            elif parts[4] == "down_proj":
                tensor = tensor[:, :width]
        if layout is not None:
            tensor = layout(name, tensor)
        state[name] = materialize(tensor)
    _assign(sliced, state)
    return sliced.eval()


def _assign(model: LlamaLM, state: dict[str, torch.Tensor]) -> None:
    """Load `state` (checkpoint names) into a model built on the meta device."""
    expected = set(model.weights())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint tensors do not match the config: missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}"
        )
    shapes = {name: tuple(t.shape) for name, t in model.weights().items()}
    wrong = sorted(name for name in expected if tuple(state[name].shape) != shapes[name])
    if wrong:
        raise CheckpointError(
            f"checkpoint tensor {wrong[0]} has shape {list(state[wrong[0]].shape)}, but the "
            f"config implies {list(shapes[wrong[0]])} ({len(wrong)} tensors disagree): the "
            f"config.json does not belong to these weights"
        )
    if model.spec.tie_embeddings:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    model.load_state_dict(state, strict=True, assign=True)
    if model.spec.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.requires_grad_(False)


# ------------------------------------------------------------------------------ family


class LlamaFamily(Family):
    """A loaded Llama-architecture checkpoint (nested by `mnm matformerize`, or dense)."""

    name = "llama"
    summary = (
        "dense or matformerized Llama-architecture models (config.json `model_type` "
        + "/".join(MODEL_TYPES)
        + ", or a .gguf file of the llama architecture)"
    )
    export_formats = ("safetensors", "onnx", "gguf")
    nesting_criteria = CRITERIA

    def __init__(
        self,
        model: LlamaLM,
        *,
        step: int | None = None,
        path: Path | None = None,
        fingerprint: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: Any = None,
        gguf_tokenizer: dict[str, Any] | None = None,
    ) -> None:
        self.model = model.eval()
        self.spec = model.spec
        self.path = path
        self._config = dict(config or {})
        stored = [w for w in self.spec.intermediate_sizes if w]
        widest = max(stored)
        # A sliced export records its source's step; otherwise 1/8 of the widest FFN, or
        # the largest step that divides every stored width when that does not.
        default = self.spec.mnm.get("step") or max(1, widest // DEFAULT_STEPS_PER_FFN)
        if any(w % default for w in stored):
            default = math.gcd(*stored)
        step = default if step is None else step
        if not is_int(step) or step <= 0:
            raise ConfigError(f"step must be a positive integer, got {step!r}")
        bad = [i for i, w in enumerate(self.spec.intermediate_sizes) if w % step]
        if bad:
            raise ConfigError(
                f"step={step} does not divide the stored FFN width "
                f"{self.spec.intermediate_sizes[bad[0]]} of layer {bad[0]}; use a divisor of "
                f"{math.gcd(*stored)} (default: 1/{DEFAULT_STEPS_PER_FFN} of the FFN, {default})"
            )
        self.step = step
        self._fingerprint = fingerprint
        self._tokenizer = tokenizer
        self._gguf_tokenizer = gguf_tokenizer  # a GGUF source's tokenizer metadata, for export

    # -- loading ----------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        weights: bool = True,
        dtype: str | None = None,
        step: int | None = None,
    ) -> LlamaFamily:
        """Load a transformers directory or a GGUF file; float32 unless `dtype` says."""
        path = Path(path)
        torch_dtype = _resolve_dtype(dtype)
        if path.is_file():
            return cls._load_gguf(path, weights=weights, dtype=torch_dtype, step=step)
        from mnm_search.families import read_config_json

        data = read_config_json(path)
        spec = LlamaSpec.from_config(data, where=str(path / "config.json"))
        files = _weight_files(path)
        if weights:
            _check_fits(spec, torch_dtype, path)
        with torch.device("meta"):
            model = LlamaLM(spec)
        if weights:
            state = _read_safetensors(files, torch_dtype, path)
            if spec.tie_embeddings:
                state.pop("lm_head.weight", None)  # some tied checkpoints store the head anyway
            _assign(model, state)
        return cls(
            model,
            step=step,
            path=path,
            fingerprint=_files_fingerprint(path / "config.json", files),
            config=data,
        )

    @classmethod
    def _load_gguf(
        cls, path: Path, *, weights: bool, dtype: torch.dtype, step: int | None
    ) -> LlamaFamily:
        from mnm_search.families.llama_gguf import read_gguf

        checkpoint = read_gguf(path, weights=weights)
        spec = LlamaSpec.from_config(checkpoint.config, where=str(path))
        with torch.device("meta"):
            model = LlamaLM(spec)
        if weights:
            _assign(model, {k: v.to(dtype) for k, v in checkpoint.tensors.items()})
        return cls(
            model,
            step=step,
            path=path,
            fingerprint=_files_fingerprint(path, []),
            config=checkpoint.config,
            gguf_tokenizer=checkpoint.tokenizer_fields,
        )

    @classmethod
    def from_module(cls, module: nn.Module) -> LlamaFamily:
        if not isinstance(module, LlamaLM):
            raise ConfigError(f"expected a LlamaLM, got a {type(module).__name__}")
        return cls(module)

    # -- facts ------------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return self.spec.n_layers

    @property
    def has_weights(self) -> bool:
        return not self.model.model.embed_tokens.weight.is_meta

    @property
    def is_universal(self) -> bool:
        return True  # any prefix of any layer's FFN slices (ordered or not: `nesting_warning`)

    @property
    def is_nested(self) -> bool:
        return bool(self.spec.mnm.get("nested"))

    @property
    def nesting_warning(self) -> str | None:
        if self.is_nested:
            return None
        return (
            f"{self.path or 'this model'} is a dense model: its FFN neurons are not ordered by "
            f"importance, so narrower widths drop arbitrary neurons and lose much more quality "
            f"than they need to; run `mnm matformerize {self.path or 'SRC'} --out DIR` first "
            f"and search DIR"
        )

    @property
    def max_positions(self) -> int:
        return self.spec.max_positions

    @property
    def eval_seq_len(self) -> int:
        return min(DEFAULT_EVAL_SEQ_LEN, self.spec.max_positions)

    @property
    def eval_batch_size(self) -> int:
        return 4

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    @property
    def fingerprint(self) -> str:  # type: ignore[override]
        if self._fingerprint is None:
            digest = hashlib.sha256(repr(self.spec).encode())
            for name, tensor in sorted(self.model.weights().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().to("cpu", torch.float32).numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        spec, full = self.spec, self.full_widths()
        return {
            "family": self.name,
            "path": str(self.path) if self.path else None,
            "fingerprint": self.fingerprint,
            "model_type": spec.model_type,
            "nested": self.is_nested,
            "nesting": {k: v for k, v in spec.mnm.items() if k != "intermediate_sizes"},
            "n_layers": self.n_layers,
            "hidden_size": spec.hidden_size,
            "heads": f"{spec.n_heads} query / {spec.n_kv_heads} key-value, dim {spec.head_dim}",
            "vocab_size": spec.vocab_size,
            "stored_widths": list(spec.intermediate_sizes),
            "step": self.step,
            "tied_embeddings": spec.tie_embeddings,
            "params": self.param_count(full),
            "uniform_params": {
                name: self.param_count(w) for name, w in self.uniform_configs().items()
            },
            "dtype": str(self.dtype).removeprefix("torch."),
            "tokenizer": "yes" if self._has_tokenizer() else "none found",
        }

    # -- widths and the search space ----------------------------------------------------

    def full_widths(self) -> Widths:
        return list(self.spec.intermediate_sizes)

    def allowed_widths(self, layer: int) -> list[int]:
        """0 (no FFN), then every multiple of the step up to the stored width."""
        return [0, *range(self.step, self.spec.intermediate_sizes[layer] + 1, self.step)]

    def format_widths(self, widths: Sequence[int]) -> str:
        return run_length_widths(widths)

    def parse_widths(self, spec: str | Sequence[int | str]) -> Widths:
        """`"1536*10,768*20"`, percentages of each layer's stored width (`"75%"`, `"50%*30"`)
        or a list -> one validated width per layer."""
        items = expand_widths_spec(spec, max_entries=self.n_layers)
        if len(items) == 1 and self.n_layers > 1:
            items = items * self.n_layers  # one entry: every layer
        if len(items) != self.n_layers:
            raise WidthsError(
                f"widths {spec!r:.200} give {len(items)} entries, but the checkpoint has "
                f"{self.n_layers} layers; write one width per layer or one for all (a multiple "
                f"of {self.step} or a percentage, 0 drops the FFN), e.g. "
                f"{self.spec.intermediate_sizes[0]}*{self.n_layers}"
            )
        widths = []
        for layer, item in enumerate(items):
            try:
                if item.endswith("%"):
                    widths.append(self._percent_width(layer, item))
                else:
                    widths.append(int(item))
            except ValueError:
                raise WidthsError(
                    f"layer {layer}: width {item!r} is not an integer or a percentage; widths "
                    f"are FFN widths in multiples of {self.step} (0 drops the FFN)"
                ) from None
        return self.validate_widths(widths)

    def _percent_width(self, layer: int, item: str) -> int:
        """`"75%"` of the layer's stored width, rounded to the nearest multiple of the step
        (0 % drops the FFN; any other share keeps at least one step)."""
        share = float(item[:-1]) / 100
        stored = self.spec.intermediate_sizes[layer]
        if not 0 <= share <= 1:
            raise WidthsError(f"layer {layer}: {item} is outside 0-100 %")
        steps = round(stored * share / self.step)
        return self.step * (max(steps, 1) if share > 0 and stored else steps)

    def validate_widths(self, widths: Sequence[int]) -> Widths:
        widths = list(widths)
        if len(widths) != self.n_layers:
            raise WidthsError(
                f"got {len(widths)} widths, but the checkpoint has {self.n_layers} layers; "
                f"write one FFN width per layer (0 drops that layer's FFN)"
            )
        for layer, width in enumerate(widths):
            stored = self.spec.intermediate_sizes[layer]
            if not is_int(width):
                raise WidthsError(f"layer {layer}: width must be an integer, got {width!r}")
            if not 0 <= width <= stored:
                raise WidthsError(
                    f"layer {layer}: width {width} is outside [0, {stored}] (0 drops the FFN; "
                    f"{stored} is the widest this checkpoint stores)"
                )
            if width % self.step:
                low = width // self.step * self.step
                hint = f"{low} or {low + self.step}" if low else f"{self.step}"
                raise WidthsError(
                    f"layer {layer}: width {width} is not a multiple of the step {self.step}; "
                    f"use {hint} (or load with --step)"
                )
        return widths

    def uniform_configs(self) -> dict[str, Widths]:
        """Every layer at the same share of the FFN, by percentage (`"75%"`)."""
        widest = max(self.spec.intermediate_sizes)
        configs = {}
        for multiple in range(self.step, widest + 1, self.step):
            widths = [min(multiple, s) if s else 0 for s in self.spec.intermediate_sizes]
            configs[f"{100 * multiple / widest:g}%"] = widths
        return configs

    def search_space(
        self,
        *,
        allow_skip: bool = False,
        interpolate: int = 0,
        min_widths: Sequence[int] | None = None,
        max_widths: Sequence[int] | None = None,
    ) -> SearchSpace:
        if interpolate:
            raise ConfigError(
                f"--interpolate ({interpolate}) does not apply to Llama-architecture models: "
                f"every multiple of the step ({self.step}) is a width; use a smaller --step"
            )
        for name, values in {"min_widths": min_widths, "max_widths": max_widths}.items():
            if values is not None and len(values) != self.n_layers:
                raise WidthsError(
                    f"{name} has {len(values)} entries, but the checkpoint has "
                    f"{self.n_layers} layers"
                )
        choices = []
        for layer in range(self.n_layers):
            low = min_widths[layer] if min_widths is not None else 0
            high = max_widths[layer] if max_widths is not None else self.full_widths()[layer]
            if low > high:
                raise WidthsError(f"layer {layer}: lower bound {low} is above upper bound {high}")
            options = [
                w for w in self.allowed_widths(layer) if low <= w <= high and (w or allow_skip)
            ]
            if not options:
                raise WidthsError(f"layer {layer}: no width in [{low}, {high}]")
            choices.append(tuple(options))
        widest = max(self.spec.intermediate_sizes)
        return SearchSpace(
            choices=tuple(choices), granularities=tuple(range(self.step, widest + 1, self.step))
        )

    # -- costs ------------------------------------------------------------------------

    def param_count(self, widths: Sequence[int] | None = None) -> int:
        """Exact: a tied head is counted once; a dropped FFN takes its norm with it."""
        spec = self.spec
        widths = self.full_widths() if widths is None else self.validate_widths(widths)
        d, hd = spec.hidden_size, spec.head_dim
        q, kv = spec.n_heads * hd, spec.n_kv_heads * hd
        attention = d * q + 2 * d * kv + q * d
        attention += (q + 2 * kv) * spec.qkv_bias + d * spec.o_bias
        embeddings = spec.vocab_size * d * (1 if spec.tie_embeddings else 2)
        layers = sum(attention + d + ((3 * d * w + d) if w else 0) for w in widths)
        return embeddings + layers + d

    def memory_bytes(self, widths: Sequence[int], target: HardwareTarget) -> MemoryEstimate:
        """Weights at the target's dtype, the KV cache of every layer for the whole context,
        and the largest activation alive beside the residual stream (attention scores, FFN
        gate/up/product, or the logits)."""
        widths = self.validate_widths(widths)
        spec, size = self.spec, DTYPE_BYTES[target.dtype]
        batch, new, context = target.batch, target.seq_len, target.total_len
        kv = 2 * batch * context * spec.n_kv_heads * spec.head_dim * self.n_layers
        attention = batch * new * (spec.n_heads + 2 * spec.n_kv_heads) * spec.head_dim
        attention += batch * spec.n_heads * new * context
        ffn = 3 * batch * new * max(widths)
        head = batch * new * spec.vocab_size
        activations = 2 * batch * new * spec.hidden_size + max(attention, ffn, head)
        return MemoryEstimate(
            weights=self.param_count(widths) * size,
            kv_cache=kv * size,
            activations=activations * size,
        )

    # -- quality ----------------------------------------------------------------------

    def _has_tokenizer(self) -> bool:
        if self._tokenizer is not None or self._gguf_tokenizer:
            return True
        return self.path is not None and self.path.is_dir() and _has_tokenizer_files(self.path)

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (local files only); CheckpointError naming the fix."""
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer(self.path, gguf=bool(self._gguf_tokenizer))
        return self._tokenizer

    def copy_tokenizer(self, directory: Path) -> list[str]:
        """Put this model's tokenizer files in `directory` (a GGUF source's tokenizer is
        saved in transformers' format); the file names written."""
        if self.path is not None and self.path.is_dir():
            copied = []
            for name in TOKENIZER_FILES:
                if (self.path / name).is_file():
                    shutil.copyfile(self.path / name, directory / name)
                    copied.append(name)
            return copied
        if not self._has_tokenizer():
            return []
        self.tokenizer.save_pretrained(str(directory))
        return sorted(p.name for p in directory.iterdir() if p.name in TOKENIZER_FILES)

    def encode(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode([int(i) for i in ids]))

    def load_eval_set(self, data: str | Path | None, *, max_tokens: int | None) -> EvalSet:
        """Windows of the user's text, or of the bundled validation text (the Python docs
        and standard library documents that `matformerize` never calibrates on)."""
        seq_len = self.eval_seq_len
        if data is None:
            tokens = self.encode(bundled_validation_text())
        else:
            needed = window_tokens(seq_len=seq_len, max_tokens=max_tokens) if max_tokens else None
            tokens = read_tokens(data, self.encode, n_tokens=needed)
        return make_eval_set(tokens, seq_len=seq_len, max_tokens=max_tokens)

    def layer_steps(self) -> LayerSteps:
        self._require_weights()
        return LlamaSteps(self.model)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, widths: Sequence[int] | None = None) -> torch.Tensor:
        self._require_weights()
        return self.model(input_ids, widths).float()

    def _require_weights(self) -> None:
        if not self.has_weights:
            raise ConfigError("this family was loaded without weights (weights=False)")

    # -- latency, decoding, export ------------------------------------------------------

    def latency_probe(self, target: HardwareTarget, device: torch.device) -> LatencyProbe:
        return LlamaProbe(self, target, device)

    def decoder(self, widths: Sequence[int] | None = None) -> Decoder:
        self._require_weights()
        return LlamaDecoder(self.model, None if widths is None else self.validate_widths(widths))

    def module(self) -> nn.Module:
        return self.model

    def sliced_module(self, widths: Sequence[int]) -> nn.Module:
        return slice_llama(self.model, self.validate_widths(widths))

    def write_export(
        self, directory: Path, widths: Sequence[int], *, fmt: str, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        from mnm_search.families.llama_export import write_llama_export

        return write_llama_export(self, directory, widths, fmt=fmt, metadata=metadata)

    # -- matformerize -----------------------------------------------------------------

    def matformerize(
        self,
        out: Path,
        *,
        data: str | Path | None = None,
        max_tokens: int | None = None,
        criterion: str | None = None,
        overwrite: bool = False,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Write a nested copy of this model to `out` (see `llama_nest.matformerize`)."""
        from mnm_search.families.llama_nest import matformerize

        return matformerize(
            self,
            out,
            data=data,
            max_tokens=max_tokens,
            criterion=criterion,
            overwrite=overwrite,
            on_progress=on_progress,
        )

    def calibration_tokens(
        self, data: str | Path | None, *, max_tokens: int
    ) -> tuple[torch.Tensor, str]:
        """Calibration tokens and where they came from: the user's text, or the training
        split of the built-in corpus (never the validation text `load_eval_set` uses)."""
        if data is None:
            train_text, _ = builtin_split()
            # The training split is megabytes; a prefix a few times the budget is plenty.
            text = train_text[: max(1, max_tokens) * 8]
            return self.encode(text)[:max_tokens], "built-in corpus, training split"
        return read_tokens(data, self.encode, n_tokens=max_tokens)[:max_tokens], str(data)


def _resolve_dtype(dtype: str | None) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)} or auto, got {dtype!r}")
    return _DTYPES[dtype]


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a transformers directory (one file, or an index's shards)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text("utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index ({exc})") from exc
        files = [path / name for name in names]
    else:
        files = [path / WEIGHTS_FILE]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        hint = (
            f"; {', '.join(pickles)} are PyTorch pickles, which mnm does not load (they can run "
            f"code): convert them to safetensors"
            if pickles
            else ""
        )
        raise CheckpointError(f"{path} has no {', '.join(missing)}{hint}")
    return files


def _read_safetensors(files: list[Path], dtype: torch.dtype, path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {file}: {exc}") from exc
        state.update({name: tensor.to(dtype) for name, tensor in tensors.items()})
    return state


def _check_fits(spec: LlamaSpec, dtype: torch.dtype, path: Path) -> None:
    d = spec.hidden_size
    estimate = spec.vocab_size * d * 2 + spec.n_layers * (
        4 * d * d + 3 * d * max(spec.intermediate_sizes)
    )
    needed = estimate * torch.finfo(dtype).bits // 8 * 2  # the file's copy and the loaded one
    total = physical_memory_bytes()
    if total is not None and needed > total:
        raise CheckpointError(
            f"{path} needs about {format_bytes(needed)} to load, but this machine has "
            f"{format_bytes(total)}; load it with --dtype bfloat16 or use a larger machine"
        )


def _files_fingerprint(config_or_file: Path, files: list[Path]) -> str:
    """Hash of the config (or GGUF file) and every weight file: sizes, heads and samples."""
    digest = hashlib.sha256()
    for file in [config_or_file, *files]:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            for k in range(16):
                handle.seek(size * k // 16)
                digest.update(handle.read(4096))
    return digest.hexdigest()[:16]


def _has_tokenizer_files(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES[:5])


def _load_tokenizer(path: Path | None, *, gguf: bool) -> Any:
    where = path or "this in-memory model"
    if path is None or not (gguf or _has_tokenizer_files(path)):
        raise CheckpointError(
            f"{where} has no tokenizer (tokenizer.json or tokenizer_config.json); copy the "
            f"tokenizer files of the model it came from into it"
        )
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise CheckpointError(
            f'{where}: reading its tokenizer needs transformers: pip install "mnm-search[hf]"'
        ) from exc
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if gguf:
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{where}: its tokenizer does not load ({exc})") from exc
    finally:
        hf_logging.set_verbosity(verbosity)


# -------------------------------------------------------------------------- layer steps


class LlamaSteps(LayerSteps):
    """LlamaLM cut at layer boundaries; the state is the residual stream [B, T, D].

    Sibling widths share one widest FFN pass: the down projection sums over hidden neurons,
    so every narrower width is a partial sum of it.
    """

    cheap_siblings = True

    def __init__(self, model: LlamaLM) -> None:
        self.model = model
        self.n_layers = model.spec.n_layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(input_ids)  # [B, T, D]

    def layer(self, index: int, state: torch.Tensor, widths: Sequence[int]) -> dict[int, Any]:
        layer = self.model.model.layers[index]
        rope = self.model.rope(0, state.shape[1], state.device)
        h = layer.attend(state, rope)
        outputs: dict[int, Any] = {0: h} if 0 in widths else {}
        positive = sorted(w for w in set(widths) if w > 0)
        if not positive:
            return outputs
        assert layer.mlp is not None and layer.post_attention_layernorm is not None
        hidden = layer.mlp.activations(layer.post_attention_layernorm(h), positive[-1])
        down = layer.mlp.down_proj.weight
        running: torch.Tensor | None = None
        start = 0
        for width in positive:
            chunk = F.linear(hidden[..., start:width], down[:, start:width])  # [B, T, D]
            running = chunk if running is None else running + chunk
            outputs[width] = h + running
            start = width
        return outputs

    def hidden(self, state: torch.Tensor) -> torch.Tensor:
        return self.model.model.norm(state)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()


class LlamaDecoder(Decoder):
    """Greedy decoding of one configuration with a growing KV cache."""

    def __init__(self, model: LlamaLM, widths: Sequence[int] | None) -> None:
        self.model, self.widths = model, None if widths is None else list(widths)
        self._cache: KVCache | None = None

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.model.model.embed_tokens.weight
        self._cache = KVCache.empty(
            self.model.spec,
            batch=input_ids.shape[0],
            capacity=max(64, 2 * input_ids.shape[1]),
            device=weight.device,
            dtype=weight.dtype,
        )
        return self.step(input_ids)

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._cache is None:
            raise ConfigError("call prefill(prompt) before step()")
        ids = input_ids.to(self.model.model.embed_tokens.weight.device)
        return self.model(ids, self.widths, cache=self._cache).float()

    def rollback(self, length: int) -> None:
        if self._cache is None or not 0 <= length <= self._cache.length:
            raise ConfigError(f"cannot roll the cache back to {length} positions")
        self._cache.length = length

    @property
    def length(self) -> int:
        return 0 if self._cache is None else self._cache.length


# ------------------------------------------------------------------------------ latency

TABLE_MEANING = "FFN time at that width, isolated"


class LlamaProbe(LatencyProbe):
    """Fixed costs (embedding, every layer's attention, head) and every layer's FFN at every
    multiple of the step, timed in isolation; whole configurations as sliced models."""

    def __init__(self, family: LlamaFamily, target: HardwareTarget, device: torch.device) -> None:
        family._require_weights()
        spec = family.spec
        if len(set(spec.intermediate_sizes)) != 1:
            raise ProfileError(
                f"profile the matformerized (universal) checkpoint, not a sliced export: this "
                f"one stores FFN widths {family.format_widths(family.full_widths())}, and the "
                f"profile must cover every width the search can choose in every layer"
            )
        if target.total_len > spec.max_positions:
            raise ConfigError(
                f"target {target.name!r} needs {target.total_len} positions, but the model "
                f"holds at most max_position_embeddings={spec.max_positions}"
            )
        self.family, self.spec, self.target, self.device = family, spec, target, device
        self._dtype = TORCH_DTYPES[target.dtype]
        # The model once on the target's device and dtype (itself when it already is);
        # every timed configuration is a `shared_slice` of it.
        weight = family.model.model.embed_tokens.weight
        self._full = (
            family.model
            if weight.device == device and weight.dtype == self._dtype
            else copy.deepcopy(family.model).to(device, self._dtype)
        )
        self._downs: dict[tuple[int, int], torch.Tensor] = {}
        self._widths = sorted(
            {w for layer in range(spec.n_layers) for w in family.allowed_widths(layer) if w}
        )
        self._table_repeats: int | None = None

    def table_widths(self) -> list[int]:
        return list(self._widths)

    def measure_table(
        self, *, repeats: int, warmup: int, seed: int, on_round: Callable[[int], None]
    ) -> LayerTable:
        widths = self.table_widths()
        fixed_fns, ffn_fns = self._component_runners(widths)
        flat = list(fixed_fns.values()) + [fn for row in ffn_fns for fn in row]
        # Isolated ops are cheap: twice the repeats steady the table every prediction uses.
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
        rest = iter(stats[len(fixed_fns) :])
        per_layer = [[next(rest) for _ in row] for row in ffn_fns]
        return LayerTable(
            widths=widths,
            per_layer=per_layer,
            fixed=fixed,
            fixed_ms=sum(s.median_ms for s in fixed.values()),
            meaning=TABLE_MEANING,
            extra={"step": self.family.step},
        )

    def runner(self, widths: Sequence[int]) -> Callable[[], object]:
        return self._forward_runner(shared_slice(self._full, list(widths), self._downs))

    def anchors(self, *, allow_skip: bool) -> list[Widths]:
        uniform = self.family.uniform_configs()
        return [uniform[name] for name in uniform]

    def sample(
        self,
        n: int,
        rng: random.Random,
        *,
        allow_skip: bool,
        exclude: Sequence[Sequence[int]] = (),
    ) -> list[Widths]:
        return spread_configs(
            self._widths,
            self.family.full_widths(),
            n,
            rng,
            skippable=range(self.spec.n_layers) if allow_skip else (),
            exclude=exclude,
        )

    def checkpoint_info(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "hidden_size": spec.hidden_size,
            "d_ff": max(spec.intermediate_sizes),
            "stored_widths": list(spec.intermediate_sizes),
            "step": self.family.step,
            "nested": self.family.is_nested,
        }

    def timing_info(self) -> dict[str, Any]:
        return {} if self._table_repeats is None else {"table_repeats": self._table_repeats}

    def _inputs(self, length: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(length)
        shape = (self.target.batch, length)
        return torch.randint(self.spec.vocab_size, shape, generator=generator).to(self.device)

    def _forward_runner(self, model: LlamaLM) -> Callable[[], object]:
        """One forward at the target's phase. Decode: the cache holds `context_len` tokens;
        every call appends `seq_len` tokens at the same position."""
        target = self.target
        ids = self._inputs(target.seq_len)
        if target.phase == "prefill":
            return lambda: model(ids)
        cache = KVCache.empty(
            model.spec,
            batch=target.batch,
            capacity=target.total_len,
            device=self.device,
            dtype=self._dtype,
        )
        with torch.inference_mode():
            model(self._inputs(target.context_len), cache=cache)

        def step() -> torch.Tensor:
            cache.length = target.context_len
            return model(ids, cache=cache)

        return step

    def _component_runners(
        self, widths: Sequence[int]
    ) -> tuple[dict[str, Callable[[], object]], list[list[Callable[[], object]]]]:
        """Isolated callables for the fixed costs and every layer's FFN at every width."""
        target, spec = self.target, self.spec
        full = self._full
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(target.batch, target.seq_len, spec.hidden_size, generator=generator)
        x = x.to(self.device, self._dtype)
        ids = self._inputs(target.seq_len)
        start = target.context_len if target.phase == "decode" else 0
        rope = full.rope(start, target.seq_len, self.device)
        cache = None
        if target.phase == "decode":
            cache = KVCache.empty(
                spec,
                batch=target.batch,
                capacity=target.total_len,
                device=self.device,
                dtype=self._dtype,
            )
            with torch.inference_mode():
                full(self._inputs(target.context_len), cache=cache)

        def attention(layer: DecoderLayer, index: int) -> Callable[[], object]:
            # The cache length stays at `context_len`: every call writes the same position.
            return lambda: layer.attend(x, rope, cache=cache, layer=index)

        fixed: dict[str, Callable[[], object]] = {
            "embedding": lambda: full.model.embed_tokens(ids),
            "head": lambda: full.lm_head(full.model.norm(x)),
        }
        for index, layer in enumerate(full.model.layers):
            fixed[f"attention.{index}"] = attention(layer, index)

        def ffn(layer: DecoderLayer, width: int) -> Callable[[], object]:
            return lambda: layer.feed_forward(x, width)

        per_layer: list[list[Callable[[], object]]] = [[] for _ in range(spec.n_layers)]
        for width in widths:
            sliced = shared_slice(full, [width] * spec.n_layers, self._downs)
            for index, layer in enumerate(sliced.model.layers):
                per_layer[index].append(ffn(layer, width))
        return fixed, per_layer


__all__ = [
    "FORMAT",
    "MODEL_TYPES",
    "KVCache",
    "LlamaFamily",
    "LlamaLM",
    "LlamaSpec",
    "slice_llama",
]
