"""The family registry: built-ins register like add-ons; add-ons may come from entry points."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from mnm_search.errors import CheckpointError, ConfigError
from mnm_search.families import base
from mnm_search.families.base import (
    family_for_config,
    family_for_file,
    register_family,
    registered_families,
    unregister_family,
)


def _never_loaded(path: Any, **options: Any) -> Any:
    raise AssertionError("detection must not load")


def test_builtin_families_are_registered_first() -> None:
    assert list(registered_families())[:3] == ["matlm", "gemma3n", "llama"]


@pytest.mark.parametrize(
    ("config", "family"),
    [
        ({"format": "mnm-matlm", "d_model": 8}, "matlm"),
        ({"d_model": 8, "granularities": [4, 8]}, "matlm"),  # written before `format` existed
        ({"model_type": "gemma3n_text"}, "gemma3n"),
        ({"model_type": "gemma3n"}, "gemma3n"),
        ({"model_type": "llama"}, "llama"),
        ({"model_type": "qwen2"}, "llama"),
        ({"model_type": "mistral"}, "llama"),
    ],
)
def test_detectors_read_only_config_json(config: dict[str, Any], family: str) -> None:
    assert family_for_config(config).name == family


def test_a_later_registration_replaces_and_unregister_forgets() -> None:
    register_family("probe", summary="first", detect=lambda c: False, load=_never_loaded)
    register_family("probe", summary="second", detect=lambda c: False, load=_never_loaded)
    try:
        assert registered_families()["probe"].summary == "second"
    finally:
        unregister_family("probe")
    assert "probe" not in registered_families()


def test_single_file_checkpoints_go_by_suffix(tmp_path: Any) -> None:
    register_family(
        "probe", summary="p", detect=lambda c: False, load=_never_loaded, suffixes=(".PRB",)
    )
    try:
        assert family_for_file(tmp_path / "model.prb").name == "probe"
        assert family_for_file(tmp_path / "model.gguf").name == "llama"
        with pytest.raises(CheckpointError, match=r"a file; .* ending in \.gguf, \.prb"):
            family_for_file(tmp_path / "model.bin")
        with pytest.raises(ConfigError, match=r"suffixes must look like '\.gguf'"):
            register_family("bad", summary="b", detect=bool, load=_never_loaded, suffixes=["gguf"])
    finally:
        unregister_family("probe")


@pytest.mark.parametrize("name", ["", "   ", None])
def test_a_family_needs_a_name(name: Any) -> None:
    with pytest.raises(ConfigError, match="non-empty name"):
        register_family(name, summary="x", detect=lambda c: False, load=_never_loaded)


def test_entry_point_families_are_imported_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed add-on names its module in the `mnm_search.families` group; importing the
    module registers the family."""
    loads: list[str] = []

    def load() -> None:
        loads.append("addon")
        register_family(
            "addon",
            summary="an add-on family",
            detect=lambda c: c.get("model_type") == "addon",
            load=_never_loaded,
        )

    def entry_points(*, group: str) -> list[Any]:
        assert group == "mnm_search.families"
        return [SimpleNamespace(load=load)]

    monkeypatch.setattr("importlib.metadata.entry_points", entry_points)
    monkeypatch.setattr(base, "_entry_points_loaded", False)
    try:
        assert family_for_config({"model_type": "addon"}).name == "addon"
        registered_families()
        assert loads == ["addon"]
    finally:
        unregister_family("addon")


def test_unsupported_config_lists_every_family() -> None:
    with pytest.raises(CheckpointError, match="unsupported model family") as caught:
        family_for_config({"model_type": "gpt2"}, where="x/config.json")
    message = str(caught.value)
    assert message.startswith("x/config.json: unsupported model family (model_type 'gpt2')")
    for name in registered_families():
        assert f"{name}: " in message
