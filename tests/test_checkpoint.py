"""Checkpoints: round trips, stable fingerprints, and a clear error for every broken input."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mnm_search.checkpoint import fingerprint, load_checkpoint, load_model, save_checkpoint
from mnm_search.cli import app
from mnm_search.errors import CheckpointError
from mnm_search.model import MatLM
from mnm_search.slicing import slice_model

runner = CliRunner()


def test_round_trip_preserves_weights_and_fingerprint(tiny_model: MatLM, tmp_path: Path) -> None:
    path = save_checkpoint(tiny_model, tmp_path / "ckpt")
    loaded = load_checkpoint(path)
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name])
    assert loaded.fingerprint == fingerprint(tiny_model)
    again = load_checkpoint(save_checkpoint(loaded.model, tmp_path / "again"))
    assert again.fingerprint == loaded.fingerprint
    assert not loaded.model.training


def test_fingerprint_is_stable_across_fp16_storage(tiny_model: MatLM, tmp_path: Path) -> None:
    first = load_checkpoint(save_checkpoint(tiny_model, tmp_path / "a", storage_dtype="float16"))
    second = load_checkpoint(save_checkpoint(first.model, tmp_path / "b", storage_dtype="float16"))
    assert first.fingerprint == second.fingerprint
    assert first.model.wte.weight.dtype == torch.float32


def test_fingerprint_changes_with_weights(tiny_model: MatLM) -> None:
    before = fingerprint(tiny_model)
    with torch.no_grad():
        tiny_model.lm_head.weight[0, 0] += 1e-3
    assert fingerprint(tiny_model) != before


def test_exported_slice_loads_and_runs_dense(tiny_model: MatLM, tmp_path: Path) -> None:
    widths = [8, 0, 64]
    path = save_checkpoint(slice_model(tiny_model, widths), tmp_path / "export")
    assert json.loads((path / "config.json").read_text())["ffn_widths"] == widths
    dense = load_model(path)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert (dense(ids) - tiny_model(ids, widths)).abs().max().item() <= 1e-5


def test_load_model_takes_widths_for_a_universal_checkpoint(
    tiny_model: MatLM, tiny_checkpoint: Path
) -> None:
    model = load_model(tiny_checkpoint)
    assert isinstance(model, torch.nn.Module) and not model.training
    ids = torch.randint(0, 256, (2, 7))
    widths = [8, 32, 0]
    with torch.no_grad():
        assert torch.equal(model(ids, widths=widths), tiny_model(ids, widths))
        assert torch.equal(model(ids), tiny_model(ids))  # no widths: the full model
        assert model(ids).shape == (2, 7, 256)


def test_load_model_without_a_path_is_the_default_checkpoint() -> None:
    import mnm_search

    model = mnm_search.load_model()
    default = load_checkpoint(None).model
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids, widths=[128] * 6), default(ids, [128] * 6))


def test_load_model_loads_a_gemma3n_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from gemma3n_models import save_tiny_checkpoint

    from mnm_search.families import load_family

    path = save_tiny_checkpoint(tmp_path / "gemma")
    try:
        model = load_model(path)
    except NotImplementedError as exc:
        pytest.skip(f"the Gemma 3n family has no module() yet: {exc}")
    family = load_family(path)
    ids = torch.randint(0, 64, (1, 6))
    widths = [128, 64, 256, 192, 0, 64]
    assert not model.training
    with torch.no_grad():
        assert torch.allclose(model(ids, widths=widths), family.logits(ids, widths), atol=1e-5)
        assert model(ids).shape[:2] == (1, 6)


def test_load_model_refuses_an_unsupported_family(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unsupported model family"):
        load_model(tmp_path)


def test_existing_directory_is_not_overwritten(tiny_model: MatLM, tiny_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(tiny_model, tiny_checkpoint)


def test_pickle_payload_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # runs os.system on unpickling
            return (__import__("os").system, (f"touch {marker}",))

    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(ckpt)
    result = runner.invoke(app, ["info", str(ckpt)])
    assert result.exit_code != 0
    assert "never unpickles" in result.output
    assert not marker.exists()


def _break_truncate(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])


def _break_shape(path: Path) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:, :16].contiguous()
    save_file(tensors, str(path / "model.safetensors"))


def _break_missing_key(path: Path) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["blocks.1.ffn.up.weight"]
    save_file(tensors, str(path / "model.safetensors"))


def _break_nan(path: Path) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    tensors["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    save_file(tensors, str(path / "model.safetensors"))


def _break_config_json(path: Path) -> None:
    (path / "config.json").write_text("{not json")


def _break_config_field(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    del config["d_model"]
    (path / "config.json").write_text(json.dumps(config))


def _break_no_weights(path: Path) -> None:
    (path / "model.safetensors").unlink()


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (_break_truncate, "corrupt or truncated"),
        (_break_shape, r"tensor lm_head.weight has shape \[256, 16\]"),
        (_break_missing_key, "missing tensors: blocks.1.ffn.up.weight"),
        (_break_nan, "tensor blocks.0.attn.qkv.weight holds NaN"),
        (_break_config_json, "is not valid JSON"),
        (_break_config_field, "missing required field"),
        (_break_no_weights, "has no model.safetensors"),
    ],
)
def test_broken_checkpoints_give_clear_errors(tiny_checkpoint: Path, breaker, message: str) -> None:
    breaker(tiny_checkpoint)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tiny_checkpoint)
    for command in (["info", str(tiny_checkpoint)], ["eval", str(tiny_checkpoint), "-w", "S*3"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1, result.output
        assert "Error:" in result.output
        assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("path_kind", "message"), [("missing", "does not exist"), ("file", "is a file")]
)
def test_not_a_checkpoint_directory(tmp_path: Path, path_kind: str, message: str) -> None:
    path = tmp_path / "x"
    if path_kind == "file":
        path.write_text("hi")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_config_json_is_strict_json(tiny_model: MatLM, tmp_path: Path) -> None:
    metadata = {"training": {"val_loss": float("nan"), "best": float("inf"), "step": 3}}
    path = save_checkpoint(tiny_model, tmp_path / "ckpt", metadata=metadata)
    text = (path / "config.json").read_text()

    def refuse(constant: str) -> None:
        raise AssertionError(f"config.json holds {constant}, which strict parsers reject")

    config = json.loads(text, parse_constant=refuse)
    assert config["training"] == {"val_loss": None, "best": None, "step": 3}
    assert load_checkpoint(path).metadata["training"]["step"] == 3


SAFETENSORS_FAILURES = [
    (
        "Error while serializing: I/O error: No space left on device (os error 28)",
        "disk full while writing {weights}: free space or choose another --out; "
        "nothing was written",
    ),
    (
        "Error while serializing: I/O error: Permission denied (os error 13)",
        "permission denied for {weights}: fix its permissions or choose another path",
    ),
    ("Error while serializing: odd header", "{weights}: Error while serializing: odd header"),
]


def _failing_save_file(text: str):
    def fail(*args: object, **kwargs: object) -> None:
        raise SafetensorError(text)

    return fail


@pytest.mark.parametrize(("raised", "expected"), SAFETENSORS_FAILURES)
def test_safetensors_write_errors_name_the_file(
    tiny_model: MatLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised: str, expected: str
) -> None:
    monkeypatch.setattr("mnm_search.checkpoint.save_file", _failing_save_file(raised))
    out = tmp_path / "ckpt"
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(tiny_model, out)
    # The destination's file, not the hidden temporary directory it was written in.
    assert expected.format(weights=out / "model.safetensors") in str(caught.value)
    assert ".tmp-" not in str(caught.value)
    assert isinstance(caught.value.__cause__, SafetensorError)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_train_reports_a_safetensors_write_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f_{i}(x):\n    return x * {i}\n" for i in range(200)))
    raised, expected = SAFETENSORS_FAILURES[0]
    monkeypatch.setattr("mnm_search.checkpoint.save_file", _failing_save_file(raised))
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--preset", "tiny", "--data", str(corpus), "--steps", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())  # rich wraps long lines
    assert expected.format(weights=out / "model.safetensors") in output
    assert "Traceback" not in result.output
