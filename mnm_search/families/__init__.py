"""Model families: which adapter serves a checkpoint directory, decided from its `config.json`.

- `matlm`: the native MatFormer LM (`format: mnm-matlm`, written by `mnm train` / `mnm export`).
- `gemma3n`: Google's Gemma 3n through transformers (`model_type` `gemma3n_text` for
  `Gemma3nForCausalLM`, `gemma3n` for the text part of `Gemma3nForConditionalGeneration`);
  needs the optional extra `pip install "mnm-search[hf]"`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnm_search.errors import CheckpointError

if TYPE_CHECKING:
    from mnm_search.families.gemma3n import Gemma3nFamily

NATIVE = "matlm"
GEMMA3N = "gemma3n"
NATIVE_FORMAT = "mnm-matlm"  # same value as mnm_search.checkpoint.FORMAT (no torch import here)
GEMMA3N_MODEL_TYPES = ("gemma3n", "gemma3n_text")

SUPPORTED = {
    NATIVE: f"native MatFormer LM (config.json `format: {NATIVE_FORMAT}`, from `mnm train`)",
    GEMMA3N: (
        "Gemma 3n via transformers (config.json `model_type` "
        + " or ".join(repr(t) for t in GEMMA3N_MODEL_TYPES)
        + ', needs pip install "mnm-search[hf]")'
    ),
}


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in `<path>/config.json`, with errors that say what is wrong."""
    from mnm_search.checkpoint import read_config  # torch-heavy: only when a path is read

    return read_config(path)


def family_of_config(data: dict[str, Any], *, where: str = "config.json") -> str:
    """Family name for a parsed `config.json`; an "unsupported family" error otherwise."""
    if data.get("format") == NATIVE_FORMAT or (
        "model_type" not in data and "d_model" in data and "granularities" in data
    ):
        return NATIVE
    model_type = data.get("model_type")
    if isinstance(model_type, str) and model_type in GEMMA3N_MODEL_TYPES:
        return GEMMA3N
    # Quoted and cut short: these values come from an untrusted file.
    found = f"model_type {model_type!r:.80}" if model_type else "no model_type and no mnm format"
    architectures = data.get("architectures")
    if architectures:
        found += f", architectures {architectures!r:.200}"
    supported = "; ".join(f"{name}: {text}" for name, text in SUPPORTED.items())
    raise CheckpointError(
        f"{where}: unsupported model family ({found}). mnm supports: {supported}. "
        f"Other transformers models are not MatFormers: their FFNs are not nested, so their "
        f"sub-models would not work without retraining"
    )


def detect_family(path: str | Path) -> str:
    """`"matlm"` or `"gemma3n"` for a checkpoint directory (raises for anything else)."""
    path = Path(path)
    return family_of_config(read_config_json(path), where=str(path / "config.json"))


def load_gemma3n(path: str | Path, **kwargs: Any) -> Gemma3nFamily:
    """Load a local Gemma 3n checkpoint; a clear error when transformers is not installed."""
    try:
        from mnm_search.families.gemma3n import Gemma3nFamily
    except ImportError as exc:  # transformers (the `hf` extra) is missing or too old
        raise CheckpointError(
            f"{path} is a Gemma 3n checkpoint, which needs transformers with Gemma 3n support "
            f'(>= 4.53): pip install "mnm-search[hf]" ({exc})'
        ) from exc
    return Gemma3nFamily.load(path, **kwargs)


__all__ = [
    "GEMMA3N",
    "NATIVE",
    "SUPPORTED",
    "detect_family",
    "family_of_config",
    "load_gemma3n",
    "read_config_json",
]
