"""`mnm matformerize`: a dense Llama-architecture model made nested, without training.

Every layer's FFN `down(silu(gate(x)) * up(x))` is a sum over hidden neurons, in any order.
Sorting each layer's neurons by importance on calibration text (Minitron, Flextron) puts the
neurons worth keeping first, so every prefix is a usable smaller FFN, while the full-width
function stays exactly the same (only the order of a sum changes). Criteria:

- `activation`: mean |a_j| x ||down[:, j]||, the average size of neuron j's contribution to
  the residual stream on the calibration tokens (a_j: its gated activation);
- `activation-rms`: sqrt(mean a_j^2) x ||down[:, j]||, the same in the L2 sense (the norm of
  its contribution as a vector over tokens), which weighs rare large activations more;
- `weight`: ||gate_j|| x ||up_j|| x ||down[:, j]||, no data needed (a weight-magnitude baseline).

On SmolLM2-135M (`bench/smollm2_criteria.py`, README "A real model") `activation-rms` lost
least at 75 % and 50 % widths and `activation` at 25 %; `weight` was worse than no reordering.
`activation-rms` is the default.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mnm_search._files import atomic_directory, json_text, refuse_overlap
from mnm_search.errors import CheckpointError, ConfigError, DataError

if TYPE_CHECKING:
    from mnm_search.families.llama import LlamaFamily

CRITERIA = ("activation-rms", "activation", "weight")
DEFAULT_CRITERION = "activation-rms"
DEFAULT_MAX_TOKENS = 16_384
EQUALITY_TOLERANCE = 1e-4  # full-width logits of the output vs the source (float32)
_BATCH_WINDOWS = 4


def neuron_scores(
    family: LlamaFamily,
    tokens: torch.Tensor | None,
    *,
    criterion: str,
    on_window: Callable[[], None] | None = None,
) -> list[torch.Tensor]:
    """Importance of every FFN neuron of every layer ([stored width] each; empty for a layer
    without FFN). `tokens` [n_windows, seq] are the calibration windows (None for `weight`)."""
    model = family.model
    layers = model.model.layers
    norms = [
        layer.mlp.down_proj.weight.float().norm(dim=0) if layer.mlp is not None else None
        for layer in layers
    ]
    if criterion == "weight":
        return [
            (
                layer.mlp.gate_proj.weight.float().norm(dim=1)
                * layer.mlp.up_proj.weight.float().norm(dim=1)
                * norm
            )
            if layer.mlp is not None and norm is not None
            else torch.zeros(0)
            for layer, norm in zip(layers, norms)
        ]
    if tokens is None:
        raise ConfigError(f"criterion {criterion!r} needs calibration tokens")
    sums = [torch.zeros(w, dtype=torch.float64) for w in model.spec.intermediate_sizes]
    count = 0
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], _BATCH_WINDOWS):
            ids = tokens[start : start + _BATCH_WINDOWS]
            rope = model.rope(0, ids.shape[1], ids.device)
            h = model.model.embed_tokens(ids)  # [B, T, D]
            for index, layer in enumerate(layers):
                h = layer.attend(h, rope)
                if layer.mlp is None or layer.post_attention_layernorm is None:
                    continue
                width = model.spec.intermediate_sizes[index]
                act = layer.mlp.activations(layer.post_attention_layernorm(h), width)  # [B, T, w]
                flat = act.flatten(0, 1).double()  # [B * T, w]
                sums[index] += (flat.abs() if criterion == "activation" else flat.pow(2)).sum(0)
                h = h + torch.nn.functional.linear(act, layer.mlp.down_proj.weight)
            count += ids.numel()
            if on_window is not None:
                on_window()
    scores = []
    for total, norm in zip(sums, norms):
        if norm is None:
            scores.append(torch.zeros(0))
            continue
        mean = total / count
        stat = mean if criterion == "activation" else mean.sqrt()
        scores.append(stat.float() * norm)
    return scores


def reorder(family: LlamaFamily, scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Permute every layer's neurons in place, most important first; the orders applied."""
    # Stable sort: equal scores (e.g. dead neurons) keep their original relative order.
    orders = [torch.sort(score, descending=True, stable=True).indices for score in scores]
    permute(family, orders)
    return orders


def permute(family: LlamaFamily, orders: list[torch.Tensor]) -> None:
    """Put neuron `orders[i][j]` of layer i at position j (in place; empty: no FFN)."""
    for layer, order in zip(family.model.model.layers, orders):
        if layer.mlp is None or order.numel() == 0:
            continue
        mlp = layer.mlp
        mlp.gate_proj.weight.data = mlp.gate_proj.weight.data[order].contiguous()
        mlp.up_proj.weight.data = mlp.up_proj.weight.data[order].contiguous()
        mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, order].contiguous()


def matformerize(
    family: LlamaFamily,
    out: Path,
    *,
    data: str | Path | None = None,
    max_tokens: int | None = None,
    criterion: str | None = None,
    overwrite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write `family` nested to the directory `out` (atomically: nothing on failure)."""

    criterion = DEFAULT_CRITERION if criterion is None else criterion
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if max_tokens <= 0:
        raise ConfigError(f"max_tokens must be positive, got {max_tokens}")
    if Path(out).exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another path or pass --force")
    if family.path is not None:
        refuse_overlap(out, {"the source model": family.path, "the calibration text": data})
    family._require_weights()
    if family.dtype != torch.float32:
        raise ConfigError("matformerize a float32 copy (load without --dtype)")
    seq_len = family.eval_seq_len
    calibration: dict[str, Any] = {"criterion_needs_data": criterion != "weight"}
    windows = None
    if criterion != "weight":
        tokens, source = family.calibration_tokens(data, max_tokens=max_tokens)
        n_windows = tokens.numel() // seq_len
        if n_windows == 0:
            raise DataError(
                f"calibration text gives {tokens.numel()} tokens; at least {seq_len} are needed"
            )
        windows = tokens[: n_windows * seq_len].view(n_windows, seq_len)  # [N, seq_len]
        calibration.update(
            source=source,
            tokens=int(windows.numel()),
            sha256=hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16],
        )
    probe = torch.randint(
        0, family.spec.vocab_size, (2, min(64, seq_len)), generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        before = family.model(probe).float()
    total = 0 if windows is None else -(-windows.shape[0] // _BATCH_WINDOWS)
    done = 0

    def window_done() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total)

    scores = neuron_scores(family, windows, criterion=criterion, on_window=window_done)
    source_fingerprint = family.fingerprint
    orders = reorder(family, scores)
    try:
        return _verify_and_write(
            family,
            out,
            before=before,
            probe=probe,
            overwrite=overwrite,
            meta={
                "criterion": criterion,
                "calibration": calibration,
                "source": {
                    "path": str(family.path) if family.path else None,
                    "fingerprint": source_fingerprint,
                },
                # llama.cpp's pre-tokenizer name of a GGUF source, for GGUF exports later.
                **(
                    {"gguf_pre": family._gguf_tokenizer["tokenizer.ggml.pre"]}
                    if family._gguf_tokenizer and "tokenizer.ggml.pre" in family._gguf_tokenizer
                    else {}
                ),
            },
        )
    finally:
        # The loaded model stays the source: put every neuron back where it was.
        permute(family, [torch.argsort(order) for order in orders])


def _verify_and_write(
    family: LlamaFamily,
    out: Path,
    *,
    before: torch.Tensor,
    probe: torch.Tensor,
    overwrite: bool,
    meta: dict[str, Any],
) -> dict[str, Any]:
    from safetensors.torch import save_file

    from mnm_search.families.llama import FORMAT, WEIGHTS_FILE

    with torch.inference_mode():
        after = family.model(probe).float()
    diff = float((after - before).abs().max())
    # Only the order of each FFN's sum changed: float32 rounding, relative to the logits.
    tolerance = EQUALITY_TOLERANCE * max(1.0, float(before.abs().max()) / 10)
    if not diff <= tolerance:
        raise ConfigError(
            f"reordering changed the full-width logits by {diff:.3g} (> {tolerance:.3g}); "
            f"nothing was written"
        )
    config = {k: v for k, v in family._config.items() if k != "mnm"}
    config["mnm"] = {
        "format": FORMAT,
        "nested": True,
        **meta,
        "full_width_max_abs_diff": diff,
    }
    if family.spec.mnm.get("intermediate_sizes"):
        config["mnm"]["intermediate_sizes"] = list(family.spec.intermediate_sizes)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(
            {k: v.contiguous() for k, v in family.model.weights().items()},
            str(tmp / WEIGHTS_FILE),
            metadata={"format": "pt"},
        )
        (tmp / "config.json").write_text(json_text(config) + "\n", encoding="utf-8")
        copied = family.copy_tokenizer(tmp)
    return {
        "out": str(out),
        "criterion": meta["criterion"],
        "calibration": meta["calibration"],
        "source_fingerprint": meta["source"]["fingerprint"],
        "full_width_max_abs_diff": diff,
        "tokenizer_files": copied,
        "n_layers": family.n_layers,
    }
