"""The nested FFN: universal forward at widths W == physically sliced model == masked full model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mnm_search.config import ModelConfig, param_count
from mnm_search.errors import ConfigError, WidthsError
from mnm_search.model import MatLM
from mnm_search.slicing import slice_model

CONFIG = ModelConfig(
    d_model=32, n_layers=3, n_heads=2, d_ff=64, granularities=(8, 16, 32, 64), max_seq_len=32
)
torch.manual_seed(0)
MODEL = MatLM(CONFIG).eval()
IDS = torch.randint(0, CONFIG.vocab_size, (2, 17))


def masked_full_model(model: MatLM, widths: list[int]) -> MatLM:
    """The full-width model with hidden neurons >= width zeroed (a skipped FFN: all zeroed)."""
    masked = MatLM(model.config).eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for block, width in zip(masked.blocks, widths):
            block.ffn.up.weight[width:] = 0.0
            block.ffn.down.weight[:, width:] = 0.0
    return masked


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=64), min_size=3, max_size=3))
def test_universal_equals_sliced_equals_masked(widths: list[int]) -> None:
    with torch.no_grad():
        universal = MODEL(IDS, widths)
        sliced = slice_model(MODEL, widths)(IDS)
        masked = masked_full_model(MODEL, widths)(IDS)
    assert universal.shape == (2, 17, CONFIG.vocab_size)
    assert (universal - sliced).abs().max().item() <= 1e-5
    assert (universal - masked).abs().max().item() <= 1e-5


@pytest.mark.parametrize("widths", [[8, 8, 8], [64, 64, 64], [0, 16, 64], [0, 0, 0], [13, 40, 7]])
def test_sliced_model_is_dense_and_counts_exactly(widths: list[int]) -> None:
    dense = slice_model(MODEL, widths)
    assert dense.config.ffn_widths == tuple(widths)
    assert all(p.is_contiguous() for p in dense.parameters())
    assert sum(p.numel() for p in dense.parameters()) == param_count(CONFIG, widths)
    for block, width in zip(dense.blocks, widths):
        assert (block.ffn is None) == (width == 0)
        if width:
            assert block.ffn.up.weight.shape == (width, CONFIG.d_model)


def test_default_widths_run_the_full_model() -> None:
    with torch.no_grad():
        assert torch.equal(MODEL(IDS), MODEL(IDS, [64, 64, 64]))


def test_narrower_widths_change_the_output() -> None:
    # Guards against a forward that ignores widths (the property test would then pass trivially).
    with torch.no_grad():
        assert (MODEL(IDS, [8, 8, 8]) - MODEL(IDS)).abs().max().item() > 1e-4


def test_no_hidden_width_state_between_calls() -> None:
    with torch.no_grad():
        first = MODEL(IDS, [8, 16, 32])
        MODEL(IDS, [64, 0, 64])
        again = MODEL(IDS, [8, 16, 32])
    assert torch.equal(first, again)


def test_sliced_model_refuses_wider_than_stored() -> None:
    dense = slice_model(MODEL, [16, 16, 16])
    with pytest.raises(WidthsError, match="layer 0: width 32 is outside"):
        dense(IDS, [32, 16, 16])


def test_param_count_matches_universal_model() -> None:
    assert sum(p.numel() for p in MODEL.parameters()) == param_count(CONFIG)


def test_sequence_longer_than_context_is_refused() -> None:
    too_long = torch.zeros(1, CONFIG.max_seq_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_seq_len"):
        MODEL(too_long)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"d_model \(33\) must be divisible by n_heads \(2\)"):
        dataclasses.replace(CONFIG, d_model=33)
    with pytest.raises(ConfigError, match="n_layers must be a positive integer, got 0"):
        dataclasses.replace(CONFIG, n_layers=0)
    with pytest.raises(ConfigError, match="granularities must be strictly increasing"):
        dataclasses.replace(CONFIG, granularities=(16, 8, 64))
    with pytest.raises(ConfigError, match="must equal d_ff"):
        dataclasses.replace(CONFIG, granularities=(8, 16, 32))
