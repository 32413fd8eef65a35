"""`--format onnx`: model.onnx with dynamic batch/seq axes, checked through onnxruntime."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mnm_search.errors import ExportError
from mnm_search.export import export_submodel
from mnm_search.families import load_family
from mnm_search.families import matlm as matlm_module

ort = pytest.importorskip("onnxruntime")


def test_onnx_export_matches_universal_model(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = load_family(tiny_checkpoint)
    widths = [8, 0, 64]
    out = tmp_path / "export"
    # Everything is written beside --out: nothing through tempfile's default directory.
    elsewhere = tmp_path / "tmpdir"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    old_umask = os.umask(0o022)
    try:
        report = export_submodel(checkpoint, widths, out, fmt="onnx")
    finally:
        os.umask(old_umask)
    assert [p for p in elsewhere.rglob("*") if p.is_file()] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "tiny-ckpt", "tmpdir"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for file in out.iterdir():  # onnx and safetensors write with their own modes
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file
    assert report.onnx_max_abs_diff is not None and report.onnx_max_abs_diff <= 1e-4
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type) == ("input_ids", "tensor(int64)")
    assert (outp.name, outp.type) == ("logits", "tensor(float)")
    assert isinstance(inp.shape[0], str) and isinstance(inp.shape[1], str)  # dynamic axes
    for shape in [(1, 1), (3, 11), (2, checkpoint.config.max_seq_len)]:
        ids = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(2))
        (logits,) = session.run(["logits"], {"input_ids": ids.numpy()})
        with torch.inference_mode():
            expected = checkpoint.model(ids, widths).numpy()
        assert logits.dtype == np.float32 and logits.shape == (*shape, 256)
        assert np.abs(logits - expected).max() <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["verification"]["onnx_max_abs_diff"] == report.onnx_max_abs_diff
    assert "onnxruntime" in (out / "README.md").read_text()


def test_onnx_mismatch_is_refused(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = load_family(tiny_checkpoint)
    monkeypatch.setattr(matlm_module, "ONNX_TOLERANCE", -1.0)  # any difference fails
    with pytest.raises(ExportError, match="onnxruntime logits differ"):
        export_submodel(checkpoint, [8, 8, 8], tmp_path / "export", fmt="onnx")
    assert not (tmp_path / "export").exists()


def test_unloadable_onnx_file_is_an_export_error(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def truncated(model: object, path: Path) -> None:
        path.write_bytes(b"\x08\x07not a protobuf")

    monkeypatch.setattr(matlm_module, "write_onnx", truncated)
    out = tmp_path / "export"
    with pytest.raises(
        ExportError, match=f"onnxruntime cannot load the model.onnx just written for {out} "
    ):
        export_submodel(load_family(tiny_checkpoint), [8, 8, 8], out, fmt="onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-ckpt"]
