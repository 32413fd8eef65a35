"""Import of MatFormer Lab slicing-config tables (Google's named Gemma 3n sub-models) from CSV.

The table Google publishes with the MatFormer Lab (dataset `google/gemma3n-slicing-configs`)
has one named configuration per row, with these columns:

    name, # Layers, # Effective Params (B), MMLU PT accuracy, FFN Hidden Dims, Layers Skipped

`FFN Hidden Dims` lists one width per *kept* layer as Python-like arithmetic
(`[2_048 * 4, 2_048 * 8, ...]`) and `Layers Skipped` the dropped source layers
(`[20, 21, 22, 23, 24]`, or empty/`null`). `LabConfig.widths(n_layers)` turns a row into the
widths `Gemma3nFamily` takes: one entry per source layer, 0 where the layer is skipped.
The arithmetic is evaluated by a small whitelist (numbers, + - * / //, `int(...)`), never `eval`.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mnm_search.config import MAX_LAYERS, SIZE_CAPS
from mnm_search.errors import ConfigError

# Google's table is a few kB with a few dozen rows; these bounds refuse anything that could
# only be a mistake or an attack before pandas reads it.
MAX_CSV_BYTES = 4 * 1024 * 1024
MAX_ROWS = 10_000
# Any intermediate value of a width expression beyond this is not a width.
_MAX_MAGNITUDE = 2**40

# Normalised column name -> field; normalisation: lower case, '#' dropped, runs of other
# characters turned into '_' (so "# Effective Params (B)" -> "effective_params_b").
_COLUMNS = {
    "name": "name",
    "ffn_hidden_dims": "ffn_hidden_dims",
    "layers_skipped": "layers_skipped",
    "layers_to_skip": "layers_skipped",
    "layers": "n_layers",
    "effective_params_b": "effective_params_b",
    "mmlu_pt_accuracy": "mmlu_accuracy",
}
_REQUIRED = ("name", "ffn_hidden_dims")
_EMPTY = {"", "nan", "none", "null", "[]"}
_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
}


@dataclass(frozen=True)
class LabConfig:
    """One named MatFormer Lab configuration."""

    name: str
    ffn_hidden_dims: tuple[int, ...]  # one per kept layer, in layer order
    layers_skipped: tuple[int, ...] = ()
    effective_params_b: float | None = None
    mmlu_accuracy: float | None = None  # percent, as the table reports it

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"name must be a non-empty string, got {self.name!r}")
        dims = tuple(self.ffn_hidden_dims)
        max_width = SIZE_CAPS["d_ff"]
        if (
            not dims
            or len(dims) > MAX_LAYERS
            or any(not _is_int(d) or not 0 < d <= max_width for d in dims)
        ):
            raise ConfigError(
                f"config {self.name!r}: ffn_hidden_dims must be positive integers (1 to "
                f"{MAX_LAYERS} of them, each at most {max_width:,}), got {list(dims)[:40]}"
            )
        skipped = tuple(self.layers_skipped)
        if (
            len(skipped) > MAX_LAYERS
            or any(not _is_int(i) or not 0 <= i < MAX_LAYERS for i in skipped)
            or len(set(skipped)) != len(skipped)
        ):
            raise ConfigError(
                f"config {self.name!r}: layers_skipped must be distinct layer indices >= 0 "
                f"(at most {MAX_LAYERS - 1}), got {list(skipped)[:40]}"
            )
        for field, value, upper in (
            ("effective_params_b", self.effective_params_b, 1e6),
            ("mmlu_accuracy", self.mmlu_accuracy, 100.0),
        ):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value <= upper
            ):
                raise ConfigError(
                    f"config {self.name!r}: {field} must be a number from 0 to {upper:g}, "
                    f"got {value!r}"
                )
        object.__setattr__(self, "ffn_hidden_dims", dims)
        object.__setattr__(self, "layers_skipped", tuple(sorted(skipped)))

    @property
    def n_source_layers(self) -> int:
        """Layers of the model the configuration slices (kept + skipped)."""
        return len(self.ffn_hidden_dims) + len(self.layers_skipped)

    def widths(self, n_layers: int) -> list[int]:
        """One entry per source layer: its FFN width, or 0 where the layer is skipped."""
        if self.n_source_layers != n_layers:
            raise ConfigError(
                f"config {self.name!r} lists {len(self.ffn_hidden_dims)} FFN widths and "
                f"{len(self.layers_skipped)} skipped layers ({self.n_source_layers} in all), "
                f"but the checkpoint has {n_layers} layers; it was made for another model"
            )
        out_of_range = [i for i in self.layers_skipped if i >= n_layers]
        if out_of_range:
            raise ConfigError(
                f"config {self.name!r} skips layer(s) {out_of_range}, but the checkpoint's "
                f"layers are 0..{n_layers - 1}"
            )
        dims = iter(self.ffn_hidden_dims)
        return [0 if i in self.layers_skipped else next(dims) for i in range(n_layers)]


def read_matformer_lab_csv(path: str | Path) -> list[LabConfig]:
    """All configurations of a MatFormer Lab CSV table; errors name the row and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"MatFormer Lab table {path} does not exist")
    size = path.stat().st_size
    if size > MAX_CSV_BYTES:
        raise ConfigError(
            f"MatFormer Lab table {path} is {size:,} bytes; the published table is a few kB "
            f"(at most {MAX_CSV_BYTES:,} accepted); is it the right file?"
        )
    try:
        table = pd.read_csv(
            path, dtype=str, keep_default_na=False, skipinitialspace=True, nrows=MAX_ROWS + 1
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a readable CSV table: {exc}") from exc
    if len(table) > MAX_ROWS:
        raise ConfigError(
            f"{path} holds more than {MAX_ROWS:,} configurations; is it the right file?"
        )
    columns = {}
    for column in table.columns:
        field = _COLUMNS.get(_normalise(column))
        if field is not None:
            columns[field] = column
    missing = [c for c in _REQUIRED if c not in columns]
    if missing:
        raise ConfigError(
            f"{path} lacks column(s) {', '.join(repr(c) for c in missing)}; a MatFormer Lab "
            f"table has 'name', 'FFN Hidden Dims' and optionally 'Layers Skipped', "
            f"'# Layers', '# Effective Params (B)', 'MMLU PT accuracy' "
            f"(found: {', '.join(repr(str(c)) for c in table.columns)})"
        )
    configs: list[LabConfig] = []
    seen: set[str] = set()
    for index, row in table.iterrows():
        line = int(index) + 2  # 1-based, after the header line
        name = row[columns["name"]].strip()
        where = f"{path} line {line} ({name!r})" if name else f"{path} line {line}"
        if not name:
            raise ConfigError(f"{where}: the 'name' column is empty")
        if name in seen:
            raise ConfigError(f"{where}: a configuration named {name!r} appears twice")
        seen.add(name)
        dims = _int_list(row[columns["ffn_hidden_dims"]], where=where, column="FFN Hidden Dims")
        if not dims:
            raise ConfigError(f"{where}: 'FFN Hidden Dims' is empty; list one width per layer")
        skipped: Sequence[int] = ()
        if "layers_skipped" in columns:
            skipped = _int_list(
                row[columns["layers_skipped"]], where=where, column="Layers Skipped"
            )
        if "n_layers" in columns and row[columns["n_layers"]].strip():
            n_layers = _number(row[columns["n_layers"]], where=where, column="# Layers")
            if n_layers != len(dims):
                raise ConfigError(
                    f"{where}: '# Layers' says {n_layers:g} but 'FFN Hidden Dims' lists "
                    f"{len(dims)} widths (one per kept layer expected)"
                )
        params = _optional_number(row, columns, "effective_params_b", where, "# Effective Params")
        mmlu = _optional_number(row, columns, "mmlu_accuracy", where, "MMLU PT accuracy")
        try:
            configs.append(
                LabConfig(
                    name=name,
                    ffn_hidden_dims=tuple(dims),
                    layers_skipped=tuple(skipped),
                    effective_params_b=params,
                    mmlu_accuracy=mmlu,
                )
            )
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    if not configs:
        raise ConfigError(f"{path} holds a header but no configurations")
    return configs


def _normalise(column: object) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(column).lower().replace("#", "")).strip("_")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_number(
    row: pd.Series, columns: dict[str, str], field: str, where: str, column: str
) -> float | None:
    if field not in columns or row[columns[field]].strip().lower() in _EMPTY:
        return None
    return _number(row[columns[field]], where=where, column=column)


def _number(text: str, *, where: str, column: str) -> float:
    cleaned = text.strip().rstrip("%").replace(",", "")
    try:
        value = float(cleaned)
    except ValueError:
        raise ConfigError(f"{where}: column {column!r} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{where}: column {column!r} must be finite, got {text!r}")
    return value


def _int_list(text: str, *, where: str, column: str) -> list[int]:
    """`[2_048 * 4, 8192]` -> [8192, 8192]; empty/null -> []."""
    text = text.strip()
    if text.lower() in _EMPTY:
        return []
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ConfigError(
            f"{where}: column {column!r} must be a list like [2_048 * 4, 8192], got {text!r}"
        ) from None
    if not isinstance(tree, (ast.List, ast.Tuple)):
        raise ConfigError(
            f"{where}: column {column!r} must be a bracketed list like [2_048 * 4, 8192], "
            f"got {text!r}"
        )
    values = []
    for position, element in enumerate(tree.elts):
        try:
            value = _arithmetic(element)
        except (ValueError, ZeroDivisionError, OverflowError, RecursionError) as exc:
            raise ConfigError(
                f"{where}: column {column!r}, entry {position} "
                f"({ast.get_source_segment(text, element)!r}): {exc}"
            ) from None
        if value != int(value):
            raise ConfigError(
                f"{where}: column {column!r}, entry {position} is {value:g}, not an integer"
            )
        values.append(int(value))
    return values


def _arithmetic(node: ast.AST) -> float:
    """Value of a whitelisted arithmetic expression (no names, no calls except int())."""
    value = _arithmetic_unbounded(node)
    # Bounded at every step: keeps values finite (int() of inf/nan raises) and small.
    if not math.isfinite(value) or abs(value) > _MAX_MAGNITUDE:
        raise ValueError(f"value out of range (a width is at most {_MAX_MAGNITUDE:,})")
    return value


def _arithmetic_unbounded(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and _is_number(node.value):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _arithmetic(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_arithmetic(node.left), _arithmetic(node.right))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "int"
        and len(node.args) == 1
        and not node.keywords
    ):
        return int(_arithmetic(node.args[0]))
    raise ValueError("only numbers, + - * / // and int(...) are allowed")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
