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
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mnm_search import __version__
from mnm_search.checkpoint import (
    atomic_directory,
    load_checkpoint,
    write_checkpoint_files,
)
from mnm_search.config import ModelConfig
from mnm_search.data import (
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

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def _model_preset(d_model: int, n_layers: int, n_heads: int, seq: int) -> ModelConfig:
    d_ff = 4 * d_model
    return ModelConfig(
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        d_ff=d_ff,
        granularities=(d_ff // 8, d_ff // 4, d_ff // 2, d_ff),
        max_seq_len=seq,
    )


PRESETS: dict[str, tuple[ModelConfig, int]] = {
    # name: (model config, batch size)
    "tiny": (_model_preset(32, 2, 2, 32), 8),
    "small": (_model_preset(128, 4, 4, 128), 16),
    "default": (_model_preset(256, 6, 4, 256), 16),
}


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
    # plus one random Mix'n'Match configuration per step.
    granularity_mode: str = "all"
    precision: str = "fp32"  # "bf16": CPU/GPU autocast for speed, weights stay fp32
    data: str | None = None  # None: the built-in corpus

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for name in ("steps", "eval_every", "checkpoint_every", "eval_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if self.granularity_mode not in ("all", "sample", "mix"):
            raise ConfigError(
                f"granularity_mode must be 'all', 'sample' or 'mix', got {self.granularity_mode!r}"
            )
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.warmup_steps < 0 or self.lr <= 0 or self.min_lr < 0:
            raise ConfigError("lr must be positive and warmup_steps, min_lr non-negative")

    @property
    def model_config(self) -> ModelConfig:
        return PRESETS[self.preset][0]

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
    tensors = load_file(str(directory / OPTIMIZER_FILE))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        per_param.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


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
        self.command = command
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
        self.commands = [command] if command else []  # every invocation, across resumes
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
        text = read_text_data(self.settings.data)
        tokens = encode(text)
        split = int(tokens.numel() * 0.9)
        return (
            tokens[:split],
            text.encode()[split:].decode("utf-8", "replace"),
            (f"{self.settings.data} (first 90% train, last 10% validation)"),
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
        state = json.loads(state_path.read_text())
        saved = TrainSettings(**state["settings"])
        if saved.model_config != self.config or saved.seed != self.settings.seed:
            raise CheckpointError(
                f"{self.out} holds a run with preset {saved.preset!r} and seed {saved.seed}; "
                f"resume it with the same --preset and --seed, or choose a new --out"
            )
        checkpoint = load_checkpoint(self.out)
        self.model.load_state_dict(checkpoint.model.state_dict())
        _restore_optimizer(self.optimizer, self.out, state["param_groups"])
        self.step = int(state["step"])
        self.log = list(state["log"])
        self.tokens_seen = int(state["tokens_seen"])
        self.elapsed = float(state["elapsed_s"])
        self.commands = [*state.get("commands", []), *self.commands]

    def _configs_for(self, step: int) -> list[tuple[str, list[int]]]:
        """(name, widths) of the submodels whose losses are averaged at `step`."""
        n_layers = self.config.n_layers
        uniform = [
            (name, [g] * n_layers)
            for name, g in zip(self.config.granularity_names, self.config.granularities)
        ]
        if self.settings.granularity_mode == "all":
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
            "settings": asdict(self.settings),
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
