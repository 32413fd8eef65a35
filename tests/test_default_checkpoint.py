"""The embedded default checkpoint: small enough to ship, and a real nested model."""

from __future__ import annotations

import itertools

import pytest

from mnm_search.checkpoint import default_checkpoint_path, load_checkpoint
from mnm_search.config import param_count, parse_widths
from mnm_search.data import load_eval_set
from mnm_search.evaluator import evaluate_loss

EVAL_TOKENS = 8192  # 32 windows: a few seconds on one thread, enough to separate the sizes


@pytest.fixture(scope="module")
def default():
    return load_checkpoint(None)


@pytest.fixture(scope="module")
def losses(default) -> dict[str, float]:
    config = default.config
    eval_set = load_eval_set(None, seq_len=config.max_seq_len, max_tokens=EVAL_TOKENS)
    specs = ["S*6", "M*6", "L*6", "XL*6", "S,S,S,M,M,M", "M,M,M,L,L,L", "L,L,L,XL,XL,XL"]
    return {
        spec: evaluate_loss(default.model, eval_set, parse_widths(spec, config)) for spec in specs
    }


def test_fits_in_the_package() -> None:
    size = sum(p.stat().st_size for p in default_checkpoint_path().iterdir())
    assert size <= 12 * 1024 * 1024


def test_shape_and_provenance(default) -> None:
    config = default.config
    assert (config.n_layers, config.d_model, len(config.granularities)) == (6, 256, 4)
    training = default.metadata["training"]
    assert training["commands"] and all(c.startswith("mnm train") for c in training["commands"])
    assert "pydoc_data" in training["corpus"]
    assert set(training["shipped_weights"]["val_losses_uniform"]) == {"S", "M", "L", "XL"}


def test_uniform_sizes_are_strictly_ordered_with_clear_gaps(losses) -> None:
    ordered = [losses[s] for s in ("S*6", "M*6", "L*6", "XL*6")]
    for smaller, larger in itertools.pairwise(ordered):
        assert smaller - larger > 0.01, ordered


def test_far_below_the_unigram_baseline(default, losses) -> None:
    unigram = default.metadata["training"]["unigram_val_loss"]
    assert losses["XL*6"] < unigram - 1.0


@pytest.mark.parametrize(
    ("mix", "smaller", "larger"),
    [
        ("S,S,S,M,M,M", "S*6", "M*6"),
        ("M,M,M,L,L,L", "M*6", "L*6"),
        ("L,L,L,XL,XL,XL", "L*6", "XL*6"),
    ],
)
def test_mix_n_match_lands_between_its_uniform_neighbours(
    default, losses, mix: str, smaller: str, larger: str
) -> None:
    config = default.config
    params = [param_count(config, parse_widths(s, config)) for s in (smaller, mix, larger)]
    assert params[0] < params[1] < params[2]
    assert losses[larger] < losses[mix] < losses[smaller]
