"""Core commands: info, eval, train."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from mnm_search._files import refuse_overlap
from mnm_search.cli._common import (
    DEFAULT_EVAL_TOKENS,
    CkptArg,
    DataOpt,
    JsonOpt,
    StepOpt,
    err,
    loss_label,
    out,
    print_eval_result,
    print_json,
    progress_bar,
    user_errors,
)
from mnm_search.cli._profile import load_profile_for
from mnm_search.config import run_length_widths
from mnm_search.errors import CheckpointError, ConfigError, Terminated
from mnm_search.families import load_family
from mnm_search.options import PRESETS

if TYPE_CHECKING:
    from mnm_search.families.base import Family

# Groups a family's describe() may nest its facts in; `info` shows their keys at the top level.
_LIFTED_GROUPS = ("config", "metadata")
# Keys of describe() that `info` computes itself, for every family, under its own names.
_REPLACED_KEYS = ("uniform_params", "params_full")


def info_data(family: Family) -> dict[str, Any]:
    """What `mnm info --json` prints: the family's own `describe()` plus the facts every
    family has (kind, layers, parameters per uniform size, number of configurations)."""
    described = dict(family.describe())
    for group in _LIFTED_GROUPS:
        nested = described.pop(group, None)
        if isinstance(nested, dict):
            for key, value in nested.items():
                described.setdefault(key, value)
    for key in _REPLACED_KEYS:
        described.pop(key, None)
    names = list(family.uniform_configs())
    uniform = family.uniform_configs() if family.is_universal else {}
    data: dict[str, Any] = {
        "family": family.name,
        "path": str(family.path) if family.path is not None else None,
        "kind": "universal" if family.is_universal else "exported",
        "n_layers": family.n_layers,
        "fingerprint": family.fingerprint,
        **described,
        "params": family.param_count(),
        "params_uniform": {name: family.param_count(w) for name, w in uniform.items()},
    }
    data.setdefault("granularity_names", names)
    if family.is_universal:
        try:
            plain = family.search_space(allow_skip=False)
            with_skips = family.search_space(allow_skip=True)
        except ConfigError:  # a family whose layers cannot be searched this way
            pass
        else:
            data.setdefault("granularities", list(plain.granularities))
            data["n_configs"] = {"mix_n_match": plain.size, "with_skips": with_skips.size}
    else:
        data["ffn_widths"] = family.full_widths()
        data["ffn_widths_compact"] = family.format_widths(family.full_widths())
    return data


@user_errors
def info(ckpt: CkptArg = None, as_json: JsonOpt = False, step: StepOpt = None) -> None:
    """Describe a checkpoint: family, layers, granularities, parameters, provenance.

    Works for every supported family (native mnm checkpoints, Gemma 3n transformers
    directories, ...); only the structure is read, never a forward pass.

    Example: mnm info --json
    """
    family = load_family(ckpt, weights=False, step=step)
    data = info_data(family)
    if as_json:
        print_json(data)
        return
    print_info_table(data)


def _shape_text(data: dict[str, Any]) -> str | None:
    parts = [f"{data['n_layers']} layers"]
    for key, label in (
        ("d_model", "d_model"),
        ("hidden_size", "hidden"),
        ("n_heads", "heads"),
        ("d_ff", "d_ff"),
        ("vocab_size", "vocab"),
        ("max_seq_len", "context"),
    ):
        if data.get(key) is not None:
            parts.append(f"{data[key]} {label}" if key == "n_heads" else f"{label} {data[key]}")
    return ", ".join(parts)


def print_info_table(data: dict[str, Any]) -> None:
    """The `mnm info` table of any family: a row for each known fact the family reports."""
    table = Table(title=f"{data['family']} checkpoint {data.get('path')}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    family = str(data["family"])
    if data.get("architecture"):
        family += f" ({data['architecture']})"
    if data.get("dtype"):
        family += f", {data['dtype']}"
    table.add_row("family", family)
    table.add_row("kind", str(data["kind"]))
    table.add_row("fingerprint", str(data["fingerprint"]))
    table.add_row("shape", _shape_text(data))
    names, grans = data.get("granularity_names") or [], data.get("granularities") or []
    if grans and len(names) == len(grans) and [str(g) for g in grans] != list(map(str, names)):
        table.add_row("granularities", ", ".join(f"{n}={g}" for n, g in zip(names, grans)))
    elif grans:
        table.add_row("granularities", ", ".join(map(str, grans)))
    if data.get("stored_widths"):
        table.add_row("stored FFN widths", run_length_widths(data["stored_widths"]))
    if data.get("step"):
        table.add_row("width step", f"{data['step']} (widths are multiples of it; 0 drops a layer)")
    if data.get("ffn_widths_compact"):
        table.add_row("ffn widths", data["ffn_widths_compact"])
    if data.get("source_fingerprint"):
        table.add_row("exported from", str(data["source_fingerprint"]))
    if "kv_producer_layers" in data:
        shared = data.get("num_kv_shared_layers")
        reuse = f"; {shared} layers reuse their KV" if shared is not None else ""
        table.add_row("KV producers", f"{data['kv_producer_layers']} (never skipped){reuse}")
    if "skippable_layers" in data:
        table.add_row("skippable layers", str(data["skippable_layers"]))
    params = f"{data['params']:,}"
    if data.get("effective_params"):
        params += f" ({data['effective_params']:,} effective)"
    table.add_row("parameters", params)
    for name, count in data["params_uniform"].items():
        table.add_row(f"  uniform {name}", f"{count:,}")
    n = data.get("n_configs")
    if isinstance(n, dict):
        table.add_row(
            "Mix'n'Match configs", f"{n['mix_n_match']:,} ({n['with_skips']:,} with skips)"
        )
    if data.get("tokenizer"):
        table.add_row("tokenizer", str(data["tokenizer"]))
    training = data.get("training")
    if isinstance(training, dict):
        _add_training_rows(table, training, Path(data["path"]) if data.get("path") else None)
    out.print(table)


def _add_training_rows(table: Table, training: dict[str, Any], path: Path | None) -> None:
    """How the checkpoint was trained, as its training run recorded it."""
    commands = training.get("commands") or [training.get("command") or "?"]
    shown = [display_command(command, path) for command in commands]
    table.add_row("trained with", "\n".join(shown))
    if training.get("history"):
        table.add_row("history", training["history"])
    table.add_row("corpus", str(training.get("corpus")))
    table.add_row(
        "training",
        f"{training.get('step')} steps, {training.get('tokens_seen', 0):,} tokens, "
        f"{training.get('tokens_per_second')} tokens/s",
    )
    val_text = _training_validation_text(training)
    val_tokens = (training.get("settings") or {}).get("eval_tokens")
    if training.get("val_losses"):
        losses = ", ".join(f"{k} {v:.4f}" for k, v in training["val_losses"].items())
        where = loss_label(val_text, val_tokens)
        table.add_row("val loss", f"{losses}\n({where}; at the last training step)")
    shipped = training.get("shipped_weights") or {}
    if shipped.get("val_losses_uniform"):
        losses = ", ".join(f"{k} {v:.4f}" for k, v in shipped["val_losses_uniform"].items())
        where = loss_label(None, shipped.get("eval_tokens"))
        dtype = shipped.get("storage_dtype", "stored")
        table.add_row(f"loss ({dtype})", f"{losses}\n({where}; the weights as shipped)")
    if training.get("unigram_val_loss"):
        table.add_row("unigram baseline", f"{training['unigram_val_loss']:.4f} nats/token")


def _training_validation_text(training: dict[str, Any]) -> str:
    """The text a training run validated on, as recorded in its `corpus` line."""
    corpus = str(training.get("corpus") or "")
    if corpus.startswith("built-in"):
        return "bundled validation text"
    return "validation split of the training data"


def display_command(command: str, checkpoint_dir: Path | None) -> str:
    """A recorded command with absolute paths shortened for display.

    Training commands are recorded as typed, so a shipped checkpoint would show the paths
    of the machine it was trained on. A path inside the checkpoint directory is shown
    relative to it (`.` for the directory itself); any other absolute path by its last
    component.
    """
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: show it as recorded
        return command
    return shlex.join(_short_path(word, checkpoint_dir) for word in words)


def _short_path(word: str, checkpoint_dir: Path | None) -> str:
    option, equals, value = word.partition("=")
    if equals and option.startswith("--"):
        return f"{option}={_short_path(value, checkpoint_dir)}"
    if not word.startswith("/"):
        return word
    path = Path(word)
    if checkpoint_dir is not None:
        try:
            return str(path.relative_to(checkpoint_dir.resolve()))
        except ValueError:
            pass
    return path.name or word


@user_errors
def eval_command(
    ckpt: CkptArg = None,
    widths: Annotated[
        str | None,
        typer.Option(
            "--widths",
            "-w",
            help="One width per layer: S,M,L,XL, g0.., integers, 0 = skip, X*N "
            "(default: the checkpoint's own widths, i.e. the full model for a universal one).",
        ),
    ] = None,
    data: DataOpt = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Evaluate on at most this many tokens.")
    ] = DEFAULT_EVAL_TOKENS,
    profile: Annotated[
        Path | None,
        typer.Option("--profile", help="Latency profile JSON (mnm profile): adds latency_ms."),
    ] = None,
    as_json: JsonOpt = False,
    step: StepOpt = None,
) -> None:
    """Loss, perplexity and parameters of one Mix'n'Match configuration.

    Widths are written in the checkpoint's own terms (see mnm info): granularity names and
    integers for native checkpoints, multiples of the width step for Gemma 3n; the loss is
    measured with the checkpoint's own tokenizer where it has one.

    Example: mnm eval --widths L,M*3,L*2 --profile profile-cpu-prefill.json --json
    """
    from mnm_search.evaluator import evaluate_loss, perplexity

    family = load_family(ckpt, step=step)
    resolved = family.parse_widths(widths) if widths is not None else family.full_widths()
    latency = load_profile_for(family, profile) if profile is not None else None
    eval_set = family.load_eval_set(data, max_tokens=max_tokens)
    started = time.perf_counter()
    with err.status(f"evaluating on {eval_set.n_tokens:,} tokens"):
        loss = evaluate_loss(family.logits, eval_set, resolved, batch_size=family.eval_batch_size)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "family": family.name,
        "widths": resolved,
        "widths_compact": family.format_widths(resolved),
        "skipped_layers": [layer for layer, width in enumerate(resolved) if width == 0],
        "loss": round(loss, 6),
        "perplexity": round(perplexity(loss), 4),
        "params": family.param_count(resolved),
        "n_tokens": eval_set.n_tokens,
        "data": str(data) if data else "bundled validation text",
        "fingerprint": family.fingerprint,
        "eval_seconds": round(seconds, 3),
    }
    # Facts some families add: parameters that must sit in accelerator memory where that
    # differs from all of them, and the tokenizer used.
    effective = family.effective_param_count(resolved)
    if effective != result["params"]:
        result["effective_params"] = effective
    tokenizer = family.describe().get("tokenizer")
    if tokenizer is not None:
        result["tokenizer"] = tokenizer
    if latency is not None:
        result["latency_ms"] = round(latency.predict_ms(resolved), 4)
        result["latency_target"] = latency.target.name
        result["latency_interpolated_layers"] = latency.interpolated_layers(resolved)
    if as_json:
        print_json(result)
        return
    print_eval_result(result)


def refuse_foreign_checkpoint(out_dir: Path) -> None:
    """Refuse an --out holding a checkpoint that `mnm train` did not write (an export, the
    universal model to search): train replaces --out whole at every save, so that checkpoint
    would be lost, not resumed."""
    from mnm_search.checkpoint import CONFIG_FILE, WEIGHTS_FILE
    from mnm_search.train import STATE_FILE

    if (out_dir / STATE_FILE).is_file():
        return  # a run of `mnm train`: resumed
    found = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if (out_dir / name).exists()]
    if found:
        raise CheckpointError(
            f"--out {out_dir} holds a checkpoint that `mnm train` did not write ({found[0]} "
            f"but no {STATE_FILE}); training there would replace it: choose a new --out"
        )


@user_errors
def train(
    out_dir: Annotated[Path, typer.Option("--out", help="Checkpoint directory to write/resume.")],
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Text file or directory (default: the built-in corpus)."),
    ] = None,
    preset: Annotated[
        str, typer.Option("--preset", help=f"Model size: {', '.join(PRESETS)}.")
    ] = "default",
    steps: Annotated[int, typer.Option("--steps", min=1, help="Total optimizer steps.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed for init and data order.")] = 0,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Sequences per step.")
    ] = None,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 2e-3,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Warm-up steps.")] = 100,
    eval_every: Annotated[
        int,
        typer.Option(
            "--eval-every",
            min=1,
            help="Measure every granularity's validation loss every N steps (and at the end).",
        ),
    ] = 250,
    checkpoint_every: Annotated[
        int,
        typer.Option(
            "--checkpoint-every",
            min=1,
            help="Save a resumable checkpoint to --out every N steps (and at the end).",
        ),
    ] = 250,
    granularity_mode: Annotated[
        str,
        typer.Option(
            "--granularities",
            help="all: average every granularity per step (the paper); sample: one random "
            "granularity per step; mix: all plus one random Mix'n'Match configuration; "
            "dense: no nesting, one FFN width (an independently trained baseline).",
        ),
    ] = "all",
    d_ff: Annotated[
        int | None,
        typer.Option(
            "--d-ff",
            min=8,
            help="FFN width (default: the preset's, 4 x d_model); e.g. --d-ff 128 "
            "--granularities dense trains a model the size of a uniform S draft.",
        ),
    ] = None,
    precision: Annotated[
        str, typer.Option("--precision", help="fp32, or bf16 autocast (faster on CPUs with bf16).")
    ] = "fp32",
) -> None:
    """Train a universal MatFormer model with nested (all-granularity) training.

    Re-running the same command resumes from the last checkpoint in --out.

    Example: mnm train --out my-matlm --preset small --steps 2000
    """
    from mnm_search.train import Trainer, TrainSettings

    settings = TrainSettings(
        preset=preset,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=warmup,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        granularity_mode=granularity_mode,
        precision=precision,
        data=str(data) if data is not None else None,
        d_ff=d_ff,
    )
    # Train replaces --out whole at every save: it must not hold the text it reads.
    refuse_overlap(out_dir, {"the --data text": data})
    refuse_foreign_checkpoint(out_dir)
    command = "mnm " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["train"] else ""
    with progress_bar(transient=False) as progress:
        task = progress.add_task("training", total=steps, status="")

        def on_progress(event: dict[str, Any]) -> None:
            losses = " ".join(f"{k} {v:.3f}" for k, v in event["losses"].items())
            status = f"{event['tokens_per_second']:,.0f} tok/s  loss {losses}"
            progress.update(task, completed=event["step"], status=status)
            if "val_losses" in event:
                val = " ".join(f"{k} {v:.4f}" for k, v in event["val_losses"].items())
                progress.console.print(f"step {event['step']}: validation loss {val}")

        trainer = Trainer(settings, out_dir, command=command, on_progress=on_progress)
        if trainer.step:
            progress.console.print(f"resuming {out_dir} at step {trainer.step}")
        progress.update(task, completed=trainer.step)
        try:
            result = trainer.run()
        except KeyboardInterrupt as exc:
            what, code = (
                ("Terminated", 143) if isinstance(exc, Terminated) else ("Interrupted", 130)
            )
            err.print(
                f"[yellow]{what}; saved step {trainer.step} to {out_dir}. "
                f"Re-run the same command to resume.[/]"
            )
            raise typer.Exit(code=code) from None
    val = ", ".join(f"{k} {v:.4f}" for k, v in result.val_losses.items())
    out.print(
        f"Trained {result.step} steps ({result.tokens_per_second:,.0f} tokens/s) -> "
        f"{result.out}\nvalidation loss: {val}"
    )
