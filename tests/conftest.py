"""Shared fixtures: tiny models built in milliseconds, saved to isolated temp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mnm_search.checkpoint import save_checkpoint
from mnm_search.config import ModelConfig
from mnm_search.model import MatLM

TINY = ModelConfig(
    d_model=32, n_layers=3, n_heads=2, d_ff=64, granularities=(8, 16, 32, 64), max_seq_len=32
)


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    # One thread: small models run faster and timings are less noisy on 2-core CI.
    torch.set_num_threads(1)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return TINY


@pytest.fixture
def tiny_model(tiny_config: ModelConfig) -> MatLM:
    torch.manual_seed(0)
    return MatLM(tiny_config).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, tiny_model: MatLM) -> Path:
    """A universal tiny checkpoint directory on disk."""
    return save_checkpoint(tiny_model, tmp_path / "tiny-ckpt")


@pytest.fixture
def eval_text_file(tmp_path: Path) -> Path:
    """A small text file for `--data` (enough for a few windows of the tiny model)."""
    path = tmp_path / "eval.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path
