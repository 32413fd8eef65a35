"""mnm: find the best Mix'n'Match submodel of a MatFormer checkpoint for your hardware."""

from mnm_search.checkpoint import load_checkpoint, load_model, save_checkpoint
from mnm_search.config import ModelConfig, param_count, parse_widths
from mnm_search.errors import MnmError
from mnm_search.families import load_family
from mnm_search.model import MatLM
from mnm_search.slicing import slice_model
from mnm_search.speculative import generate

__version__ = "0.1.0"

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
