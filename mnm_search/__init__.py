"""mnm: find the best Mix'n'Match submodel of a MatFormer checkpoint for your hardware.

The public names below are imported on first use (PEP 562), so that `import mnm_search`,
and with it `mnm --help`, does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "MatLM": "mnm_search.model",
    "MnmError": "mnm_search.errors",
    "ModelConfig": "mnm_search.config",
    "generate": "mnm_search.speculative",
    "load_checkpoint": "mnm_search.checkpoint",
    "load_family": "mnm_search.families",
    "load_model": "mnm_search.checkpoint",
    "param_count": "mnm_search.config",
    "parse_widths": "mnm_search.config",
    "save_checkpoint": "mnm_search.checkpoint",
    "slice_model": "mnm_search.slicing",
}

__all__ = [
    "MatLM",
    "MnmError",
    "ModelConfig",
    "__version__",
    "generate",
    "load_checkpoint",
    "load_family",
    "load_model",
    "param_count",
    "parse_widths",
    "save_checkpoint",
    "slice_model",
]

if TYPE_CHECKING:
    from mnm_search.checkpoint import load_checkpoint, load_model, save_checkpoint
    from mnm_search.config import ModelConfig, param_count, parse_widths
    from mnm_search.errors import MnmError
    from mnm_search.families import load_family
    from mnm_search.model import MatLM
    from mnm_search.slicing import slice_model
    from mnm_search.speculative import generate


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
