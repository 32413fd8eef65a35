"""Nested (MatFormer) training for users without a universal checkpoint.

Each step averages the loss over every granularity (the paper's joint training), samples one
granularity per step (`granularity_mode="sample"`), or adds one random Mix'n'Match configuration
to the uniform ones (`"mix"`). AdamW, linear warm-up then cosine decay,
gradient clipping, periodic validation, and an atomic checkpoint every `checkpoint_every`
steps. Re-running into the same output directory resumes from the last checkpoint with the
exact data order an uninterrupted run would have had (batches depend only on seed and step).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mnm_search import __version__
from mnm_search.checkpoint import (
    atomic_directory,
    load_checkpoint,
    write_checkpoint_files,
)
from mnm_search.config import ModelConfig
from mnm_search.data import (
    MAX_TRAIN_BYTES,
    builtin_split,
    bundled_validation_text,
    encode,
    make_eval_set,
    read_text_data,
    sample_batch,
)
from mnm_search.errors import CheckpointError, ConfigError
from mnm_search.evaluator import evaluate_loss, unigram_loss
from mnm_search.model import MatLM
from mnm_search.options import PRESETS

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
# train_state.json holds settings, a log line per evaluation and the commands: well under this.
MAX_STATE_BYTES = 64 * 1024 * 1024
MAX_STEPS = 10**9


GRANULARITY_MODES = ("all", "sample", "mix", "dense")


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines a training run (saved with it, checked on resume)."""

    preset: str = "default"
    steps: int = 1000
    batch_size: int | None = None  # None: the preset's
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_tokens: int = 32_768
    checkpoint_every: int = 250
    seed: int = 0
    # "all": average every granularity (the paper); "sample": one per step; "mix": all of them
    # plus one random Mix'n'Match configuration per step; "dense": no nesting, one width
    # (the independently trained baseline of the paper's comparisons).
    granularity_mode: str = "all"
    precision: str = "fp32"  # "bf16": CPU/GPU autocast for speed, weights stay fp32
    data: str | None = None  # None: the built-in corpus
    d_ff: int | None = None  # FFN width; None: the preset's (4 x d_model)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for name in ("steps", "eval_every", "checkpoint_every", "eval_tokens", "warmup_steps"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ConfigError(f"{name} must be an integer, got {value!r:.80}")
            if value > MAX_STEPS:
                raise ConfigError(f"{name} must be at most {MAX_STEPS:,}, got {value:,}")
            if value <= 0 and name != "warmup_steps":
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size <= 0):
            raise ConfigError(f"batch_size must be positive, got {self.batch_size!r:.80}")
        if self.batch_size is not None and self.batch_size > 4096:
            raise ConfigError(f"batch_size must be at most 4096, got {self.batch_size:,}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be an integer in [0, 2**32), got {self.seed!r:.80}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r:.80}")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be finite and >= 0, got {value!r}")
        if self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be positive, got {self.grad_clip!r}")
        if self.data is not None and not isinstance(self.data, str):
            raise ConfigError(f"data must be a path string or null, got {self.data!r:.80}")
        if self.granularity_mode not in GRANULARITY_MODES:
            raise ConfigError(
                f"granularity_mode must be one of {', '.join(GRANULARITY_MODES)}, "
                f"got {self.granularity_mode!r}"
            )
        if self.d_ff is not None and (not _is_int(self.d_ff) or not 8 <= self.d_ff <= 65536):
            raise ConfigError(f"d_ff must be an integer in [8, 65536], got {self.d_ff!r:.80}")
        if self.d_ff is not None and self.granularity_mode != "dense" and self.d_ff % 8:
            raise ConfigError(
                f"d_ff={self.d_ff} must be a multiple of 8 for nested training (its "
                f"granularities are d_ff/8, d_ff/4, d_ff/2, d_ff); or train it dense"
            )
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.warmup_steps < 0 or self.lr <= 0 or self.min_lr < 0:
            raise ConfigError("lr must be positive and warmup_steps, min_lr non-negative")

    @property
    def model_config(self) -> ModelConfig:
        preset = PRESETS[self.preset][0]
        d_ff = self.d_ff or preset.d_ff
        if self.granularity_mode == "dense":  # one width: an ordinary, independently trained LM
            return replace(preset, d_ff=d_ff, granularities=(d_ff,))
        return replace(preset, d_ff=d_ff, granularities=(d_ff // 8, d_ff // 4, d_ff // 2, d_ff))

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size or PRESETS[self.preset][1]


def learning_rate(settings: TrainSettings, step: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at the last step."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return settings.min_lr + (settings.lr - settings.min_lr) * cosine


@dataclass
class TrainResult:
    out: Path
    step: int
    resumed_from: int
    tokens_per_second: float
    val_losses: dict[str, float]
    train_losses: list[float] = field(default_factory=list)  # mean over granularities, per step


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """Optimizer state as flat tensors (for safetensors) plus its JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.detach().cpu().contiguous()
        for index, entry in state["state"].items()
        for key, value in entry.items()
    }
    return tensors, state["param_groups"]


def _restore_optimizer(optimizer: torch.optim.Optimizer, directory: Path, groups: Any) -> None:
    """Load AdamW's state, checking names, shapes and values against the model's parameters."""
    path = directory / OPTIMIZER_FILE
    fix = "choose a new --out (the run cannot be resumed)"
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is missing, corrupt or truncated ({exc}); {fix}") from exc
    params = [param for group in optimizer.param_groups for param in group["params"]]
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        index, _, key = name.partition(".")
        if not index.isdigit() or int(index) >= len(params) or not key:
            raise CheckpointError(f"{path}: unexpected tensor {name!r}; {fix}")
        expected = () if key == "step" else tuple(params[int(index)].shape)
        if tuple(tensor.shape) != expected or not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(tensor.shape)} (expected "
                f"{list(expected)}) or non-finite values; {fix}"
            )
        per_param.setdefault(int(index), {})[key] = tensor
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} does not fit this model's optimizer ({exc}); {fix}") from exc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def portable_command(command: str) -> str:
    """`command` with each absolute path reduced to its last component.

    Provenance travels with a checkpoint: `--out /home/alice/runs/x` says nothing useful
    elsewhere and shows the machine it was trained on, so it is recorded as `--out x`.
    """

    def shorten(token: str) -> str:
        option, equals, value = token.partition("=") if token.startswith("-") else ("", "", token)
        if os.path.isabs(value) or value.startswith("~"):
            value = Path(value).name or "."
        return f"{option}{equals}{value}"

    try:
        return shlex.join(shorten(token) for token in shlex.split(command))
    except ValueError:  # unbalanced quotes: shorten what looks like a path
        return re.sub(r"(?<![\w.-])(?:~|/)[^\s'\"]*", lambda m: Path(m[0]).name or ".", command)


def portable_path(path: str) -> str:
    """An absolute path as its last component (see `portable_command`); others unchanged."""
    return Path(path).name or "." if os.path.isabs(path) or path.startswith("~") else path


def _read_state(out: Path) -> dict[str, Any]:
    """`train_state.json` of a run in `out`, every field checked before it is used."""
    path = out / STATE_FILE
    fix = "choose a new --out (the run cannot be resumed)"
    if path.stat().st_size > MAX_STATE_BYTES:
        raise CheckpointError(f"{path} is {path.stat().st_size:,} bytes, too big to be ours; {fix}")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    # ValueError: bad JSON, bad UTF-8, and integers of more than 4300 digits.
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} must hold a JSON object; {fix}")
    fields = {
        "step": int,
        "settings": dict,
        "param_groups": list,
        "log": list,
        "tokens_seen": int,
        "elapsed_s": (int, float),
    }
    for name, kind in fields.items():
        value = state.get(name)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise CheckpointError(
                f"{path}: field {name!r} is missing or invalid ({value!r:.80}); {fix}"
            )
    try:
        settings = TrainSettings(**state["settings"])
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: field 'settings' is invalid ({exc}); {fix}") from None
    if not 0 <= state["step"] <= settings.steps:
        raise CheckpointError(
            f"{path}: field 'step' is {state['step']}, outside [0, {settings.steps}] (the run's "
            f"steps); {fix}"
        )
    if state["tokens_seen"] < 0 or not math.isfinite(state["elapsed_s"]) or state["elapsed_s"] < 0:
        raise CheckpointError(
            f"{path}: 'tokens_seen' ({state['tokens_seen']!r}) and 'elapsed_s' "
            f"({state['elapsed_s']!r}) must be finite and >= 0; {fix}"
        )
    commands = state.get("commands", [])
    if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
        raise CheckpointError(f"{path}: field 'commands' must be a list of strings; {fix}")
    if not all(isinstance(entry, dict) for entry in state["log"]):
        raise CheckpointError(f"{path}: field 'log' must be a list of objects; {fix}")
    if not all(isinstance(group, dict) for group in state["param_groups"]):
        raise CheckpointError(f"{path}: field 'param_groups' must be a list of objects; {fix}")
    return {**state, "settings": settings, "commands": commands}


class Trainer:
    """One training run writing into `out` (resuming if `out` holds an earlier run)."""

    def __init__(
        self,
        settings: TrainSettings,
        out: str | Path,
        *,
        command: str = "",
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.out = Path(out)
        self.command = portable_command(command)
        self.on_progress = on_progress
        self.config = settings.model_config
        torch.manual_seed(settings.seed)
        self.model = MatLM(self.config)
        self.optimizer = torch.optim.AdamW(
            self._param_groups(), lr=settings.lr, betas=(0.9, 0.95), fused=False
        )
        self.step = 0
        self.log: list[dict[str, Any]] = []
        self.train_tokens, val_text, self.corpus = self._load_text()
        self.eval_set = make_eval_set(
            encode(val_text), seq_len=self.config.max_seq_len, max_tokens=settings.eval_tokens
        )
        self.tokens_seen = 0
        self.elapsed = 0.0
        self.commands = [self.command] if command else []  # every invocation, across resumes
        self._resume_if_present()

    def _param_groups(self) -> list[dict[str, Any]]:
        # No weight decay on norms (1-D) or embeddings, as in nanoGPT.
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            is_matrix = param.dim() >= 2 and not name.startswith(("wte", "wpe"))
            (decay if is_matrix else no_decay).append(param)
        return [
            {"params": decay, "weight_decay": self.settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def _load_text(self) -> tuple[torch.Tensor, str, str]:
        if self.settings.data is None:
            train_text, _ = builtin_split()
            return (
                encode(train_text),
                bundled_validation_text(),
                "built-in: pydoc_data topics + CPython standard library source "
                f"(Python {platform.python_version()}), validation = bundled/validation.txt",
            )
        # Bounded read (MAX_TRAIN_BYTES); the tokens are held as bytes, one per token.
        raw = read_text_data(self.settings.data, max_bytes=MAX_TRAIN_BYTES).encode("utf-8")
        tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        split = int(tokens.numel() * 0.9)
        read = f"first {MAX_TRAIN_BYTES // 2**20} MiB of " if len(raw) >= MAX_TRAIN_BYTES else ""
        return (
            tokens[:split],
            raw[split:].decode("utf-8", "replace"),
            f"{read}{portable_path(self.settings.data)} (first 90% train, last 10% validation)",
        )

    def _resume_if_present(self) -> None:
        state_path = self.out / STATE_FILE
        if not self.out.exists():
            return
        if not state_path.is_file():
            raise CheckpointError(
                f"{self.out} exists but holds no training run to resume ({STATE_FILE} missing); "
                f"choose a new --out"
            )
        state = _read_state(self.out)
        saved: TrainSettings = state["settings"]
        if saved.model_config != self.config or saved.seed != self.settings.seed:
            raise CheckpointError(
                f"{self.out} holds a run with preset {saved.preset!r} and seed {saved.seed}; "
                f"resume it with the same --preset and --seed, or choose a new --out"
            )
        checkpoint = load_checkpoint(self.out)
        self.model.load_state_dict(checkpoint.model.state_dict())
        _restore_optimizer(self.optimizer, self.out, state["param_groups"])
        self.step = state["step"]
        self.log = list(state["log"])
        self.tokens_seen = state["tokens_seen"]
        self.elapsed = float(state["elapsed_s"])
        self.commands = [*map(portable_command, state["commands"]), *self.commands]

    def _configs_for(self, step: int) -> list[tuple[str, list[int]]]:
        """(name, widths) of the submodels whose losses are averaged at `step`."""
        n_layers = self.config.n_layers
        uniform = [
            (name, [g] * n_layers)
            for name, g in zip(self.config.granularity_names, self.config.granularities)
        ]
        if self.settings.granularity_mode in ("all", "dense"):
            return uniform
        generator = torch.Generator().manual_seed(self.settings.seed * 7919 + step)
        if self.settings.granularity_mode == "sample":
            return [uniform[int(torch.randint(len(uniform), (1,), generator=generator))]]
        # "mix": the uniform models plus one random Mix'n'Match configuration, so that layers
        # also learn to work with neighbours of other widths (joint training alone never
        # shows them such combinations, and mixed configurations then fall behind).
        picks = torch.randint(len(self.config.granularities), (n_layers,), generator=generator)
        return [*uniform, ("mix", [self.config.granularities[int(i)] for i in picks])]

    def _train_step(self, step: int) -> dict[str, float]:
        settings = self.settings
        inputs, targets = sample_batch(
            self.train_tokens,
            batch_size=settings.effective_batch_size,
            seq_len=self.config.max_seq_len,
            seed=settings.seed,
            step=step,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(settings, step)
        self.model.train()
        losses: dict[str, float] = {}
        configs = self._configs_for(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.precision == "bf16"):
            total = torch.zeros(())
            for name, widths in configs:
                logits = self.model(inputs, widths)  # [B, T, vocab]
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                total = total + loss
                losses[name] = loss.item()
        (total / len(configs)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), settings.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens_seen += inputs.numel()
        return losses

    def validate(self) -> dict[str, float]:
        self.model.eval()
        names = self.config.granularity_names
        return {
            name: evaluate_loss(self.model, self.eval_set, [g] * self.config.n_layers)
            for name, g in zip(names, self.config.granularities)
        }

    def save(self, *, final: bool = False, val_losses: dict[str, float] | None = None) -> None:
        tensors, groups = _optimizer_tensors(self.optimizer)
        metadata = {"training": self.provenance(val_losses, final=final)}
        state = {
            "step": self.step,
            "settings": asdict(self.settings),
            "param_groups": groups,
            "log": self.log,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed,
            "commands": self.commands,
        }
        with atomic_directory(self.out, overwrite=True) as tmp:
            write_checkpoint_files(tmp, self.model, metadata=metadata)
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")

    def provenance(self, val_losses: dict[str, float] | None, *, final: bool) -> dict[str, Any]:
        return {
            "command": self.command,
            "commands": self.commands,
            "corpus": self.corpus,
            "settings": {
                **asdict(self.settings),
                "data": portable_path(self.settings.data) if self.settings.data else None,
            },
            "step": self.step,
            "finished": final,
            "tokens_seen": self.tokens_seen,
            "train_time_s": round(self.elapsed, 1),
            "tokens_per_second": (
                round(self.tokens_seen / self.elapsed, 1) if self.elapsed else None
            ),
            "val_losses": val_losses,
            "unigram_val_loss": round(unigram_loss(self.train_tokens, self.eval_set), 4),
            "mnm_version": __version__,
            "torch_version": torch.__version__,
        }

    def run(self) -> TrainResult:
        """Train to `settings.steps`; on Ctrl-C save the current step before re-raising."""
        settings = self.settings
        resumed_from = self.step
        val_losses: dict[str, float] = {}
        train_losses: list[float] = []
        try:
            while self.step < settings.steps:
                started = time.perf_counter()
                losses = self._train_step(self.step)
                self.elapsed += time.perf_counter() - started
                self.step += 1
                mean_loss = sum(losses.values()) / len(losses)
                train_losses.append(mean_loss)
                event: dict[str, Any] = {
                    "step": self.step,
                    "losses": losses,
                    "tokens_per_second": self.tokens_seen / max(self.elapsed, 1e-9),
                }
                if self.step % settings.eval_every == 0 or self.step == settings.steps:
                    val_losses = self.validate()
                    event["val_losses"] = val_losses
                    self.log.append(
                        {
                            "step": self.step,
                            "train_loss": mean_loss,
                            **{f"val_{k}": round(v, 5) for k, v in val_losses.items()},
                        }
                    )
                if self.on_progress is not None:
                    self.on_progress(event)
                if self.step % settings.checkpoint_every == 0 and self.step < settings.steps:
                    self.save(val_losses=val_losses or None)
        except KeyboardInterrupt:
            self.save(val_losses=val_losses or None)
            raise
        if not val_losses:  # already finished earlier: report the stored model's quality
            val_losses = self.validate()
        self.save(final=True, val_losses={k: round(v, 5) for k, v in val_losses.items()})
        return TrainResult(
            out=self.out,
            step=self.step,
            resumed_from=resumed_from,
            tokens_per_second=self.tokens_seen / max(self.elapsed, 1e-9),
            val_losses=val_losses,
            train_losses=train_losses,
        )
