"""Latency measured as a deployment sees it: exported models timed in their own fresh processes,
drift correction through a re-measured reference, and the fresh-process validation block
(structure and behaviour on tiny models, never speed)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mnm_search import _fresh_process, profiler
from mnm_search._fresh_process import export_config, measure_fresh, time_exports, timed_call
from mnm_search.checkpoint import load_model
from mnm_search.errors import ProfileError
from mnm_search.families.matlm import MatLMFamily
from mnm_search.model import MatLM
from mnm_search.targets import HardwareTarget

PREFILL = HardwareTarget(name="fresh-prefill", phase="prefill", seq_len=8, repeats=3, warmup=1)
DECODE = HardwareTarget(name="fresh-decode", phase="decode", context_len=12, repeats=3, warmup=1)


@pytest.mark.parametrize("target", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_fresh_process_round_trip(tiny_model: MatLM, target: HardwareTarget) -> None:
    """Each configuration exported, loaded with load_model in a new process and timed there:
    finite positive timings, one per configuration, `runs` samples each."""
    family = MatLMFamily.from_model(tiny_model)
    done: list[int] = []
    configs = [[8, 16, 0], [64, 64, 64], [8, 16, 0]]
    stats = measure_fresh(
        family, target, configs, warmup=2, runs=4, per_process=2, on_done=done.append
    )
    assert len(stats) == 3 and done == [2, 3]
    for s in stats:
        assert s.n == 4 and len(s.samples_ms) == 4
        assert all(math.isfinite(x) and x > 0 for x in s.samples_ms)
        assert 0 < s.p10_ms <= s.median_ms <= s.p90_ms


@pytest.mark.parametrize("target", [PREFILL, DECODE], ids=["prefill", "decode"])
@torch.inference_mode()
def test_the_timed_call_runs_the_targets_phase(
    tmp_path: Path, tiny_model: MatLM, target: HardwareTarget
) -> None:
    """What the child times is the exported model at the target's phase: prefill is one
    forward over seq_len tokens; decode one cached step that repeats the same position."""
    widths = [8, 64, 16]
    path = export_config(MatLMFamily.from_model(tiny_model), widths, tmp_path / "export")
    model = load_model(path)
    call = timed_call(model, target)
    first, second = call(), call()
    torch.testing.assert_close(first, second)  # every call repeats the same work
    assert first.shape[:2] == (target.batch, target.seq_len)
    assert first.shape[-1] == tiny_model.config.vocab_size


def test_a_failing_child_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        ProfileError, match=r"in a fresh process failed.*CheckpointError.*does not exist"
    ):
        time_exports([tmp_path / "not-an-export"], PREFILL, warmup=0, runs=1)


@pytest.mark.parametrize(("per_process", "runs", "warmup"), [(0, 3, 1), (1, 0, 1), (1, 3, -1)])
def test_bad_fresh_process_settings_are_refused(per_process: int, runs: int, warmup: int) -> None:
    with pytest.raises(ProfileError, match=r"per_process|runs"):
        time_exports([], PREFILL, warmup=warmup, runs=runs, per_process=per_process)


def test_the_child_pins_the_targets_threads(
    tmp_path: Path, tiny_model: MatLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    replies: list[dict] = []
    run_child = _fresh_process._run_child

    def spy(request: dict, *, threads: int | None) -> dict:
        reply = run_child(request, threads=threads)
        replies.append(reply)
        return reply

    monkeypatch.setattr(_fresh_process, "_run_child", spy)
    target = HardwareTarget(name="two", phase="prefill", seq_len=4, threads=2)
    path = export_config(MatLMFamily.from_model(tiny_model), [8, 8, 8], tmp_path / "e")
    time_exports([path], target, warmup=0, runs=1)
    assert replies[0]["threads"] == 2


# ------------------------------------------------------------------------ drift correction

DRIFTS = [
    # (name, machine speed factor as a function of time in [0, 1])
    pytest.param(lambda t: 1.0 + 0.3 * t, id="slowing-down"),
    pytest.param(lambda t: 1.2 - 0.25 * t, id="speeding-up"),
    pytest.param(lambda t: 1.0 if t < 0.5 else 1.4, id="step: another job started"),
    pytest.param(lambda t: 1.0 + 0.2 * math.sin(2 * t), id="wandering"),
]


@pytest.mark.parametrize("drift", DRIFTS)
def test_drift_correction_recovers_the_ratios(drift: Callable[[float], float]) -> None:
    """Timings taken while the machine drifts, with a reference re-timed between them: the
    corrected timings keep the true ratios to the reference, the raw ones do not."""
    truth = [3.0, 5.0, 4.0, 8.0, 6.0, 2.5, 7.0, 4.5, 5.5]
    reference_ms = 10.0
    configs = [[i] for i in range(len(truth))]
    sequence, reference_at = profiler.with_reference(configs, [-1], every=3)
    n = len(sequence) - 1
    timed = [
        (reference_ms if widths == [-1] else truth[widths[0]]) * drift(i / n)
        for i, widths in enumerate(sequence)
    ]
    at = [i for i in range(len(sequence)) if i not in reference_at]
    corrected = profiler.drift_corrected(
        [timed[i] for i in at],
        at=at,
        reference_at=reference_at,
        reference_ms=[timed[i] for i in reference_at],
    )
    level = statistics.median(timed[i] for i in reference_at)
    expected = [t * level / reference_ms for t in truth]
    raw = [timed[i] for i in at]
    corrected_error = sorted(abs(c / e - 1) for c, e in zip(corrected, expected))
    raw_error = sorted(abs(r / e - 1) for r, e in zip(raw, expected))
    # The median config is corrected to within 1 % (a step is exact except next to the jump,
    # where the reference cannot say when it happened); on average 3x better than raw.
    assert corrected_error[len(truth) // 2] < 0.01 < raw_error[len(truth) // 2]
    assert sum(corrected_error) < sum(raw_error) / 3


def test_without_drift_the_correction_changes_nothing() -> None:
    corrected = profiler.drift_corrected(
        [1.0, 2.0, 3.0], at=[1, 2, 4], reference_at=[0, 3, 5], reference_ms=[4.0, 4.0, 4.0]
    )
    assert corrected == pytest.approx([1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reference_at": [], "reference_ms": []}, "at least one reference"),
        ({"reference_at": [0, 0], "reference_ms": [1.0, 1.0]}, "must increase"),
    ],
)
def test_drift_correction_refuses_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        profiler.drift_corrected([1.0], at=[1], **kwargs)


@pytest.mark.parametrize(
    ("n", "every", "expected"),
    [
        (3, 4, [0, 4]),
        (4, 4, [0, 5]),
        (5, 2, [0, 3, 6, 8]),
        (1, 1, [0, 2]),
    ],
)
def test_the_reference_brackets_every_group(n: int, every: int, expected: list[int]) -> None:
    configs = [[i] for i in range(n)]
    sequence, positions = profiler.with_reference(configs, [99], every=every)
    assert positions == expected
    assert [c for c in sequence if c != [99]] == configs
    assert sequence[0] == sequence[-1] == [99]


def test_a_configuration_equal_to_the_reference_is_not_mistaken_for_it() -> None:
    sequence, positions = profiler.with_reference([[1], [99], [2]], [99], every=2)
    assert sequence == [[99], [1], [99], [99], [2], [99]]
    assert positions == [0, 3, 5]
