"""Checkpoints: a directory with `config.json` and `model.safetensors`. Never pickle.

`config.json` is flat: the `ModelConfig` fields at the top level (so an exported model's
per-layer `ffn_widths` is plain to see) plus metadata keys (`format`, `storage_dtype`,
`training`, `source_fingerprint`, `quality`, `latency`, ...).

The fingerprint identifies a model's architecture and weights, independent of the dtype the
weights were stored in, so it is stable across save/load round trips.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mnm_search._files import atomic_directory, describe_safetensors_error, json_text
from mnm_search.config import ModelConfig, check_fits_in_memory
from mnm_search.errors import CheckpointError, ConfigError
from mnm_search.model import MatLM

FORMAT = "mnm-matlm"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# safetensors header dtype names of the float dtypes a checkpoint may store.
_FLOAT_HEADER_DTYPES = {"F32", "F16", "BF16", "F64"}
# A config.json is a few kB; refusing big ones keeps a hostile file from filling memory.
MAX_CONFIG_BYTES = 4 * 1024 * 1024


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (fp32, eval mode) and what is known about it."""

    model: MatLM
    config: ModelConfig
    fingerprint: str
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def default_checkpoint_path() -> Path:
    """Directory of the embedded default universal checkpoint inside the package."""
    return Path(str(resources.files("mnm_search").joinpath("default_checkpoint")))


def fingerprint(model: MatLM) -> str:
    """Stable short hash of the architecture and the fp32 values of every weight."""
    digest = hashlib.sha256()
    arch = {k: v for k, v in model.config.to_dict().items()}
    digest.update(json.dumps(arch, sort_keys=True).encode())
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(list(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def write_checkpoint_files(
    directory: Path,
    model: MatLM,
    *,
    metadata: dict[str, Any] | None = None,
    storage_dtype: str = "float32",
) -> None:
    """Write `config.json` and `model.safetensors` into an existing directory.

    Callers write into `atomic_directory`'s temporary directory, so a failed write leaves the
    destination as it was ("nothing was written"); errors name the destination's file.
    """
    if storage_dtype not in _DTYPES:
        raise ConfigError(
            f"storage_dtype must be one of {', '.join(_DTYPES)}, got {storage_dtype!r}"
        )
    tensors = {
        name: tensor.detach().to("cpu", _DTYPES[storage_dtype]).contiguous()
        for name, tensor in model.state_dict().items()
    }
    weights_path = directory / WEIGHTS_FILE
    try:
        save_file(tensors, str(weights_path), metadata={"format": FORMAT})
    except SafetensorError as exc:  # how safetensors reports I/O errors such as disk full
        message = describe_safetensors_error(exc, weights_path)
        raise CheckpointError(f"{message}; nothing was written") from exc
    config = {"format": FORMAT, **model.config.to_dict(), "storage_dtype": storage_dtype}
    config.update(metadata or {})
    # Strict JSON: a NaN in the metadata (a diverged loss) becomes null, which every parser reads.
    (directory / CONFIG_FILE).write_text(json_text(config) + "\n", encoding="utf-8")


def save_checkpoint(
    model: MatLM,
    out: str | Path,
    *,
    metadata: dict[str, Any] | None = None,
    storage_dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Save atomically as a checkpoint directory; return its path."""
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_checkpoint_files(tmp, model, metadata=metadata, storage_dtype=storage_dtype)
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    """The JSON object in `<path>/config.json` of any checkpoint family, with clear errors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is a file; a checkpoint is a directory with {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{path} holds only pickle files ({', '.join(pickles)}); mnm never unpickles "
                f"because loading a pickle can run arbitrary code. Convert the weights to "
                f"safetensors (e.g. safetensors.torch.save_file on a state dict you trust) "
                f"next to a config.json"
            )
        raise CheckpointError(f"{path} has no {CONFIG_FILE}; is it a checkpoint directory?")
    size = config_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise CheckpointError(
            f"{config_path} is {size:,} bytes; a model config is a few kB (at most "
            f"{MAX_CONFIG_BYTES:,} bytes accepted); is it the right file?"
        )
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    # ValueError: bad JSON, bad UTF-8, and integers of more than 4300 digits.
    except ValueError as exc:
        raise CheckpointError(
            f"{config_path} is not valid JSON ({exc}); restore it from the checkpoint's source"
        ) from exc
    except RecursionError:  # deeply nested arrays: the json module gives up
        raise CheckpointError(f"{config_path} is nested too deeply to be a model config") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    return data


def _load_tensors(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors of `<path>/model.safetensors`, checked against `expected` shapes first.

    Names, shapes and dtypes come from the file's header, so a file that does not match the
    config is refused before its data is read.
    """
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = (
            f"; found pickle files ({', '.join(pickles)}) that mnm never loads: convert them to "
            f"safetensors"
            if pickles
            else ""
        )
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}{hint}")
    corrupt = f"{weights_path} is corrupt or truncated"
    fix = "re-copy the checkpoint or export it again"
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            header = {}
            for name in handle.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
                piece = handle.get_slice(name)
                header[name] = (tuple(piece.get_shape()), piece.get_dtype())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{corrupt} ({exc}); {fix}") from exc
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:6])}")
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected[:6])}")
        raise CheckpointError(
            f"{weights_path} does not match {CONFIG_FILE} ({'; '.join(parts)}); the config "
            f"and weights do not belong together: {fix}"
        )
    for name, shape in expected.items():
        stored, dtype = header[name]
        if stored != shape:
            raise CheckpointError(
                f"{weights_path}: tensor {name} has shape {list(stored)} but {CONFIG_FILE} "
                f"implies {list(shape)}; the config and weights do not belong together: {fix}"
            )
        if dtype not in _FLOAT_HEADER_DTYPES:
            raise CheckpointError(
                f"{weights_path}: tensor {name} has dtype {dtype}, but weights must be floats "
                f"({', '.join(sorted(_FLOAT_HEADER_DTYPES))}); {fix}"
            )
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{corrupt} ({exc}); {fix}") from exc


def load_checkpoint(path: str | Path | None = None) -> Checkpoint:
    """Load a universal or exported checkpoint (None: the embedded default)."""
    path = default_checkpoint_path() if path is None else Path(path)
    data = read_config(path)
    if data.get("format") not in (None, FORMAT):
        raise CheckpointError(
            f"{path} has format {data.get('format')!r}; this loader reads {FORMAT!r} checkpoints"
        )
    config_path = path / CONFIG_FILE
    try:
        config = ModelConfig.from_dict(data)
        # Before any allocation: a 1 kB config may describe terabytes of weights.
        check_fits_in_memory(config, where="this config")
    except ConfigError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc

    with torch.device("meta"):
        model = MatLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tensors = _load_tensors(path, expected)
    for name in expected:
        if not torch.isfinite(tensors[name]).all():
            raise CheckpointError(
                f"{path / WEIGHTS_FILE}: tensor {name} holds NaN or infinite values; the "
                f"weights are damaged: re-copy the checkpoint or export it again"
            )
    state = {name: t.to(torch.float32) for name, t in tensors.items()}
    model.load_state_dict(state, assign=True)
    model.eval()
    metadata = {k: v for k, v in data.items() if k not in config.to_dict()}
    return Checkpoint(
        model=model, config=config, fingerprint=fingerprint(model), metadata=metadata, path=path
    )


def load_model(path: str | Path | None = None) -> torch.nn.Module:
    """Any registered family's checkpoint directory -> a module in eval mode (DESIGN.md §4).

    `model(input_ids)` runs the checkpoint as stored (an exported submodel: its own dense
    forward), `model(input_ids, widths=[...])` any Mix'n'Match configuration of a universal
    one; both return logits [B, T, vocab]. None loads the embedded default checkpoint.
    Native-only code that needs the config and metadata too uses `load_checkpoint`.
    """
    from mnm_search.families import load_family  # the registry imports this module

    return load_family(path).module().eval()
