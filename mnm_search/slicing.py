"""Physical slicing: a universal model at given widths -> a dense model with only those weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from mnm_search.config import validate_widths
from mnm_search.model import MatLM


def slice_state_dict(model: MatLM, widths: Sequence[int]) -> dict[str, torch.Tensor]:
    """Contiguous copies of the weights the configuration `widths` uses, nothing more."""
    widths = validate_widths(widths, model.config)
    sliced: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("blocks.") and (".ffn." in name or ".ffn_norm." in name):
            layer = int(name.split(".")[1])
            width = widths[layer]
            if width == 0:
                continue  # a skipped FFN stores nothing
            if name.endswith("ffn.up.weight"):
                tensor = tensor[:width]  # rows = hidden neurons
            elif name.endswith("ffn.down.weight"):
                tensor = tensor[:, :width]  # columns = hidden neurons
        sliced[name] = tensor.detach().clone().contiguous()
    return sliced


def slice_model(model: MatLM, widths: Sequence[int]) -> MatLM:
    """A dense `MatLM` whose layer `i` stores exactly `widths[i]` FFN neurons."""
    widths = validate_widths(widths, model.config)
    config = dataclasses.replace(model.config, ffn_widths=tuple(widths))
    with torch.device("meta"):
        dense = MatLM(config)
    dense.load_state_dict(slice_state_dict(model, widths), assign=True)
    return dense.eval()
