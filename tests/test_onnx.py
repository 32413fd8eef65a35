"""`--format onnx`: model.onnx with dynamic batch/seq axes, checked through onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mnm_search import export as export_module
from mnm_search.checkpoint import load_checkpoint
from mnm_search.errors import ExportError
from mnm_search.export import export_submodel

ort = pytest.importorskip("onnxruntime")


def test_onnx_export_matches_universal_model(tiny_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = load_checkpoint(tiny_checkpoint)
    widths = [8, 0, 64]
    out = tmp_path / "export"
    report = export_submodel(checkpoint, widths, out, fmt="onnx")
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
    checkpoint = load_checkpoint(tiny_checkpoint)
    monkeypatch.setattr(export_module, "ONNX_TOLERANCE", -1.0)  # any difference fails
    with pytest.raises(ExportError, match="onnxruntime logits differ"):
        export_submodel(checkpoint, [8, 8, 8], tmp_path / "export", fmt="onnx")
    assert not (tmp_path / "export").exists()
