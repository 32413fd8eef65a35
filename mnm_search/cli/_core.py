"""Core commands: info, eval, train."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mnm_search._files import refuse_overlap
from mnm_search.checkpoint import CONFIG_FILE, WEIGHTS_FILE, Checkpoint, load_checkpoint
from mnm_search.cli._common import (
    DEFAULT_EVAL_TOKENS,
    CkptArg,
    DataOpt,
    JsonOpt,
    StepOpt,
    err,
    family_of,
    loss_label,
    out,
    print_eval_result,
    print_json,
    progress_bar,
    refuse_step,
    user_errors,
)
from mnm_search.cli._profile import load_profile_for
from mnm_search.config import format_widths, param_count, parse_widths
from mnm_search.data import load_eval_set
from mnm_search.errors import CheckpointError, Terminated
from mnm_search.evaluator import evaluate_loss, perplexity
from mnm_search.families import GEMMA3N
from mnm_search.train import PRESETS, STATE_FILE, Trainer, TrainSettings


def _count_configs(checkpoint: Checkpoint) -> dict[str, int]:
    g, layers = len(checkpoint.config.granularities), checkpoint.config.n_layers
    return {"mix_n_match": g**layers, "with_skips": (g + 1) ** layers}


@user_errors
def info(ckpt: CkptArg = None, as_json: JsonOpt = False, step: StepOpt = None) -> None:
    """Describe a checkpoint: family, layers, granularities, parameters, provenance.

    Works on native mnm checkpoints and on Gemma 3n (transformers) checkpoint directories.

    Example: mnm info --json
    """
    if ckpt is not None and family_of(ckpt) == GEMMA3N:
        from mnm_search.cli import _gemma3n

        _gemma3n.info(ckpt, as_json=as_json, step=step)
        return
    refuse_step(step)
    checkpoint = load_checkpoint(ckpt)
    config = checkpoint.config
    uniform = {
        name: param_count(config, config.uniform_widths(g))
        for name, g in zip(config.granularity_names, config.granularities)
        if config.is_universal
    }
    data: dict[str, Any] = {
        "path": str(checkpoint.path),
        "family": config.family,
        "kind": "universal" if config.is_universal else "exported",
        "n_layers": config.n_layers,
        "d_model": config.d_model,
        "n_heads": config.n_heads,
        "d_ff": config.d_ff,
        "vocab_size": config.vocab_size,
        "max_seq_len": config.max_seq_len,
        "granularities": list(config.granularities),
        "granularity_names": config.granularity_names,
        "params": param_count(config),
        "params_uniform": uniform,
        "n_configs": _count_configs(checkpoint),
        "fingerprint": checkpoint.fingerprint,
        "training": checkpoint.metadata.get("training"),
    }
    if not config.is_universal:
        data["ffn_widths"] = config.physical_widths
        data["source_fingerprint"] = checkpoint.metadata.get("source_fingerprint")
    if as_json:
        print_json(data)
        return
    table = Table(title=f"{config.family} checkpoint {checkpoint.path}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("kind", data["kind"])
    table.add_row("fingerprint", checkpoint.fingerprint)
    table.add_row(
        "shape",
        f"{config.n_layers} layers, d_model {config.d_model}, {config.n_heads} heads, "
        f"d_ff {config.d_ff}, vocab {config.vocab_size}, context {config.max_seq_len}",
    )
    table.add_row(
        "granularities",
        ", ".join(f"{n}={g}" for n, g in zip(config.granularity_names, config.granularities)),
    )
    if not config.is_universal:
        table.add_row("ffn widths", format_widths(config.physical_widths, config))
    table.add_row("parameters", f"{data['params']:,}")
    for name, count in uniform.items():
        table.add_row(f"  uniform {name}", f"{count:,}")
    if config.is_universal:
        n = data["n_configs"]
        table.add_row(
            "Mix'n'Match configs", f"{n['mix_n_match']:,} ({n['with_skips']:,} with skips)"
        )
    training = checkpoint.metadata.get("training")
    if training:
        commands = training.get("commands") or [training.get("command") or "?"]
        shown = [display_command(command, checkpoint.path) for command in commands]
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
    out.print(table)


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

    Gemma 3n checkpoints take integer widths (multiples of the step, 0 drops a layer) and
    are evaluated with their own tokenizer when the directory has one.

    Example: mnm eval --widths L,M*3,L*2 --profile profile-cpu-prefill.json --json
    """
    if ckpt is not None and family_of(ckpt) == GEMMA3N:
        from mnm_search.cli import _gemma3n

        _gemma3n.evaluate(
            ckpt,
            widths=widths,
            data=data,
            max_tokens=max_tokens,
            profile=profile,
            as_json=as_json,
            step=step,
        )
        return
    refuse_step(step)
    checkpoint = load_checkpoint(ckpt)
    config = checkpoint.config
    resolved = parse_widths(widths, config) if widths is not None else config.physical_widths
    latency = load_profile_for(checkpoint, profile) if profile is not None else None
    eval_set = load_eval_set(data, seq_len=config.max_seq_len, max_tokens=max_tokens)
    started = time.perf_counter()
    loss = evaluate_loss(checkpoint.model, eval_set, resolved)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "widths": resolved,
        "widths_compact": format_widths(resolved, config),
        "loss": round(loss, 6),
        "perplexity": round(perplexity(loss), 4),
        "params": param_count(config, resolved),
        "n_tokens": eval_set.n_tokens,
        "data": str(data) if data else "bundled validation text",
        "fingerprint": checkpoint.fingerprint,
        "eval_seconds": round(seconds, 3),
    }
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
            "granularity per step; mix: all plus one random Mix'n'Match configuration.",
        ),
    ] = "all",
    precision: Annotated[
        str, typer.Option("--precision", help="fp32, or bf16 autocast (faster on CPUs with bf16).")
    ] = "fp32",
) -> None:
    """Train a universal MatFormer model with nested (all-granularity) training.

    Re-running the same command resumes from the last checkpoint in --out.

    Example: mnm train --out my-matlm --preset small --steps 2000
    """
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
