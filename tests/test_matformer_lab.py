"""Import of MatFormer Lab slicing-config tables (CSV), valid and malformed."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnm_search.errors import ConfigError
from mnm_search.families.matformer_lab import LabConfig, read_matformer_lab_csv

FIXTURES = Path(__file__).parent / "fixtures"
HEADER = "name,# Layers,# Effective Params (B),MMLU PT accuracy,FFN Hidden Dims,Layers Skipped\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "configs.csv"
    path.write_text(text)
    return path


def test_reads_the_published_layout() -> None:
    configs = read_matformer_lab_csv(FIXTURES / "matformer_lab_e4b.csv")
    by_name = {c.name: c for c in configs}
    assert list(by_name) == [
        "Main model",
        "Config for official E2B Model",
        "Example: global layers wider",
        "Example: half-steps",
    ]
    main = by_name["Main model"]
    assert main.ffn_hidden_dims == (16384,) * 35 and main.layers_skipped == ()
    assert main.effective_params_b == 3.98 and main.mmlu_accuracy == 62.3
    e2b = by_name["Config for official E2B Model"]
    assert e2b.ffn_hidden_dims == (8192,) * 30
    assert e2b.layers_skipped == (20, 21, 22, 23, 24)
    assert e2b.widths(35) == [8192] * 20 + [0] * 5 + [8192] * 10
    assert by_name["Example: half-steps"].ffn_hidden_dims[0] == 7168  # int(2048 * 3.5)
    assert by_name["Example: global layers wider"].effective_params_b is None


def test_tiny_fixture_widths() -> None:
    configs = read_matformer_lab_csv(FIXTURES / "matformer_lab_tiny.csv")
    assert [c.widths(6) for c in configs] == [
        [256] * 6,
        [128, 128, 128, 128, 128, 0],
        [128, 0, 192, 256, 64, 0],
    ]


@pytest.mark.parametrize(
    ("alias_header", "row"),
    [
        ("name,ffn_hidden_dims,layers_to_skip\n", 'a,"[1, 2]","[2]"\n'),
        ("Name, FFN Hidden Dims\n", 'a,"[1, 2]"\n'),
    ],
)
def test_column_aliases(tmp_path: Path, alias_header: str, row: str) -> None:
    (config,) = read_matformer_lab_csv(write(tmp_path, alias_header + row))
    assert config.ffn_hidden_dims == (1, 2)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('A,2,,,"[2_048 * 4, 2048",', r"line 2 \('A'\): column 'FFN Hidden Dims' must be a list"),
        ("A,2,,,8192,", "must be a bracketed list"),
        ('A,2,,,"[2048 * x, 1]",', r"entry 0 \('2048 \* x'\): only numbers"),
        ("A,2,,,\"[__import__('os'), 1]\",", "only numbers"),
        ('A,2,,,"[2048 / 3, 1]",', "entry 0 is 682.667, not an integer"),
        ('A,2,,,"[1 // 0, 1]",', "integer division or modulo by zero"),
        ('A,2,,,"[]",', "'FFN Hidden Dims' is empty"),
        ('A,2,,,"[0, 2048]",', "ffn_hidden_dims must be positive integers"),
        ('A,3,,,"[2048, 2048]",', "'# Layers' says 3 but 'FFN Hidden Dims' lists 2 widths"),
        ('A,two,,,"[2048, 2048]",', "column '# Layers' must be a number, got 'two'"),
        ('A,2,big,,"[2048, 2048]",', "column '# Effective Params' must be a number"),
        ('A,2,,,"[2048, 2048]","[3, 3]"', "layers_skipped must be distinct"),
        ('A,2,,,"[2048, 2048]","[-1]"', "layers_skipped must be distinct layer indices >= 0"),
        (',2,,,"[2048, 2048]",', "line 2: the 'name' column is empty"),
    ],
)
def test_malformed_rows(tmp_path: Path, row: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_matformer_lab_csv(write(tmp_path, HEADER + row + "\n"))


def test_error_names_the_row(tmp_path: Path) -> None:
    text = HEADER + 'Good,1,,,"[8]",\nBad,1,,,"[x]",\n'
    with pytest.raises(ConfigError, match=r"line 3 \('Bad'\)"):
        read_matformer_lab_csv(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "name,# Layers\nA,3\n",
            "lacks column\\(s\\) 'ffn_hidden_dims'.*found: 'name', '# Layers'",
        ),
        (HEADER, "holds a header but no configurations"),
        ("", "not a readable CSV table"),
        (HEADER + 'A,1,,,"[8]",\nA,1,,,"[8]",\n', "named 'A' appears twice"),
    ],
)
def test_malformed_tables(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_matformer_lab_csv(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_matformer_lab_csv(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    ("n_layers", "message"),
    [
        (36, r"30 FFN widths and 5 skipped layers \(35 in all\), but the checkpoint has 36"),
        (34, "has 34 layers; it was made for another model"),
    ],
)
def test_widths_for_another_model(n_layers: int, message: str) -> None:
    config = LabConfig(
        name="E2B", ffn_hidden_dims=(8192,) * 30, layers_skipped=(20, 21, 22, 23, 24)
    )
    with pytest.raises(ConfigError, match=message):
        config.widths(n_layers)


def test_skipped_layer_out_of_range() -> None:
    config = LabConfig(name="X", ffn_hidden_dims=(8, 8), layers_skipped=(5,))
    with pytest.raises(ConfigError, match=r"skips layer\(s\) \[5\].*layers are 0..2"):
        config.widths(3)
