"""Model families: the registry, and which family serves a checkpoint directory.

Every family, the native one included, registers here or from its own module through
`register_family` (name, a cheap detector on `config.json`, a loader); code outside this
package loads checkpoints with `load_family` and uses only the `Family` interface
(`mnm_search.families.base`). The built-in families:

- `matlm`: the native MatFormer LM (`format: mnm-matlm`, written by `mnm train` / `mnm export`);
- `llama`: dense Llama-architecture models (Llama, SmolLM, Mistral, Qwen2) from a transformers
  directory or a GGUF file, nested by `mnm matformerize`;
- `gemma3n`: Google's Gemma 3n through transformers (`model_type` `gemma3n_text` for
  `Gemma3nForCausalLM`, `gemma3n` for the text part of `Gemma3nForConditionalGeneration`);
  needs the optional extra `pip install "mnm-search[hf]"`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnm_search.errors import CheckpointError
from mnm_search.families.base import (
    FamilyEntry,
    family_for_config,
    family_for_file,
    family_for_module,
    register_family,
    registered_families,
    unregister_family,
)

if TYPE_CHECKING:
    from mnm_search.families.base import Family

NATIVE_FORMAT = "mnm-matlm"  # same value as mnm_search.checkpoint.FORMAT (no torch import here)
GEMMA3N_MODEL_TYPES = ("gemma3n", "gemma3n_text")
LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")  # same values as families.llama.MODEL_TYPES


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in `<path>/config.json`, with errors that say what is wrong."""
    from mnm_search.checkpoint import read_config  # torch-heavy: only when a path is read

    return read_config(path)


def detect_family(path: str | Path) -> str:
    """The registered family name of a checkpoint directory (raises for anything else)."""
    return _entry_for(Path(path)).name


def load_family(
    path: str | Path | None = None,
    *,
    weights: bool = True,
    dtype: str | None = None,
    step: int | None = None,
) -> Family:
    """Load any registered family's checkpoint (None: the embedded default checkpoint)."""
    if path is None:
        path = _default_path()
    path = Path(path)
    return _entry_for(path).load(path, weights=weights, dtype=dtype, step=step)


def _entry_for(path: Path) -> FamilyEntry:
    if path.is_file():
        return family_for_file(path)
    return family_for_config(read_config_json(path), where=str(path / "config.json"))


def _default_path() -> Path:
    from mnm_search.checkpoint import default_checkpoint_path

    return default_checkpoint_path()


def _lazy_loader(module: str, cls: str, *, missing: str | None = None) -> Any:
    """A loader importing `module` only when a checkpoint of its family is loaded."""

    def load(path: Path, **options: Any) -> Family:
        try:
            family_cls = getattr(importlib.import_module(module), cls)
        except ImportError as exc:
            if missing is None:
                raise
            raise CheckpointError(f"{path} is {missing} ({exc})") from exc
        return family_cls.load(path, **options)

    return load


def _lazy_wrapper(module: str, cls: str) -> Any:
    """A `wrap` importing `module` only when one of its family's modules is decoded."""

    def wrap(model: Any) -> Family:
        return getattr(importlib.import_module(module), cls).from_module(model)

    return wrap


def _is_native(config: dict[str, Any]) -> bool:
    return config.get("format") == NATIVE_FORMAT or (
        "model_type" not in config and "d_model" in config and "granularities" in config
    )


def _is_gemma3n(config: dict[str, Any]) -> bool:
    return config.get("model_type") in GEMMA3N_MODEL_TYPES


def _is_llama(config: dict[str, Any]) -> bool:
    return config.get("model_type") in LLAMA_MODEL_TYPES


register_family(
    "matlm",
    summary=f"native MatFormer LM (config.json `format: {NATIVE_FORMAT}`, from `mnm train`)",
    detect=_is_native,
    load=_lazy_loader("mnm_search.families.matlm", "MatLMFamily"),
    modules=("mnm_search.model.MatLM",),
    wrap=_lazy_wrapper("mnm_search.families.matlm", "MatLMFamily"),
)
register_family(
    "gemma3n",
    summary=(
        "Gemma 3n via transformers (config.json `model_type` "
        + " or ".join(repr(t) for t in GEMMA3N_MODEL_TYPES)
        + ', needs pip install "mnm-search[hf]")'
    ),
    detect=_is_gemma3n,
    load=_lazy_loader(
        "mnm_search.families.gemma3n",
        "Gemma3nFamily",
        missing=(
            "a Gemma 3n checkpoint, which needs transformers with Gemma 3n support (>= 4.53): "
            'pip install "mnm-search[hf]"'
        ),
    ),
    modules=(
        "mnm_search.families.gemma3n._WidthsModule",
        "transformers.models.gemma3n.modeling_gemma3n.Gemma3nForCausalLM",
    ),
    wrap=_lazy_wrapper("mnm_search.families.gemma3n", "Gemma3nFamily"),
)

register_family(
    "llama",
    summary=(
        "dense or matformerized Llama-architecture models (config.json `model_type` "
        + " or ".join(repr(t) for t in LLAMA_MODEL_TYPES)
        + ", or a llama-architecture .gguf file; `mnm matformerize` nests a dense one)"
    ),
    detect=_is_llama,
    load=_lazy_loader("mnm_search.families.llama", "LlamaFamily"),
    suffixes=(".gguf",),
    modules=("mnm_search.families.llama.LlamaLM",),
    wrap=_lazy_wrapper("mnm_search.families.llama", "LlamaFamily"),
)

__all__ = [
    "FamilyEntry",
    "detect_family",
    "family_for_config",
    "family_for_module",
    "load_family",
    "read_config_json",
    "register_family",
    "registered_families",
    "unregister_family",
]
