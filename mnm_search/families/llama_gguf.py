"""GGUF files for the dense Llama family: read (dequantized, Hugging Face names), write, and
run with llama.cpp to check a written file.

`read_gguf` turns a llama.cpp model file (any quantization the `gguf` package can dequantize)
into a transformers-style `config.json` dict and float32 tensors with transformers names, so the
family can load a GGUF as it loads a safetensors directory. `write_gguf` writes a sliced model
back, and `llama_cpp_logits` runs a written file with llama-cpp-python to verify it.

Per-layer FFN widths in llama.cpp (llama.cpp as vendored by llama-cpp-python 0.3.36):

- Every architecture's hyper-parameters are read by one loader that accepts
  `{arch}.feed_forward_length` either as one integer or as an array with one entry per layer
  (`src/llama-model.cpp:1395`, `get_key_or_arr`; an array of the wrong length is refused in
  `src/llama-model-loader.cpp:477`; INT32 and UINT32 element types are accepted,
  `src/llama-model-loader.cpp:365-370`). The same holds for `attention.head_count` and
  `attention.head_count_kv` (`src/llama-model.cpp:1396-1404`).
- The `llama` architecture then creates every layer's FFN tensors with ONE width:
  `LLAMA_LOAD_LOCALS` sets `n_ff = hparams.n_ff()` (`src/llama-model.h:871`), i.e.
  `n_ff(il = 0)` (`src/llama-hparams.h:409`, `src/llama-hparams.cpp:66`), and
  `src/models/llama.cpp:70-72` creates `ffn_gate/ffn_down/ffn_up` of shape `{n_embd, n_ff}` for
  all layers. A per-layer array therefore loads only if all entries equal layer 0's; a
  mixed-width `llama` file fails with a tensor shape error, and a width of 0 is not possible
  (`ffn_norm` and the FFN tensors are required, `src/models/llama.cpp:59,70-72`).
- The `deci` architecture (DeciLM / Llama-3.1-Nemotron, converted by
  `conversion/deci.py`, which writes the per-layer array with
  `add_feed_forward_length(self._ffn_dims)`) reads `hparams.n_ff(i)` per layer
  (`src/models/deci.cpp:32`), creates `ffn_norm` only if `n_ff > 0`
  (`src/models/deci.cpp:50-52`) and the FFN tensors with that layer's width only if
  `n_ff > 0` (`src/models/deci.cpp:61-65`). Otherwise its graph is the Llama one (RMSNorm,
  GQA, rope type NORM like `llama`, `src/llama-model.cpp:3051-3055`, SiLU-gated MLP;
  `conversion/deci.py` permutes q/k rows exactly as `conversion/llama.py`). Measured: mixed
  non-zero widths match a float64 torch reference to ~3e-6 in the logits.
- BUT `n_ff == 0` does not mean "attention only" there: the graph `continue`s
  (`src/models/deci.cpp:146-149`) before `inpL = cur` (`src/models/deci.cpp:175`), so the
  layer's attention output is discarded too and the whole layer is the identity (measured:
  llama.cpp's logits equal a reference without that layer to ~2e-6, and differ by ~5 from one
  that keeps its attention). It is meant for Nemotron's dummy layers. If the LAST layer has
  `n_ff == 0`, the unused `out_ids` input has no buffer and llama.cpp aborts the process
  (`GGML_ASSERT(buffer)`, `ggml/src/ggml-backend.cpp:205`).

So `write_gguf` never writes `n_ff == 0`: a layer without FFN gets an all-zero FFN of width
`ZERO_FFN_WIDTH` (it adds exactly 0, so attention and residual are kept), and `read_gguf`
reads an all-zero FFN back as width 0. Equal widths are written as `llama` (every llama.cpp
build and most GGUF tools know it), anything else as `deci`. `read_gguf` reads a third-party
`deci` layer with `n_ff == 0` as transformers' DeciLM does (attention kept, no FFN), which is
not what llama.cpp computes for it. A layer with `n_head_kv == 0` means "linear attention" in
`deci` (`src/models/deci.cpp:36`), so head counts are always written as plain integers here and
per-layer head-count arrays are refused on read unless uniform.

Q/K rows: llama.cpp's converters permute the rows of `q_proj` and `k_proj` from the
transformers "rotate_half" layout to llama.cpp's interleaved-pairs RoPE layout
(`LlamaModel.permute` in `conversion/llama.py`). `read_gguf` undoes it (as transformers'
`reverse_permute_weights` does) and `write_gguf` applies it.

A file without a tokenizer: `tokenizer.ggml.model = "none"` makes llama.cpp create
`{arch}.vocab_size` dummy tokens (`src/llama-vocab.cpp:1949-1969`); such a file loads and
evaluates token ids, but cannot tokenize or detokenize text.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnm_search._files import (
    _file_mode,
    _temp_prefix,
    describe_os_error,
    remove_stale_temporaries,
)
from mnm_search.errors import CheckpointError, ExportError

if TYPE_CHECKING:
    import numpy as np
    import torch

READ_ARCHITECTURES = ("llama", "deci")
WRITE_DTYPES = ("f32", "f16")
# The FFN width written for a layer without FFN (all weights zero): one 32-value block, so
# llama-quantize can still quantize the file (k-quants fall back to a 32-block type).
ZERO_FFN_WIDTH = 32

# GGUF tensor name (layer part) -> transformers name (layer part); ffn_* only when n_ff > 0.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_FFN_PARTS = ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_ROPE_FREQS = "rope_freqs.weight"
# Llama 3.x rope scaling as Meta published it; the factor is read from the file (8 for 3.1,
# 32 for 3.2) and the whole vector is checked against these, so other values are refused.
_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
_REQUANTIZE = (
    "re-quantize the model to Q8_0 or F16 with llama.cpp's llama-quantize, or give the "
    "safetensors directory of the model instead"
)


@dataclass
class GGUFCheckpoint:
    """A Llama-architecture GGUF file as transformers would see it (see `read_gguf`)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer_fields: dict[str, Any]
    architecture: str
    # `general.file_type` by name (e.g. "MOSTLY_Q4_1"), None when the file does not say
    file_type: str | None = None
    # how many tensors of each GGML type the file holds, e.g. {"Q4_1": 210, "F32": 61}
    tensor_types: dict[str, int] = field(default_factory=dict)


def _import_gguf(error: type[CheckpointError] | type[ExportError], path: Path) -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise error(
            f"{path}: GGUF files need the `gguf` package, which is not installed: pip install gguf"
        ) from exc
    return gguf


def _f32(value: float) -> float:
    # GGUF stores float32: give back the shortest decimal that round-trips (1e-05, not
    # 9.999999747378752e-06), i.e. what the writer most likely meant.
    import numpy as np

    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


# ---------------------------------------------------------------------------------------------
# Q/K row permutation (llama.cpp's interleaved RoPE layout <-> transformers' rotate_half layout)


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Transformers layout -> llama.cpp layout (`LlamaModel.permute` in llama.cpp)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
        .contiguous()
    )


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp layout -> transformers layout (the inverse of `permute_qk`)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
        .contiguous()
    )


# ---------------------------------------------------------------------------------------------
# Reading


def read_gguf(path: Path, *, weights: bool = True) -> GGUFCheckpoint:
    """Read a `llama` or `deci` GGUF file: its config (transformers `config.json` keys),
    its weights dequantized to float32 with transformers names, and its tokenizer metadata.

    Tensors are dequantized one at a time, so the peak memory is the float32 model plus one
    tensor. A layer whose FFN is all zeros (how `write_gguf` stores a layer without FFN) or
    a `deci` layer with `n_ff == 0` is read as width 0: no FFN tensors, no
    `post_attention_layernorm`, 0 in `config["intermediate_size"]` (then a per-layer list).
    Raises `CheckpointError` for anything that is not such a file. `weights=False` reads the
    metadata only (`mnm info`: instant, no tensors; an all-zero FFN then keeps its stored
    width, since telling it apart needs the data).
    """
    path = Path(path)
    gguf = _import_gguf(CheckpointError, path)
    reader = _open_reader(gguf, path)

    def value(key: str, default: Any = None) -> Any:
        found = reader.fields.get(key)
        return default if found is None else found.contents()

    arch = value("general.architecture")
    if arch not in READ_ARCHITECTURES:
        held = f"a `{arch}` model" if arch else "no `general.architecture`"
        raise CheckpointError(
            f"{path} holds {held}; mnm reads GGUF files of the `llama` architecture (Llama, "
            "SmolLM, Mistral...) and `deci` (per-layer FFN widths); give such a file or a "
            "transformers checkpoint directory"
        )
    raw = {t.name: t for t in reader.tensors}
    config = _read_config(path, arch, value, raw, gguf)
    _check_tensor_names(path, config, raw)
    tensor_types = dict(Counter(t.tensor_type.name for t in reader.tensors))
    _check_dequantizable(path, gguf, raw)
    tensors = {}
    if weights:
        tensors = _read_tensors(path, gguf, raw, config)
        _drop_zero_ffns(tensors, config)
    file_type = value("general.file_type")
    try:
        file_type_name = None if file_type is None else gguf.LlamaFileType(file_type).name
    except ValueError:
        file_type_name = str(file_type)
    tokenizer_fields = {
        key: found.contents()
        for key, found in reader.fields.items()
        if key.startswith("tokenizer.")
    }
    return GGUFCheckpoint(
        config=config,
        tensors=tensors,
        tokenizer_fields=tokenizer_fields,
        architecture=arch,
        file_type=file_type_name,
        tensor_types=tensor_types,
    )


def _reader_class(gguf: Any) -> Any:
    """`gguf.GGUFReader`, made ~3x faster to open where its private `_get` is as expected.

    The reader slices its `np.memmap` once per metadata item, and every memmap slice pays
    for memmap's Python-level `__array_finalize__`: opening SmolLM2 (49k tokens, 49k merges)
    takes 6 s, of which 4 s is that overhead. Slicing a plain ndarray view of the same mapping
    gives the same bytes (tensor data stay memory-mapped) in 2 s. Any other `_get` signature
    (a future gguf) gets the stock reader.
    """
    import inspect

    import numpy as np

    stock = gguf.GGUFReader
    try:
        params = list(inspect.signature(stock._get).parameters)
    except (AttributeError, TypeError, ValueError):
        return stock
    if params != ["self", "offset", "dtype", "count", "override_order"]:
        return stock

    class _Reader(stock):  # type: ignore[misc, valid-type]
        def _get(
            self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None
        ) -> Any:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
            count = int(count)
            end = offset + np.dtype(dtype).itemsize * count
            array = plain[offset:end].view(dtype=dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return array.view(array.dtype.newbyteorder(order))

    return _Reader


def _open_reader(gguf: Any, path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
        if magic != b"GGUF":
            raise CheckpointError(
                f"{path} is not a GGUF file (it does not start with `GGUF`): give a .gguf model "
                "file, or a transformers checkpoint directory"
            )
        return _reader_class(gguf)(path)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} does not exist: check the path") from exc
    except IsADirectoryError as exc:
        raise CheckpointError(f"{path} is a directory, not a GGUF file") from exc
    except OSError as exc:
        raise CheckpointError(describe_os_error(exc, path)) from exc
    except CheckpointError:
        raise
    except Exception as exc:  # the reader fails in many ways on bad bytes (struct, numpy, ...)
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); it may be "
            "truncated or of another format: give a complete .gguf file (download it again)"
        ) from exc


def _read_config(
    path: Path, arch: str, value: Any, raw: Mapping[str, Any], gguf: Any
) -> dict[str, Any]:
    def required(key: str) -> Any:
        found = value(f"{arch}.{key}")
        if found is None:
            raise CheckpointError(
                f"{path} lacks the metadata key `{arch}.{key}`; the file is incomplete: "
                "convert the model again with llama.cpp's convert_hf_to_gguf.py"
            )
        return found

    n_layer = int(required("block_count"))
    hidden = int(required("embedding_length"))
    heads = _uniform(path, arch, "attention.head_count", required("attention.head_count"), n_layer)
    kv_value = value(f"{arch}.attention.head_count_kv", heads)
    kv_heads = _uniform(path, arch, "attention.head_count_kv", kv_value, n_layer)
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise CheckpointError(
            f"{path}: {heads} attention heads with {kv_heads} key/value heads is not a "
            "Llama attention layout (attention-free or linear-attention layers, as in "
            "Nemotron, are not supported)"
        )
    head_dim = int(value(f"{arch}.attention.key_length", hidden // heads))
    value_dim = int(value(f"{arch}.attention.value_length", head_dim))
    rope_dim = int(value(f"{arch}.rope.dimension_count", head_dim))
    if value_dim != head_dim or rope_dim != head_dim:
        raise CheckpointError(
            f"{path}: key length {head_dim}, value length {value_dim} and rope dimension "
            f"{rope_dim} differ; mnm's Llama family needs them equal (as llama.cpp's llama "
            "loader does)"
        )
    ff = required("feed_forward_length")
    if isinstance(ff, list):
        if len(ff) != n_layer:
            raise CheckpointError(
                f"{path}: `{arch}.feed_forward_length` has {len(ff)} entries for {n_layer} "
                "layers; the file is corrupt: convert the model again"
            )
        intermediate: int | list[int] = [int(v) for v in ff]
    else:
        intermediate = int(ff)
    embd = raw.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(f"{path} has no `token_embd.weight` tensor; the file is incomplete")
    vocab = int(embd.shape[-1])  # GGUF shapes are reversed: {n_embd, n_vocab}
    eps = value(f"{arch}.attention.layer_norm_rms_epsilon")
    if eps is None:
        raise CheckpointError(
            f"{path} lacks `{arch}.attention.layer_norm_rms_epsilon`; it is not a Llama "
            "(RMSNorm) model file"
        )
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": n_layer,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rope_theta": _f32(value(f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": _f32(eps),
        "max_position_embeddings": int(value(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in raw,
        "bos_token_id": value("tokenizer.ggml.bos_token_id"),
        "eos_token_id": value("tokenizer.ggml.eos_token_id"),
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
    scaling = _read_rope_scaling(path, arch, value, raw, gguf, head_dim, config["rope_theta"])
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _uniform(path: Path, arch: str, key: str, found: Any, n_layer: int) -> int:
    if not isinstance(found, list):
        return int(found)
    if len(found) != n_layer or len(set(found)) != 1:
        raise CheckpointError(
            f"{path}: `{arch}.{key}` differs between layers ({found}); mnm's Llama family "
            "needs the same attention in every layer"
        )
    return int(found[0])


def _read_rope_scaling(
    path: Path,
    arch: str,
    value: Any,
    raw: Mapping[str, Any],
    gguf: Any,
    head_dim: int,
    theta: float,
) -> dict[str, Any] | None:
    kind = value(f"{arch}.rope.scaling.type")
    factor = value(f"{arch}.rope.scaling.factor", value(f"{arch}.rope.scale_linear"))
    scaled = factor not in (None, 0.0, 1.0)
    if kind == "linear" or (kind is None and scaled):
        return {"rope_type": "linear", "factor": _f32(factor)} if scaled else None
    if kind not in (None, "none"):
        raise CheckpointError(
            f"{path} uses `{kind}` rope scaling, which mnm's Llama family does not support "
            "(it supports none, linear and Llama 3 rope scaling)"
        )
    if _ROPE_FREQS not in raw:
        return None
    # Llama 3.x: llama.cpp keeps the per-frequency factors as a tensor; transformers wants the
    # parameters. Recompute the factors from Meta's published parameters and compare.
    freqs = gguf.quants.dequantize(raw[_ROPE_FREQS].data, raw[_ROPE_FREQS].tensor_type)
    stored = [float(v) for v in freqs.reshape(-1)]
    scaling = {"rope_type": "llama3", "factor": _f32(max(stored)), **_LLAMA3_ROPE}
    expected = llama3_rope_factors(scaling, theta, head_dim)
    if len(expected) != len(stored) or any(
        not math.isclose(a, b, rel_tol=1e-4) for a, b in zip(expected, stored)
    ):
        raise CheckpointError(
            f"{path} has a `{_ROPE_FREQS}` tensor that is not Llama 3 rope scaling with "
            f"{_LLAMA3_ROPE}; mnm cannot express it as transformers `rope_scaling`: give the "
            "model's transformers checkpoint directory instead"
        )
    return scaling


def llama3_rope_factors(scaling: Mapping[str, Any], theta: float, head_dim: int) -> list[float]:
    """The per-frequency factors llama.cpp stores as `rope_freqs.weight` for Llama 3 rope
    scaling (`DeciModel.generate_extra_tensors` / `LlamaModel` in llama.cpp's converter)."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old / low, old / high
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / theta ** (i / head_dim))
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def _widths(config: Mapping[str, Any]) -> list[int]:
    size = config["intermediate_size"]
    n_layer = int(config["num_hidden_layers"])
    return [int(v) for v in size] if isinstance(size, list) else [int(size)] * n_layer


def _hf_shapes(config: Mapping[str, Any], widths: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The transformers name and shape of every tensor a model with these widths has."""
    hidden = int(config["hidden_size"])
    vocab = int(config["vocab_size"])
    head_dim = int(config.get("head_dim") or hidden // int(config["num_attention_heads"]))
    q_rows = int(config["num_attention_heads"]) * head_dim
    kv_rows = int(config["num_key_value_heads"]) * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    for i, width in enumerate(widths):
        prefix = f"model.layers.{i}."
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        shapes[prefix + "self_attn.q_proj.weight"] = (q_rows, hidden)
        shapes[prefix + "self_attn.k_proj.weight"] = (kv_rows, hidden)
        shapes[prefix + "self_attn.v_proj.weight"] = (kv_rows, hidden)
        shapes[prefix + "self_attn.o_proj.weight"] = (hidden, q_rows)
        if width > 0:
            shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
            shapes[prefix + "mlp.gate_proj.weight"] = (width, hidden)
            shapes[prefix + "mlp.up_proj.weight"] = (width, hidden)
            shapes[prefix + "mlp.down_proj.weight"] = (hidden, width)
    return shapes


def _hf_name(gguf_name: str) -> str | None:
    """Transformers name of a GGUF tensor name, None for names this family does not know."""
    stem = gguf_name.removesuffix(".weight")
    if stem in _GLOBAL_NAMES and gguf_name.endswith(".weight"):
        return _GLOBAL_NAMES[stem] + ".weight"
    match = _BLOCK.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"


def _gguf_name(hf_name: str) -> str:
    for gguf_stem, hf_stem in _GLOBAL_NAMES.items():
        if hf_name == hf_stem + ".weight":
            return gguf_stem + ".weight"
    _, _, index, rest = hf_name.split(".", 3)
    part = {v: k for k, v in _LAYER_NAMES.items()}[rest.removesuffix(".weight")]
    return f"blk.{index}.{part}.weight"


def _check_tensor_names(path: Path, config: Mapping[str, Any], raw: Mapping[str, Any]) -> None:
    expected = _hf_shapes(config, _widths(config))
    found = {}
    for name, tensor in raw.items():
        if name == _ROPE_FREQS:
            continue
        hf = _hf_name(name)
        if hf is None or hf not in expected:
            raise CheckpointError(
                f"{path} holds a tensor `{name}` that a Llama model with the file's metadata "
                "does not have (biases, experts or extra layers are not supported); give a "
                "plain Llama GGUF file"
            )
        found[hf] = tensor
    missing = [name for name in expected if name not in found]
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} tensor(s) its metadata calls for, e.g. "
            f"`{_gguf_name(missing[0])}`; the file is incomplete: convert the model again"
        )
    for hf, tensor in found.items():
        shape = tuple(int(v) for v in reversed(tensor.shape))
        if shape != expected[hf]:
            raise CheckpointError(
                f"{path}: tensor `{tensor.name}` has shape {list(shape)}, but the file's "
                f"metadata calls for {list(expected[hf])}; the file is corrupt"
            )


def _check_dequantizable(path: Path, gguf: Any, raw: Mapping[str, Any]) -> None:
    # Fail before dequantizing gigabytes: try each tensor type once, on one row.
    tried: set[Any] = set()
    for name, tensor in raw.items():
        if tensor.tensor_type in tried:
            continue
        try:
            gguf.quants.dequantize(tensor.data[:1], tensor.tensor_type)
        except NotImplementedError as exc:
            raise CheckpointError(
                f"{path}: tensor `{name}` is stored as {tensor.tensor_type.name}, which the "
                f"gguf package cannot dequantize; {_REQUANTIZE}"
            ) from exc
        tried.add(tensor.tensor_type)


def _read_tensors(
    path: Path, gguf: Any, raw: Mapping[str, Any], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    import numpy as np
    import torch

    heads = int(config["num_attention_heads"])
    kv_heads = int(config["num_key_value_heads"])
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        hf = _hf_name(name)
        if hf is None:  # rope_freqs: represented by config["rope_scaling"]
            continue
        shape = tuple(int(v) for v in reversed(tensor.shape))
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            array = np.asarray(array, dtype=np.float32).reshape(shape)
        except (ValueError, IndexError) as exc:  # the data ends before the tensor does
            raise CheckpointError(
                f"{path}: tensor `{name}` cannot be read ({exc}); the file is truncated or "
                "corrupt: download or convert it again"
            ) from exc
        if np.may_share_memory(array, tensor.data) or not array.flags.writeable:
            array = array.copy()  # F32 tensors are views of the memory-mapped file
        weight = torch.from_numpy(array)
        if hf.endswith("q_proj.weight"):
            weight = unpermute_qk(weight, heads)
        elif hf.endswith("k_proj.weight"):
            weight = unpermute_qk(weight, kv_heads)
        tensors[hf] = weight
    return tensors


def _drop_zero_ffns(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """A layer whose down projection is all zeros has no FFN (its output is exactly 0 for any
    input): drop its FFN tensors and record width 0, the inverse of `write_gguf`'s placeholder
    for a layer without FFN."""
    widths = _widths(config)
    for i, width in enumerate(widths):
        down = tensors.get(f"model.layers.{i}.mlp.down_proj.weight")
        if width == 0 or down is None or bool(down.any()):
            continue
        for part in _FFN_PARTS:
            del tensors[f"model.layers.{i}.{_LAYER_NAMES[part]}.weight"]
        widths[i] = 0
    if widths != _widths(config):
        config["intermediate_size"] = widths


# ---------------------------------------------------------------------------------------------
# Writing


def write_gguf(
    path: Path,
    *,
    config: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    intermediate_sizes: Sequence[int],
    tokenizer_fields: dict[str, Any] | None,
    tokenizer_dir: Path | None,
    name: str,
    dtype: str = "f32",
) -> dict[str, Any]:
    """Write a GGUF file llama.cpp loads from transformers-named, already sliced TENSORS.

    Layer i's gate/up projections have `intermediate_sizes[i]` rows and its down projection
    that many columns; 0 means the layer has no FFN (its FFN tensors and
    `post_attention_layernorm` may be absent or empty; the file gets an all-zero FFN of width
    `ZERO_FFN_WIDTH`, see the module docstring). Equal widths give architecture `llama`,
    anything else `deci`.
    CONFIG supplies the rest (transformers `config.json` keys; `gguf_pre` names llama.cpp's
    pre-tokenizer for a converted tokenizer). The tokenizer comes from TOKENIZER_FIELDS
    (copied from a GGUF file by `read_gguf`), else from TOKENIZER_DIR's `tokenizer.json`
    (byte-level BPE), else the file has none (token ids only). Matrices are written in DTYPE
    ("f32" or "f16"), norms in f32. The file is written beside PATH and renamed into place.

    Returns `{"architecture", "tensor_count", "bytes"}`.
    """
    path = Path(path)
    gguf = _import_gguf(ExportError, path)
    if dtype not in WRITE_DTYPES:
        raise ExportError(f"GGUF tensor type {dtype!r} is not supported: use one of {WRITE_DTYPES}")
    widths = [int(w) for w in intermediate_sizes]
    n_layer = int(config["num_hidden_layers"])
    if len(widths) != n_layer or any(w < 0 for w in widths):
        raise ExportError(
            f"writing {path}: {len(widths)} FFN widths {widths} for a model with {n_layer} "
            "layers; give one width >= 0 per layer"
        )
    # llama.cpp cannot run a layer without FFN (module docstring): such a layer gets a
    # zero FFN, which adds exactly 0, and `read_gguf` reads it back as width 0.
    written = [w if w > 0 else ZERO_FFN_WIDTH for w in widths]
    uniform = len(set(written)) == 1
    arch = "llama" if uniform else "deci"
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ExportError(
            f"writing {path}: the model has attention or MLP biases, which mnm's GGUF writer "
            "does not write; export it as safetensors instead"
        )
    # A tied model's `lm_head.weight` (transformers lists it in state_dict) is the embedding.
    tied = bool(config.get("tie_word_embeddings", "lm_head.weight" not in tensors))
    if tied:
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    layout = {
        **config,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "tie_word_embeddings": tied,
    }
    vocab = int(config["vocab_size"])
    fields = _tokenizer_fields(path, config, tokenizer_fields, tokenizer_dir, vocab, gguf)
    shapes = _hf_shapes(layout, widths)
    _check_write_tensors(path, tensors, shapes, widths)
    theta, scaling = _rope(config)

    import numpy as np

    def stored(shape: tuple[int, ...]) -> np.dtype[Any]:
        return np.dtype(np.float16 if len(shape) == 2 and dtype == "f16" else np.float32)

    # (GGUF name, stored dtype, shape, transformers name or None for a zero-FFN placeholder)
    plan: list[tuple[str, np.dtype[Any], tuple[int, ...], str | None]] = [
        (_gguf_name(hf), stored(shape), shape, hf) for hf, shape in shapes.items()
    ]
    for i, width in enumerate(widths):
        if width == 0:
            zero = {
                "ffn_norm": (hidden,),
                "ffn_gate": (ZERO_FFN_WIDTH, hidden),
                "ffn_up": (ZERO_FFN_WIDTH, hidden),
                "ffn_down": (hidden, ZERO_FFN_WIDTH),
            }
            plan += [
                (f"blk.{i}.{part}.weight", stored(shape), shape, None)
                for part, shape in zero.items()
            ]
    rope_freqs = None
    if scaling is not None and scaling.get("rope_type") == "llama3":
        rope_freqs = np.asarray(llama3_rope_factors(scaling, theta, head_dim), dtype=np.float32)

    # Written beside PATH and renamed into place: a reader never sees half a file, and a
    # killed run's temporary is removed by the next write (mnm_search._files conventions).
    writer = None
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(path, "tmp"), dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name)
        writer.add_file_type(
            gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
        )
        writer.add_block_count(n_layer)
        writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(written[0] if uniform else written)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        if head_dim != hidden // heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        if scaling is not None and scaling.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(vocab)
        for key, field_value in fields.items():
            _add_field(writer, gguf, key, field_value)
        for gguf_name, np_dtype, shape, _ in plan:
            count = math.prod(shape)
            writer.add_tensor_info(gguf_name, shape, np_dtype, count * np_dtype.itemsize)
        if rope_freqs is not None:
            writer.add_tensor_info(
                _ROPE_FREQS, rope_freqs.shape, rope_freqs.dtype, rope_freqs.nbytes
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # One tensor converted at a time: the peak is the caller's model plus one tensor.
        for gguf_name, np_dtype, shape, hf in plan:
            if hf is None:  # the norm of a zero FFN is irrelevant; ones keep it harmless
                fill = np.ones if gguf_name.endswith("ffn_norm.weight") else np.zeros
                writer.write_tensor_data(fill(shape, dtype=np_dtype))
                continue
            weight = tensors[hf].detach().to(device="cpu")
            if hf.endswith("q_proj.weight"):
                weight = permute_qk(weight, heads)
            elif hf.endswith("k_proj.weight"):
                weight = permute_qk(weight, kv_heads)
            writer.write_tensor_data(weight.float().numpy().astype(np_dtype, copy=False))
        if rope_freqs is not None:
            writer.write_tensor_data(rope_freqs)
        writer.close()
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        raise ExportError(f"{describe_os_error(exc, path)}; nothing was written") from exc
    finally:
        if writer is not None:
            writer.close()  # idempotent; closes the file when a write failed half-way
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return {
        "architecture": arch,
        "tensor_count": len(plan) + (rope_freqs is not None),
        "bytes": path.stat().st_size,
    }


def _check_write_tensors(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    widths: Sequence[int],
) -> None:
    for hf, shape in shapes.items():
        tensor = tensors.get(hf)
        if tensor is None:
            raise ExportError(f"writing {path}: the model has no tensor `{hf}`")
        if tuple(tensor.shape) != shape:
            raise ExportError(
                f"writing {path}: tensor `{hf}` has shape {list(tensor.shape)}, expected "
                f"{list(shape)} (FFN widths {list(widths)}); pass the tensors sliced to the "
                "widths"
            )
    for hf, tensor in tensors.items():
        if hf in shapes:
            continue
        # An absent FFN may still be passed, empty (sliced to width 0) or whole; both are
        # dropped. Anything else would be silently lost, so refuse it.
        match = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf)
        absent_ffn = (
            match is not None
            and int(match.group(1)) < len(widths)
            and widths[int(match.group(1))] == 0
            and match.group(2) in {f"{_LAYER_NAMES[p]}.weight" for p in _FFN_PARTS}
        )
        if not absent_ffn:
            raise ExportError(
                f"writing {path}: tensor `{hf}` (shape {list(tensor.shape)}) has no place in a "
                "Llama GGUF file; the model is not a plain Llama"
            )


def _rope(config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope theta and scaling from a transformers 4 (`rope_theta`, `rope_scaling`) or 5
    (`rope_parameters`) config."""
    params = dict(config.get("rope_parameters") or {})
    theta = float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise ExportError(
            f"rope scaling `{kind}` cannot be written to GGUF by mnm (it writes none, linear "
            "and llama3); export as safetensors instead"
        )
    return theta, {**scaling, "rope_type": kind}


# Which GGUF value type each tokenizer value gets: llama.cpp reads token ids as UINT32,
# `token_type` as INT32 and `scores` as FLOAT32 (llama-vocab.cpp), as its converter writes them.
def _value_type(gguf: Any, value: Any) -> Any:
    kinds = gguf.GGUFValueType
    if isinstance(value, bool):
        return kinds.BOOL
    if isinstance(value, int):
        return kinds.UINT32 if value >= 0 else kinds.INT32
    if isinstance(value, float):
        return kinds.FLOAT32
    if isinstance(value, str):
        return kinds.STRING
    raise TypeError(f"unsupported GGUF value {value!r}")


def _add_field(writer: Any, gguf: Any, key: str, value: Any) -> None:
    kinds = gguf.GGUFValueType
    if isinstance(value, (list, tuple)):
        if not value:
            return
        first = value[0]
        if isinstance(first, bool):
            sub = kinds.BOOL
        elif isinstance(first, int):
            sub = kinds.INT32
        else:
            sub = _value_type(gguf, first)
        writer.add_key_value(key, list(value), kinds.ARRAY, sub_type=sub)
    else:
        writer.add_key_value(key, value, _value_type(gguf, value))


def _tokenizer_fields(
    path: Path,
    config: Mapping[str, Any],
    fields: Mapping[str, Any] | None,
    tokenizer_dir: Path | None,
    vocab: int,
    gguf: Any,
) -> dict[str, Any]:
    if fields:
        tokens = fields.get("tokenizer.ggml.tokens")
        if tokens is not None and len(tokens) != vocab:
            raise ExportError(
                f"writing {path}: the tokenizer has {len(tokens)} tokens but the model "
                f"{vocab}; give the tokenizer of the model being exported"
            )
        return dict(fields)
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        return hf_tokenizer_fields(Path(tokenizer_dir), config, vocab)
    # llama.cpp loads a file without a tokenizer as "none" with `{arch}.vocab_size` tokens
    return {"tokenizer.ggml.model": "none"}


def hf_tokenizer_fields(
    tokenizer_dir: Path, config: Mapping[str, Any], vocab_size: int
) -> dict[str, Any]:
    """GGUF tokenizer metadata for a transformers byte-level BPE `tokenizer.json` (GPT-2,
    Llama 3, SmolLM, Qwen style), as llama.cpp's converter writes it: tokens in id order
    (added tokens included, missing ids as unused `[PAD<id>]`), their types, merges, special
    token ids and flags and the chat template from `tokenizer_config.json`."""
    gguf = _import_gguf(ExportError, tokenizer_dir)
    source = tokenizer_dir / "tokenizer.json"
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ExportError(describe_os_error(exc, source)) from exc
    except ValueError as exc:
        raise ExportError(
            f"{source} is not valid JSON ({exc}); give the model's tokenizer"
        ) from exc
    model = data.get("model") or {}
    described = json.dumps(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("byte_fallback") or "Metaspace" in described:
        raise ExportError(
            f"{source} is not a byte-level BPE tokenizer (model {model.get('type')!r}); mnm "
            "converts only those to GGUF: export from a GGUF source model (its tokenizer is "
            "copied) or convert the exported safetensors with llama.cpp's convert_hf_to_gguf.py"
        )
    types = gguf.TokenType
    tokens: list[str | None] = [None] * vocab_size
    token_types = [int(types.NORMAL)] * vocab_size
    entries = [(int(i), str(t), None) for t, i in model.get("vocab", {}).items()]
    entries += [
        (int(a["id"]), str(a["content"]), bool(a.get("special")))
        for a in data.get("added_tokens", [])
    ]
    for index, text, special in entries:
        if not 0 <= index < vocab_size:
            raise ExportError(
                f"{source} has token {text!r} with id {index}, outside the model's vocabulary "
                f"of {vocab_size}; give the model's own tokenizer"
            )
        tokens[index] = text
        if special is not None:
            token_types[index] = int(types.CONTROL if special else types.USER_DEFINED)
    for index, text in enumerate(tokens):
        if text is None:  # the embedding has rows the tokenizer never produces
            tokens[index] = f"[PAD{index}]"
            token_types[index] = int(types.UNUSED)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    # SpecialVocab knows the many shapes of tokenizer_config.json; let it write into a scratch
    # writer and keep what it wrote.
    scratch = gguf.GGUFWriter(None, "llama")
    special.add_to_gguf(scratch, quiet=True)
    # llama.cpp's pre-tokenizer is named, not described: "gpt-2" is exactly a plain
    # ByteLevel pre-tokenizer's GPT-2 regex; anything else gets llama.cpp's generic "default"
    # unless the caller knows better (config["gguf_pre"], e.g. "smollm", "llama3").
    pre_tokenizer = data.get("pre_tokenizer") or {}
    plain = pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True)
    fields: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": str(config.get("gguf_pre") or ("gpt-2" if plain else "default")),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": token_types,
    }
    fields.update(
        {
            key: item.value
            for key, item in scratch.kv_data[0].items()
            if key.startswith("tokenizer.")
        }
    )
    for kind in ("bos", "eos"):
        key = f"tokenizer.ggml.{kind}_token_id"
        fallback = config.get(f"{kind}_token_id")
        if key not in fields and isinstance(fallback, int) and 0 <= fallback < vocab_size:
            fields[key] = fallback
    return fields


# ---------------------------------------------------------------------------------------------
# Running with llama.cpp


def llama_cpp_logits(path: Path, token_ids: Sequence[int]) -> np.ndarray | None:
    """llama.cpp's float32 logits [len(token_ids), vocab] for TOKEN_IDS evaluated from position
    0, or None when llama-cpp-python is not installed. `ExportError` (with llama.cpp's own
    reason) when llama.cpp cannot load or run the file.

    The KV cache is float32 (llama.cpp's default is f16) so that the comparison with a
    float32 reference measures the file, not the cache's rounding.
    """
    try:
        import llama_cpp
    except ImportError:
        return None
    import numpy as np

    path = Path(path)
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError("llama_cpp_logits needs at least one token id")
    _refuse_abort(path)
    n_ctx = max(64, len(ids))
    log = io.StringIO()
    try:
        # verbose=True routes llama.cpp's log through Python's sys.stderr (verbose=False sends
        # it to /dev/null), so the reason for a refusal can be quoted.
        with contextlib.redirect_stderr(log):
            model = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                n_threads=2,
                logits_all=True,
                vocab_only=False,
                type_k=llama_cpp.GGML_TYPE_F32,
                type_v=llama_cpp.GGML_TYPE_F32,
                verbose=True,
            )
    except (ValueError, RuntimeError) as exc:
        raise ExportError(
            f"llama.cpp cannot load {path}: {_llama_cpp_reason(log.getvalue()) or exc}"
        ) from exc
    try:
        vocab = model.n_vocab()
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside {path}'s vocabulary of {vocab}")
        with contextlib.redirect_stderr(log):
            try:
                model.eval(ids)
            except RuntimeError as exc:
                reason = _llama_cpp_reason(log.getvalue()) or exc
                raise ExportError(f"llama.cpp cannot evaluate {path}: {reason}") from exc
            return np.array(model.scores[: len(ids)], dtype=np.float32, copy=True)
    finally:
        with contextlib.redirect_stderr(log):  # freeing logs too
            model.close()


def _refuse_abort(path: Path) -> None:
    """Refuse a file that would abort the whole process inside llama.cpp (not an exception):
    a `deci` model whose LAST layer has no FFN. Its graph then never uses the `out_ids` input,
    which has no buffer, and `llama_decode` dies on `GGML_ASSERT(buffer)`
    (ggml/src/ggml-backend.cpp:205; seen with llama-cpp-python 0.3.36). `write_gguf` never
    writes such a file; this guards third-party ones."""
    try:
        import gguf

        reader = _reader_class(gguf)(path)
    except Exception:  # unreadable here: let llama.cpp give its own reason
        return
    field_ = reader.fields.get("deci.feed_forward_length")
    arch = reader.fields.get("general.architecture")
    if arch is None or arch.contents() != "deci" or field_ is None:
        return
    widths = field_.contents()
    if isinstance(widths, list) and widths and widths[-1] == 0:
        raise ExportError(
            f"llama.cpp cannot run {path}: its last layer has no FFN (`deci.feed_forward_length` "
            "ends in 0), which aborts llama.cpp; write the file with mnm (it gives such a layer "
            "a zero FFN) or give the last layer an FFN"
        )


def _llama_cpp_reason(log: str) -> str:
    """The error lines of llama.cpp's log (e.g. `llama_model_load: error loading model:
    check_tensor_dims: tensor 'blk.1.ffn_gate.weight' has wrong shape...`)."""
    lines = [
        line.strip()
        for line in log.splitlines()
        if "error" in line.lower() or "failed" in line.lower()
    ]
    return " | ".join(dict.fromkeys(lines))[:1000]
