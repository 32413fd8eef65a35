"""Write a safetensors file one chunk of rows at a time.

`safetensors.torch.save_file` needs every tensor whole and contiguous in memory. A tensor that
only exists as a computed slice of a larger one (Gemma 3n's per-layer-embedding table without
the dropped layers' blocks: ~4 GB for E4B) would then be copied whole before writing. The file
format is simple enough to stream instead (https://huggingface.co/docs/safetensors): an 8-byte
little-endian header length, a JSON header (padded with spaces to 8 bytes) giving each tensor's
dtype, shape and byte range, then the tensors' bytes back to back. safetensors itself reads
the result, and the tests check that it does.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class StreamedTensor:
    """A tensor to write: its dtype, shape and a function yielding it as consecutive row chunks.

    `chunks()` is called once, while writing; the chunks concatenated along dim 0 must be the
    tensor (a 0-d tensor is one chunk of itself).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(
    path: str | Path, tensors: Sequence[StreamedTensor], *, metadata: dict[str, str] | None = None
) -> int:
    """Write `tensors` to `path` holding one chunk at a time; returns the data bytes written."""
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError(f"tensor names must be unique, got {names}")
    for tensor in tensors:
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{tensor.name}: dtype {tensor.dtype} cannot be written")
    # Widest dtypes first, as safetensors orders them: every tensor starts aligned to its
    # element size (the data section starts 8-aligned).
    order = sorted(tensors, key=lambda t: (-torch.empty((), dtype=t.dtype).element_size(), t.name))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for tensor in order:
        header[tensor.name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    try:
        with Path(path).open("wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            for tensor in order:
                _write_tensor(handle, tensor)
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        # `write()` errors (disk full, file too large) name no file; say which one.
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
    return offset


def _write_tensor(handle: BinaryIO, tensor: StreamedTensor) -> None:
    written = 0
    for chunk in tensor.chunks():
        if chunk.dtype != tensor.dtype or tuple(chunk.shape[1:]) != tensor.shape[1:]:
            raise ValueError(
                f"{tensor.name}: chunk {chunk.dtype} {list(chunk.shape)} does not fit "
                f"{tensor.dtype} {list(tensor.shape)}"
            )
        data = chunk.detach().to("cpu").contiguous()
        nbytes = data.numel() * data.element_size()
        if nbytes:
            # Read in place through a raw pointer, as safetensors does: `.numpy()`
            # would mark the weights' storage as never resizable again.
            handle.write((ctypes.c_ubyte * nbytes).from_address(data.data_ptr()))
        written += nbytes
    if written != tensor.nbytes:
        raise ValueError(
            f"{tensor.name}: chunks gave {written} bytes, the shape needs {tensor.nbytes}"
        )
