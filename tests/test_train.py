"""Nested training: the loss goes down, and an interrupted run resumes exactly where it stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mnm_search.checkpoint import load_checkpoint
from mnm_search.errors import CheckpointError, ConfigError
from mnm_search.train import Trainer, TrainSettings, learning_rate


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    lines = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)]
    path.write_text("".join(lines))
    return path


def _settings(corpus: Path, **overrides) -> TrainSettings:
    base = dict(
        preset="tiny",
        steps=12,
        warmup_steps=2,
        eval_every=6,
        checkpoint_every=4,
        eval_tokens=512,
        data=str(corpus),
        lr=3e-3,
    )
    base.update(overrides)
    return TrainSettings(**base)


def test_training_lowers_the_loss_for_every_granularity(corpus: Path, tmp_path: Path) -> None:
    trainer = Trainer(_settings(corpus, steps=40, eval_every=40), tmp_path / "run")
    before = trainer.validate()
    result = trainer.run()
    for name, loss in result.val_losses.items():
        assert loss < before[name] - 0.5, (name, before[name], loss)
    info = load_checkpoint(tmp_path / "run").metadata["training"]
    assert info["finished"] and info["step"] == 40
    assert set(info["val_losses"]) == {"S", "M", "L", "XL"}


def test_sampled_granularity_mode_trains(corpus: Path, tmp_path: Path) -> None:
    trainer = Trainer(_settings(corpus, granularity_mode="sample"), tmp_path / "run")
    picked = [trainer._configs_for(step) for step in range(12)]
    assert all(len(p) == 1 for p in picked)
    assert len({p[0][0] for p in picked}) > 1  # different granularities across steps
    assert trainer.run().step == 12


def test_mix_mode_adds_a_random_mix_n_match_configuration(corpus: Path, tmp_path: Path) -> None:
    trainer = Trainer(_settings(corpus, granularity_mode="mix"), tmp_path / "run")
    configs = [trainer._configs_for(step) for step in range(12)]
    assert all([name for name, _ in c] == ["S", "M", "L", "XL", "mix"] for c in configs)
    mixes = [c[-1][1] for c in configs]
    assert any(len(set(widths)) > 1 for widths in mixes)  # really mixed across layers
    assert trainer._configs_for(3) == configs[3]  # a function of the step: resumable
    assert trainer.run().step == 12


def test_resume_after_interrupt_matches_an_uninterrupted_run(corpus: Path, tmp_path: Path) -> None:
    reference = Trainer(_settings(corpus), tmp_path / "straight").run()

    def interrupt_at_step_7(event: dict) -> None:
        if event["step"] == 7:
            raise KeyboardInterrupt

    interrupted = Trainer(_settings(corpus), tmp_path / "resumed", on_progress=interrupt_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    assert json.loads((tmp_path / "resumed" / "train_state.json").read_text())["step"] == 7

    resumed = Trainer(_settings(corpus), tmp_path / "resumed")
    assert resumed.step == 7
    result = resumed.run()
    assert result.resumed_from == 7 and result.step == 12
    # Same data order and optimizer state: the per-step losses after the resume are identical.
    assert result.train_losses == pytest.approx(reference.train_losses[7:], abs=1e-6)
    straight = load_checkpoint(tmp_path / "straight").model.state_dict()
    for name, tensor in load_checkpoint(tmp_path / "resumed").model.state_dict().items():
        assert torch.allclose(tensor, straight[name], atol=1e-6), name


def test_sigkill_resumes_from_the_last_checkpoint(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "mnm_search",
        "train",
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--data",
        str(corpus),
        "--steps",
        "100000",
        "--checkpoint-every",
        "3",
        "--eval-every",
        "1000",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "train_state.json"
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert state.exists(), "no checkpoint was written before the kill"
    saved_step = json.loads(state.read_text())["step"]
    assert saved_step % 3 == 0 and saved_step > 0
    assert load_checkpoint(out).config.n_layers == 2  # the checkpoint on disk is complete

    resumed = Trainer(
        TrainSettings(
            preset="tiny",
            steps=saved_step + 2,
            data=str(corpus),
            checkpoint_every=3,
            eval_every=1000,
            eval_tokens=512,
        ),
        out,
    )
    assert resumed.step == saved_step
    assert resumed.run().step == saved_step + 2


def test_output_directory_without_a_run_is_refused(corpus: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="holds no training run"):
        Trainer(_settings(corpus), tmp_path / "taken")


def test_resume_with_another_preset_is_refused(corpus: Path, tmp_path: Path) -> None:
    Trainer(_settings(corpus, steps=2), tmp_path / "run").run()
    with pytest.raises(CheckpointError, match="same --preset and --seed"):
        Trainer(_settings(corpus, steps=4, seed=1), tmp_path / "run")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("preset", "huge", "preset must be one of tiny, small, default, got 'huge'"),
        ("steps", 0, "steps must be positive, got 0"),
        (
            "granularity_mode",
            "one",
            "granularity_mode must be one of all, sample, mix, dense, got 'one'",
        ),
        ("precision", "fp8", "precision must be 'fp32' or 'bf16'"),
    ],
)
def test_settings_validation_names_the_field(field: str, value, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainSettings(**{field: value})


def test_schedule_warms_up_then_decays() -> None:
    settings = TrainSettings(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert learning_rate(settings, 0) == pytest.approx(0.1)
    assert learning_rate(settings, 9) == pytest.approx(1.0)
    assert learning_rate(settings, 100) == pytest.approx(0.1)
    assert learning_rate(settings, 50) < learning_rate(settings, 20)


@pytest.mark.parametrize(
    ("d_ff", "mode", "granularities"),
    [(None, "all", (16, 32, 64, 128)), (64, "mix", (8, 16, 32, 64)), (48, "dense", (48,))],
)
def test_d_ff_and_dense_training_shape_the_model(
    d_ff: int | None, mode: str, granularities: tuple[int, ...]
) -> None:
    config = TrainSettings(preset="tiny", d_ff=d_ff, granularity_mode=mode).model_config
    assert config.granularities == granularities and config.d_ff == granularities[-1]


@pytest.mark.parametrize(
    ("d_ff", "mode", "message"),
    [(4, "dense", r"d_ff must be an integer in \[8, 65536\]"), (60, "all", "multiple of 8")],
)
def test_bad_d_ff_names_the_fix(d_ff: int, mode: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainSettings(preset="tiny", d_ff=d_ff, granularity_mode=mode)
