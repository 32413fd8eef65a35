"""The streaming safetensors writer: files safetensors itself reads back exactly, clear errors."""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mnm_search._safetensors_writer import StreamedTensor, write_safetensors


def streamed(name: str, tensor: torch.Tensor, rows: int = 2) -> StreamedTensor:
    def chunks() -> Iterator[torch.Tensor]:
        if tensor.dim() == 0:
            yield tensor
            return
        for start in range(0, tensor.shape[0], rows):
            yield tensor[start : start + rows]

    return StreamedTensor(name, tensor.dtype, tuple(tensor.shape), chunks)


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(5, 3, generator=generator).to(torch.bfloat16),
        "b.f32": torch.randn(7, 2, 3, generator=generator),
        "c.f16": torch.randn(3, generator=generator).half(),
        "d.i64": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
        "g.empty": torch.zeros(0, 4),
        "h.u8": torch.arange(11, dtype=torch.uint8),
    }


@pytest.mark.parametrize("rows", [1, 2, 100])
def test_round_trip_matches_save_file(tmp_path: Path, rows: int) -> None:
    tensors = sample_tensors()
    total = write_safetensors(
        tmp_path / "streamed.safetensors",
        [streamed(name, tensor, rows) for name, tensor in tensors.items()],
        metadata={"format": "pt"},
    )
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    got = load_file(str(tmp_path / "streamed.safetensors"))
    reference = load_file(str(tmp_path / "reference.safetensors"))
    assert got.keys() == reference.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert total == sum(t.numel() * t.element_size() for t in tensors.values())
    with safe_open(str(tmp_path / "streamed.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert handle.get_slice("b.f32")[2:4].tolist() == tensors["b.f32"][2:4].tolist()


def test_header_is_padded_and_every_tensor_aligned(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "x.safetensors"
    write_safetensors(path, [streamed(n, t) for n, t in tensors.items()])
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert length % 8 == 0
    header = json.loads(data[8 : 8 + length])
    assert "__metadata__" not in header  # none given
    spans = sorted(entry["data_offsets"] for entry in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(data) - 8 - length
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # no holes
    for name, entry in header.items():
        assert entry["data_offsets"][0] % tensors[name].element_size() == 0, name


def test_chunks_are_pulled_one_at_a_time(tmp_path: Path) -> None:
    """The writer must not collect a tensor's chunks before writing them."""
    alive: list[int] = []

    def chunks() -> Iterator[torch.Tensor]:
        for index in range(4):
            alive.append(index)
            yield torch.full((2, 3), float(index))

    write_safetensors(
        tmp_path / "x.safetensors", [StreamedTensor("t", torch.float32, (8, 3), chunks)]
    )
    assert alive == [0, 1, 2, 3]
    expected = torch.arange(4.0).repeat_interleave(2)[:, None].expand(8, 3)
    assert torch.equal(load_file(str(tmp_path / "x.safetensors"))["t"], expected)


def _short(dtype: torch.dtype = torch.float32) -> StreamedTensor:
    return StreamedTensor("t", dtype, (4, 3), lambda: iter([torch.zeros(2, 3, dtype=dtype)]))


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ([streamed("t", torch.zeros(2)), streamed("t", torch.ones(2))], "unique"),
        ([streamed("z", torch.zeros(2, dtype=torch.complex64))], "complex64 cannot be written"),
        ([_short()], "chunks gave 24 bytes, the shape needs 48"),
        (
            [StreamedTensor("t", torch.float32, (4, 3), lambda: iter([torch.zeros(4, 2)]))],
            r"does not fit torch.float32 \[4, 3\]",
        ),
        (
            [StreamedTensor("t", torch.float32, (2,), lambda: iter([torch.zeros(2).half()]))],
            "does not fit",
        ),
    ],
)
def test_inconsistent_tensors_are_refused(
    tmp_path: Path, tensors: list[StreamedTensor], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        write_safetensors(tmp_path / "x.safetensors", tensors)


def test_written_tensors_stay_resizable(tmp_path: Path) -> None:
    """Export frees and re-reads the loaded weights in place after writing them."""
    weights = torch.randn(6, 4)
    write_safetensors(tmp_path / "x.safetensors", [streamed("w", weights)])
    storage = weights.untyped_storage()
    storage.resize_(0)
    storage.resize_(6 * 4 * 4)
