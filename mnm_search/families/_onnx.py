"""ONNX export of a sliced model and its check through onnxruntime, for any family whose
sliced module maps `input_ids` [batch, seq] to logits [batch, seq, vocab]."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from mnm_search.errors import ExportError

ONNX_FILE = "model.onnx"


class _QuietExporter:
    """The ONNX exporter logs and warns on stdout/stderr; keep `--json` stdout clean."""

    def __enter__(self) -> None:
        self._logger = logging.getLogger("torch.onnx")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(warnings.catch_warnings())
        self._stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        warnings.simplefilter("ignore")

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._stack.close()
        finally:
            self._logger.setLevel(self._level)


def write_onnx(model: nn.Module, path: Path, *, max_len: int) -> None:
    """`input_ids` int64 [batch, seq] -> `logits` float32 [batch, seq, vocab], dynamic axes
    (sequences of up to `max_len` tokens)."""
    example = torch.zeros((2, min(8, max_len)), dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=max_len)
    with _QuietExporter():
        try:
            program = torch.onnx.export(
                model,
                (example,),
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_shapes={"input_ids": {0: batch, 1: seq}},
                dynamo=True,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many internal types
            raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
        program.save(str(path))


def verify_onnx(
    path: Path, model: nn.Module, *, vocab_size: int, max_len: int, tolerance: float
) -> float:
    """Max abs difference between onnxruntime and torch logits on two input shapes."""
    import onnxruntime as ort  # optional dependency, needed only here

    from mnm_search._files import user_path

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types (Fail, InvalidGraph, ...)
        raise ExportError(
            f"onnxruntime cannot load the {path.name} just written for {user_path(path.parent)} "
            f"({type(exc).__name__}: {exc}); the ONNX file was not written"
        ) from exc
    names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if names != (["input_ids"], ["logits"]):
        raise ExportError(
            f"{user_path(path)} has inputs/outputs {names}, expected input_ids -> logits"
        )
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    # Two shapes: proves the batch and sequence axes are really dynamic.
    for shape in ((2, min(16, max_len)), (1, min(5, max_len))):
        ids = torch.randint(0, vocab_size, shape, generator=generator)
        (logits,) = session.run(["logits"], {"input_ids": ids.numpy()})
        with torch.inference_mode():
            expected = model(ids).float()
        if logits.dtype.name != "float32" or tuple(logits.shape) != tuple(expected.shape):
            raise ExportError(
                f"{path} returned {logits.dtype} {list(logits.shape)}, expected float32 "
                f"{list(expected.shape)}"
            )
        worst = max(worst, float((torch.from_numpy(logits) - expected).abs().max()))
    if not worst <= tolerance:
        raise ExportError(
            f"onnxruntime logits differ from torch by {worst:.3g} (> {tolerance:g}); "
            f"the ONNX file was not written"
        )
    return worst
