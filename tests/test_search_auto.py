"""`--sampler auto`: enumerate (racing over eval chunks) or sample, and the GP's hand-over."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import torch

from mnm_search._enumerate import (
    RACE_COST_FRACTION,
    Enumeration,
    chunk_bounds,
    estimate_strategy,
    sweep_layer_passes,
)
from mnm_search.checkpoint import load_checkpoint, save_checkpoint
from mnm_search.config import ModelConfig
from mnm_search.data import EvalSet, load_eval_set
from mnm_search.evaluator import evaluate_loss
from mnm_search.families.matlm import MatLMFamily
from mnm_search.model import MatLM
from mnm_search.pareto import format_widths_column, pareto_front
from mnm_search.space import SearchSpace
from mnm_search.study import BoundedGPSampler, SearchSettings, run_search

TINY = ModelConfig(
    d_model=32, n_layers=4, n_heads=2, d_ff=64, granularities=(8, 16, 32, 64), max_seq_len=32
)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> MatLMFamily:
    torch.manual_seed(0)
    model = MatLM(TINY).eval()
    with torch.no_grad():  # make widths matter for the loss
        for block in model.blocks:
            block.ffn.up.weight.mul_(8)
            block.ffn.down.weight.mul_(30)
    path = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny")
    return MatLMFamily(load_checkpoint(path))


@pytest.fixture(scope="module")
def eval_set() -> EvalSet:
    return load_eval_set(None, seq_len=TINY.max_seq_len, max_tokens=16 * 32)


@pytest.fixture(scope="module")
def truth(family: MatLMFamily, eval_set: EvalSet) -> dict[str, float]:
    """Every configuration's loss by the plain forward (the reference)."""
    space = family.search_space()
    return {
        format_widths_column(w): evaluate_loss(family.logits, eval_set, w)
        for w in space.all_configs()
    }


def _truth_frame(truth: dict[str, float], family: MatLMFamily) -> pd.DataFrame:
    """The plain-forward losses with each configuration's parameter count."""
    return pd.DataFrame(
        [
            {"widths": w, "loss": loss, "params": family.param_count(family.parse_widths(w))}
            for w, loss in truth.items()
        ]
    )


def _search(
    family: MatLMFamily, eval_set: EvalSet, out: Path, settings: SearchSettings, **kwargs: Any
) -> Any:
    return run_search(
        family, family.search_space(), settings, eval_set, study_name="s", results_dir=out, **kwargs
    )


@pytest.mark.parametrize(
    ("n_windows", "first", "bounds"),
    [
        (16, 1, [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16)]),
        (5, 2, [(0, 2), (2, 4), (4, 5)]),
        (1, 4, [(0, 1)]),
        (3, 1, [(0, 1), (1, 2), (2, 3)]),
    ],
)
def test_chunks_double(n_windows: int, first: int, bounds: list[tuple[int, int]]) -> None:
    assert chunk_bounds(n_windows, first) == bounds


@pytest.mark.parametrize(("cheap", "passes"), [(True, 1 + 2 + 4), (False, 2 + 4 + 16)])
def test_sweep_layer_passes(cheap: bool, passes: int) -> None:
    space = SearchSpace(choices=((8, 16), (8, 16), (8, 16, 32, 64)), granularities=(8, 16, 32, 64))
    assert sweep_layer_passes(space, cheap_siblings=cheap) == passes


@pytest.mark.parametrize(
    ("layer_s", "n_trials", "shared", "name", "words"),
    [
        # 85 layer passes, raced: ~51 passes; a sampled trial: 4/3 passes.
        (0.001, 100, False, "enumerate", "no more than 100 sampled trials"),
        (0.3, 10, False, "enumerate", "within a minute"),  # ~15 s vs ~4 s sampled
        (10.0, 10, False, "gp", "more than a minute"),  # ~8 min vs ~2 min sampled
        (10.0, 1000, False, "enumerate", "no more than 1000 sampled trials"),
        (0.001, 100, True, "gp", "shared --storage"),
    ],
)
def test_auto_enumerates_when_it_costs_no_more(
    layer_s: float, n_trials: int, shared: bool, name: str, words: str
) -> None:
    grans = (8, 16, 32, 64)
    space = SearchSpace(choices=(grans,) * 4, granularities=grans)  # 256 configs, 85 passes
    strategy = estimate_strategy(
        space=space,
        n_trials=n_trials,
        layer_pass_s=layer_s,
        cheap_siblings=True,
        race=True,
        shared_storage=shared,
    )
    assert strategy.name == name
    assert words in strategy.reason
    assert strategy.estimates["enumerate_s"] == pytest.approx(
        85 * layer_s * RACE_COST_FRACTION, abs=0.1
    )


def test_race_keeps_the_exact_front_and_plain_forward_losses(
    family: MatLMFamily, eval_set: EvalSet, truth: dict[str, float]
) -> None:
    space = family.search_space()
    configs = [tuple(w) for w in space.all_configs()]
    costs = {w: [float(family.param_count(list(w)))] for w in configs}
    decided: dict[tuple[int, ...], dict[str, Any]] = {}

    def on_decided(decisions: list[Any]) -> None:
        for d in decisions:
            assert d.widths not in decided, "a configuration was decided twice"
            decided[d.widths] = d.metrics

    race = Enumeration(
        family, eval_set, space.choices, cost_columns=["params"], race=True, first_chunk_tokens=32
    )
    assert race.n_chunks == 5
    race.run(configs, costs, known_full={}, on_decided=on_decided)
    assert set(decided) == set(configs)
    full = {w for w, m in decided.items() if m["fidelity"] == "full"}
    assert 0 < len(full) < len(configs), "the race should rule some configurations out"
    for w in full:  # sums of exact chunk sums: the plain forward's loss
        reference = truth[format_widths_column(w)]
        assert abs(decided[w]["loss"] - reference) <= 1e-6 * reference
    rows = [
        {"widths": format_widths_column(w), "loss": loss, "params": costs[w][0]}
        for w, loss in ((w, truth[format_widths_column(w)]) for w in configs)
    ]
    true_front = set(pareto_front(pd.DataFrame(rows), ["loss", "params"])["widths"])
    assert true_front <= {format_widths_column(w) for w in full}


def test_auto_search_enumerates_a_cheap_space(
    family: MatLMFamily, eval_set: EvalSet, truth: dict[str, float], tmp_path: Path
) -> None:
    messages: list[str] = []
    settings = SearchSettings(objectives=("loss", "params"), n_trials=10)
    result = _search(family, eval_set, tmp_path / "r", settings, on_strategy=messages.append)
    assert result.run_info["strategy"]["name"] == "enumerate"
    assert messages and messages[0].startswith("auto: all 256 configurations")
    trials = result.trials
    assert len(trials) == 256 == trials["widths"].nunique()  # every one, once: not n_trials
    assert set(trials["fidelity"]) <= {"full", "subset"}
    sources = dict(zip(trials["widths"], trials["source"], strict=True))
    assert sources["64,64,64,64"] == "uniform XL" and sources["8,8,8,8"] == "uniform S"
    frame = _truth_frame(truth, family)
    assert set(result.pareto["widths"]) == set(pareto_front(frame, ["loss", "params"])["widths"])
    assert (result.pareto["fidelity"] == "full").all()
    # Re-running resumes: nothing is left to decide.
    again = _search(family, eval_set, tmp_path / "r", settings)
    assert again.n_new == 0 and len(again.trials) == 256


def test_enumeration_skips_configurations_over_the_limits(
    family: MatLMFamily, eval_set: EvalSet, truth: dict[str, float], tmp_path: Path
) -> None:
    limit = family.param_count([16] * 4)
    settings = SearchSettings(objectives=("loss", "params"), sampler="exhaustive", max_params=limit)
    result = _search(family, eval_set, tmp_path / "r", settings)
    frame = _truth_frame(truth, family)
    within = frame[frame["params"] <= limit]
    assert len(result.trials) == len(within) and result.trials["feasible"].all()
    assert (result.trials["fidelity"] == "full").all()  # exhaustive: no race
    losses = dict(zip(result.trials["widths"], result.trials["loss"], strict=True))
    assert all(abs(losses[w] - truth[w]) <= 1e-6 * truth[w] for w in within["widths"])


def test_enumeration_with_agreement_objectives(
    family: MatLMFamily, eval_set: EvalSet, tmp_path: Path
) -> None:
    settings = SearchSettings(objectives=("kl", "params"), sampler="auto", n_trials=10)
    result = _search(family, eval_set, tmp_path / "r", settings)
    assert result.run_info["strategy"] == {**result.run_info["strategy"], "race": False}
    assert result.trials["kl"].notna().all() and result.trials["disagreement"].notna().all()
    full = result.trials.set_index("widths").loc["64,64,64,64"]
    assert full["kl"] == pytest.approx(0.0, abs=1e-6)


class _SlowRandom(optuna.samplers.RandomSampler):
    """A stand-in GP: relative sampling that takes `delay` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__(seed=0)
        self.delay = delay

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return {"x": optuna.distributions.FloatDistribution(0, 1)}

    def sample_relative(self, study: Any, trial: Any, space: Any) -> dict[str, Any]:
        time.sleep(self.delay)
        return {}


@pytest.mark.parametrize(
    ("gp_delay", "eval_delay", "switched"),
    [(0.03, 0.0, True), (0.0, 0.03, False)],
)
def test_gp_hands_over_to_tpe_when_it_costs_more_than_an_evaluation(
    gp_delay: float, eval_delay: float, switched: bool
) -> None:
    fallback = optuna.samplers.RandomSampler(seed=1)
    sampler = BoundedGPSampler(_SlowRandom(gp_delay), fallback, min_trials=4, window=3)
    heard: list[str] = []
    sampler.on_switch = heard.append
    study = optuna.create_study(sampler=sampler)

    def objective(trial: optuna.Trial) -> float:
        time.sleep(eval_delay)
        return trial.suggest_float("x", 0, 1)

    study.optimize(objective, n_trials=8)
    assert (sampler.inner is fallback) is switched
    assert (sampler.switch is not None) is switched
    assert heard == ([sampler.switch] if switched else [])
    if switched:
        assert "TPE from here on" in sampler.switch


class _CountingRandom(optuna.samplers.RandomSampler):
    """A stand-in GP that counts the trials it is asked to model."""

    def __init__(self) -> None:
        super().__init__(seed=0)
        self.asked: list[int] = []

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return {"x": optuna.distributions.FloatDistribution(0, 1)}

    def sample_relative(self, study: Any, trial: Any, space: Any) -> dict[str, Any]:
        self.asked.append(trial.number)
        return {}


def test_seeds_are_not_sent_to_the_gp() -> None:
    """Enqueued trials have their parameters: fitting a GP for them is wasted time, and their
    timings must not decide the hand-over."""
    gp = _CountingRandom()
    sampler = BoundedGPSampler(gp, optuna.samplers.RandomSampler(seed=1))
    study = optuna.create_study(sampler=sampler)
    for x in (0.1, 0.2, 0.3):
        study.enqueue_trial({"x": x})
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=5)
    assert gp.asked == [3, 4]
    assert [t.params["x"] for t in study.trials[:3]] == [0.1, 0.2, 0.3]


def test_an_enumeration_never_records_a_configuration_twice(
    family: MatLMFamily, eval_set: EvalSet, tmp_path: Path
) -> None:
    """Another process enumerating the same journal may decide a configuration first."""
    from mnm_search._enumerate import Decision, Strategy
    from mnm_search.study import CostModel, _Enumerated, open_storage

    settings = SearchSettings(objectives=("loss", "params"), n_trials=10)
    _search(family, eval_set, tmp_path, settings)
    study = optuna.load_study(study_name="s", storage=open_storage(None, tmp_path))
    before = len(study.trials)
    enumerated = _Enumerated(
        family,
        family.search_space(),
        settings,
        eval_set,
        CostModel(family),
        {},
        [],
        Strategy("enumerate", "test", race=True),
    )
    late = Decision((8, 8, 8, 8), {"loss": 1.0, "fidelity": "full"}, 0.0)
    enumerated._record(study, None, "other-worker", [late])  # type: ignore[arg-type]
    assert len(study.trials) == before
