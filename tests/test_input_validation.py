"""Every file mnm reads is validated before anything is allocated (issue 11).

Malformed inputs must give a typed `MnmError` naming the file, the field and the value, never
a traceback, a memory exhaustion or a silent NaN. Table-driven: several variants per class.
"""

from __future__ import annotations

import json
import math
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mnm_search.checkpoint import load_checkpoint
from mnm_search.cli import app
from mnm_search.config import ModelConfig, expand_widths_spec, parse_widths
from mnm_search.data import load_eval_set, read_text_data
from mnm_search.errors import CheckpointError, ConfigError, DataError, ProfileError, WidthsError
from mnm_search.families.matformer_lab import read_matformer_lab_csv
from mnm_search.latency import PROFILE_FORMAT, LatencyModel
from mnm_search.targets import HardwareTarget, load_target, machine_facts
from mnm_search.train import Trainer, TrainSettings, portable_command

runner = CliRunner()


def _assert_clean_cli_error(args: list[str], message: str) -> None:
    """The CLI exits 1 with one `Error:` paragraph naming `message`, no traceback."""
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Error:" in result.output
    assert "Traceback" not in result.output
    assert message in " ".join(result.output.split()), result.output


# ------------------------------------------------------------------ model config (config.json)


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(config: dict[str, Any]) -> None:
        config[field] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set("n_layers", 10**7), "n_layers is 10,000,000, above the limit of 4,096"),
        (_set("d_model", 10**9), "d_model is 1,000,000,000, above the limit"),
        (_set("vocab_size", 10**12), "vocab_size is 1,000,000,000,000, above the limit"),
        (_set("max_seq_len", 10**9), "max_seq_len is 1,000,000,000, above the limit"),
        (_set("n_layers", "3"), "n_layers must be a positive integer, got '3'"),
        (_set("n_layers", True), "n_layers must be a positive integer, got True"),
        (_set("d_model", 32.0), "d_model must be a positive integer, got 32.0"),
        (_set("d_ff", {"a": 1}), "d_ff must be a positive integer"),
        (_set("granularities", ["8", "16", "32", "64"]), "granularities[0] must be an integer"),
        (_set("granularities", "8,16"), "granularities must be a list of integers"),
        (_set("granularities", [8, 16, [32], 64]), "granularities[2] must be an integer"),
        (_set("ffn_widths", [64, "64", 64]), "ffn_widths[1] must be an integer"),
        (_set("norm_eps", float("nan")), "norm_eps must be a finite number in (0, 1)"),
        (_set("norm_eps", float("inf")), "norm_eps must be a finite number in (0, 1)"),
        (_set("norm_eps", -1e-5), "norm_eps must be a finite number in (0, 1)"),
        (_set("norm_eps", "1e-5"), "norm_eps must be a finite number in (0, 1)"),
        # Within every cap, but terabytes of weights: refused from the estimate.
        (
            lambda c: c.update(
                d_model=65_536, n_heads=2, n_layers=4096, d_ff=64, granularities=[8, 16, 32, 64]
            ),
            "TiB to load, but this machine has",
        ),
    ],
)
def test_bad_model_config_is_refused_before_allocating(
    tiny_checkpoint: Path,
    mutate: Callable[[dict[str, Any]], None],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tiny_checkpoint / "config.json"
    config = json.loads(path.read_text())
    mutate(config)
    path.write_text(json.dumps(config))

    def never_built(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was built from a config that should be refused")

    # Refused from config.json alone: not even the (meta-device) model is constructed.
    monkeypatch.setattr("mnm_search.checkpoint.MatLM", never_built)
    with pytest.raises(CheckpointError, match=r"config\.json: ") as caught:
        load_checkpoint(tiny_checkpoint)
    assert message in str(caught.value)
    _assert_clean_cli_error(["info", str(tiny_checkpoint)], message)


def test_model_config_constructor_refuses_huge_sizes_directly() -> None:
    with pytest.raises(ConfigError, match="n_layers is 10,000,000"):
        ModelConfig(d_model=32, n_layers=10**7, n_heads=2, d_ff=64, granularities=(64,))


def test_config_json_with_a_4301_digit_integer_is_refused(tiny_checkpoint: Path) -> None:
    path = tiny_checkpoint / "config.json"
    path.write_text(path.read_text().replace('"n_layers": 3', '"n_layers": ' + "9" * 4301))
    _assert_clean_cli_error(["info", str(tiny_checkpoint)], "is not valid JSON")


def test_oversized_config_json_is_refused(tiny_checkpoint: Path) -> None:
    path = tiny_checkpoint / "config.json"
    config = json.loads(path.read_text())
    config["padding"] = "x" * (5 * 1024 * 1024)
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="a model config is a few kB"):
        load_checkpoint(tiny_checkpoint)


# ------------------------------------------------------------------------ safetensors weights


def _weights_garbage(path: Path) -> None:
    (path / "model.safetensors").write_bytes(b"\xff" * 64)


def _weights_huge_header(path: Path) -> None:
    # A header length of 2**60 bytes: must not be allocated.
    (path / "model.safetensors").write_bytes((2**60).to_bytes(8, "little") + b"{}")


def _weights_int_dtype(path: Path) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"].to(torch.int32)
    save_file(tensors, str(path / "model.safetensors"))


def _weights_wrong_shape(path: Path) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    tensors["blocks.0.ffn.up.weight"] = torch.zeros(8, 32)
    save_file(tensors, str(path / "model.safetensors"))


def _weights_extra_tensor(path: Path) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    tensors["evil"] = torch.zeros(3)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (_weights_garbage, "is corrupt or truncated"),
        (_weights_huge_header, "is corrupt or truncated"),
        (_weights_int_dtype, "tensor lm_head.weight has dtype I32, but weights must be floats"),
        (_weights_wrong_shape, "tensor blocks.0.ffn.up.weight has shape [8, 32]"),
        (_weights_extra_tensor, "unexpected tensors: evil"),
    ],
)
def test_bad_weights_name_the_file_and_the_fix(
    tiny_checkpoint: Path, breaker: Callable[[Path], None], message: str
) -> None:
    breaker(tiny_checkpoint)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tiny_checkpoint)
    text = str(caught.value)
    assert message in text
    assert "model.safetensors" in text
    assert "re-copy the checkpoint or export it again" in text
    _assert_clean_cli_error(["info", str(tiny_checkpoint)], message)


# ---------------------------------------------------------------------------- widths syntax

G4 = ModelConfig(d_model=32, n_layers=4, n_heads=2, d_ff=64, granularities=(8, 16, 32, 64))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("S*99999999999", "more than 4 entries (at entry 0, 'S*99999999999')"),
        ("S*" + "9" * 5000, "more than 4 entries (at entry 0"),
        ("S,M,L*99999999999", "more than 4 entries (at entry 2, 'L*99999999999')"),
        ("S,M,L,XL,S", "more than 4 entries (at entry 4, 'S')"),
        ("S*3,M*2", "more than 4 entries (at entry 1, 'M*2')"),
    ],
)
def test_widths_repetition_is_bounded_before_expanding(spec: str, message: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(WidthsError) as caught:
            parse_widths(spec, G4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message in str(caught.value)
    # Nothing was expanded: a list of even 10**6 entries would take 8 MB.
    assert peak < 1_000_000, f"{peak:,} bytes allocated while refusing {spec[:20]!r}"


def test_expand_widths_spec_has_an_absolute_bound() -> None:
    with pytest.raises(WidthsError, match="more than 4,096 entries"):
        expand_widths_spec("S*10000000000")


@pytest.mark.parametrize("spec", ["S*99999999999", "S*" + "9" * 5000, "XL*3,S*4000000000"])
def test_eval_refuses_huge_repeat_counts(tiny_checkpoint: Path, spec: str) -> None:
    # The message comes from the bounded parser: nothing was expanded first.
    _assert_clean_cli_error(
        ["eval", str(tiny_checkpoint), "--widths", spec], "but there are only 3 layers"
    )


# ----------------------------------------------------------------------- hardware target YAML

GOOD_TARGET = "device: cpu\nphase: prefill\nseq_len: 16\n"
ALIAS_BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
    )
    + GOOD_TARGET
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (ALIAS_BOMB, "YAML anchors and aliases (&name, *name) are not allowed"),
        ("base: &b cpu\ndevice: *b\nphase: prefill\nseq_len: 16\n", "anchors and aliases"),
        (GOOD_TARGET + "name: x/../../escaped\n", "target field 'name' must be a plain name"),
        (GOOD_TARGET + "name: ..\n", "target field 'name' must be a plain name"),
        (GOOD_TARGET + "name: a..b\n", "target field 'name' must be a plain name"),
        (GOOD_TARGET + "name: /etc/passwd\n", "target field 'name' must be a plain name"),
        (GOOD_TARGET + "name: 123\n", "target field 'name' must be a plain name"),
        (GOOD_TARGET + "name: " + "a" * 65 + "\n", "target field 'name' must be a plain name"),
        (GOOD_TARGET + "batch: 1000000000\n", "'batch' must be an integer from 1 to 4,096"),
        (GOOD_TARGET + "threads: 100000\n", "'threads' must be an integer from 1 to 1,024"),
        (GOOD_TARGET + "repeats: 10000000\n", "'repeats' must be an integer from 3 to 10,000"),
        (GOOD_TARGET + "batch: 2.0\n", "'batch' must be an integer from 1 to 4,096, got 2.0"),
        (GOOD_TARGET + "warmup: [1]\n", "'warmup' must be an integer from 0 to 1,000"),
        (
            "device: cpu\nphase: prefill\nseq_len: 1000000000\n",
            "'seq_len' must be an integer from 1 to 1,048,576",
        ),
        (
            "device: cpu\nphase: decode\ncontext_len: 99999999999\n",
            "'context_len' must be an integer from 0 to 1,048,576",
        ),
        (GOOD_TARGET + "description: [a, b]\n", "'description' must be a string"),
        (GOOD_TARGET + "1: 2\nnull: 3\n", "unknown field(s) 1, None"),
        (GOOD_TARGET + "x: !!python/object/apply:os.system [ls]\n", "is not valid YAML"),
        ("# padding\n" * 8000 + GOOD_TARGET, "a target is a few lines"),
    ],
)
def test_bad_target_yaml_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "target.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_target(path)
    assert message in str(caught.value)


def test_alias_bomb_through_the_cli(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    _assert_clean_cli_error(
        ["profile", str(tiny_checkpoint), "--target", str(path), "--quick"],
        "anchors and aliases",
    )


@pytest.mark.parametrize(
    ("stem", "name"), [("my target", "my-target"), ("..evil..name", "evil.name"), ("...", "target")]
)
def test_default_target_name_from_the_file_name_is_safe(
    tmp_path: Path, stem: str, name: str
) -> None:
    path = tmp_path / f"{stem}.yaml"
    path.write_text(GOOD_TARGET)
    assert load_target(path).name == name


# -------------------------------------------------------------------------- latency profiles

TARGET = HardwareTarget(name="unit", device="cpu", phase="prefill", seq_len=8)


def _profile(**latency: Any) -> dict[str, Any]:
    model = {
        "measured_widths": [8, 16, 32, 64],
        "ffn_ms": [[1.0, 2.0, 4.0, 8.0], [2.0, 3.0, 5.0, 9.0], [1.0, 2.0, 3.0, 4.0]],
        "fixed_ms": 10.0,
        "coefficients": [1.0, 1.0, 0.5],
    }
    model.update(latency)
    return {
        "format": PROFILE_FORMAT,
        "target": TARGET.to_dict(),
        "device": machine_facts(TARGET),
        "checkpoint": {"fingerprint": "abc", "d_ff": 64, "n_layers": 3},
        "latency_model": model,
    }


def _with_checkpoint(**fields: Any) -> dict[str, Any]:
    profile = _profile()
    profile["checkpoint"].update(fields)
    return profile


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        (
            _profile(coefficients=[float("nan"), 1.0, 1.0]),
            "coefficients[0] must be finite, got nan",
        ),
        (
            _profile(coefficients=[1.0, float("inf"), 1.0]),
            "coefficients[1] must be finite, got inf",
        ),
        (_profile(fixed_ms=float("nan")), "fixed_ms must be finite, got nan"),
        (_profile(fixed_ms=-5.0), "fixed_ms must be a time >= 0 ms, got -5.0"),
        (
            _profile(ffn_ms=[[1.0, 2.0, -4.0, 8.0], [2.0, 3.0, 5.0, 9.0], [1.0, 2.0, 3.0, 4.0]]),
            "ffn_ms[0][2] (layer 0, width 32) must be a time >= 0 ms, got -4.0",
        ),
        (
            _profile(ffn_ms=[[1.0, 2.0, 4.0, "8"], [2.0, 3.0, 5.0, 9.0], [1.0, 2.0, 3.0, 4.0]]),
            "ffn_ms[0][3] must be a number, got '8'",
        ),
        (_profile(ffn_ms="fast"), "ffn_ms must be a list of rows"),
        (_profile(measured_widths=[8, "16", 32, 64]), "measured_widths[1] must be an integer"),
        (_profile(measured_widths=[8, 16, 32, 128]), "strictly increasing widths in [1, d_ff=64]"),
        (_profile(coefficients=[-1000.0, 1.0, 1.0]), "a latency must be positive"),
        (_with_checkpoint(n_layers=6), "checkpoint.n_layers is 6, but ffn_ms holds 3 rows"),
        (_with_checkpoint(fingerprint=None), "fingerprint must be a non-empty string, got None"),
        (_with_checkpoint(d_ff=True), "d_ff must be an integer from 1 to"),
        (_with_checkpoint(d_ff=10**12), "d_ff must be an integer from 1 to"),
    ],
)
def test_bad_latency_profile_is_refused(
    tmp_path: Path, profile: dict[str, Any], message: str
) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))  # json writes NaN/Infinity, as a hand edit could
    with pytest.raises(ProfileError) as caught:
        LatencyModel.load(path)
    text = str(caught.value)
    assert message in text
    assert str(path) in text
    assert "mnm profile" in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"format": "mnm-latency-profile", "x": ' + "1" * 5000 + "}", "corrupt"),
        ("[" * 100_000, "nested too deeply"),
    ],
)
def test_pathological_profile_json_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "profile.json"
    path.write_text(text)
    with pytest.raises(ProfileError, match=message):
        LatencyModel.load(path)


def test_profile_with_odd_device_facts_loads(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({**_profile(), "device": ["not", "a", "mapping"]}))
    with pytest.warns(UserWarning, match="other hardware"):  # unknown hardware: warned
        assert LatencyModel.load(path).n_layers == 3


def test_valid_profile_still_predicts(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(_profile()))
    predicted = LatencyModel.load(path).predict_ms([8, 16, 64])
    assert math.isfinite(predicted) and predicted > 0


def test_nan_profile_through_eval_is_an_error(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = tmp_path / "profile.json"
    profile = _profile(coefficients=[float("nan"), 1.0, 1.0])
    # this checkpoint's own profile: another checkpoint's is refused for that first
    profile["checkpoint"]["fingerprint"] = load_checkpoint(tiny_checkpoint).fingerprint
    path.write_text(json.dumps(profile))
    _assert_clean_cli_error(
        ["eval", str(tiny_checkpoint), "--widths", "S*3", "--profile", str(path)],
        "coefficients[0] must be finite",
    )


# ------------------------------------------------------------------------ train_state.json

STATE_OK: dict[str, Any] = {
    "step": 2,
    "settings": {"preset": "tiny", "steps": 4, "eval_tokens": 512},
    "param_groups": [{}, {}],
    "log": [],
    "tokens_seen": 0,
    "elapsed_s": 1.0,
    "commands": [],
}


def _state(**changes: Any) -> str:
    return json.dumps({**STATE_OK, **changes})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        (_state(step="2"), "field 'step' is missing or invalid ('2')"),
        (_state(step=True), "field 'step' is missing or invalid (True)"),
        (_state(step=99), "field 'step' is 99, outside [0, 4]"),
        (_state(step=-1), "field 'step' is -1, outside [0, 4]"),
        (_state(settings={"preset": "tiny", "steps": "many"}), "steps must be an integer"),
        (_state(settings={"preset": "tiny", "lr": float("nan")}), "lr must be finite"),
        (_state(settings={"preset": "tiny", "bogus": 1}), "field 'settings' is invalid"),
        (_state(elapsed_s=float("nan")), "must be finite and >= 0"),
        (_state(tokens_seen=-5), "must be finite and >= 0"),
        (_state(commands=[1, 2]), "field 'commands' must be a list of strings"),
        (_state(log=[1]), "field 'log' must be a list of objects"),
    ],
)
def test_bad_train_state_is_refused(tmp_path: Path, content: str, message: str) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_state.json").write_text(content)
    settings = TrainSettings(preset="tiny", steps=4, eval_tokens=512, data=str(corpus))
    with pytest.raises(CheckpointError) as caught:
        Trainer(settings, out)
    assert message in str(caught.value)
    assert "train_state.json" in str(caught.value)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            "mnm train --out /work/train_default --preset default",
            "mnm train --out train_default --preset default",
        ),
        ("mnm train --data=/home/alice/corpus.txt", "mnm train --data=corpus.txt"),
        ("mnm train --out runs/x --data ~/c.txt", "mnm train --out runs/x --data c.txt"),
        ("mnm train --out '/a b/my run'", "mnm train --out 'my run'"),
    ],
)
def test_recorded_commands_hold_no_absolute_paths(command: str, expected: str) -> None:
    assert portable_command(command) == expected


def test_provenance_records_portable_paths(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    out = tmp_path / "run"
    settings = TrainSettings(
        preset="tiny", steps=1, eval_every=1, eval_tokens=64, data=str(corpus), warmup_steps=0
    )
    Trainer(settings, out, command=f"mnm train --out {out} --data {corpus}").run()
    recorded = json.dumps(json.loads((out / "config.json").read_text())["training"])
    assert str(tmp_path) not in recorded
    assert "mnm train --out run --data corpus.txt" in recorded


# ------------------------------------------------------------------------------ --data files


class _CountingReads:
    """Counts the bytes/characters read through `Path.open` (old code read whole files)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.total = 0
        original = Path.open
        counter = self

        class Handle:
            def __init__(self, handle: Any) -> None:
                self._handle = handle

            def read(self, size: int = -1) -> Any:
                data = self._handle.read(size)
                counter.total += len(data)
                return data

            def __enter__(self) -> Handle:
                return self

            def __exit__(self, *exc: object) -> None:
                self._handle.close()

            def __getattr__(self, name: str) -> Any:
                return getattr(self._handle, name)

        def counting_open(path: Path, *args: Any, **kwargs: Any) -> Any:
            return Handle(original(path, *args, **kwargs))

        monkeypatch.setattr(Path, "open", counting_open)


@pytest.mark.parametrize("layout", ["file", "directory"])
def test_eval_reads_only_the_bytes_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 50_000  # 2.2 MB
    if layout == "file":
        data = tmp_path / "big.txt"
        data.write_text(text)
    else:
        data = tmp_path / "corpus"
        data.mkdir()
        for i in range(5):
            (data / f"part{i}.txt").write_text(text[i * 400_000 : (i + 1) * 400_000])
    expected = load_eval_set(data, seq_len=32, max_tokens=256)
    reads = _CountingReads(monkeypatch)
    eval_set = load_eval_set(data, seq_len=32, max_tokens=256)
    assert torch.equal(eval_set.inputs, expected.inputs)
    assert eval_set.inputs.shape == (8, 32)
    assert reads.total <= 8 * 33 + 16  # the windows' bytes plus the UTF-8 margin


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"text\x00\x01\x02binary", "holds a NUL byte at offset 4, so it is binary"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "so it is binary"),
        (b"   \n\n  ", "holds no text"),
    ],
)
def test_binary_or_empty_data_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_text_data(path)


def test_invalid_utf8_is_replaced_as_documented(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café ".encode("latin-1") * 10)
    assert read_text_data(path).startswith("caf\ufffd ")


def test_binary_data_through_eval(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = tmp_path / "data.bin.txt"
    path.write_bytes(b"\x00" * 4096)
    _assert_clean_cli_error(
        ["eval", str(tiny_checkpoint), "--widths", "S*3", "--data", str(path)], "binary"
    )


# ------------------------------------------------------------------------- MatFormer Lab CSV

LAB_HEADER = (
    "name,# Layers,# Effective Params (B),MMLU PT accuracy,FFN Hidden Dims,Layers Skipped\n"
)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('A,2,,,"[1e308 * 1e308, 2048]",', "value out of range"),
        ('A,2,,,"[2 ** 2048, 2048]",', "only numbers"),
        ('A,2,,,"[2048 * 2048 * 2048 * 2048, 2048]",', "value out of range"),
        ('A,2,,,"[' + "(" * 5000 + "1" + ")" * 5000 + ', 1]",', "must be a list like"),
        ('A,2,,,"[4_000_000, 2048]",', "ffn_hidden_dims must be positive integers"),
        ('A,2,,,"[2048, 2048]","[100000]"', "layers_skipped must be distinct layer indices"),
        ('A,2,,150%,"[2048, 2048]",', "mmlu_accuracy must be a number from 0 to 100"),
        ('A,2,-3,,"[2048, 2048]",', "effective_params_b must be a number from 0"),
    ],
)
def test_bad_matformer_lab_rows_are_refused(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "lab.csv"
    path.write_text(LAB_HEADER + row + "\n")
    with pytest.raises(ConfigError) as caught:
        read_matformer_lab_csv(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_oversized_matformer_lab_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lab.csv"
    path.write_text(LAB_HEADER + 'A,2,,,"[2048, 2048]",\n' * 200_000)
    with pytest.raises(ConfigError, match="the published table is a few kB"):
        read_matformer_lab_csv(path)


# -------------------------------------------------------------------- Gemma 3n config.json

GEMMA_TEXT = {"model_type": "gemma3n_text"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_hidden_layers": 10**7}, "field 'num_hidden_layers' must be an integer from 1"),
        ({"hidden_size": "2048"}, "field 'hidden_size' must be an integer from 1"),
        ({"vocab_size": 10**12}, "field 'vocab_size' must be an integer from 1"),
        ({"intermediate_size": ["16384"] * 35}, "field 'intermediate_size' must be an integer"),
        ({"intermediate_size": 10**9}, "field 'intermediate_size' must be an integer"),
        ({"num_hidden_layers": 4, "intermediate_size": [64] * 5}, "one width per layer (4)"),
        ({"layer_types": "full_attention"}, "field 'layer_types' must be a list of strings"),
        ({"rms_norm_eps": float("nan")}, "field 'rms_norm_eps' must be a finite number"),
    ],
)
def test_bad_gemma3n_config_is_refused(
    tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    pytest.importorskip("transformers")
    from mnm_search.families.gemma3n import Gemma3nFamily

    (tmp_path / "config.json").write_text(json.dumps({**GEMMA_TEXT, **fields}))
    with pytest.raises(CheckpointError) as caught:
        Gemma3nFamily.load(tmp_path, weights=False)
    assert message in str(caught.value)
    assert "config.json" in str(caught.value)
    _assert_clean_cli_error(["info", str(tmp_path)], message)


def test_gemma3n_weights_that_cannot_fit_are_refused_before_allocating(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import Gemma3nTextConfig

    from mnm_search.families.gemma3n import _check_fits

    config = Gemma3nTextConfig(hidden_size=65_536, vocab_size=4_000_000)
    with pytest.raises(CheckpointError, match="but this machine has"):
        _check_fits(config, torch.float32, tmp_path)


@pytest.mark.parametrize("spec", ["256*99999999999", "256*" + "9" * 5000, "256*6,0"])
def test_gemma3n_widths_repetition_is_bounded(spec: str) -> None:
    pytest.importorskip("transformers")
    from gemma3n_models import random_model, tiny_config

    from mnm_search.families.gemma3n import Gemma3nFamily

    family = Gemma3nFamily(model=random_model(tiny_config()))
    with pytest.raises(WidthsError, match="but there are only 6 layers"):
        family.parse_widths(spec)
