"""What `Gemma3nFamily.write_export` writes: a verified Hugging Face checkpoint directory.

`Gemma3nFamily.export_hf` streams the slice to disk (sharded safetensors, `config.json` with
per-layer `intermediate_size`, the source tokenizer files, `mnm.json`) and reloads it with
transformers to compare its logits with the in-place sliced model. `mnm_search.export` does
the rest around it (choosing members, the atomic directory, loss, measured latency, model
card, `front.csv`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from mnm_search._files import describe_os_error, finite
from mnm_search.errors import ExportError

if TYPE_CHECKING:
    from mnm_search.families.gemma3n import Gemma3nFamily

HF_FORMAT = "hf"
_STAGING = ".hf-export"  # export_hf's own destination, inside the caller's temporary directory

FRONT_MATTER = """---
library_name: transformers
pipeline_tag: text-generation
tags:
- gemma3n
- matformer
- mix-n-match
- mnm
---"""

USAGE = """```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")
```"""


def write_gemma3n_export(
    family: Gemma3nFamily,
    directory: Path,
    widths: Sequence[int],
    *,
    fmt: str,
    metadata: dict[str, Any],
    max_shard_size: int | str = "2GB",
) -> dict[str, Any]:
    """Write the configuration into the empty `directory` as a transformers checkpoint,
    verified by reloading it; the facts for `mnm_search.export`'s report and model card."""
    from mnm_search.families.gemma3n import EXPORT_INFO_FILE

    if fmt != HF_FORMAT:
        raise ExportError(
            f"a Gemma 3n checkpoint exports as --format {HF_FORMAT} (a transformers "
            f"directory), not {fmt!r}"
        )
    directory = Path(directory)
    staging = directory / _STAGING
    try:
        # export_hf publishes atomically itself: into a staging directory inside ours (its
        # temporaries stay inside our temporary directory), then moved up.
        family.export_hf(
            list(widths),
            staging,
            metadata=finite(metadata),
            max_shard_size=max_shard_size,
        )
        for entry in sorted(staging.iterdir()):
            os.replace(entry, directory / entry.name)
        staging.rmdir()
    except OSError as exc:
        raise ExportError(f"{describe_os_error(exc, directory)}; nothing was written") from exc
    except SafetensorError as exc:
        # Shards are written by mnm's own writer (OSError); safetensors only reads the source.
        raise ExportError(
            f"reading the weights of {family.path} failed ({exc}): the checkpoint is corrupt "
            f"or truncated; re-copy it. Nothing was written"
        ) from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    info = json.loads((directory / EXPORT_INFO_FILE).read_text(encoding="utf-8"))
    verification = info.get("verification") or {}
    files = sorted(p.name for p in directory.iterdir() if p.is_file())
    return {
        "verified_max_abs_diff": verification.get("max_abs_logit_diff"),
        "verification": verification,
        "files": files,
        "metadata_file": EXPORT_INFO_FILE,
        "card": _card(family, info),
    }


def _card(family: Gemma3nFamily, info: dict[str, Any]) -> dict[str, Any]:
    source = info.get("source_path") or "an in-memory Gemma 3n model"
    widths = info["widths"]
    skipped = info["skipped_layers"]
    check = info.get("verification") or {}
    verified = (
        f"reloaded with `from_pretrained` (transformers {check['transformers']}): logits "
        f"match the in-place sliced source model to {check['max_abs_logit_diff']:.2e} (max "
        f"abs, {check['probe_tokens']} probe tokens)"
        if check.get("verified")
        else "not verified after export"
    )
    return {
        "front_matter": FRONT_MATTER,
        "title": "Gemma 3n Mix'n'Match submodel",
        "about": (
            f"> This is a submodel sliced from `{source}` (fingerprint "
            f"`{info['source_fingerprint']}`) by\n"
            "> `mnm` (Mix'n'Match search) without retraining. Gemma 3n is a MatFormer: the "
            "first neurons\n"
            "> of each FFN form a working smaller FFN, so a slice keeps those neurons and "
            "drops whole layers.\n"
            "> It is not the original model; its use is subject to the original model's "
            "license (Gemma terms)."
        ),
        "rows": [
            [
                "layers kept",
                f"{len(widths) - len(skipped)} of {len(widths)}; skipped: {skipped or 'none'}",
            ],
            [
                "FFN hidden dims per kept layer (`intermediate_size`)",
                f"{info['intermediate_size']}",
            ],
            ["effective parameters (without embedding tables)", f"{info['effective_params']:,}"],
        ],
        "verified": verified,
        "usage": USAGE,
    }
