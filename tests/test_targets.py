"""Hardware target YAML files: the shipped ones load; bad fields are named with allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

import mnm_search
from mnm_search.errors import ConfigError
from mnm_search.targets import (
    HardwareTarget,
    default_profiles_dir,
    default_target,
    hardware_differences,
    load_target,
    machine_facts,
    shipped_target_names,
)


@pytest.mark.parametrize(
    ("name", "device", "phase"),
    [
        ("cpu-prefill", "cpu", "prefill"),
        ("cpu-decode", "cpu", "decode"),
        ("cpu-batch", "cpu", "prefill"),
        ("cuda-prefill", "cuda:0", "prefill"),
        ("cuda-decode", "cuda:0", "decode"),
    ],
)
def test_shipped_targets_load(name: str, device: str, phase: str) -> None:
    target = load_target(default_profiles_dir() / f"{name}.yaml")
    assert (target.name, target.device, target.phase) == (name, device, phase)
    if target.device == "cpu":
        assert target.threads == 1  # two threads on 2 cores: 9-20 % run-to-run noise
    if target.phase == "decode":
        assert target.seq_len == 1 and target.context_len > 0


def test_default_target_is_cpu_prefill() -> None:
    target = default_target()
    assert (target.name, target.device, target.phase, target.seq_len) == (
        "cpu-prefill",
        "cpu",
        "prefill",
        128,
    )


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "target.yaml"
    path.write_text(text)
    return path


GOOD = "device: cpu\nphase: prefill\nseq_len: 16\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("phase: prefill\nseq_len: 16\n", "missing required field 'device'"),
        ("device: cpu\nseq_len: 16\n", "missing required field 'phase'"),
        ("device: cpu\nphase: train\nseq_len: 16\n", "'phase' must be one of prefill, decode"),
        (GOOD + "dtype: int8\n", "'dtype' must be one of float32, bfloat16, float16, got 'int8'"),
        ("device: gpu\nphase: prefill\nseq_len: 16\n", "'device' must be 'cpu', 'cuda' or"),
        (GOOD + "threads: 0\n", "'threads' must be an integer from 1 to 1,024 .or null"),
        (GOOD + "batch: -2\n", "'batch' must be an integer from 1 to 4,096, got -2"),
        (GOOD + "repeats: 2\n", "'repeats' must be an integer from 3 to"),
        (GOOD + "batch: '4'\n", "'batch' must be an integer"),
        (GOOD + "batchsize: 4\n", "unknown field.*'batchsize'.*allowed fields: name, device"),
        ("device: cpu\nphase: prefill\n", "phase 'prefill' needs field 'seq_len'"),
        ("device: cpu\nphase: decode\n", "phase 'decode' needs field 'context_len'"),
        (GOOD + "context_len: 8\n", "'context_len' must be 0 for phase 'prefill'"),
        ("device: cpu\nphase: decode\ncontext_len: 0\n", "'context_len' must be >= 1"),
        ("", "is empty"),
        ("- cpu\n- prefill\n", "expected a mapping"),
        ("device: [cpu\n", "not valid YAML"),
    ],
)
def test_bad_target_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_target(_write(tmp_path, text))


def test_error_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD + "dtype: int8\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_target(path)


def test_missing_file_lists_shipped_targets(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist.*usable by name.*cpu-decode"):
        load_target(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"target file gpu-fast does not exist.*cpu-prefill"):
        load_target("gpu-fast")


@pytest.mark.parametrize("spec", ["cpu-decode", "cpu-decode.yaml"])
def test_shipped_targets_load_by_bare_name_from_any_directory(
    spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no profiles/ here
    target = load_target(spec)
    assert (target.name, target.phase) == ("cpu-decode", "decode")
    assert target == load_target(default_profiles_dir() / "cpu-decode.yaml")


def test_a_local_file_wins_over_a_shipped_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cpu-decode.yaml").write_text("device: cpu\nphase: decode\ncontext_len: 7\n")
    assert load_target("cpu-decode.yaml").context_len == 7
    # A path with a directory is never looked up among the shipped targets.
    with pytest.raises(ConfigError, match="does not exist"):
        load_target("elsewhere/cpu-prefill.yaml")


def test_shipped_targets_are_package_data_and_listed() -> None:
    assert default_profiles_dir().is_relative_to(Path(mnm_search.__file__).parent)
    assert shipped_target_names() == [
        "cpu-batch",
        "cpu-decode",
        "cpu-prefill",
        "cuda-decode",
        "cuda-prefill",
    ]
    # The repository keeps its top-level profiles/ (DESIGN.md §3), the same files.
    top = Path(__file__).resolve().parent.parent / "profiles"
    assert sorted(p.stem for p in top.glob("*.yaml")) == shipped_target_names()


def test_decode_defaults_to_one_new_token(tmp_path: Path) -> None:
    target = load_target(_write(tmp_path, "device: cpu\nphase: decode\ncontext_len: 100\n"))
    assert (target.seq_len, target.context_len, target.total_len) == (1, 100, 101)
    assert target.name == "target"  # the file's stem


def test_round_trip_through_dict() -> None:
    target = HardwareTarget(name="x", device="cuda:1", phase="decode", context_len=5, threads=None)
    assert HardwareTarget.from_dict(target.to_dict()) == target
    assert target.is_cuda


def test_machine_facts_and_hardware_differences() -> None:
    facts = machine_facts(HardwareTarget(name="x"))
    for key in ("cpu_model", "torch_version", "threads", "gpu_name", "cuda_available"):
        assert key in facts
    assert facts["threads"] == 1
    assert hardware_differences(facts, facts) == []
    other = {**facts, "cpu_model": "Some Other CPU"}
    assert hardware_differences(other, facts) == [
        f"cpu_model 'Some Other CPU' (profiled) vs {facts['cpu_model']!r} (here)"
    ]
    assert hardware_differences({**facts, "gpu_name": "H100"}, facts)[0].startswith("gpu_name")
