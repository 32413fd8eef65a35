"""The Optuna study: objectives, constraints, samplers, seeding, reproducibility, resume."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from mnm_search.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from mnm_search.config import ModelConfig, param_count
from mnm_search.data import EvalSet, load_eval_set
from mnm_search.errors import ConfigError, SearchError
from mnm_search.families.base import SeedConfig
from mnm_search.families.matlm import MatLMFamily
from mnm_search.latency import LatencyModel
from mnm_search.model import MatLM
from mnm_search.pareto import pareto_front, parse_widths_column
from mnm_search.space import SearchSpace
from mnm_search.study import (
    JOURNAL_FILE,
    SearchSettings,
    fail_dead_trials,
    open_storage,
    run_search,
)
from mnm_search.targets import HardwareTarget

TINY = ModelConfig(
    d_model=32, n_layers=3, n_heads=2, d_ff=64, granularities=(8, 16, 32, 64), max_seq_len=32
)
TINY_TARGET = HardwareTarget(
    name="tiny-cpu",
    device="cpu",
    phase="prefill",
    seq_len=16,
    repeats=5,
    warmup=1,
    calibration=8,
    validation=6,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    torch.manual_seed(0)
    model = MatLM(TINY).eval()
    with torch.no_grad():  # make widths matter for the loss
        for block in model.blocks:
            block.ffn.up.weight.mul_(8)
            block.ffn.down.weight.mul_(30)
    return load_checkpoint(save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture(scope="module")
def eval_set() -> EvalSet:
    return load_eval_set(None, seq_len=TINY.max_seq_len, max_tokens=8 * 32)


@pytest.fixture(scope="module")
def latency_model(checkpoint: Checkpoint) -> LatencyModel:
    from mnm_search.profiler import profile

    family = MatLMFamily(checkpoint).prepare_for_target(TINY_TARGET)
    return LatencyModel.from_profile(profile(family, TINY_TARGET, quick=True))


def _run(checkpoint, eval_set, tmp_path, study="s", space=None, **kwargs):  # type: ignore[no-untyped-def]
    extra = {k: kwargs.pop(k) for k in ("latency_model", "memory_target", "storage") if k in kwargs}
    # The sampled path (what these tests check); `auto` is tested in test_search_auto.py.
    settings = SearchSettings(**{"objectives": ("loss", "params"), "sampler": "gp", **kwargs})
    return run_search(
        MatLMFamily(checkpoint),
        space or SearchSpace.from_config(checkpoint.config),
        settings,
        eval_set,
        study_name=study,
        results_dir=tmp_path / study,
        **extra,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_trials": 0}, "n_trials must be a positive integer, got 0"),
        ({"sampler": "cmaes"}, "unknown sampler 'cmaes'; choose from auto, nsga2, tpe, gp"),
        ({"objectives": ("loss", "speed")}, "unknown objective.*'speed'"),
        ({"objectives": ("loss",)}, "at least two"),
        ({"objectives": ("loss", "loss")}, "at least two different"),
        ({"max_params": -5}, "max_params must be positive, got -5"),
        ({"max_latency_ms": 0}, "max_latency_ms must be positive"),
        ({"fidelity_tokens": 64, "objectives": ("loss", "kl")}, "fidelity_tokens"),
    ],
)
def test_settings_are_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SearchSettings(**kwargs)


def test_search_writes_results_with_seeds_first(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path
) -> None:
    result = _run(checkpoint, eval_set, tmp_path, n_trials=16)
    trials = pd.read_csv(tmp_path / "s" / "trials.csv", dtype={"widths": str})
    assert len(trials) == 16 and (trials["state"] == "COMPLETE").all()
    assert trials["trial"].tolist() == list(range(16))
    assert list(trials.columns[:4]) == ["trial", "widths", "loss", "params"]
    # uniform S/M/L/XL first, then the minimum-slope heuristic, then the sampler
    assert trials["source"].tolist()[:4] == ["uniform S", "uniform M", "uniform L", "uniform XL"]
    assert (trials["source"].iloc[4:10] == "min-slope").all()
    assert (trials["source"].iloc[10:] == "sampler").all()
    # what each seed is, stored next to its label (nothing parses labels back)
    assert (trials["seed_kind"].iloc[:4] == "uniform").all()
    assert (trials["seed_kind"].iloc[4:10] == "min-slope").all()
    assert trials["seed_kind"].iloc[10:].isna().all()
    for row in trials.itertuples():
        widths = parse_widths_column(row.widths)
        assert row.params == param_count(TINY, widths)
    front = pd.read_csv(tmp_path / "s" / "pareto.csv", dtype={"widths": str})
    expected = pareto_front(trials, ("loss", "params"))
    assert front["trial"].tolist() == expected["trial"].tolist()
    assert result.pareto["trial"].tolist() == expected["trial"].tolist()
    info = json.loads((tmp_path / "s" / "run.json").read_text())
    assert info["fingerprint"] == checkpoint.fingerprint
    assert info["seed_trials"]["0"] == "uniform S"
    assert info["objectives"] == ["loss", "params"]
    assert (tmp_path / "s" / JOURNAL_FILE).is_file()


@pytest.mark.parametrize("sampler", ["nsga2", "tpe", "gp", "random"])
def test_every_sampler_is_reproducible(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path, sampler: str
) -> None:
    runs = [
        _run(
            checkpoint,
            eval_set,
            tmp_path / str(i),
            n_trials=12,
            sampler=sampler,
            seed=7,
            seed_configs=False,
        )
        for i in range(2)
    ]
    assert runs[0].trials["widths"].tolist() == runs[1].trials["widths"].tolist()
    assert runs[0].trials["loss"].tolist() == runs[1].trials["loss"].tolist()
    assert len(runs[0].trials) == 12
    other = _run(
        checkpoint,
        eval_set,
        tmp_path / "other",
        n_trials=12,
        sampler=sampler,
        seed=8,
        seed_configs=False,
    )
    assert other.trials["widths"].tolist() != runs[0].trials["widths"].tolist()


def test_exhaustive_covers_the_space_once(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path
) -> None:
    space = SearchSpace.from_config(TINY, max_widths=[16, 16, 64])  # 2 x 2 x 4 = 16 configs
    result = _run(checkpoint, eval_set, tmp_path, space=space, n_trials=50, sampler="exhaustive")
    widths = result.trials["widths"].tolist()
    assert len(widths) == 16 == len(set(widths))
    assert set(widths) == {",".join(map(str, w)) for w in space.all_configs()}
    assert result.run_info["n_complete"] == 16


def test_resume_continues_to_the_requested_total(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path
) -> None:
    first = _run(checkpoint, eval_set, tmp_path, n_trials=12)
    again = _run(checkpoint, eval_set, tmp_path, n_trials=12)
    assert again.n_new == 0
    more = _run(checkpoint, eval_set, tmp_path, n_trials=20)
    assert more.n_new == 8
    assert more.trials["trial"].tolist() == list(range(20))
    assert more.trials.iloc[:12]["widths"].tolist() == first.trials["widths"].tolist()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"space": SearchSpace.from_config(TINY, allow_skip=True)}, "another search space"),
        ({"objectives": ("loss", "kl")}, "another objectives"),
        ({"max_params": 40_000}, "another constraints"),
    ],
)
def test_reusing_a_study_with_another_setup_is_refused(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path, change: dict, match: str
) -> None:
    _run(checkpoint, eval_set, tmp_path, n_trials=6)
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    with pytest.raises(SearchError, match=match):
        _run(checkpoint, eval_set, tmp_path, n_trials=8, **change)
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before


def test_reusing_a_study_with_another_checkpoint_is_refused(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path
) -> None:
    _run(checkpoint, eval_set, tmp_path, n_trials=6)
    torch.manual_seed(1)
    other = load_checkpoint(save_checkpoint(MatLM(TINY).eval(), tmp_path / "other-ckpt"))
    with pytest.raises(SearchError, match=f"another checkpoint.*{other.fingerprint}"):
        _run(other, eval_set, tmp_path, n_trials=8)


def test_constraint_limits_the_front(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path
) -> None:
    limit = param_count(TINY, [16, 16, 16])
    result = _run(checkpoint, eval_set, tmp_path, n_trials=20, max_params=limit)
    assert (result.pareto["params"] <= limit).all()
    assert not result.pareto.empty
    # Seeds above the limit are not enqueued; the sampler may still try infeasible configs,
    # which the table marks.
    seeded = result.trials[result.trials["source"] != "sampler"]
    assert (seeded["params"] <= limit).all()
    assert (result.trials["feasible"] == (result.trials["params"] <= limit)).all()


def test_infeasible_constraint_is_refused_before_searching(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path
) -> None:
    smallest = param_count(TINY, [8, 8, 8])
    with pytest.raises(
        SearchError, match=f"--max-params 1000: the lowest reachable params is {smallest}"
    ):
        _run(checkpoint, eval_set, tmp_path, n_trials=5, max_params=1000)
    assert not (tmp_path / "s").exists()


def test_loss_latency_with_a_real_profile(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path, latency_model: LatencyModel
) -> None:
    result = _run(
        checkpoint,
        eval_set,
        tmp_path,
        n_trials=14,
        objectives=("loss", "latency"),
        latency_model=latency_model,
    )
    trials = result.trials
    for row in trials.itertuples():
        assert row.latency_ms == pytest.approx(
            latency_model.predict_ms(parse_widths_column(row.widths))
        )
    assert set(result.pareto["trial"]) == set(pareto_front(trials, ("loss", "latency_ms"))["trial"])
    with pytest.raises(SearchError, match="latency profile"):
        _run(
            checkpoint,
            eval_set,
            tmp_path,
            study="nolat",
            n_trials=5,
            objectives=("loss", "latency"),
        )


def test_latency_constraint_nearest_value(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path, latency_model: LatencyModel
) -> None:
    space = SearchSpace.from_config(TINY)
    fastest = min(latency_model.predict_ms(w) for w in space.all_configs())
    with pytest.raises(SearchError, match=f"lowest reachable latency_ms is {fastest:g}"):
        _run(
            checkpoint,
            eval_set,
            tmp_path,
            n_trials=5,
            max_latency_ms=fastest / 2,
            objectives=("loss", "params"),
            latency_model=latency_model,
        )


def test_loss_memory_and_three_objectives(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path
) -> None:
    from mnm_search.memory import memory_bytes

    result = _run(
        checkpoint,
        eval_set,
        tmp_path,
        n_trials=14,
        objectives=("loss", "memory", "params"),
        memory_target=TINY_TARGET,
    )
    for row in result.trials.itertuples():
        widths = parse_widths_column(row.widths)
        assert row.memory_bytes == memory_bytes(TINY, widths, TINY_TARGET).total
    assert set(result.pareto["trial"]) == set(
        pareto_front(result.trials, ("loss", "memory_bytes", "params"))["trial"]
    )


def test_kl_and_disagreement_objectives(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path
) -> None:
    result = _run(checkpoint, eval_set, tmp_path, n_trials=12, objectives=("kl", "params"))
    xl = result.trials[result.trials["widths"] == "64,64,64"].iloc[0]
    assert xl["kl"] == pytest.approx(0, abs=1e-6) and xl["agreement"] == 1.0
    assert (result.trials["disagreement"] == 1 - result.trials["agreement"]).all()


def test_multi_fidelity_screens_but_keeps_the_front_exact(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path
) -> None:
    space = SearchSpace.from_config(TINY)
    result = _run(
        checkpoint,
        eval_set,
        tmp_path,
        space=space,
        n_trials=64,
        sampler="exhaustive",
        fidelity_tokens=64,
    )
    truth = _run(
        checkpoint,
        eval_set,
        tmp_path,
        study="truth",
        space=space,
        n_trials=64,
        sampler="exhaustive",
    )
    assert (result.trials["fidelity"] == "subset").any()
    assert set(result.pareto["widths"]) == set(truth.pareto["widths"])
    assert (result.pareto["fidelity"] == "full").all()


def test_dead_worker_trials_are_failed(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path
) -> None:
    _run(checkpoint, eval_set, tmp_path, n_trials=3)
    storage = open_storage(None, tmp_path / "s")
    study = optuna.load_study(study_name="s", storage=storage)
    trial = study.ask()
    trial.set_user_attr("worker", f"{__import__('socket').gethostname()}:999999999")
    trial_alive = study.ask()
    trial_alive.set_user_attr(
        "worker", f"{__import__('socket').gethostname()}:{__import__('os').getpid()}"
    )
    assert fail_dead_trials(study) == [trial.number]
    states = {t.number: t.state for t in study.get_trials()}
    assert states[trial.number] == optuna.trial.TrialState.FAIL
    assert states[trial_alive.number] == optuna.trial.TrialState.RUNNING


def test_named_configs_come_first_with_their_kind(
    checkpoint: Checkpoint, eval_set: EvalSet, tmp_path: Path
) -> None:
    named = SeedConfig("named", "lab: Mixed", (64, 16, 32))
    result = run_search(
        MatLMFamily(checkpoint),
        SearchSpace.from_config(checkpoint.config),
        # Sampled: an enumeration labels named configurations but decides in its own order.
        SearchSettings(n_trials=3, objectives=("loss", "params"), seed_configs=False, sampler="gp"),
        eval_set,
        study_name="s",
        results_dir=tmp_path / "s",
        named_configs=[named],
    )
    first = result.trials.iloc[0]
    assert first["source"] == "lab: Mixed" and first["seed_kind"] == "named"
    assert parse_widths_column(first["widths"]) == [64, 16, 32]


@pytest.mark.parametrize(
    ("objectives", "limits", "match"),
    [
        (("loss", "memory"), {}, "cannot compute memory \\(objective memory\\): no model"),
        (("loss", "params"), {"max_memory": 10**6}, "cannot compute memory \\(max_memory\\)"),
    ],
)
def test_objectives_a_family_cannot_compute_are_refused(
    checkpoint: Checkpoint,
    eval_set: EvalSet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    objectives: tuple[str, ...],
    limits: dict,
    match: str,
) -> None:
    family = MatLMFamily(checkpoint)
    monkeypatch.setattr(family, "unsupported_objectives", {"memory": "no model of its memory"})
    with pytest.raises(SearchError, match=f"the matlm family {match}"):
        run_search(
            family,
            SearchSpace.from_config(checkpoint.config),
            SearchSettings(n_trials=3, objectives=objectives, **limits),
            eval_set,
            study_name="s",
            results_dir=tmp_path / "s",
            memory_target=TINY_TARGET,
        )
    assert not (tmp_path / "s").exists()
