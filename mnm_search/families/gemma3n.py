"""Gemma 3n (transformers `Gemma3nForCausalLM`) as a Mix'n'Match model family.

Gemma 3n E4B is a MatFormer: every FFN is nested (the first `m` neurons of a layer form a working
smaller FFN) and E2B is E4B with narrower FFNs and layers 20-24 dropped. A configuration here is
`widths`: one entry per layer of the loaded checkpoint, either an FFN width (a multiple of the
family's `step`, at most the stored width) or `0`, which drops the whole decoder layer (unlike
the native MatLM, where 0 drops only the FFN: Gemma 3n's sub-models skip layers, never FFNs).

Gemma 3n specifics that slicing must respect (see transformers' `modeling_gemma3n.py`):

- KV sharing: the last `num_kv_shared_layers` layers compute no keys/values; each reuses the
  KV of the last earlier layer of its attention type (the "producers"). Producers can never be
  dropped; dropping a consumer lowers `num_kv_shared_layers`.
- Per-layer embeddings (PLE): `embed_tokens_per_layer` ([vocab, n_layers * P]) and
  `per_layer_model_projection` ([n_layers * P, hidden]) hold one P-wide block per layer; the
  blocks of dropped layers are cut out. `per_layer_projection_norm` is shared by all layers.
- `activation_sparsity_pattern`, `layer_types` and `intermediate_size` are per-layer lists and
  are rebuilt for the kept layers.

The loaded model is held once. `sliced_model(widths)` is a `Gemma3nForCausalLM` for the
configuration whose weights are views of the loaded ones (no copy, except the small PLE
projection); `export_hf` streams the slice to disk in row chunks (64 MiB of extra memory) and,
while it reloads the written checkpoint to verify it, frees the loaded weights and reads them
back afterwards, so even a full-width export never holds the model twice.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import math
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import DynamicCache, Gemma3nForCausalLM, Gemma3nTextConfig
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextDecoderLayer
from transformers.utils import logging as hf_logging

from mnm_search._files import finite, json_text
from mnm_search._safetensors_writer import StreamedTensor, write_safetensors
from mnm_search.checkpoint import atomic_directory
from mnm_search.config import (
    MAX_LAYERS,
    SIZE_CAPS,
    expand_widths_spec,
    format_bytes,
    is_int,
    physical_memory_bytes,
    run_length_widths,
)
from mnm_search.data import (
    EvalSet,
    bundled_validation_text,
    make_eval_set,
    read_tokens,
    window_tokens,
)
from mnm_search.errors import CheckpointError, ConfigError, DataError, ExportError, WidthsError
from mnm_search.families import read_config_json
from mnm_search.families.base import Decoder, Family, LatencyProbe, LayerSteps
from mnm_search.memory import DTYPE_BYTES, MemoryEstimate
from mnm_search.space import SearchSpace
from mnm_search.targets import HardwareTarget

try:  # transformers >= 5
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights
try:  # transformers >= 5: a dict of KV states passed between decoder layers
    from transformers.cache_utils import KVSharingDict as _KVSharing
except ImportError:  # pragma: no cover (4.x shares KV through the cache; see _ReplaySteps)
    _KVSharing = dict  # type: ignore[assignment,misc]
try:  # huggingface_hub >= 1.0 validates configs strictly
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # pragma: no cover

    class StrictDataclassError(Exception):  # type: ignore[no-redef]
        """Placeholder: older huggingface_hub never raises it."""


INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_PLE_TABLE = "model.embed_tokens_per_layer.weight"
EXPORT_INFO_FILE = "mnm.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
_COPY_CHUNK_BYTES = 64 * 2**20  # bounds the temporary memory of loading one (huge) tensor
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_ANCHOR = "layers.0.mlp.gate_proj.weight"  # locates the text model inside any checkpoint layout
_LANGUAGE_MODEL = "model.language_model."  # text model inside multimodal checkpoints
# Evaluation windows: long enough for real context, short enough for a CPU (E4B's
# max_position_embeddings is 32768).
DEFAULT_EVAL_SEQ_LEN = 512
# Tokens per chunk of the LM head + loss: E4B's 262,144-entry vocabulary makes the float32
# logits of one 512-token window 0.5 GB; a chunk of 64 tokens is 64 MiB.
_HEAD_CHUNK = 64
_KV_ONLY = ("self_attn.k_proj.", "self_attn.v_proj.", "self_attn.k_norm.", "self_attn.v_norm.")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


@dataclass(frozen=True)
class _Plan:
    """A validated configuration: which original layers stay, at which FFN width."""

    widths: tuple[int, ...]  # one per original layer, 0 = layer dropped
    kept: tuple[int, ...]  # original indices of the kept layers, ascending
    n_layers: int  # original number of layers

    @property
    def kept_widths(self) -> list[int]:
        return [self.widths[i] for i in self.kept]

    @property
    def skips_layers(self) -> bool:
        return len(self.kept) != self.n_layers


class _KeptLayersEmbedding(nn.Module):
    """The full per-layer embedding table, returning only the kept layers' blocks.

    Lets the in-place model drop layers without copying the (very large) PLE table:
    E4B's is 262144 x 35 * 256 values, more than half of the text model's parameters.
    """

    def __init__(self, full: nn.Module, kept: Sequence[int], n_layers: int, width: int) -> None:
        super().__init__()
        self.full = full
        self.n_layers = n_layers
        self.width = width
        kept_index = torch.tensor(list(kept), dtype=torch.long, device=full.weight.device)
        self.register_buffer("kept", kept_index, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        blocks = self.full(input_ids).unflatten(-1, (self.n_layers, self.width))
        return blocks.index_select(-2, self.kept).flatten(-2)


class Gemma3nFamily(Family):
    """A loaded Gemma 3n text model and everything search and export need from it.

    Build it with `Gemma3nFamily.load(path)` for a checkpoint directory, or directly from an
    in-memory `Gemma3nForCausalLM` (tests). `step` is the FFN width granularity (default: the
    gcd of the stored widths and the hidden size, which is 2048 for E4B, matching the
    MatFormer Lab's `2_048 * k` configurations).
    """

    name = "gemma3n"
    summary = "Gemma 3n via transformers (config.json `model_type` 'gemma3n' or 'gemma3n_text')"
    export_formats = ("hf",)

    def __init__(
        self,
        *,
        model: Gemma3nForCausalLM,
        step: int | None = None,
        path: str | Path | None = None,
        fingerprint: str | None = None,
    ) -> None:
        if not isinstance(model, Gemma3nForCausalLM):
            raise ConfigError(
                f"model must be a transformers Gemma3nForCausalLM, got {type(model).__name__}"
            )
        self.model = model.eval().requires_grad_(False)
        self.config: Gemma3nTextConfig = model.config
        self.path = Path(path) if path is not None else None
        stored = [int(w) for w in self.config.intermediate_size]
        default_step = math.gcd(math.gcd(*stored), int(self.config.hidden_size))
        if step is None:
            step = default_step
        if not isinstance(step, int) or isinstance(step, bool) or step <= 0:
            raise ConfigError(f"step must be a positive integer, got {step!r}")
        bad = [i for i, w in enumerate(stored) if w % step]
        if bad:
            raise ConfigError(
                f"step={step} does not divide the stored FFN width {stored[bad[0]]} of layer "
                f"{bad[0]}; use a divisor of {math.gcd(*stored)} (default {default_step})"
            )
        self.step = step
        self._stored = stored
        self._tensors = {
            **dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False)),
        }
        self._producers, self._consumers = _kv_roles(
            list(self.config.layer_types), int(self.config.num_kv_shared_layers)
        )
        self._fingerprint = fingerprint
        # Set by `load`: the weights are exactly the checkpoint's, so they can be freed and
        # read back (see `_weights_released`).
        self._rereadable = False
        self._lost: str | None = None  # why the weights are unusable, after a failed read-back
        self._view: tuple[tuple[int, ...], Gemma3nForCausalLM] | None = None
        self._tokenizer: Any = None
        self._tokenizer_loaded = False

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def from_module(cls, module: nn.Module) -> Gemma3nFamily:
        if isinstance(module, _WidthsModule):
            return module._family[0]
        return cls(model=module)  # a Gemma3nForCausalLM (the constructor checks)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        weights: bool = True,
        dtype: str | None = None,
        step: int | None = None,
        attn_implementation: str = "sdpa",
    ) -> Gemma3nFamily:
        """Load a local Gemma 3n checkpoint (CausalLM or the text part of a multimodal one).

        Nothing is downloaded. The model is built without initialisation and every tensor is
        copied in chunks straight from the safetensors shards into it, so peak memory is the
        model plus 64 MiB. Vision and audio tensors are never read. `dtype`: `auto` (as
        stored), `float32`, `bfloat16` or `float16`. `weights=False` reads only the config
        and the shard headers (the model lives on the meta device): enough for `describe`,
        widths and parameter counts, instant even for E4B. `dtype=None` means `auto`.
        """
        if dtype is None:
            dtype = "auto"
        if attn_implementation not in ("sdpa", "eager"):
            raise ConfigError(
                f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}"
            )
        path = Path(path)
        data = read_config_json(path)
        config = _text_config(data, path)
        config._attn_implementation = attn_implementation
        shards = _shard_files(path)
        locations = _tensor_locations(shards)
        prefix = _text_prefix(locations, path)
        torch_dtype = _resolve_dtype(dtype, locations, prefix)
        if weights:
            _check_fits(config, torch_dtype, path)
        device = torch.device("cpu") if weights else torch.device("meta")
        with device, _default_dtype(torch_dtype), no_init_weights():
            model = _tied(Gemma3nForCausalLM(config))
        if weights:
            _fill_from_shards(model, locations, prefix, path)
        family = cls(
            model=model, step=step, path=path, fingerprint=_files_fingerprint(path, shards)
        )
        family._rereadable = weights
        return family

    # ------------------------------------------------------------------------ search space

    @property
    def n_layers(self) -> int:
        return len(self._stored)

    @property
    def stored_widths(self) -> list[int]:
        """FFN width stored for each layer (the widest each layer can run)."""
        return list(self._stored)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    @property
    def kv_producer_layers(self) -> list[int]:
        """Layers whose keys/values later layers reuse: they can never be skipped."""
        return list(self._producers)

    @property
    def kv_consumer_layers(self) -> list[int]:
        """The last `num_kv_shared_layers` layers, which reuse a producer's keys/values."""
        return list(self._consumers)

    @property
    def skippable_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if i not in self._producers]

    def allowed_widths(self, layer: int) -> list[int]:
        """Ascending choices for `layer`: 0 (drop it) where allowed, then step multiples."""
        if not 0 <= layer < self.n_layers:
            raise WidthsError(f"layer must be in [0, {self.n_layers - 1}], got {layer}")
        widths = list(range(self.step, self._stored[layer] + 1, self.step))
        return ([0] if layer not in self._producers else []) + widths

    def full_widths(self) -> list[int]:
        return list(self._stored)

    @property
    def n_configs(self) -> int:
        return math.prod(len(self.allowed_widths(i)) for i in range(self.n_layers))

    @property
    def has_weights(self) -> bool:
        return not self.model.model.embed_tokens.weight.is_meta

    @property
    def is_universal(self) -> bool:
        return True  # every width up to the stored one, and every skippable layer, slices

    @property
    def max_positions(self) -> int:
        return int(self.config.max_position_embeddings)

    @property
    def eval_seq_len(self) -> int:
        return min(DEFAULT_EVAL_SEQ_LEN, int(self.config.max_position_embeddings))

    @property
    def eval_batch_size(self) -> int:
        return 4  # E4B: 4 windows of 512 tokens are 2 GiB of float32 logits already

    def format_widths(self, widths: Sequence[int]) -> str:
        """`[2048, 2048, 0, 4096]` -> `"2048*2,0,4096"` (what `parse_widths` reads back)."""
        return run_length_widths(widths)

    def parse_widths(self, spec: str | Sequence[int | str]) -> list[int]:
        """`"8192*20,0*5,16384*10"` (or a list) -> one validated width per layer."""
        # Bounded by the layer count: `8192*99999999999` is refused before it is expanded.
        items = expand_widths_spec(spec, max_entries=self.n_layers)
        if len(items) != self.n_layers:
            raise WidthsError(
                f"widths {spec!r} give {len(items)} entries, but the checkpoint has "
                f"{self.n_layers} layers; write one width per layer (a multiple of {self.step}, "
                f"0 drops the layer), e.g. {self._stored[0]}*{self.n_layers}"
            )
        widths = []
        for layer, item in enumerate(items):
            try:
                widths.append(int(item))
            except ValueError:
                raise WidthsError(
                    f"layer {layer}: width {item!r} is not an integer; Gemma 3n widths are FFN "
                    f"widths in multiples of {self.step} (0 drops the layer)"
                ) from None
        return self.validate_widths(widths)

    def uniform_configs(self) -> dict[str, list[int]]:
        """Every layer at the same width (each step multiple all layers can take), by name
        (the width: `"2048"`; `seed_configs` labels it `uniform 2048`)."""
        top = min(self._stored)
        return {str(w): [w] * self.n_layers for w in range(self.step, top + 1, self.step)}

    def search_space(
        self,
        *,
        allow_skip: bool = False,
        interpolate: int = 0,
        min_widths: Sequence[int] | None = None,
        max_widths: Sequence[int] | None = None,
    ) -> SearchSpace:
        """Per-layer choices: step multiples, plus 0 (drop) for skippable layers with
        `allow_skip`. Bounds are inclusive, one per layer; a lower bound above 0 keeps a layer."""
        if interpolate:
            raise ConfigError(
                f"--interpolate ({interpolate}) does not apply to Gemma 3n: its widths are every "
                f"multiple of the step ({self.step}); choose a smaller step instead (--step)"
            )
        bounds = {"min_widths": min_widths, "max_widths": max_widths}
        for name, values in bounds.items():
            if values is not None and len(values) != self.n_layers:
                raise WidthsError(
                    f"{name} has {len(values)} entries, but the checkpoint has "
                    f"{self.n_layers} layers"
                )
        choices = []
        for layer in range(self.n_layers):
            low = min_widths[layer] if min_widths is not None else 0
            high = max_widths[layer] if max_widths is not None else self._stored[layer]
            if low > high:
                raise WidthsError(f"layer {layer}: lower bound {low} is above upper bound {high}")
            options = [
                w for w in self.allowed_widths(layer) if low <= w <= high and (w > 0 or allow_skip)
            ]
            choices.append(tuple(options))
        widths = tuple(range(self.step, max(self._stored) + 1, self.step))
        return SearchSpace(choices=tuple(choices), granularities=widths)

    def describe(self) -> dict[str, Any]:
        """Facts for `mnm info`: architecture, search space, parameter counts."""
        full = self.full_widths()
        return {
            "family": self.name,
            "path": str(self.path) if self.path else None,
            "fingerprint": self.fingerprint,
            "n_layers": self.n_layers,
            "hidden_size": int(self.config.hidden_size),
            "vocab_size": int(self.config.vocab_size),
            "stored_widths": self.stored_widths,
            "step": self.step,
            "layer_types": list(self.config.layer_types),
            "num_kv_shared_layers": int(self.config.num_kv_shared_layers),
            "kv_producer_layers": self.kv_producer_layers,
            "skippable_layers": self.skippable_layers,
            "n_configs": self.n_configs,
            "params": self.param_count(full),
            "effective_params": self.effective_param_count(full),
            "dtype": str(self.dtype).removeprefix("torch."),
            "tokenizer": "checkpoint"
            if self._has_tokenizer_files()
            else "bytes (no tokenizer files)",
        }

    def validate_widths(self, widths: Sequence[int]) -> list[int]:
        """Check a configuration; errors name the layer and how to fix it."""
        widths = list(widths)
        if len(widths) != self.n_layers:
            raise WidthsError(
                f"got {len(widths)} widths, but the checkpoint has {self.n_layers} layers; "
                f"write one entry per layer (an FFN width, or 0 to drop the layer)"
            )
        for layer, width in enumerate(widths):
            if not isinstance(width, int) or isinstance(width, bool):
                raise WidthsError(f"layer {layer}: width must be an integer, got {width!r}")
            stored = self._stored[layer]
            if width == 0:
                if layer in self._producers:
                    users = [c for c in self._consumers if _same_type(self.config, c, layer)]
                    raise WidthsError(
                        f"layer {layer} cannot be skipped: it produces the KV cache that layers "
                        f"{_ranges(users)} reuse (Gemma 3n KV sharing); give it a width "
                        f"(a multiple of {self.step} up to {stored}) instead"
                    )
                continue
            if width < 0 or width > stored:
                raise WidthsError(
                    f"layer {layer}: width {width} is outside [0, {stored}] (0 drops the layer; "
                    f"{stored} is the widest FFN this checkpoint stores for it)"
                )
            if width % self.step:
                low = width // self.step * self.step
                hint = f"{low} or {low + self.step}" if low else f"{self.step}"
                raise WidthsError(
                    f"layer {layer}: width {width} is not a multiple of the step {self.step}; "
                    f"use {hint}"
                )
        if not any(widths):
            raise WidthsError("every layer is skipped; keep at least one layer")
        return widths

    def _plan(self, widths: Sequence[int]) -> _Plan:
        widths = self.validate_widths(widths)
        kept = tuple(i for i, w in enumerate(widths) if w > 0)
        return _Plan(widths=tuple(widths), kept=kept, n_layers=self.n_layers)

    # ----------------------------------------------------------------------------- slicing

    def sliced_config(self, widths: Sequence[int]) -> Gemma3nTextConfig:
        """The `Gemma3nTextConfig` of the physically sliced model for `widths`."""
        plan = self._plan(widths)
        return self._sliced_config(plan)

    def _sliced_config(self, plan: _Plan) -> Gemma3nTextConfig:
        config = self.config
        data = config.to_dict()
        dropped_consumers = sum(1 for i in self._consumers if i not in plan.kept)
        data.update(
            num_hidden_layers=len(plan.kept),
            intermediate_size=plan.kept_widths,
            layer_types=[config.layer_types[i] for i in plan.kept],
            activation_sparsity_pattern=[
                float(config.activation_sparsity_pattern[i]) for i in plan.kept
            ],
            num_kv_shared_layers=int(config.num_kv_shared_layers) - dropped_consumers,
            architectures=["Gemma3nForCausalLM"],
        )
        sliced = Gemma3nTextConfig.from_dict(data)
        sliced._attn_implementation = config._attn_implementation
        return sliced

    def _source(self, name: str, plan: _Plan) -> torch.Tensor:
        """Tensor `name` of the sliced model, as a view of the loaded weights where possible."""
        match = _LAYER_KEY.match(name)
        if match:
            new, rest = int(match[1]), match[2]
            tensor = self._tensors[f"model.layers.{plan.kept[new]}.{rest}"]
            width = plan.widths[plan.kept[new]]
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                return tensor[:width]  # rows = hidden neurons
            if rest == "mlp.down_proj.weight":
                return tensor[:, :width]  # columns = hidden neurons
            return tensor
        tensor = self._tensors[name]
        if not plan.skips_layers:
            return tensor
        if name == _PLE_TABLE:
            return self._kept_ple_blocks(tensor, plan)
        if name == "model.per_layer_model_projection.weight":  # [n_layers * P, hidden]
            kept = torch.tensor(plan.kept, device=tensor.device)
            width = int(self.config.hidden_size_per_layer_input)
            blocks = tensor.unflatten(0, (self.n_layers, width))
            return blocks.index_select(0, kept).flatten(0, 1)
        return tensor

    def _kept_ple_blocks(self, rows: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Rows of the PLE table [vocab, n_layers * P] without the dropped layers' blocks."""
        kept = torch.tensor(plan.kept, device=rows.device)
        blocks = rows.unflatten(1, (self.n_layers, int(self.config.hidden_size_per_layer_input)))
        return blocks.index_select(1, kept).flatten(1)  # [rows, kept * P]

    def sliced_model(self, widths: Sequence[int]) -> Gemma3nForCausalLM:
        """The configuration as a transformers model sharing the loaded weights (views).

        Runs transformers' own forward with the sliced config, so it computes exactly what
        the exported checkpoint computes. The last one built is cached.
        """
        plan = self._plan(widths)
        if self._view is not None and self._view[0] == plan.widths:
            return self._view[1]
        self._view = None  # release the previous view before building the next
        view = self.view_model(plan.widths)
        self._view = (plan.widths, view)
        return view

    def _require_weights(self) -> None:
        if self._lost is not None:
            raise CheckpointError(f"{self._lost}; load the checkpoint again")
        if not self.has_weights:
            raise ConfigError(
                "this Gemma 3n checkpoint was loaded without weights (weights=False); "
                "load it with weights to run or export it"
            )

    def view_model(self, widths: Sequence[int]) -> Gemma3nForCausalLM:
        """A new (uncached) in-place sliced model for `widths`; see `sliced_model`.

        Several views can live at once (profiling times them interleaved): they share the
        loaded weights, so each costs only its small PLE projection copy when it skips layers.
        """
        return self._build_model(self._plan(widths), copy=False)

    def _build_model(self, plan: _Plan, *, copy: bool) -> Gemma3nForCausalLM:
        """The sliced model of `plan`: views of the loaded weights, or (`copy`) contiguous
        copies of them (the PLE table cut too), as an exported checkpoint holds them."""
        self._require_weights()
        config = self._sliced_config(plan)
        with torch.device("meta"), _default_dtype(self.dtype), no_init_weights():
            view = _tied(Gemma3nForCausalLM(config))
        tied = view.lm_head.weight is view.model.embed_tokens.weight
        wrap_ple = plan.skips_layers and not copy
        for module_name, module in view.named_modules():
            if wrap_ple and module_name == "model.embed_tokens_per_layer":
                continue  # replaced below by a wrapper around the full table (no copy)
            prefix = f"{module_name}." if module_name else ""
            for leaf, tensor in list(module._parameters.items()):
                if tensor is None or not tensor.is_meta:
                    continue
                source = self._source(prefix + leaf, plan)
                if copy:
                    source = source.detach().clone(memory_format=torch.contiguous_format)
                if not isinstance(source, nn.Parameter):
                    source = nn.Parameter(source.detach(), requires_grad=False)
                module._parameters[leaf] = source
            for leaf, tensor in list(module._buffers.items()):
                if tensor is not None and tensor.is_meta:
                    source = self._source(prefix + leaf, plan)
                    module._buffers[leaf] = source.clone() if copy else source
        if wrap_ple:
            view.model.embed_tokens_per_layer = _KeptLayersEmbedding(
                self.model.model.embed_tokens_per_layer,
                plan.kept,
                self.n_layers,
                int(self.config.hidden_size_per_layer_input),
            )
        if tied:
            view.lm_head.weight = view.model.embed_tokens.weight
        view.eval().requires_grad_(False)
        return view

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, widths: Sequence[int] | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] of the configuration (default: the full model)."""
        widths = self.full_widths() if widths is None else widths
        model = self.sliced_model(widths)
        return model(input_ids=input_ids, use_cache=_USE_CACHE).logits

    def layer_steps(self) -> LayerSteps:
        """The forward cut at layer boundaries (prefix caching, `CachedEvaluator`)."""
        self._require_weights()
        if not _LAYER_TAKES_SHARED_KV:
            return _ReplaySteps(self)
        return Gemma3nSteps(self)

    def decoder(self, widths: Sequence[int] | None = None) -> Decoder:
        """Greedy decoding of the configuration with a transformers KV cache."""
        return Gemma3nDecoder(self, self.full_widths() if widths is None else widths)

    def module(self) -> nn.Module:
        """The loaded model as a module: `forward(input_ids, widths=None)` -> logits."""
        return _WidthsModule(self)

    def sliced_module(self, widths: Sequence[int]) -> nn.Module:
        """The physically sliced `Gemma3nForCausalLM` (contiguous copies of the kept weights,
        the PLE table cut), wrapped so `forward(input_ids)` returns the logits tensor."""
        return _LogitsModule(self._build_model(self._plan(widths), copy=True))

    # -------------------------------------------------------------------------- parameters

    def param_count(self, widths: Sequence[int] | None = None) -> int:
        """Exact number of parameters of the sliced model (tied weights counted once)."""
        plan = self._plan(self.full_widths() if widths is None else widths)
        counts = self._counts()
        hidden = int(self.config.hidden_size)
        total = counts["fixed"]
        for i in plan.kept:
            total += counts["layer_base"][i] + counts["per_layer_embedding"]
            total += 3 * hidden * plan.widths[i]  # gate + up + down projections
        return total

    def effective_param_count(self, widths: Sequence[int] | None = None) -> int:
        """Parameters without the embedding tables: MatFormer Lab's "effective params".

        Equals transformers' `num_parameters(exclude_embeddings=True)` of the text model
        (the E2B slice of E4B: 1,905,495,648).
        """
        plan = self._plan(self.full_widths() if widths is None else widths)
        counts = self._counts()
        ple_rows = int(self.config.vocab_size_per_layer_input)
        ple_width = int(self.config.hidden_size_per_layer_input)
        embeddings = counts["embed_tokens"] + ple_rows * ple_width * len(plan.kept)
        return self.param_count(plan.widths) - embeddings

    def memory_bytes(self, widths: Sequence[int], target: HardwareTarget) -> MemoryEstimate:
        """Bytes the configuration needs on `target`, at the target's dtype.

        - weights: every parameter of the sliced model (`param_count`);
        - KV cache: keys and values of the kept layers that compute them (KV-sharing consumers
          reuse their producer's; dropped layers hold none) for the target's whole context
          (`context_len + seq_len`), at most `sliding_window` positions in sliding layers;
        - activations: a peak estimate for one forward pass, the AltUp streams (the layer's
          input and its predictions, `altup_num_inputs` each) and the per-layer inputs of the
          kept layers, plus the largest intermediate alive beside them (attention: q, k, v and
          the score matrix; FFN: gate, up and their product; head: the logits, soft-capped).
        """
        plan = self._plan(widths)
        config = self.config
        size = DTYPE_BYTES[target.dtype]
        batch, new, context = target.batch, target.seq_len, target.total_len
        hidden, head_dim = int(config.hidden_size), int(config.head_dim)
        heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
        window = int(config.sliding_window)

        def span(layer: int) -> int:  # positions a layer attends to (and caches)
            sliding = config.layer_types[layer] == "sliding_attention"
            return min(context, window) if sliding else context

        kv = sum(
            2 * batch * span(i) * kv_heads * head_dim for i in plan.kept if i not in self._consumers
        )
        streams = (2 * int(config.altup_num_inputs) + 1) * batch * new * hidden
        per_layer = batch * new * len(plan.kept) * int(config.hidden_size_per_layer_input)
        attention = batch * new * (heads + 2 * kv_heads) * head_dim + batch * heads * new * max(
            span(i) for i in plan.kept
        )
        ffn = 3 * batch * new * max(plan.kept_widths)
        capped = 2 if config.final_logit_softcapping is not None else 1
        head = capped * batch * new * int(config.vocab_size)
        activations = streams + per_layer + max(attention, ffn, head)
        return MemoryEstimate(
            weights=self.param_count(plan.widths) * size,
            kv_cache=kv * size,
            activations=activations * size,
        )

    def _counts(self) -> dict[str, Any]:
        model = self.model.model
        layers = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
        mlps = [sum(p.numel() for p in layer.mlp.parameters()) for layer in model.layers]
        per_layer = (
            model.embed_tokens_per_layer.weight.numel()
            + model.per_layer_model_projection.weight.numel()
        ) // self.n_layers
        total = sum(p.numel() for p in self.model.parameters())  # deduplicates tied weights
        return {
            "fixed": total - sum(layers) - per_layer * self.n_layers,
            "layer_base": [n - m for n, m in zip(layers, mlps)],
            "per_layer_embedding": per_layer,
            "embed_tokens": model.embed_tokens.weight.numel(),
        }

    # -------------------------------------------------------------------------- evaluation

    @property
    def fingerprint(self) -> str:
        """Stable short hash identifying the checkpoint (files, or weights when in memory)."""
        if self._fingerprint is None:
            digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
            for name, tensor in sorted(self.model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().to("cpu", torch.float32).numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def _has_tokenizer_files(self) -> bool:
        return self.path is not None and any((self.path / f).is_file() for f in TOKENIZER_FILES[:3])

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's own tokenizer (local files only), or None: bytes are used then."""
        if not self._tokenizer_loaded:
            self._tokenizer_loaded = True
            if self._has_tokenizer_files():
                from transformers import AutoTokenizer

                try:
                    self._tokenizer = AutoTokenizer.from_pretrained(
                        str(self.path), local_files_only=True
                    )
                except (OSError, ValueError) as exc:
                    raise CheckpointError(
                        f"{self.path} has tokenizer files that transformers cannot load ({exc}); "
                        f"remove them to fall back to byte-level tokens, or repair them"
                    ) from exc
        return self._tokenizer

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of `text`: the checkpoint's tokenizer, else UTF-8 bytes (tests)."""
        if self.tokenizer is not None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return torch.tensor(ids, dtype=torch.long)
        if int(self.config.vocab_size) < 256:
            raise DataError(
                f"the checkpoint has no tokenizer files and its vocabulary "
                f"({self.config.vocab_size} tokens) is too small for byte-level fallback (256); "
                f"add its tokenizer files"
            )
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return super().decode(ids)
        return str(self.tokenizer.decode([int(i) for i in ids]))

    def load_eval_set(
        self,
        data: str | Path | None,
        *,
        max_tokens: int | None = None,
        seq_len: int | None = None,
    ) -> EvalSet:
        """Windows of the user's text (or the bundled validation text), tokenized as above,
        `seq_len` tokens each (default: `eval_seq_len`).

        Only a prefix of a large file is read and tokenized: enough for `max_tokens`.
        """
        if seq_len is None:
            seq_len = self.eval_seq_len
        if data is None:
            tokens = self.encode(bundled_validation_text())
        else:
            needed = (
                window_tokens(seq_len=seq_len, max_tokens=max_tokens)
                if max_tokens is not None
                else None
            )
            tokens = read_tokens(data, self.encode, n_tokens=needed)
        return make_eval_set(tokens, seq_len=seq_len, max_tokens=max_tokens)

    @torch.inference_mode()
    def evaluate_loss(
        self, widths: Sequence[int], eval_set: EvalSet, *, batch_size: int = 4
    ) -> float:
        """Mean next-token cross-entropy (nats/token) of the configuration on `eval_set`.

        The LM head and the loss run in chunks of tokens, so memory stays bounded by the
        hidden states, not by full-vocabulary logits.
        """
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        model = self.sliced_model(widths)
        device = model.lm_head.weight.device
        cap = self.config.final_logit_softcapping
        total, count = 0.0, 0
        for start in range(0, eval_set.inputs.shape[0], batch_size):
            inputs = eval_set.inputs[start : start + batch_size].to(device)
            targets = eval_set.targets[start : start + batch_size].to(device)
            hidden = model.model(input_ids=inputs, use_cache=_USE_CACHE).last_hidden_state
            hidden = hidden.flatten(0, 1)  # [B * T, hidden]
            flat_targets = targets.flatten()  # [B * T]
            for row in range(0, hidden.shape[0], _HEAD_CHUNK):
                # As Gemma3nForCausalLM.forward computes logits, one chunk of tokens at a time.
                logits = model.lm_head(hidden[row : row + _HEAD_CHUNK]).float()  # [c, vocab]
                if cap is not None:
                    logits = torch.tanh(logits / cap) * cap
                chunk = flat_targets[row : row + _HEAD_CHUNK]
                total += F.cross_entropy(logits, chunk, reduction="sum").item()
                count += chunk.numel()
        return total / count

    # ------------------------------------------------------------------------------ export

    def export_hf(
        self,
        widths: Sequence[int],
        out: str | Path,
        *,
        max_shard_size: int | str = "2GB",
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
        verify: bool = True,
        atol: float | None = None,
    ) -> Path:
        """Write the configuration as a Hugging Face checkpoint that transformers loads.

        `out` gets sharded safetensors (+ index when more than one shard), `config.json` with
        per-layer `intermediate_size`, the source tokenizer files and `mnm.json` (widths,
        source fingerprint, verification); the model card is `mnm_search.export`'s, written
        for every family around `write_export`. Written atomically; with
        `verify`, the directory is reloaded with `from_pretrained` and its logits compared
        with the in-place sliced model (an `ExportError` leaves `out` untouched). A family
        from `load` frees its weights during that reload and reads them back from its
        checkpoint afterwards (as long as a `load` takes): memory stays at one model.
        """
        self._require_weights()
        plan = self._plan(widths)
        shard_bytes = _parse_size(max_shard_size)
        config = self._sliced_config(plan)
        with torch.device("meta"), _default_dtype(self.dtype), no_init_weights():
            shapes = _tied(Gemma3nForCausalLM(config))
        tied = shapes.lm_head.weight is shapes.model.embed_tokens.weight
        names = [n for n in shapes.state_dict() if not (tied and n == "lm_head.weight")]
        expected = {n: tuple(t.shape) for n, t in shapes.state_dict().items()}
        del shapes
        probe = self._probe_ids()
        reference = self.logits(probe, plan.widths) if verify else None
        out = Path(out)
        with atomic_directory(out, overwrite=overwrite) as tmp:
            total = self._write_shards(tmp, names, expected, plan, shard_bytes)
            config.save_pretrained(str(tmp))
            self._copy_tokenizer_files(tmp)
            report: dict[str, Any] = {"verified": False}
            if reference is not None:
                with self._weights_released():
                    report = self._verify_export(tmp, probe, reference, atol)
            info = {
                "format": "mnm-hf-export",
                "family": self.name,
                "source_path": str(self.path) if self.path else None,
                "source_fingerprint": self.fingerprint,
                "widths": list(plan.widths),
                "skipped_layers": [i for i in range(self.n_layers) if i not in plan.kept],
                "intermediate_size": plan.kept_widths,
                "params": self.param_count(plan.widths),
                "effective_params": self.effective_param_count(plan.widths),
                "weights_bytes": total,
                "verification": report,
                **(metadata or {}),
            }
            # `metadata` may hold a NaN loss or latency: mnm.json (strict JSON) and the card
            # both record it as null, "not measured".
            info = finite(info)
            (tmp / EXPORT_INFO_FILE).write_text(json_text(info) + "\n", encoding="utf-8")
        return out

    @contextlib.contextmanager
    def _weights_released(self) -> Iterator[None]:
        """Free the loaded weights while the block runs, then read them back from the shards.

        Verifying an export reloads the slice with `from_pretrained`; a full-width slice is as
        large as the source, and E4B must never be held twice. Only weights that `load` read
        from a checkpoint still unchanged on disk are freed; an in-memory model is kept (it
        is then held alongside the reload). Storages are resized in place, so every view of
        them (`sliced_model`, the profiler's views) is valid again afterwards.
        """
        path = self.path
        if not self._rereadable or path is None:
            yield
            return
        shards = _shard_files(path)
        if _files_fingerprint(path, shards) != self._fingerprint:
            warnings.warn(
                f"{path} changed on disk since it was loaded: keeping its weights in memory "
                "while the export is verified (twice the memory)",
                stacklevel=4,
            )
            yield
            return
        self._view = None
        storages = {}
        for tensor in self.model.state_dict(keep_vars=True).values():
            storage = tensor.untyped_storage()
            storages.setdefault(storage.data_ptr(), (storage, storage.nbytes()))
        self._lost = f"the weights of {path} were freed during an export and not read back"
        for storage, _ in storages.values():
            storage.resize_(0)
        try:
            yield
        finally:
            for storage, nbytes in storages.values():
                storage.resize_(nbytes)
            locations = _tensor_locations(shards)
            with warnings.catch_warnings():  # `load` already warned about unused tensors
                warnings.simplefilter("ignore")
                _fill_from_shards(self.model, locations, _text_prefix(locations, path), path)
            self._lost = None

    def _write_shards(
        self,
        directory: Path,
        names: list[str],
        expected: dict[str, tuple[int, ...]],
        plan: _Plan,
        shard_bytes: int,
    ) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        shards: list[list[str]] = [[]]
        size = 0
        for name in names:
            nbytes = math.prod(expected[name]) * itemsize
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        weight_map: dict[str, str] = {}
        total = 0
        for number, shard in enumerate(shards, start=1):
            filename = (
                SINGLE_FILE
                if len(shards) == 1
                else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            )
            # Streamed in row chunks: exporting holds one chunk, never a shard or a second model.
            streamed = [
                StreamedTensor(name, self.dtype, expected[name], self._chunks(name, plan))
                for name in shard
            ]
            total += write_safetensors(directory / filename, streamed, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, filename))
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (directory / INDEX_FILE).write_text(json_text(index) + "\n", encoding="utf-8")
        return total

    def _chunks(self, name: str, plan: _Plan) -> Callable[[], Iterator[torch.Tensor]]:
        """Tensor `name` of the sliced model as row chunks of at most `_COPY_CHUNK_BYTES`."""

        def chunks() -> Iterator[torch.Tensor]:
            cut_ple = name == _PLE_TABLE and plan.skips_layers
            # The PLE table is cut chunk by chunk (a whole cut copy is ~4 GB for E4B); every
            # other tensor is a view of the loaded weights or, for the projection, small.
            tensor = self._tensors[name] if cut_ple else self._source(name, plan)
            if tensor.dim() == 0:
                yield tensor.to(self.dtype)
                return
            row_bytes = max(1, tensor[0].numel() * tensor.element_size())
            rows = max(1, _COPY_CHUNK_BYTES // row_bytes)
            for start in range(0, tensor.shape[0], rows):
                chunk = tensor[start : start + rows]
                yield (self._kept_ple_blocks(chunk, plan) if cut_ple else chunk).to(self.dtype)

        return chunks

    def _copy_tokenizer_files(self, directory: Path) -> None:
        if self.path is None:
            return
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file():
                shutil.copy2(self.path / name, directory / name)

    def _probe_ids(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        length = min(24, int(self.config.max_position_embeddings))
        return torch.randint(0, int(self.config.vocab_size), (2, length), generator=generator)

    def _verify_export(
        self, directory: Path, probe: torch.Tensor, reference: torch.Tensor, atol: float | None
    ) -> dict[str, Any]:
        if atol is None:
            atol = 1e-4 if self.dtype == torch.float32 else 5e-2
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # the CLI shows its own progress; keep stderr clean
        try:
            reloaded = Gemma3nForCausalLM.from_pretrained(
                str(directory),
                local_files_only=True,
                attn_implementation=self.config._attn_implementation,
                **{_DTYPE_KWARG: self.dtype},
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise ExportError(f"transformers cannot load the exported checkpoint: {exc}") from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        with torch.inference_mode():
            logits = reloaded.eval()(input_ids=probe, use_cache=_USE_CACHE).logits
        del reloaded
        diff = (logits.float() - reference.float()).abs().max().item()
        if not diff <= atol:
            raise ExportError(
                f"export verification failed: logits of the reloaded checkpoint differ from the "
                f"in-place sliced model by {diff:.3g} (> {atol:g}); nothing was written"
            )
        return {
            "verified": True,
            "max_abs_logit_diff": diff,
            "atol": atol,
            "probe_tokens": int(probe.numel()),
            "transformers": transformers.__version__,
        }

    # ----------------------------------------------------- latency and export (issue 12)

    def latency_probe(self, target: HardwareTarget, device: torch.device) -> LatencyProbe:
        from mnm_search.families.gemma3n_profile import Gemma3nProbe

        return Gemma3nProbe(self, target, device)

    def prepare_for_target(self, target: HardwareTarget) -> Gemma3nFamily:
        """This family, its model moved to the target's device and dtype IN PLACE: a real
        E4B must never be held twice. Load in the target's dtype to skip the conversion."""
        from mnm_search.profiler import TORCH_DTYPES, select_device

        if not self.has_weights:
            return self
        device, dtype = select_device(target.device), TORCH_DTYPES[target.dtype]
        weights = self.model.model.embed_tokens.weight
        if weights.device != device or weights.dtype != dtype:
            if device.type == "cpu" and self.path is not None:
                _check_fits(self.config, dtype, self.path)  # e.g. bfloat16 -> float32 doubles
            self.model.to(device=device, dtype=dtype)  # parameters converted one at a time
            self._tensors = {  # moved buffers are new tensors: re-read every name
                **dict(self.model.named_parameters(remove_duplicate=False)),
                **dict(self.model.named_buffers(remove_duplicate=False)),
            }
            self._view = None
        return self

    def write_export(
        self, directory: Path, widths: Sequence[int], *, fmt: str, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        """The configuration as a verified transformers checkpoint (see gemma3n_export)."""
        from mnm_search.families.gemma3n_export import write_gemma3n_export

        return write_gemma3n_export(self, directory, widths, fmt=fmt, metadata=metadata)

    def widths_on_export(self, widths: Sequence[int], exported: Sequence[int]) -> list[int]:
        """An export keeps only the layers `exported` does not skip (0 drops a whole layer)."""
        return [int(w) for w, kept in zip(widths, exported) if kept]


@dataclass(frozen=True, eq=False)
class _BatchContext:
    """What every layer reads for one eval batch and none changes: per-layer inputs, rotary
    position embeddings and attention masks. One object per batch is shared by all of its
    states, so the evaluator does not count it per cached prefix (it is not a tensor)."""

    per_layer_inputs: torch.Tensor  # [B, T, n_layers, P]: the full model's, every layer
    position_ids: torch.Tensor  # [1, T]
    position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]]  # by layer type
    masks: dict[str, Any]  # by layer type, as transformers builds them (may be None)


class Gemma3nSteps(LayerSteps):
    """Gemma 3n's text forward (`Gemma3nTextModel.forward`) cut at layer boundaries.

    The state between layers is `{"streams": [altup_num_inputs, B, T, hidden], "kv": {layer
    type: (keys, values)}, "context": _BatchContext}`: the AltUp streams, the keys/values the
    KV producers stored so far (what later KV-sharing layers read), and the per-batch context.
    Each layer runs transformers' own `Gemma3nTextDecoderLayer` of the loaded model; a
    narrower width runs a shallow copy of it whose MLP projections are views of the first
    `width` neurons (what `view_model` builds). Width 0 (a dropped layer) passes the state
    through: the view model's per-layer inputs, masks and KV sharing are those of the kept
    layers, which equal the full model's (producers are never dropped). Siblings run the layer
    once per width (the gated MLP with activation sparsity has no exact partial sums).
    """

    def __init__(self, family: Gemma3nFamily) -> None:
        self.family = family
        self.model = family.model
        self.text = family.model.model
        self.config = family.config
        self.n_layers = family.n_layers
        self._layers: dict[tuple[int, int], nn.Module] = {}
        modeling = inspect.getmodule(type(self.text))
        self._mask_functions = {
            "full_attention": modeling.create_causal_mask,
            "sliding_attention": modeling.create_sliding_window_causal_mask,
        }

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> dict[str, Any]:
        text, config = self.text, self.config
        device = text.embed_tokens.weight.device
        input_ids = input_ids.to(device)
        embeds = text.embed_tokens(input_ids)
        per_layer = text.project_per_layer_inputs(embeds, text.get_per_layer_inputs(input_ids))
        position_ids = torch.arange(input_ids.shape[1], device=device).unsqueeze(0)
        mask_kwargs = {
            "config": config,
            "inputs_embeds": embeds,
            "attention_mask": None,
            _CACHE_KWARG: DynamicCache(config=config),  # empty, as a plain forward's
            "position_ids": position_ids,
        }
        masks = {kind: make(**mask_kwargs) for kind, make in self._mask_functions.items()}
        # AltUp: the embedding and its projections rescaled to its magnitude (as transformers).
        target = torch.mean(embeds**2, dim=-1, keepdim=True) ** 0.5
        streams = [embeds]
        for projection in text.altup_projections:
            stream = projection(embeds).to(dtype=embeds.dtype, device=target.device)
            magnitude = torch.sqrt(torch.mean(stream**2, dim=-1, keepdim=True).clamp(min=1e-5))
            streams.append(stream * target / magnitude)
        hidden = torch.stack(streams, dim=0)  # [altup_num_inputs, B, T, hidden]
        positions = {
            kind: text.rotary_emb(hidden, position_ids, kind) for kind in set(config.layer_types)
        }
        context = _BatchContext(
            per_layer_inputs=per_layer,
            position_ids=position_ids,
            position_embeddings=positions,
            masks=masks,
        )
        return {"streams": hidden, "kv": {}, "context": context}

    @torch.inference_mode()
    def layer(self, index: int, state: dict[str, Any], widths: Sequence[int]) -> dict[int, Any]:
        context: _BatchContext = state["context"]
        kind = self.config.layer_types[index]
        outputs: dict[int, Any] = {}
        for width in sorted(set(widths)):
            if width == 0:
                outputs[0] = state
                continue
            shared = _KVSharing(state["kv"])  # producers add theirs; the input state is kept
            streams = self._layer(index, width)(
                state["streams"],
                context.position_embeddings[kind],
                context.per_layer_inputs[:, :, index, :],
                shared_kv_states=shared,
                attention_mask=context.masks[kind],
                position_ids=context.position_ids,
                **{_CACHE_KWARG: None},
            )
            outputs[width] = {"streams": streams, "kv": dict(shared), "context": context}
        return outputs

    @torch.inference_mode()
    def hidden(self, state: dict[str, Any]) -> torch.Tensor:
        text, hidden = self.text, state["streams"]
        dtype = text.embed_tokens.weight.dtype
        # AltUp unembedding, final norm, LM head and soft-capping, as the plain forward.
        target = torch.mean(hidden[0] ** 2, dim=-1, keepdim=True) ** 0.5
        streams = [hidden[0]]
        for i, projection in enumerate(text.altup_unembed_projections, start=1):
            stream = projection(hidden[i]).to(dtype=dtype, device=target.device)
            magnitude = torch.sqrt(torch.mean(stream**2, dim=-1, keepdim=True).clamp(min=1e-5))
            streams.append(stream * target / magnitude)
        return text.norm(torch.mean(torch.stack(streams), dim=0))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return _soft_capped_logits(self.model, hidden)

    def _layer(self, index: int, width: int) -> nn.Module:
        """Decoder layer `index` with its MLP cut to `width` neurons (views, built once)."""
        key = (index, width)
        if key not in self._layers:
            full = self.text.layers[index]
            if width == self.family.stored_widths[index]:
                self._layers[key] = full
            else:
                mlp = copy.copy(full.mlp)
                mlp._modules = dict(full.mlp._modules)
                mlp.gate_proj = _linear(full.mlp.gate_proj.weight[:width])
                mlp.up_proj = _linear(full.mlp.up_proj.weight[:width])
                mlp.down_proj = _linear(full.mlp.down_proj.weight[:, :width])
                mlp.intermediate_size = width
                layer = copy.copy(full)
                layer._modules = dict(full._modules)
                layer.mlp = mlp
                self._layers[key] = layer
        return self._layers[key]


class _ReplaySteps(LayerSteps):
    """Exact but uncached steps for transformers without `shared_kv_states` (4.x, which
    shares KV through the cache object): the state records the widths, `logits` runs the
    plain forward of the configuration up to the LM head."""

    def __init__(self, family: Gemma3nFamily) -> None:
        self.family = family
        self.n_layers = family.n_layers

    def embed(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ids": input_ids, "widths": torch.zeros(0, dtype=torch.long)}

    def layer(self, index: int, state: dict[str, Any], widths: Sequence[int]) -> dict[int, Any]:
        return {
            w: {"ids": state["ids"], "widths": torch.cat([state["widths"], torch.tensor([w])])}
            for w in set(widths)
        }

    def hidden(self, state: dict[str, Any]) -> torch.Tensor:
        widths = [int(w) for w in state["widths"]]
        model = self.family.view_model(widths)
        ids = state["ids"].to(model.lm_head.weight.device)
        return model.model(input_ids=ids, use_cache=_USE_CACHE).last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return _soft_capped_logits(self.family.model, hidden)


def _soft_capped_logits(model: Gemma3nForCausalLM, hidden: torch.Tensor) -> torch.Tensor:
    """Float logits of final hidden states, soft-capped as Gemma3nForCausalLM.forward does."""
    logits = model.lm_head(hidden)
    cap = model.config.final_logit_softcapping
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


class Gemma3nDecoder(Decoder):
    """Greedy decoding of one configuration: the in-place view model and a transformers cache.

    The cache holds every position of every layer (sliding layers too; their mask keeps the
    window), so `rollback` is a plain cut of each layer's keys and values.
    """

    def __init__(self, family: Gemma3nFamily, widths: Sequence[int]) -> None:
        self.model = family.view_model(widths)
        self._cache: Any = None

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._cache = DynamicCache()
        return self.step(input_ids)

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._cache is None:
            raise ConfigError("call prefill(prompt) before step()")
        device = self.model.lm_head.weight.device
        out = self.model(
            input_ids=input_ids.to(device), use_cache=True, **{_CACHE_KWARG: self._cache}
        )
        return out.logits.float()

    def rollback(self, length: int) -> None:
        if self._cache is None or not 0 <= length <= self.length:
            raise ConfigError(f"cannot roll the cache back to {length} positions")
        layers = getattr(self._cache, "layers", None)
        if layers is None:  # transformers 4.x without cache layers: its crop takes a length
            self._cache.crop(length)
            return
        for layer in layers:
            if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]

    @property
    def length(self) -> int:
        return 0 if self._cache is None else int(self._cache.get_seq_length())


class _WidthsModule(nn.Module):
    """The loaded model as a module: `forward(input_ids, widths=None)` -> logits."""

    def __init__(self, family: Gemma3nFamily) -> None:
        super().__init__()
        self.model = family.model
        self._family = [family]  # a plain list: not a submodule, not a parameter

    def forward(self, input_ids: torch.Tensor, widths: Sequence[int] | None = None) -> torch.Tensor:
        return self._family[0].logits(input_ids, widths)


class _LogitsModule(nn.Module):
    """A `Gemma3nForCausalLM` whose `forward(input_ids)` returns the logits tensor."""

    def __init__(self, model: Gemma3nForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=_USE_CACHE).logits


def _linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free `nn.Linear` around `weight` (a view: no copy)."""
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear.eval()


# ---------------------------------------------------------------------------------- helpers

# transformers 4.x shares KV between layers only through the cache object: without one, the
# KV-sharing layers would compute their own keys/values (a different model). 5.x shares KV
# either way, so a cache is always requested.
_USE_CACHE = True
# The cache argument of the forwards: `cache` in transformers >= 5.x (`past_key_values` before).
_CACHE_KWARG = (
    "cache"
    if "cache" in inspect.signature(Gemma3nForCausalLM.forward).parameters
    else "past_key_values"
)
# transformers 5.x passes the KV-sharing states between decoder layers explicitly.
_LAYER_TAKES_SHARED_KV = (
    "shared_kv_states" in inspect.signature(Gemma3nTextDecoderLayer.forward).parameters
)
_DTYPE_KWARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def _tied(model: Gemma3nForCausalLM) -> Gemma3nForCausalLM:
    """Tie the LM head to the embeddings as the config says (skipped weight init skips it)."""
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _kv_roles(layer_types: list[str], n_shared: int) -> tuple[list[int], list[int]]:
    """(producer layers, consumer layers) of Gemma 3n's KV sharing.

    Consumers are the last `n_shared` layers; each reuses the KV of the last earlier layer of
    its attention type. Like transformers, every attention type's last non-consumer layer
    counts as a producer.
    """
    n = len(layer_types)
    if n_shared <= 0:
        return [], []
    first = n - n_shared
    producers = sorted(
        max(i for i in range(first) if layer_types[i] == kind)
        for kind in set(layer_types)
        if kind in layer_types[:first]
    )
    return producers, list(range(first, n))


def _same_type(config: Gemma3nTextConfig, a: int, b: int) -> bool:
    return config.layer_types[a] == config.layer_types[b]


def _ranges(layers: Sequence[int]) -> str:
    if not layers:
        return "none"
    if list(layers) == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(str(i) for i in layers)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ConfigError(f"max_shard_size must be positive, got {size}")
        return size
    match = _SIZE.match(str(size))
    if not match:
        raise ConfigError(
            f"max_shard_size must be bytes or a size like '2GB' or '500MB', got {size!r}"
        )
    value = float(match[1]) * _SIZE_UNITS[(match[2] or "B").upper()]
    if value < 1:
        raise ConfigError(f"max_shard_size must be positive, got {size!r}")
    return int(value)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _text_config(data: dict[str, Any], path: Path) -> Gemma3nTextConfig:
    from mnm_search.families import family_for_config

    family = family_for_config(data, where=str(path / "config.json")).name  # unsupported: error
    if family != Gemma3nFamily.name:
        raise CheckpointError(
            f"{path} is a {family} checkpoint, not Gemma 3n; load it with mnm_search.load_family"
        )
    if data.get("model_type") == "gemma3n_text":
        text = data
    else:
        text = data.get("text_config")
        if not isinstance(text, dict):
            raise CheckpointError(
                f"{path / 'config.json'} is not a Gemma 3n text checkpoint (model_type "
                f"{data.get('model_type')!r} without a text_config object)"
            )
    _check_text_fields(text, where=str(path / "config.json"))
    try:
        return Gemma3nTextConfig.from_dict(text)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as exc:
        raise CheckpointError(
            f"{path / 'config.json'}: invalid Gemma 3n text config: {exc}"
        ) from exc


# Sizes transformers would allocate from: each must be an integer in [minimum, maximum].
# The caps are far above E4B (35 layers, hidden 2048, FFN 16384, vocab 262144) and refuse a
# config that asks for astronomic tensors; `_check_fits` then bounds the total.
_TEXT_INT_FIELDS = {
    "hidden_size": (1, SIZE_CAPS["d_model"]),
    "num_hidden_layers": (1, MAX_LAYERS),
    "num_attention_heads": (1, SIZE_CAPS["n_heads"]),
    "num_key_value_heads": (1, SIZE_CAPS["n_heads"]),
    "head_dim": (1, SIZE_CAPS["d_model"]),
    "vocab_size": (1, SIZE_CAPS["vocab_size"]),
    "vocab_size_per_layer_input": (1, SIZE_CAPS["vocab_size"]),
    "hidden_size_per_layer_input": (1, SIZE_CAPS["d_model"]),
    "max_position_embeddings": (1, SIZE_CAPS["max_seq_len"]),
    "num_kv_shared_layers": (0, MAX_LAYERS),
    "laurel_rank": (1, SIZE_CAPS["d_model"]),
    "sliding_window": (1, SIZE_CAPS["max_seq_len"]),
    "altup_num_inputs": (1, 64),
}


def _check_text_fields(text: dict[str, Any], *, where: str) -> None:
    """Types and bounds of the fields that size the model, before transformers sees them."""

    def fail(field: str, value: Any, expected: str) -> CheckpointError:
        return CheckpointError(
            f"{where}: field {field!r} must be {expected}, got {value!r:.80}; fix the config "
            f"or restore it from the checkpoint's source"
        )

    for field, (minimum, maximum) in _TEXT_INT_FIELDS.items():
        if field in text and (not is_int(text[field]) or not minimum <= text[field] <= maximum):
            raise fail(field, text[field], f"an integer from {minimum:,} to {maximum:,}")
    layers = text.get("num_hidden_layers")
    widths = text.get("intermediate_size")
    if widths is not None:
        entries = widths if isinstance(widths, list) else [widths]
        if isinstance(widths, list) and is_int(layers) and len(widths) != layers:
            raise fail("intermediate_size", widths, f"one width per layer ({layers})")
        if not entries or not all(is_int(w) and 0 < w <= SIZE_CAPS["d_ff"] for w in entries):
            raise fail(
                "intermediate_size",
                widths,
                f"an integer or a list of integers from 1 to {SIZE_CAPS['d_ff']:,}",
            )
    layer_types = text.get("layer_types")
    if layer_types is not None and (
        not isinstance(layer_types, list)
        or not all(isinstance(t, str) for t in layer_types)
        or (is_int(layers) and len(layer_types) != layers)
    ):
        raise fail("layer_types", layer_types, "a list of strings, one per layer")
    for field in ("rms_norm_eps",):
        value = text.get(field)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not 0 < value < 1
        ):
            raise fail(field, value, "a finite number in (0, 1)")


def _estimated_params(config: Gemma3nTextConfig) -> int:
    """Rough parameter count of the text model from its config (big terms only)."""
    hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
    ple = int(config.hidden_size_per_layer_input)
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
    attention = 2 * hidden * heads * config.head_dim + 2 * hidden * kv_heads * config.head_dim
    widths = config.intermediate_size
    ffn = 3 * hidden * sum(widths if isinstance(widths, list) else [widths] * layers)
    embeddings = int(config.vocab_size) * hidden
    per_layer = int(config.vocab_size_per_layer_input) * layers * ple + hidden * layers * ple
    return embeddings + per_layer + ffn + layers * (attention + 2 * hidden * ple)


def _check_fits(config: Gemma3nTextConfig, dtype: torch.dtype, path: Path) -> None:
    """Refuse, before allocating, a model whose weights exceed this machine's memory."""
    params = _estimated_params(config)
    needed = params * torch.empty((), dtype=dtype).element_size()
    total = physical_memory_bytes()
    if total is not None and needed > total:
        raise CheckpointError(
            f"{path / 'config.json'} describes about {params:,} text-model parameters "
            f"(hidden_size {config.hidden_size}, num_hidden_layers {config.num_hidden_layers}, "
            f"vocab_size {config.vocab_size}), {format_bytes(needed)} in {dtype}, but this "
            f"machine has {format_bytes(total)} of memory; use a larger machine, a smaller "
            f"dtype, or load without weights (mnm info)"
        )


def _shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint; missing shards are a clear error."""
    index_path = path / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(
                f"{index_path} is not a valid safetensors index (needs a 'weight_map' object)"
            ) from None
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{path} is incomplete: {len(missing)} of {len(files)} weight shards listed in "
                f"{INDEX_FILE} are missing ({', '.join(missing[:4])}"
                f"{', ...' if len(missing) > 4 else ''}); copy or re-download the missing files "
                f"into {path}"
            )
        return [path / f for f in files]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    hint = (
        f"; it holds pickle files ({', '.join(pickles[:4])}) that mnm never loads, because "
        f"unpickling can run arbitrary code: convert them to safetensors"
        if pickles
        else ""
    )
    raise CheckpointError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


def _tensor_locations(shards: list[Path]) -> dict[str, Path]:
    locations: dict[str, Path] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    locations[name] = shard
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(
                f"{shard} is corrupt or truncated ({exc}); re-copy or re-download it"
            ) from exc
    return locations


def _text_prefix(locations: dict[str, Path], path: Path) -> str:
    """Key prefix of the text model: `model.` (CausalLM) or `model.language_model.` (multimodal)."""
    anchors = sorted(n[: -len(_ANCHOR)] for n in locations if n.endswith(_ANCHOR))
    if not anchors:
        raise CheckpointError(
            f"{path}: the weights hold no tensor named '*{_ANCHOR}'; they are not a Gemma 3n "
            f"text model"
        )
    return min(anchors, key=len)  # a vision tower would nest deeper; the text model is shallowest


def _resolve_dtype(dtype: str, locations: dict[str, Path], prefix: str) -> torch.dtype:
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ConfigError(f"dtype must be auto or one of {', '.join(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    name = prefix + _ANCHOR
    with safe_open(str(locations[name]), framework="pt") as handle:
        stored = handle.get_slice(name).get_dtype()
    by_code = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    if stored not in by_code:
        raise CheckpointError(f"weights are stored as {stored}; expected F32, BF16 or F16")
    return by_code[stored]


def _checkpoint_name(name: str, prefix: str) -> str:
    return prefix + name.removeprefix("model.") if name.startswith("model.") else name


def _fill_from_shards(
    model: Gemma3nForCausalLM, locations: dict[str, Path], prefix: str, path: Path
) -> None:
    """Copy every tensor of `model` from the shards, in bounded chunks, checking shapes."""
    state = model.state_dict(keep_vars=True)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    wanted = {
        name: _checkpoint_name(name, prefix)
        for name in state
        if not (tied and name == "lm_head.weight")
    }
    # transformers 4.53 saved Gemma3nForCausalLM's `per_layer_model_projection` as
    # `per_layer_model.language_model_projection` (its key renaming was not anchored).
    canonical = {_unmangled(key, prefix): key for key in locations}
    missing = sorted(n for n, key in wanted.items() if key not in canonical)
    if missing:
        raise CheckpointError(
            f"{path}: the weights lack {len(missing)} tensor(s) config.json implies "
            f"({', '.join(missing[:4])}); the config and weights do not belong together"
        )
    used = set(wanted.values())
    text_keys = {n for n in canonical if n.startswith(prefix)}
    unexpected = sorted(
        n for n in text_keys - used if not any(part in n for part in _KV_ONLY)
    )  # KV-sharing layers' unused k/v weights are stored in Google's checkpoints: ignore them
    if unexpected:
        warnings.warn(
            f"{path}: ignoring {len(unexpected)} text-model tensor(s) the config does not use "
            f"({', '.join(unexpected[:4])})",
            stacklevel=3,
        )
    by_file: dict[Path, list[str]] = {}
    for name, key in wanted.items():
        by_file.setdefault(locations[canonical[key]], []).append(name)
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for name in names:
                    key = canonical[wanted[name]]
                    _copy_tensor(state[name], handle.get_slice(key), key, path)


def _unmangled(key: str, prefix: str) -> str:
    if prefix != _LANGUAGE_MODEL or not key.startswith(prefix):
        return key
    return prefix + key[len(prefix) :].replace(_LANGUAGE_MODEL.rstrip("."), "model")


def _copy_tensor(target: torch.Tensor, source: Any, key: str, path: Path) -> None:
    shape = list(source.get_shape())
    if shape != list(target.shape):
        raise CheckpointError(
            f"{path}: tensor {key} has shape {shape} but config.json implies "
            f"{list(target.shape)}; the config and weights do not belong together"
        )
    if target.dim() == 0 or target.numel() == 0:
        target.copy_(source[...])
        return
    row_bytes = max(1, target[0].numel() * target.element_size())
    rows = max(1, _COPY_CHUNK_BYTES // row_bytes)
    for start in range(0, shape[0], rows):
        target[start : start + rows].copy_(source[start : start + rows])


def _files_fingerprint(path: Path, shards: list[Path]) -> str:
    """Hash of the config, every shard's header and size, and samples of its data.

    Hashing all of E4B's ~16 GB would take minutes; headers pin the architecture and samples
    spread over every file tell fine-tunes apart.
    """
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for shard in shards:
        size = shard.stat().st_size
        digest.update(f"{shard.name}:{size}".encode())
        with shard.open("rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(min(header_len, 100_000_000)))
            for k in range(16):
                handle.seek(size * k // 16)
                digest.update(handle.read(4096))
    return digest.hexdigest()[:16]
