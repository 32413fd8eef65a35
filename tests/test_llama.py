"""The Llama-architecture family: equal to transformers, widths, export, matformerize, decoding.

Tiny random Llama/Qwen2/Mistral checkpoints come from `llama_models` (nothing is
downloaded); the contract suite (test_family_contract.py) runs the family through the
checks every family shares, this file the Llama-specific ones.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from llama_models import (
    LLAMA3_ROPE,
    english,
    hf_model,
    input_ids,
    save_tiny_llama,
)

from mnm_search import load_model
from mnm_search.data import builtin_split, bundled_validation_text, make_eval_set
from mnm_search.errors import CheckpointError, ConfigError, DataError, WidthsError
from mnm_search.evaluator import CachedEvaluator, evaluate_loss
from mnm_search.export import export_submodel
from mnm_search.families import load_family
from mnm_search.families.llama import (
    KVCache,
    LlamaFamily,
    LlamaSpec,
    rope_inv_freq,
)
from mnm_search.families.llama_nest import CRITERIA, DEFAULT_CRITERION, neuron_scores

MIXED = [16, 0, 64]  # stored 64 per layer, step 8


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tied tiny Llama with a tokenizer (read-only: tests that change it copy it)."""
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "dense")


@pytest.fixture(scope="module")
def family(llama_dir: Path) -> LlamaFamily:
    loaded = load_family(llama_dir)
    assert isinstance(loaded, LlamaFamily)
    return loaded


def _copy(source: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(source, tmp_path / name))


def _config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=0)


# ============================================================ 1. equal to transformers

HF_CASES: dict[str, dict[str, Any]] = {
    "llama-tied": {"tie": True},
    "llama-untied": {"tie": False},
    "llama-attention-bias": {"attention_bias": True, "tie": False},
    "qwen2": {"model_type": "qwen2", "tie": False},
    "mistral": {"model_type": "mistral", "tie": True},
    "llama3-rope": {"rope_scaling": LLAMA3_ROPE},
    "linear-rope": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_forward_and_param_count_equal_transformers(tmp_path: Path, case: str) -> None:
    path = save_tiny_llama(tmp_path / case, tokenizer=False, **HF_CASES[case])
    hf = hf_model(path)
    family = load_family(path)
    assert family.name == "llama" and family.spec.model_type == hf.config.model_type
    ids = input_ids(length=100)  # past original_max_position_embeddings of the llama3 case
    with torch.inference_mode():
        expected = hf(ids).logits
    _close(family.logits(ids), expected)
    assert family.param_count() == sum(p.numel() for p in hf.parameters())  # tied: once
    for widths in (MIXED, [8, 64, 0], [0, 0, 0], [24, 40, 56]):
        sliced = family.sliced_module(widths)
        assert family.param_count(widths) == sum(p.numel() for p in sliced.parameters()), widths
    if "rope_scaling" in HF_CASES[case]:  # the scaling is really in effect
        plain = LlamaSpec.from_config({**_config(path), "rope_parameters": {}}, where="x")
        assert plain.rope_scaling is None and family.spec.rope_scaling is not None
        assert not torch.allclose(rope_inv_freq(plain), rope_inv_freq(family.spec))


def test_transformers_4_rope_config_reads_the_same(tmp_path: Path) -> None:
    """Older transformers write `rope_scaling` and a top-level `rope_theta`; both spellings
    give the same model."""
    path = save_tiny_llama(tmp_path / "v5", tokenizer=False, rope_scaling=LLAMA3_ROPE)
    config = _config(path)
    rope = config.pop("rope_parameters")
    assert rope["rope_type"] == "llama3"
    old = {**config, "rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}
    spec_new = LlamaSpec.from_config(_config(path), where="new")
    spec_old = LlamaSpec.from_config(old, where="old")
    _close(rope_inv_freq(spec_old), rope_inv_freq(spec_new), atol=0)
    legacy = {**old, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert LlamaSpec.from_config(legacy, where="legacy").rope_scaling == {
        "type": "linear",
        "factor": 2.0,
    }


# ======================================================================== 2. widths


@pytest.mark.parametrize(
    ("spec", "widths"),
    [
        ("75%", [48, 48, 48]),
        ("64*3", [64, 64, 64]),
        ("32,0,64", [32, 0, 64]),
        ("32 0 64", [32, 0, 64]),
        ("8", [8, 8, 8]),
        ("50%,0,100%", [32, 0, 64]),
        ([32, 0, 64], [32, 0, 64]),
        (["50%", 8, "100%"], [32, 8, 64]),
        ("10%", [8, 8, 8]),  # 6.4 rounds to the nearest step, never to 0
        ("20%,0%,60%", [16, 0, 40]),
    ],
)
def test_parse_widths(family: LlamaFamily, spec: Any, widths: list[int]) -> None:
    assert family.parse_widths(spec) == widths
    assert family.parse_widths(family.format_widths(widths)) == widths


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("12,0,64", r"layer 0: width 12 is not a multiple of the step 8; use 8 or 16 .*--step"),
        ("8,4,8", r"layer 1: width 4 is not a multiple of the step 8; use 8 \("),
        ("8,8,72", r"layer 2: width 72 is outside \[0, 64\] .*64 is the widest"),
        ("8,-8,8", r"layer 1: width -8 is outside"),
        ("8,8", r"give 2 entries, but the checkpoint has 3 layers; .* e\.g\. 64\*3"),
        ("8*4", r"more than 3 entries"),
        ("x,8,8", r"layer 0: width 'x' is not an integer or a percentage"),
        ("8,,8", r"empty entry"),
        ("150%", r"layer 0: 150% is outside 0-100 %"),
    ],
)
def test_bad_widths_name_the_layer_and_the_fix(
    family: LlamaFamily, spec: str, message: str
) -> None:
    with pytest.raises(WidthsError, match=message):
        family.parse_widths(spec)


def test_validate_widths_counts_layers(family: LlamaFamily) -> None:
    with pytest.raises(WidthsError, match=r"got 2 widths, but the checkpoint has 3 layers"):
        family.validate_widths([8, 8])
    with pytest.raises(WidthsError, match=r"layer 1: width must be an integer"):
        family.validate_widths([8, 8.0, 8])
    with pytest.raises(WidthsError, match=r"do not fit the stored widths"):
        family.model(input_ids(), [8, 8])  # the module checks too


@pytest.mark.parametrize(
    ("step", "allowed", "names"),
    [
        (None, [0, 8, 16, 24, 32, 40, 48, 56, 64], ["12.5%", "25%", "37.5%", "50%", "100%"]),
        (16, [0, 16, 32, 48, 64], ["25%", "50%", "75%", "100%"]),
        (32, [0, 32, 64], ["50%", "100%"]),
        (64, [0, 64], ["100%"]),
    ],
)
def test_step_sets_the_widths(
    llama_dir: Path, step: int | None, allowed: list[int], names: list[str]
) -> None:
    family = load_family(llama_dir, step=step, weights=False)
    assert family.step == (step or 8)
    assert all(family.allowed_widths(layer) == allowed for layer in range(3))
    uniform = family.uniform_configs()
    assert set(names) <= set(uniform) and len(uniform) == len(allowed) - 1
    assert uniform["100%"] == [64, 64, 64]
    assert all(
        widths == [int(name[:-1]) * 64 // 100] * 3
        for name, widths in uniform.items()
        if name in ("25%", "50%", "75%")
    )
    assert family.search_space().granularities == tuple(allowed[1:])


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (
            24,
            r"step=24 does not divide the stored FFN width 64 of layer 0; use a divisor of 64 "
            r"\(default: 1/8 of the FFN, 8\)",
        ),
        (0, r"step must be a positive integer"),
        (-8, r"step must be a positive integer"),
    ],
)
def test_a_bad_step_is_a_config_error(llama_dir: Path, step: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_family(llama_dir, step=step, weights=False)


def test_search_space_skips_and_bounds(family: LlamaFamily) -> None:
    plain = family.search_space()
    assert plain.choices == ((8, 16, 24, 32, 40, 48, 56, 64),) * 3 and plain.size == 8**3
    skips = family.search_space(allow_skip=True)
    assert skips.choices == ((0, 8, 16, 24, 32, 40, 48, 56, 64),) * 3 and skips.size == 9**3
    bounded = family.search_space(allow_skip=True, min_widths=[16, 0, 48], max_widths=[32, 8, 64])
    assert bounded.choices == ((16, 24, 32), (0, 8), (48, 56, 64))
    assert family.search_space(min_widths=[0, 0, 0], max_widths=[8, 8, 8]).choices == ((8,),) * 3
    assert bounded.contains([16, 0, 64]) and not bounded.contains([8, 0, 64])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"interpolate": 2}, ConfigError, r"--interpolate \(2\) does not apply .* --step"),
        ({"min_widths": [8, 8]}, WidthsError, r"min_widths has 2 entries, but .* 3 layers"),
        ({"max_widths": [8, 8, 8, 8]}, WidthsError, r"max_widths has 4 entries"),
        (
            {"min_widths": [32, 0, 0], "max_widths": [16, 64, 64]},
            WidthsError,
            r"layer 0: lower bound 32 is above upper bound 16",
        ),
        (
            {"min_widths": [0, 12, 0], "max_widths": [64, 12, 64]},
            WidthsError,
            r"layer 1: no width in \[12, 12\]",
        ),
        ({"max_widths": [0, 64, 64]}, WidthsError, r"layer 0: no width in \[0, 0\]"),
    ],
)
def test_search_space_refusals(
    family: LlamaFamily, kwargs: dict[str, Any], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        family.search_space(**kwargs)


# ======================================================================== 3. export


def test_mixed_width_export_reloads_with_load_model(family: LlamaFamily, tmp_path: Path) -> None:
    out = tmp_path / "export"
    report = export_submodel(family, MIXED, out)
    assert report.family == "llama" and report.format == "safetensors"
    assert report.params == family.param_count(MIXED) and report.logits_max_abs_diff <= 1e-5
    config = _config(out)
    assert config["mnm"]["intermediate_sizes"] == MIXED
    assert config["mnm"]["transformers_loadable"] is False
    assert config["mnm"]["source_fingerprint"] == family.fingerprint
    assert config["intermediate_size"] == 64
    for name in ("tokenizer.json", "tokenizer_config.json"):  # copied byte for byte
        assert (out / name).read_bytes() == (family.path / name).read_bytes()
        assert name in report.files
    module = load_model(out)
    ids = input_ids(length=24)
    with torch.inference_mode():
        _close(module(ids), family.logits(ids, MIXED))
    reloaded = load_family(out)
    assert reloaded.full_widths() == MIXED and reloaded.param_count() == report.params
    assert reloaded.uniform_configs()["50%"] == [16, 0, 32]
    assert reloaded.encode("the cat").tolist() == family.encode("the cat").tolist()
    card = (out / "README.md").read_text()
    assert "dense (not matformerized)" in card and "AmbiguousGlobalPerLayer" in card


def test_uniform_export_is_a_plain_transformers_model(family: LlamaFamily, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    widths = [32, 32, 32]
    out = tmp_path / "export"
    export_submodel(family, widths, out)
    config = _config(out)
    assert config["intermediate_size"] == 32 and config["mnm"]["transformers_loadable"] is True
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = input_ids(length=24)
    with torch.inference_mode():
        _close(hf(ids).logits, family.logits(ids, widths))
    assert sum(p.numel() for p in hf.parameters()) == family.param_count(widths)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer("the cat")["input_ids"] == family.encode("the cat").tolist()


def test_onnx_export_runs_in_onnxruntime(family: LlamaFamily, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    widths = [24, 0, 64]
    out = tmp_path / "export"
    report = export_submodel(family, widths, out, fmt="onnx")
    assert report.format == "onnx" and "model.onnx" in report.files
    assert report.onnx_max_abs_diff is not None and report.onnx_max_abs_diff <= 1e-3
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = input_ids(batch=3, length=37, seed=5)  # a shape the export never saw
    (logits,) = session.run(["logits"], {"input_ids": ids.numpy()})
    _close(torch.from_numpy(logits), family.logits(ids, widths), atol=1e-3)
    assert load_family(out).full_widths() == widths  # the safetensors beside it


def test_export_refuses_widths_that_do_not_fit(family: LlamaFamily, tmp_path: Path) -> None:
    with pytest.raises(WidthsError, match="layer 0: width 12 is not a multiple"):
        export_submodel(family, [12, 0, 64], tmp_path / "x")
    assert not (tmp_path / "x").exists()


# =================================================================== 4. matformerize


@pytest.fixture
def calibration_file(tmp_path: Path) -> Path:
    path = tmp_path / "calibration.txt"
    path.write_text(english(200, seed=500))
    return path


@pytest.mark.parametrize("criterion", CRITERIA)
def test_matformerize_keeps_the_full_model_and_orders_neurons(
    llama_dir: Path, tmp_path: Path, calibration_file: Path, criterion: str
) -> None:
    source = load_family(llama_dir)
    assert source.nesting_warning is not None and "mnm matformerize" in source.nesting_warning
    assert not source.is_nested and source.describe()["nested"] is False
    fingerprint = source.fingerprint
    data = None if criterion == DEFAULT_CRITERION else calibration_file  # the default: built-in
    out = tmp_path / "nested"
    weights = {k: v.clone() for k, v in source.model.weights().items()}
    report = source.matformerize(out, criterion=criterion, data=data, max_tokens=512)
    for name, tensor in source.model.weights().items():  # the loaded source is left as it was
        assert torch.equal(tensor, weights[name]), name
    assert report["criterion"] == criterion and report["full_width_max_abs_diff"] <= 1e-4
    assert report["source_fingerprint"] == fingerprint
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(report["tokenizer_files"])

    nested = load_family(out)
    assert nested.is_nested and nested.nesting_warning is None
    mnm = _config(out)["mnm"]
    assert mnm["nested"] is True and mnm["criterion"] == criterion
    assert mnm["source"] == {"path": str(llama_dir), "fingerprint": fingerprint}
    assert nested.describe()["nesting"]["criterion"] == criterion
    calibration = mnm["calibration"]
    if criterion == "weight":
        assert calibration == {"criterion_needs_data": False}
    else:
        fresh = load_family(llama_dir)
        tokens, where = fresh.calibration_tokens(data, max_tokens=512)
        assert calibration["tokens"] == 512 == tokens.numel()
        assert calibration["source"] == where
        assert where == ("built-in corpus, training split" if data is None else str(data))
        assert calibration["sha256"] == hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16]

    original = load_family(llama_dir)
    ids = input_ids(length=40)
    _close(nested.logits(ids), original.logits(ids), atol=1e-4)
    assert not torch.allclose(nested.logits(ids, [32] * 3), original.logits(ids, [32] * 3))
    assert nested.fingerprint != original.fingerprint
    for ours, theirs in zip(nested.model.model.layers, original.model.model.layers):
        # the same neurons, reordered
        rows = ours.mlp.gate_proj.weight.sort(dim=0).values
        _close(rows, theirs.mlp.gate_proj.weight.sort(dim=0).values, atol=0)
    # Re-scored on the output, every layer's neurons come out most important first.
    windows = None
    if criterion != "weight":
        windows = nested.calibration_tokens(data, max_tokens=512)[0].view(-1, 128)
    for scores in neuron_scores(nested, windows, criterion=criterion):
        assert bool((scores[:-1] >= scores[1:] - 1e-6 * scores.max()).all()), scores


def test_matformerize_a_sliced_export_with_a_dropped_ffn(
    family: LlamaFamily, tmp_path: Path, calibration_file: Path
) -> None:
    export_submodel(family, MIXED, tmp_path / "export")
    source = load_family(tmp_path / "export")
    ids = input_ids(length=24)
    before = source.logits(ids)
    source.matformerize(tmp_path / "nested", data=calibration_file, max_tokens=256)
    nested = load_family(tmp_path / "nested")
    assert nested.full_widths() == MIXED and nested.is_nested
    _close(nested.logits(ids), before, atol=1e-4)


def test_a_sliced_export_keeps_its_source_step(family: LlamaFamily, tmp_path: Path) -> None:
    # 40 // 8 = 5 divides neither 24 nor 8: the export must not guess its step from its widths.
    export_submodel(family, [40, 24, 8], tmp_path / "export")
    sliced = load_family(tmp_path / "export")
    assert sliced.step == family.step == 8 and sliced.full_widths() == [40, 24, 8]


def test_a_sliced_export_cannot_be_profiled(family: LlamaFamily, tmp_path: Path) -> None:
    from mnm_search.errors import ProfileError
    from mnm_search.targets import default_target

    export_submodel(family, MIXED, tmp_path / "export")
    sliced = load_family(tmp_path / "export")
    with pytest.raises(ProfileError, match=r"not a sliced export: .* 16,0,64"):
        sliced.latency_probe(default_target(), torch.device("cpu"))


def test_activation_order_beats_the_stored_order_at_half_width(tmp_path: Path) -> None:
    """A briefly trained model whose FFN neurons differ in importance: after matformerize,
    half of every FFN keeps nearly all of the quality; the stored first half does not."""
    source_dir = save_tiny_llama(tmp_path / "trained", train_steps=60, seed=1)
    (tmp_path / "calibration.txt").write_text(english(300, seed=500))
    source = load_family(source_dir)
    held_out = make_eval_set(source.encode(english(200, seed=900)), seq_len=64, max_tokens=None)
    half = source.uniform_configs()["50%"]
    full_loss = evaluate_loss(source.logits, held_out, None)
    stored_half = evaluate_loss(source.logits, held_out, half)
    source.matformerize(
        tmp_path / "nested", data=tmp_path / "calibration.txt", criterion="activation"
    )
    nested = load_family(tmp_path / "nested")
    nested_half = evaluate_loss(nested.logits, held_out, half)
    assert evaluate_loss(nested.logits, held_out, None) == pytest.approx(full_loss, abs=1e-4)
    assert nested_half < stored_half - 0.1, (full_loss, nested_half, stored_half)
    assert nested_half - full_loss < (stored_half - full_loss) / 4, (nested_half, stored_half)


def test_calibration_text_is_the_training_split_never_the_evaluation_text(
    family: LlamaFamily,
) -> None:
    tokens, where = family.calibration_tokens(None, max_tokens=300)
    assert where == "built-in corpus, training split" and tokens.numel() == 300
    text = family.tokenizer.decode(tokens.tolist())
    assert len(text) > 300
    train, _ = builtin_split()
    validation = bundled_validation_text()
    assert train.startswith(text[:-8])  # a byte-level token may split a character at the end
    for start in range(0, len(text) - 100, 50):  # no passage of it is evaluation text
        assert text[start : start + 100] not in validation
    evaluation = family.load_eval_set(None, max_tokens=256)
    assert family.tokenizer.decode(evaluation.inputs[0].tolist()) in validation
    assert family.tokenizer.decode(evaluation.inputs[0].tolist())[:100] not in train


def test_matformerize_refusals_write_nothing(
    family: LlamaFamily, tmp_path: Path, calibration_file: Path
) -> None:
    short = tmp_path / "short.txt"
    short.write_text("the cat sat")
    out = tmp_path / "nested"
    cases: list[tuple[dict[str, Any], type, str]] = [
        ({"criterion": "bogus"}, ConfigError, "one of activation-rms, activation, weight"),
        ({"max_tokens": 0}, ConfigError, "max_tokens must be positive"),
        ({"data": short}, DataError, r"gives \d+ tokens; at least 128 are needed"),
        ({"data": calibration_file, "max_tokens": 100}, DataError, "at least 128"),
    ]
    before = family.fingerprint
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            family.matformerize(out, **kwargs)
        assert not out.exists(), kwargs
    assert family.fingerprint == before  # nothing reordered in memory either


def test_an_existing_out_is_refused_before_any_work(llama_dir: Path, tmp_path: Path) -> None:
    """Refused up front: no calibration pass, and the loaded model is left as it was (not
    reordered in memory while its fingerprint still names the dense file)."""
    source = load_family(llama_dir)
    ids = input_ids(length=16)
    half, fingerprint = source.logits(ids, [32] * 3), source.fingerprint
    out = tmp_path / "nested"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    calls: list[tuple[int, int]] = []
    with pytest.raises(CheckpointError, match="already exists"):
        source.matformerize(out, max_tokens=256, on_progress=lambda *a: calls.append(a))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert source.fingerprint == fingerprint
    _close(source.logits(ids, [32] * 3), half, atol=0)
    assert calls == []


def test_matformerize_refuses_a_half_precision_model(llama_dir: Path, tmp_path: Path) -> None:
    source = load_family(llama_dir, dtype="bfloat16")
    with pytest.raises(ConfigError, match="float32"):
        source.matformerize(tmp_path / "x", criterion="weight")
    assert not (tmp_path / "x").exists()


# ======================================================================= 6. decoding


@pytest.mark.parametrize("widths", [None, MIXED, [8, 64, 0]], ids=["full", "mixed", "mixed2"])
def test_decoder_equals_one_forward(family: LlamaFamily, widths: list[int] | None) -> None:
    ids = input_ids(batch=2, length=30, seed=3)
    reference = family.logits(ids, widths)
    decoder = family.decoder(widths)
    assert decoder.length == 0
    parts = [decoder.prefill(ids[:, :10])]
    parts += [decoder.step(ids[:, t : t + 1]) for t in range(10, 20)]
    parts.append(decoder.step(ids[:, 20:]))  # several new tokens at once
    assert decoder.length == 30
    _close(torch.cat(parts, dim=1), reference)
    decoder.rollback(12)
    assert decoder.length == 12
    _close(decoder.step(ids[:, 12:17]), reference[:, 12:17])
    _close(decoder.step(ids[:, 17:18]), reference[:, 17:18])
    decoder.rollback(0)
    _close(decoder.step(ids[:, :5]), reference[:, :5])


def test_decoding_past_the_initial_cache_stays_exact(family: LlamaFamily) -> None:
    ids = input_ids(batch=1, length=150, seed=4)  # prefill 66: capacity 132, then grows
    reference = family.logits(ids, MIXED)
    decoder = family.decoder(MIXED)
    parts = [decoder.prefill(ids[:, :66])]
    parts += [decoder.step(ids[:, t : t + 1]) for t in range(66, 140)]
    parts.append(decoder.step(ids[:, 140:]))
    _close(torch.cat(parts, dim=1), reference)
    decoder.rollback(130)
    _close(decoder.step(ids[:, 130:150]), reference[:, 130:150])


def test_kv_cache_grows_and_keeps_what_it_held(family: LlamaFamily) -> None:
    spec = family.spec
    cache = KVCache.empty(
        spec, batch=1, capacity=4, device=torch.device("cpu"), dtype=torch.float32
    )
    chunks = [torch.randn(1, spec.n_kv_heads, n, spec.head_dim) for n in (3, 2, 9, 1)]
    for index, chunk in enumerate(chunks):
        keys, values = cache.write(0, chunk, -chunk)
        cache.length += chunk.shape[2]
        _close(keys, torch.cat(chunks[: index + 1], dim=2), atol=0)
        _close(values, -keys, atol=0)
    assert cache.keys[0].shape[2] >= 15 and cache.keys[1].shape[2] == 4  # per layer


def test_decoder_misuse_is_a_clear_error(family: LlamaFamily) -> None:
    decoder = family.decoder([8, 8, 8])
    with pytest.raises(ConfigError, match="prefill"):
        decoder.step(input_ids(length=1))
    decoder.prefill(input_ids(length=4))
    with pytest.raises(ConfigError, match="cannot roll the cache back to 5"):
        decoder.rollback(5)
    with pytest.raises(WidthsError):
        family.decoder([12, 8, 8])


# ====================================================================== 7. evaluator


def test_cached_evaluator_equals_plain_evaluation(family: LlamaFamily) -> None:
    eval_set = family.load_eval_set(None, max_tokens=3 * 128)
    assert eval_set.inputs.shape[1] == family.eval_seq_len == 128
    evaluator = CachedEvaluator(family, eval_set)
    configs = [[64, 64, 64], [32, 32, 32], MIXED, [16, 0, 56], [0, 0, 0], [8, 64, 8]]
    for widths in [*configs, *configs]:  # the second round hits the caches
        plain = evaluate_loss(family.module(), eval_set, widths)
        assert evaluator.evaluate(widths).loss == pytest.approx(plain, rel=1e-5), widths
    assert evaluator.stats.prefix_hits > 0


# ===================================================================== 8. bad input


def _break(path: Path, **changes: Any) -> None:
    config = _config(path)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
        ({"mlp_bias": True}, r"mlp_bias is not supported"),
        (
            {"model_type": "mistral", "sliding_window": 64},
            r"sliding-window attention \(sliding_window=64\) is not supported",
        ),
        (
            {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 32},
            r"sliding_window=32\) is not supported",
        ),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}},
            r"RoPE scaling 'yarn' is not supported",
        ),
        ({"partial_rotary_factor": 0.5}, r"partial rotary embeddings"),
        (
            {"num_attention_heads": 3, "num_key_value_heads": 2},
            r"num_attention_heads 3 is not a multiple of num_key_value_heads",
        ),
        ({"mnm": {"intermediate_sizes": [64, 64]}}, r"one per layer \(3\)"),
        ({"hidden_size": None}, r"hidden_size must be a positive integer, got None"),
        ({"model_type": "gpt2"}, r"unsupported model family"),
    ],
)
def test_unsupported_configs_are_refused(
    llama_dir: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    path = _copy(llama_dir, tmp_path)
    _break(path, **changes)
    with pytest.raises(CheckpointError, match=message) as error:
        load_family(path)
    assert "unsupported model family" in message or str(path / "config.json") in str(error.value)


def test_a_mistral_without_a_real_window_loads(llama_dir: Path, tmp_path: Path) -> None:
    path = _copy(llama_dir, tmp_path)
    _break(path, model_type="mistral", sliding_window=128)  # the window is the whole context
    assert load_family(path, weights=False).spec.model_type == "mistral"


def test_weights_it_cannot_read_are_refused(llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    pickles = _copy(llama_dir, tmp_path, "pickles")
    (pickles / "model.safetensors").unlink()
    (pickles / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(
        CheckpointError,
        match=r"has no model\.safetensors; pytorch_model\.bin are PyTorch pickles, which mnm "
        r"does not load .*convert them to safetensors",
    ):
        load_family(pickles)

    missing = _copy(llama_dir, tmp_path, "missing")
    state = load_file(str(missing / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(missing / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        load_family(missing)

    sharded = _copy(llama_dir, tmp_path, "sharded")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"has no model-00001-of-00002\.safetensors$"):
        load_family(sharded)

    corrupt = _copy(llama_dir, tmp_path, "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_family(corrupt)


@pytest.mark.parametrize(
    ("changes", "tensor"),
    [
        ({"intermediate_size": 32}, "mlp"),
        ({"num_attention_heads": 3}, "self_attn"),  # head_dim 16 stays: q is 48 wide
        ({"vocab_size": 301}, "embed_tokens"),
    ],
)
def test_tensors_of_the_wrong_shape_are_a_checkpoint_error(
    llama_dir: Path, tmp_path: Path, changes: dict[str, Any], tensor: str
) -> None:
    """A config.json that disagrees with the tensors' shapes: one clear CheckpointError
    naming a tensor (not torch's RuntimeError from load_state_dict)."""
    path = _copy(llama_dir, tmp_path)
    _break(path, **changes)
    with pytest.raises(CheckpointError, match=tensor):
        load_family(path)


def test_a_file_with_an_unknown_suffix_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"x")
    with pytest.raises(
        CheckpointError,
        match=r"is a file; a checkpoint is a directory with config.json, or a "
        r"file ending in \.gguf",
    ):
        load_family(path)


def test_missing_tokenizer_names_the_fix(llama_dir: Path, tmp_path: Path) -> None:
    path = _copy(llama_dir, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    family = load_family(path)
    assert family.describe()["tokenizer"] == "none found"
    with pytest.raises(CheckpointError, match=r"has no tokenizer .*copy the tokenizer files"):
        family.load_eval_set(None, max_tokens=256)
