"""What `LlamaFamily.write_export` writes: the sliced model as a transformers-style directory
(config.json with the per-layer widths, model.safetensors, the tokenizer files), reloaded and
compared with the in-place forward; `onnx` adds model.onnx checked through onnxruntime, `gguf`
adds model.gguf (llama.cpp's `llama` architecture for one width everywhere, `deci` for
per-layer widths; see `llama_gguf`) run through llama.cpp when llama-cpp-python is installed.
`mnm_search.export` does the atomic directory, evaluation, latency and model card around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mnm_search._files import json_text
from mnm_search.errors import ExportError
from mnm_search.families.llama import (
    FORMAT,
    WEIGHTS_FILE,
    LlamaFamily,
    LlamaLM,
    slice_llama,
)

LOGITS_TOLERANCE = 1e-4  # float32, the same arithmetic on sliced copies
ONNX_TOLERANCE = 1e-3  # onnxruntime fuses and reorders; a 49k-token head sums 576 products
GGUF_FILE = "model.gguf"
GGUF_TOLERANCE = 1e-3  # llama.cpp vs torch, relative to the largest logit (float32 file)


def export_config(
    family: LlamaFamily, widths: Sequence[int], metadata: dict[str, Any]
) -> dict[str, Any]:
    """The config.json of a sliced export: the source's, with the widths of the slice.

    With one width everywhere it is a plain transformers `LlamaForCausalLM` config; per-layer
    widths live in `mnm.intermediate_sizes` (transformers' Llama cannot hold them).
    """
    config = {k: v for k, v in family._config.items() if k != "mnm"}
    if not config:  # a GGUF source: its reconstructed config
        config = {}
    uniform = len(set(widths)) == 1 and widths[0] > 0
    config["intermediate_size"] = int(widths[0]) if uniform else int(max(widths))
    config["mnm"] = {
        **family.spec.mnm,
        "format": FORMAT,
        "intermediate_sizes": [int(w) for w in widths],
        "step": family.step,
        "transformers_loadable": uniform,
        **metadata,
    }
    return config


def write_llama_export(
    family: LlamaFamily,
    directory: Path,
    widths: Sequence[int],
    *,
    fmt: str,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    from safetensors.torch import save_file

    from mnm_search import __version__
    from mnm_search.families._onnx import verify_onnx, write_onnx

    if fmt not in family.export_formats:
        raise ExportError(
            f"a Llama-architecture model exports as {', '.join(family.export_formats)}, not {fmt!r}"
        )
    family._require_weights()
    widths = family.validate_widths(widths)
    compact = family.format_widths(widths)
    sliced = slice_llama(family.model, widths).float()
    config = export_config(family, widths, metadata)
    config.update({"torch_dtype": "float32", "dtype": "float32"})
    if family.spec.tie_embeddings:
        config["tie_word_embeddings"] = True
    weights = {k: v.contiguous() for k, v in sliced.weights().items()}
    save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / "config.json").write_text(json_text(config) + "\n", encoding="utf-8")
    copied = family.copy_tokenizer(directory)
    exported = LlamaFamily.load(directory)
    diff = _logits_difference(family, widths, exported.model)
    if not diff <= LOGITS_TOLERANCE:
        raise ExportError(
            f"exported {compact} differs from the in-place forward by {diff:.3g} "
            f"(> {LOGITS_TOLERANCE:g}); nothing was written"
        )
    params = sum(p.numel() for p in exported.model.parameters())
    if params != family.param_count(widths):
        raise ExportError(
            f"exported {compact} holds {params:,} parameters, expected "
            f"{family.param_count(widths):,}; nothing was written"
        )
    files = ["config.json", WEIGHTS_FILE, *copied]
    rows: list[list[str]] = []
    facts: dict[str, Any] = {"onnx_max_abs_diff": None, "gguf": None}
    if fmt == "onnx":
        onnx_path = directory / "model.onnx"
        write_onnx(sliced, onnx_path, max_len=min(family.spec.max_positions, 4096))
        facts["onnx_max_abs_diff"] = verify_onnx(
            onnx_path,
            sliced,
            vocab_size=family.spec.vocab_size,
            max_len=family.spec.max_positions,
            tolerance=ONNX_TOLERANCE,
        )
        files.append("model.onnx")
        rows.append(
            [
                "ONNX",
                f"`model.onnx` checked with onnxruntime: max abs diff "
                f"{facts['onnx_max_abs_diff']:.2e}",
            ]
        )
    if fmt == "gguf":
        facts["gguf"] = _write_gguf(family, sliced, directory, config)
        files.append(GGUF_FILE)
        rows.append(["GGUF", facts["gguf"]["summary"]])
    verification = {
        "logits_max_abs_diff": diff,
        "logits_tolerance": LOGITS_TOLERANCE,
        "params_expected": family.param_count(widths),
        "onnx_max_abs_diff": facts["onnx_max_abs_diff"],
        "gguf": facts["gguf"],
    }
    config["mnm"]["verification"] = verification
    (directory / "config.json").write_text(json_text(config) + "\n", encoding="utf-8")
    uniform = config["mnm"]["transformers_loadable"]
    return {
        "verified_max_abs_diff": diff,
        **facts,
        "verification": verification,
        "files": files,
        "metadata_file": "config.json",
        "card": {
            "title": f"{family.spec.model_type} Mix'n'Match submodel {compact}",
            "about": (
                f"FFN widths sliced from `{family.fingerprint}` ({family.n_layers} layers, hidden "
                f"{family.spec.hidden_size}, FFN {max(family.spec.intermediate_sizes)}"
                f"{', matformerized' if family.is_nested else ', dense (not matformerized)'}) "
                f"by `mnm export` {__version__}."
            ),
            "rows": rows,
            "verified": (
                f"logits max abs diff {diff:.2e} vs the in-place forward at these widths "
                f"(tolerance {LOGITS_TOLERANCE:g}); exact parameter count"
            ),
            "usage": _usage(uniform=uniform),
        },
    }


def _usage(*, uniform: bool) -> str:
    lines = [
        "```python",
        "import torch",
        "from mnm_search import load_model",
        "",
        'model = load_model("path/to/this/directory")',
        "logits = model(torch.tensor([[1, 2, 3]]))  # [batch, seq, vocab]",
        "```",
    ]
    if uniform:
        lines += [
            "",
            "One FFN width in every layer: transformers loads it as it is",
            "(`AutoModelForCausalLM.from_pretrained(path)`).",
        ]
    else:
        lines += [
            "",
            "Per-layer FFN widths: transformers' `LlamaForCausalLM` cannot hold them (a",
            "`per_layer_config` raises `AmbiguousGlobalPerLayerAttributeError`); use",
            "`load_model`, the ONNX file, or the GGUF file (llama.cpp's `deci` architecture).",
        ]
    return "\n".join(lines)


@torch.inference_mode()
def _logits_difference(family: LlamaFamily, widths: list[int], exported: LlamaLM) -> float:
    generator = torch.Generator().manual_seed(0)
    seq = min(32, family.spec.max_positions)
    ids = torch.randint(0, family.spec.vocab_size, (2, seq), generator=generator)
    expected = family.model(ids, widths).float()
    return float((exported(ids).float() - expected).abs().max())


def _write_gguf(
    family: LlamaFamily, sliced: LlamaLM, directory: Path, config: dict[str, Any]
) -> dict[str, Any]:
    from mnm_search.families.llama_gguf import llama_cpp_logits, write_gguf

    path = directory / GGUF_FILE
    pre = family.spec.mnm.get("gguf_pre")  # recorded by matformerize from a GGUF source
    facts = write_gguf(
        path,
        config={**config, "gguf_pre": pre} if pre else config,
        tensors=sliced.weights(),
        intermediate_sizes=list(sliced.spec.intermediate_sizes),
        tokenizer_fields=family._gguf_tokenizer,
        tokenizer_dir=directory,
        name=f"mnm {family.format_widths(list(sliced.spec.intermediate_sizes))}",
    )
    ids = list(range(1, min(17, family.spec.vocab_size)))
    logits = llama_cpp_logits(path, ids)
    if logits is None:
        facts["llama_cpp_max_abs_diff"] = None
        facts["summary"] = (
            f"`{GGUF_FILE}` (llama.cpp architecture `{facts['architecture']}`); not run through "
            f"llama.cpp here (pip install llama-cpp-python to check it)"
        )
        return facts
    with torch.inference_mode():
        expected = sliced(torch.tensor([ids])).float()[0]
    found = torch.from_numpy(logits).float()
    diff = float((found - expected).abs().max())
    scale = float(expected.abs().max())
    # llama.cpp runs its own kernels (other summation orders) on the float32 file: the
    # differences are ~1e-5 of the logits' scale; a wrong tensor layout is ~1.
    tolerance = GGUF_TOLERANCE * max(scale, 1.0)
    if not diff <= tolerance:
        raise ExportError(
            f"llama.cpp's logits for {GGUF_FILE} differ from torch by {diff:.3g} (> "
            f"{tolerance:.3g}; the logits reach {scale:.3g}); nothing was written"
        )
    agreement = float((found.argmax(-1) == expected.argmax(-1)).float().mean())
    facts["llama_cpp_max_abs_diff"] = diff
    facts["llama_cpp_greedy_agreement"] = agreement
    facts["summary"] = (
        f"`{GGUF_FILE}` (llama.cpp architecture `{facts['architecture']}`) run through llama.cpp: "
        f"max abs logits diff {diff:.2e} (logits up to {scale:.1f})"
    )
    return facts
