"""The one model-family interface, and the registry every family (the native one too) joins.

Code outside `mnm_search/families/` sees a checkpoint only as a `Family`: it never imports a
concrete family and never asks which one it has. A family is one module that subclasses
`Family` and registers itself with a name, a cheap detector on `config.json` and a loader:

    class ToyFamily(Family):
        name = "toy"
        ...

    register_family(
        "toy",
        summary="toy models (config.json `model_type: toy`)",
        detect=lambda config: config.get("model_type") == "toy",
        load=ToyFamily.load,
    )

Built-in families register in `mnm_search.families` (their loaders import the heavy module
only when a checkpoint of theirs is loaded); add-ons register the same way from their own
module (import it, or name it in the `mnm_search.families` entry-point group).

What passes between the pieces:
- widths: one int per layer, the FFN width of that layer (0 drops the layer where allowed);
- `LayerSteps`: the forward pass cut at layer boundaries; the state between layers is the
  family's own (the residual stream for MatLM; AltUp streams + per-layer inputs for Gemma 3n),
  which is what makes prefix caching (`mnm_search.evaluator.CachedEvaluator`) family-neutral;
- `LatencyProbe`: what the profiler times (fixed costs, every layer at every width, whole
  configurations at the target's phase, decode with a cache);
- `Decoder`: greedy decoding with a KV cache at one configuration (speculative decoding);
- `write_export`: the family's files for one sliced configuration; `mnm_search.export` does
  the atomic directory, verification, evaluation, measured latency and model card around it.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mnm_search.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mnm_search.data import EvalSet
    from mnm_search.memory import MemoryEstimate
    from mnm_search.profiler import TimingStats
    from mnm_search.space import SearchSpace
    from mnm_search.targets import HardwareTarget

Widths = list[int]
State = Any  # a family's between-layer state: tensors in tuples/lists/dicts


# ------------------------------------------------------------------------------ seeds


@dataclass(frozen=True)
class SeedConfig:
    """A configuration evaluated before the sampler's own: uniform, heuristic or named.

    `kind` is what the configuration is ("uniform", "min-slope", "named"); `label` is what a
    person reads ("uniform M", "min-slope", "lab: E2B"). Results keep both, so nothing has to
    be parsed back out of the label.
    """

    kind: str
    label: str
    widths: tuple[int, ...]

    KINDS: ClassVar[tuple[str, ...]] = ("uniform", "min-slope", "named")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ConfigError(f"seed kind must be one of {self.KINDS}, got {self.kind!r}")


# ---------------------------------------------------------------------- layer steps


class LayerSteps(ABC):
    """One family's forward pass cut at layer boundaries, for exact prefix caching.

    The evaluator calls `embed` once per eval batch, then `layer` for each layer, keeping the
    returned states keyed by the widths prefix. `layer` returns one output state per requested
    width: a family computes siblings together where it can (nested FFN partial sums).
    Every state is a tensor or a tuple/list/dict of tensors, which the evaluator sizes for
    its memory budget; a non-tensor leaf (e.g. a per-batch context shared by all of a batch's
    states) is allowed and is not counted. States must not be modified in place once returned.
    """

    n_layers: int
    # Whether `layer` computes several widths for little more than the widest (nested FFN
    # partial sums): the evaluator then precomputes every sibling width worth keeping.
    cheap_siblings: ClassVar[bool] = False

    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> State:
        """The state entering layer 0 for token ids [B, T]."""

    @abstractmethod
    def layer(self, index: int, state: State, widths: Sequence[int]) -> dict[int, State]:
        """The state after layer `index` at each of `widths` (0 = the layer dropped)."""

    @abstractmethod
    def hidden(self, state: State) -> torch.Tensor:
        """The LM head's input [B, T, D] from the state after the last layer."""

    @abstractmethod
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float logits [..., vocab] of head inputs [..., D]. Separate from `hidden` so the
        evaluator can run a large vocabulary's head a few tokens at a time."""

    def logits(self, state: State) -> torch.Tensor:
        """Float logits [B, T, vocab] from the state after the last layer."""
        return self.head(self.hidden(state))


# -------------------------------------------------------------------- latency probe


@dataclass
class LayerTable:
    """What a probe measured in isolation: fixed costs, and every layer at every width.

    `per_layer[layer][j]` times layer `layer` at `widths[j]`; `meaning` says what a layer's
    time covers (the FFN alone, or the whole decoder layer) for the profile JSON.
    """

    widths: list[int]
    per_layer: list[list[TimingStats]]
    fixed: dict[str, TimingStats]
    fixed_ms: float
    meaning: str = "FFN time at that width"
    extra: dict[str, Any] = field(default_factory=dict)


class LatencyProbe(ABC):
    """What the profiler times for one family on one target (the model already prepared).

    `mnm_search.profiler` owns the stages, sampling, calibration, validation and the profile
    JSON; a probe only builds the callables and knows the family's valid configurations.
    """

    @abstractmethod
    def table_widths(self) -> list[int]:
        """The FFN widths the per-layer table measures."""

    def measure_extra_widths(self, widths: Sequence[int]) -> None:
        """Also measure these FFN widths in the table (`mnm profile --measure-widths`)."""
        raise ConfigError(
            f"extra table widths ({', '.join(map(str, widths))}) do not apply to this family: "
            f"its table already measures every width it can take"
        )

    @abstractmethod
    def measure_table(
        self, *, repeats: int, warmup: int, seed: int, on_round: Callable[[int], None]
    ) -> LayerTable:
        """Fixed costs and every layer at every table width, timed interleaved."""

    @abstractmethod
    def runner(self, widths: Sequence[int]) -> Callable[[], object]:
        """A no-argument callable running the configuration end to end at the target's phase
        (decode: one step against a filled KV cache), as the exported model would run."""

    @abstractmethod
    def anchors(self, *, allow_skip: bool) -> list[Widths]:
        """Configurations every calibration includes (the uniform ones, skip anchors)."""

    @abstractmethod
    def sample(
        self,
        n: int,
        rng: random.Random,
        *,
        allow_skip: bool,
        exclude: Sequence[Sequence[int]] = (),
    ) -> list[Widths]:
        """Up to `n` distinct valid configurations spread from small to large."""

    def checkpoint_info(self) -> dict[str, Any]:
        """The profile JSON's `checkpoint` block beyond fingerprint and path."""
        return {}

    def timing_info(self) -> dict[str, Any]:
        """Extra facts for the profile JSON's `timing` block."""
        return {}

    def extra_blocks(self) -> dict[str, Any]:
        """Extra top-level blocks of the profile JSON (e.g. a decode check, memory)."""
        return {}


# ------------------------------------------------------------------------- decoding


class Decoder(ABC):
    """A configuration of one family run token by token with a KV cache (greedy decoding)."""

    @abstractmethod
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Reset the cache, run the prompt [B, T]; logits [B, T, vocab]."""

    @abstractmethod
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Append tokens [B, t] to the cache; their logits [B, t, vocab]."""

    @abstractmethod
    def rollback(self, length: int) -> None:
        """Forget every cached position from `length` on."""

    @property
    @abstractmethod
    def length(self) -> int:
        """Positions held in the cache."""


# --------------------------------------------------------------------------- family


class Family(ABC):
    """A loaded checkpoint of one model family: everything the commands need of it."""

    name: ClassVar[str]  # registry key, e.g. "matlm"
    summary: ClassVar[str]  # one line for "supported families" errors and `mnm info`
    export_formats: ClassVar[tuple[str, ...]] = ("safetensors",)
    # Objectives this family cannot compute, with the reason (e.g. {"memory": "..."}).
    unsupported_objectives: ClassVar[dict[str, str]] = {}

    path: Path | None
    fingerprint: str

    # -- loading ----------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def load(
        cls,
        path: Path,
        *,
        weights: bool = True,
        dtype: str | None = None,
        step: int | None = None,
    ) -> Family:
        """Load a checkpoint directory (`weights=False`: structure only, for `info`).

        `dtype` converts the weights (None keeps the family's default); `step` is the FFN
        width step of families whose widths are multiples of one (a ConfigError otherwise).
        """

    @classmethod
    def from_module(cls, module: nn.Module) -> Family:
        """The family around a module its `module()` returned (for `generate`)."""
        raise ConfigError(f"the {cls.name} family cannot wrap a {type(module).__name__}")

    # -- facts ------------------------------------------------------------------------

    @property
    @abstractmethod
    def n_layers(self) -> int: ...

    @property
    @abstractmethod
    def has_weights(self) -> bool: ...

    @property
    @abstractmethod
    def is_universal(self) -> bool:
        """Whether every width of the search space can be sliced from this checkpoint."""

    @property
    def max_positions(self) -> int | None:
        """Most token positions one sequence can hold (None: no fixed limit)."""
        return None

    @property
    def eval_seq_len(self) -> int:
        """Tokens per evaluation window."""
        return 512

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-safe facts for `mnm info` (family, fingerprint, layers, widths, params...)."""

    # -- widths and the search space ----------------------------------------------------

    @abstractmethod
    def full_widths(self) -> Widths:
        """The widest configuration (the universal model itself)."""

    @abstractmethod
    def parse_widths(self, spec: str | Sequence[int | str]) -> Widths:
        """A user's widths (names like `M`, `8192*20,0*5`, a list) -> validated widths."""

    @abstractmethod
    def format_widths(self, widths: Sequence[int]) -> str:
        """Compact, human-readable widths that `parse_widths` reads back."""

    @abstractmethod
    def validate_widths(self, widths: Sequence[int]) -> Widths:
        """Check a configuration; WidthsError naming the layer and the fix otherwise."""

    @abstractmethod
    def search_space(
        self,
        *,
        allow_skip: bool = False,
        interpolate: int = 0,
        min_widths: Sequence[int] | None = None,
        max_widths: Sequence[int] | None = None,
    ) -> SearchSpace:
        """Per-layer width choices (bounds inclusive); ConfigError for options that do not
        apply to this family."""

    @abstractmethod
    def uniform_configs(self) -> dict[str, Widths]:
        """Every layer at the same width, by display name ("S", "M", "8192"...)."""

    def seed_configs(self, space: SearchSpace) -> list[SeedConfig]:
        """The uniform and minimum-slope configurations of `space`, evaluated first."""
        seeds = [
            SeedConfig("uniform", f"uniform {name}", tuple(widths))
            for name, widths in self.uniform_configs().items()
            if space.contains(widths)
        ]
        seeds += [SeedConfig("min-slope", "min-slope", tuple(w)) for w in space.min_slope_configs()]
        return seeds

    def named_configs(self, path: Path) -> list[SeedConfig]:
        """Named configurations from a MatFormer Lab CSV (`--lab-configs`), validated here.

        The Lab's CSV names per-layer FFN widths and skipped layers, which any family with
        per-layer widths can read; errors name the configuration and the fix.
        """
        from mnm_search.errors import WidthsError
        from mnm_search.families.matformer_lab import read_matformer_lab_csv

        seeds = []
        for config in read_matformer_lab_csv(path):
            widths = config.widths(self.n_layers)
            try:
                self.validate_widths(widths)
            except WidthsError as exc:
                raise WidthsError(f"{path}: {config.name!r}: {exc}") from None
            seeds.append(SeedConfig("named", f"lab: {config.name}", tuple(widths)))
        return seeds

    # -- costs ------------------------------------------------------------------------

    @abstractmethod
    def param_count(self, widths: Sequence[int] | None = None) -> int:
        """Exact parameters of the sliced model at `widths` (None: the full model)."""

    def effective_param_count(self, widths: Sequence[int] | None = None) -> int:
        """Parameters that must sit in accelerator memory (Gemma 3n keeps its per-layer
        embeddings on the CPU); every parameter for most families."""
        return self.param_count(widths)

    @abstractmethod
    def memory_bytes(self, widths: Sequence[int], target: HardwareTarget) -> MemoryEstimate:
        """Bytes the configuration needs on `target`: weights, KV cache, peak activations."""

    # -- quality ----------------------------------------------------------------------

    @abstractmethod
    def load_eval_set(self, data: str | Path | None, *, max_tokens: int | None) -> EvalSet:
        """Evaluation windows of the user's text (None: the bundled text), in this family's
        tokens and `eval_seq_len`."""

    def encode(self, text: str) -> torch.Tensor:
        """Token ids [T] of `text` (default: UTF-8 bytes, for byte-level vocabularies)."""
        from mnm_search.data import encode

        return encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (default: UTF-8 bytes, undecodable ones replaced)."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    @abstractmethod
    def layer_steps(self) -> LayerSteps:
        """The forward pass cut at layer boundaries (for the cached evaluator)."""

    @abstractmethod
    def logits(self, input_ids: torch.Tensor, widths: Sequence[int] | None = None) -> torch.Tensor:
        """The plain forward at `widths` (the reference the cached evaluator must match)."""

    @property
    def eval_batch_size(self) -> int:
        """Eval windows per forward pass: bounded memory for big models."""
        return 16

    # -- latency, decoding, export ------------------------------------------------------

    @abstractmethod
    def latency_probe(self, target: HardwareTarget, device: torch.device) -> LatencyProbe:
        """The probe the profiler times on `target` (model on the target's device/dtype)."""

    def prepare_for_target(self, target: HardwareTarget) -> Family:
        """This family with its weights on the target's device and dtype (may be a copy)."""
        return self

    @abstractmethod
    def decoder(self, widths: Sequence[int] | None = None) -> Decoder:
        """Greedy decoding with a KV cache at `widths` (None: the full model)."""

    @abstractmethod
    def module(self) -> nn.Module:
        """The model as a module whose forward takes `input_ids` and `widths=` (load_model)."""

    @abstractmethod
    def sliced_module(self, widths: Sequence[int]) -> nn.Module:
        """A physically sliced model of the configuration (what export ships), whose forward
        takes `input_ids` and returns logits."""

    @abstractmethod
    def write_export(
        self, directory: Path, widths: Sequence[int], *, fmt: str, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        """Write the configuration's deployable files into the empty `directory`, verify
        them against the in-place forward, and return facts for the report
        (`{"verified_max_abs_diff": float, ...}`). `metadata` goes into the export's config."""

    def widths_on_export(self, widths: Sequence[int], exported: Sequence[int]) -> Widths:
        """A configuration of this checkpoint that is at most `exported` in every layer, as
        widths of the export of `exported` (what `write_export` wrote, loaded again), e.g. a
        draft shipped with it. The same list where exports keep every layer (a skipped FFN
        stays a layer of width 0); a family whose exports drop skipped layers drops them."""
        return list(widths)

    # -- nesting a dense checkpoint (`mnm matformerize`) ---------------------------------

    # Importance criteria `matformerize` accepts, the default first; empty: the family's
    # checkpoints are nested by training and cannot be matformerized.
    nesting_criteria: ClassVar[tuple[str, ...]] = ()

    @property
    def nesting_warning(self) -> str | None:
        """Why narrower widths of this checkpoint may be poor sub-models (a dense model whose
        FFN neurons are not ordered by importance), for `search` to warn; None if nested."""
        return None

    def matformerize(
        self,
        out: Path,
        *,
        data: str | Path | None = None,
        max_tokens: int | None = None,
        criterion: str | None = None,
        overwrite: bool = False,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Write a nested copy of this dense checkpoint to `out`: every FFN's neurons
        reordered by importance on calibration text `data`, the full-width function
        unchanged. Returns facts for the report; `on_progress(done, total)` after each batch
        of calibration text."""
        raise ConfigError(
            f"{self.name} checkpoints are nested already ({self.summary}); matformerize turns "
            f"a dense model into a nested one"
        )


# ------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class FamilyEntry:
    """A registered family: its name, a one-line summary, a detector and a loader.

    The detector sees the parsed `config.json` and must be cheap (no torch, no weights); the
    loader is called only for a checkpoint its detector accepted, and may import heavy
    libraries then (a missing optional dependency becomes a CheckpointError naming the fix).
    """

    name: str
    summary: str
    detect: Callable[[dict[str, Any]], bool]
    load: Callable[..., Family]
    # File suffixes (".gguf") of single-file checkpoints this family loads, beside directories.
    suffixes: tuple[str, ...] = ()
    # Qualified class names of the modules `Family.module()` returns, and the function that
    # wraps such a module back into its family (`generate(model, ...)` needs the family).
    modules: tuple[str, ...] = ()
    wrap: Callable[[Any], Family] | None = None


_REGISTRY: dict[str, FamilyEntry] = {}
_ENTRY_POINT_GROUP = "mnm_search.families"
_entry_points_loaded = False


def register_family(
    name: str,
    *,
    summary: str,
    detect: Callable[[dict[str, Any]], bool],
    load: Callable[..., Family],
    suffixes: Sequence[str] = (),
    modules: Sequence[str] = (),
    wrap: Callable[[Any], Family] | None = None,
) -> FamilyEntry:
    """Make a family known (a later registration under the same name replaces it).

    `load(path, *, weights, dtype, step)` returns the loaded `Family`; `path` is a directory
    whose config.json `detect` accepted, or a file with one of `suffixes` (e.g. ".gguf").
    `modules` names the classes (`"package.module.Class"`) of the modules the family's
    `module()` returns and `wrap(module)` turns one back into the family, so that
    `generate(load_model(path), ...)` works without importing every family to ask.
    Built-in families register in `mnm_search.families`; add-ons call this from their own
    module, imported by the user or named in the `mnm_search.families` entry-point group.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a family needs a non-empty name, got {name!r}")
    bad = [s for s in suffixes if not (isinstance(s, str) and s.startswith("."))]
    if bad:
        raise ConfigError(f"suffixes must look like '.gguf', got {bad!r}")
    entry = FamilyEntry(
        name=name,
        summary=summary,
        detect=detect,
        load=load,
        suffixes=tuple(s.lower() for s in suffixes),
        modules=tuple(modules),
        wrap=wrap,
    )
    _REGISTRY[name] = entry
    return entry


def unregister_family(name: str) -> None:
    """Forget a family (tests that register toy families clean up with this)."""
    _REGISTRY.pop(name, None)


def registered_families() -> dict[str, FamilyEntry]:
    """Every registered family by name, built-in ones first."""
    _load_entry_points()
    return dict(_REGISTRY)


def family_for_config(data: dict[str, Any], *, where: str = "config.json") -> FamilyEntry:
    """The family whose detector accepts a parsed `config.json`; a clear error otherwise."""
    for entry in registered_families().values():
        if entry.detect(data):
            return entry
    model_type = data.get("model_type")
    # Quoted and cut short: these values come from an untrusted file.
    found = f"model_type {model_type!r:.80}" if model_type else "no model_type and no mnm format"
    architectures = data.get("architectures")
    if architectures:
        found += f", architectures {architectures!r:.200}"
    supported = "; ".join(f"{e.name}: {e.summary}" for e in _REGISTRY.values())
    raise CheckpointError(
        f"{where}: unsupported model family ({found}). mnm supports: {supported}. "
        f"Other transformers models are not MatFormers: their FFNs are not nested, so their "
        f"sub-models would not work without retraining"
    )


def family_for_file(path: Path) -> FamilyEntry:
    """The family that loads a single-file checkpoint, by its suffix; a clear error otherwise."""
    for entry in registered_families().values():
        if path.suffix.lower() in entry.suffixes:
            return entry
    known = sorted({s for e in _REGISTRY.values() for s in e.suffixes})
    raise CheckpointError(
        f"{path} is a file; a checkpoint is a directory with config.json"
        + (f", or a file ending in {', '.join(known)}" if known else "")
    )


def family_for_module(model: Any) -> Family:
    """The family of a module that `load_model` (or `Family.module()`) returned; a Family
    is returned as it is. A clear error for any other module."""
    if isinstance(model, Family):
        return model
    cls = type(model)
    qualified = f"{cls.__module__}.{cls.__qualname__}"
    for entry in registered_families().values():
        if qualified in entry.modules and entry.wrap is not None:
            return entry.wrap(model)
    raise ConfigError(
        f"cannot decode a {qualified}: pass a model from mnm_search.load_model(path) or a "
        f"loaded family (mnm_search.load_family(path))"
    )


def _load_entry_points() -> None:
    """Import add-on families declared by installed packages, once."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for point in entry_points(group=_ENTRY_POINT_GROUP):
        point.load()  # the module registers its family when imported
