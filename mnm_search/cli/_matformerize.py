"""`mnm matformerize`: a dense model made nested (FFN neurons ordered by importance)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from mnm_search._files import refuse_overlap
from mnm_search.cli._common import JsonOpt, out, print_json, progress_bar, user_errors
from mnm_search.errors import ConfigError
from mnm_search.families import load_family


@user_errors
def matformerize(
    src: Annotated[
        Path,
        typer.Argument(
            help="Dense model: a transformers directory (config.json + safetensors) or a "
            ".gguf file."
        ),
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write the nested model.")],
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Calibration text file or directory (default: the training split of the "
            "built-in corpus, disjoint from the bundled evaluation text).",
        ),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", min=1, help="Calibration tokens (default 16384)."),
    ] = None,
    criterion: Annotated[
        str | None,
        typer.Option(
            "--criterion",
            help="Neuron importance: activation-rms (default: RMS activation x |down column|), "
            "activation (mean |activation| x |down column|), or weight (no data).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make a dense model nested: reorder every layer's FFN neurons by importance on
    calibration text, so that every prefix is a usable smaller FFN. The full-width model
    computes exactly what the source did (checked: logits within 1e-4); only the order of
    the neurons changes. Then profile, search and export the output like any checkpoint.

    Example: mnm matformerize SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2-nested
    """
    refuse_overlap(out_dir, {"the source model": src, "the --data text": data})
    if out_dir.exists() and not force:
        raise ConfigError(f"{out_dir} already exists; choose another --out or pass --force")
    started = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task("loading", total=None, status=str(src))
        family = load_family(src)  # a family nested by training refuses below, saying so
        progress.update(task, description="calibrating", status="")

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, status=f"batch {done}/{total}")

        report = family.matformerize(
            out_dir,
            data=data,
            max_tokens=max_tokens,
            criterion=criterion,
            overwrite=force,
            on_progress=on_progress,
        )
    report["seconds"] = round(time.perf_counter() - started, 1)
    if as_json:
        print_json(report)
        return
    calibration = report["calibration"]
    used = (
        f"{calibration['tokens']:,} tokens of {calibration['source']}"
        if "tokens" in calibration
        else "weights only"
    )
    out.print(
        f"Nested {src} -> {out_dir} in {report['seconds']:.0f} s "
        f"(criterion {report['criterion']}, {used}); full-width logits unchanged "
        f"(max abs diff {report['full_width_max_abs_diff']:.1e}).\n"
        f"Next: mnm profile {out_dir} --target cpu-prefill"
    )
