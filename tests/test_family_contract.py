"""The model-family contract: every registered family passes the same checks.

Four families run through one table of checks: a tiny native MatLM, a tiny random Gemma 3n
(skipped where transformers lacks it), a tiny random dense Llama and a toy family defined
only in this file. The toy registers itself with `register_family` and touches no other
module: it is the proof that a new family needs nothing but a `Family` subclass and one
registration.

The checks: a sliced module computes the universal forward at its widths; cached evaluation
equals plain evaluation; parameter counts are exact; an export reloads to the same forward;
the profiler's JSON has its schema and loads as a latency model; widths round-trip; the
decoder's steps equal one full forward; greedy speculative decoding with any narrower
configuration as the draft equals plain greedy decoding; the registry detects each family
and names them all when it detects none.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mnm_search import data as mnm_data
from mnm_search import profiler
from mnm_search.config import expand_widths_spec
from mnm_search.data import EvalSet, make_eval_set
from mnm_search.errors import CheckpointError, ConfigError, ExportError, WidthsError
from mnm_search.evaluator import CachedEvaluator
from mnm_search.families import (
    detect_family,
    load_family,
    read_config_json,
    register_family,
    registered_families,
    unregister_family,
)
from mnm_search.families.base import (
    Decoder,
    Family,
    LatencyProbe,
    LayerSteps,
    LayerTable,
    Widths,
)
from mnm_search.latency import PROFILE_FORMAT, LatencyModel
from mnm_search.memory import DTYPE_BYTES, MemoryEstimate
from mnm_search.space import SearchSpace
from mnm_search.targets import HardwareTarget

# =============================================================== the toy family (test-only)

TOY_TYPE = "mnm-toy"
TOY_WEIGHTS = "model.safetensors"


class ToyBlock(nn.Module):
    """A residual nested FFN: the first `width` hidden neurons form a working smaller FFN."""

    def __init__(self, d_model: int, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, width, bias=False)
        self.down = nn.Linear(width, d_model, bias=False)

    def forward(self, h: torch.Tensor, width: int) -> torch.Tensor:
        hidden = F.gelu(F.linear(self.norm(h), self.up.weight[:width]))
        return h + F.linear(hidden, self.down.weight[:, :width])


class ToyLM(nn.Module):
    """Token embedding plus its causal running mean (the only context), N nested-FFN layers
    (width 0 drops a layer: no parameters), a final norm and an untied head."""

    def __init__(self, vocab: int, d_model: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.widths = list(widths)
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(ToyBlock(d_model, w) if w else nn.Identity() for w in widths)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def embed_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        e = self.embed(input_ids)  # [B, T, D]
        counts = torch.arange(1, e.shape[1] + 1, device=e.device, dtype=e.dtype)
        return e + e.cumsum(1) / counts[:, None]

    def forward(self, input_ids: torch.Tensor, widths: Sequence[int] | None = None) -> torch.Tensor:
        h = self.embed_ids(input_ids)
        for block, width in zip(self.blocks, self.widths if widths is None else widths):
            if width:
                h = block(h, width)
        return self.head(self.norm(h))


class ToySteps(LayerSteps):
    """The toy forward cut at layer boundaries; the state is the residual stream [B, T, D]."""

    cheap_siblings = True  # nested partial sums, as MatLM

    def __init__(self, model: ToyLM) -> None:
        self.model, self.n_layers = model, len(model.widths)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_ids(input_ids)

    def layer(self, index: int, state: torch.Tensor, widths: Sequence[int]) -> dict[int, Any]:
        outputs: dict[int, Any] = {0: state} if 0 in widths else {}
        positive = sorted(w for w in set(widths) if w > 0)
        if positive:  # siblings are partial sums of the widest pass
            block = self.model.blocks[index]
            hidden = F.gelu(F.linear(block.norm(state), block.up.weight[: positive[-1]]))
            running, start = torch.zeros_like(state), 0
            for width in positive:
                running = running + F.linear(
                    hidden[..., start:width], block.down.weight[:, start:width]
                )
                outputs[width], start = state + running, width
        return outputs

    def hidden(self, state: torch.Tensor) -> torch.Tensor:
        return self.model.norm(state)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.head(hidden).float()


class ToyDecoder(Decoder):
    """Stateless recompute: the "cache" is the token history, every step reruns all of it."""

    def __init__(self, model: ToyLM, widths: Widths | None) -> None:
        self.model, self.widths = model, widths
        self._tokens: torch.Tensor | None = None

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._tokens = input_ids[:, :0]
        return self.step(input_ids)

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._tokens is None:
            raise ConfigError("call prefill(prompt) before step()")
        self._tokens = torch.cat([self._tokens, input_ids], dim=1)
        return self.model(self._tokens, self.widths)[:, -input_ids.shape[1] :].float()

    def rollback(self, length: int) -> None:
        if self._tokens is None or not 0 <= length <= self.length:
            raise ConfigError(f"cannot roll the cache back to {length} positions")
        self._tokens = self._tokens[:, :length]

    @property
    def length(self) -> int:
        return 0 if self._tokens is None else self._tokens.shape[1]


class ToyProbe(LatencyProbe):
    """Times the toy on a target: embedding and head, each layer at each width, whole runs."""

    def __init__(self, family: ToyFamily, target: HardwareTarget, device: torch.device) -> None:
        self.family, self.target, self.device = family, target, device
        generator = torch.Generator().manual_seed(target.seed)
        vocab, batch = family.config["vocab_size"], target.batch
        # The toy recomputes its history, so decode runs context + new tokens too.
        self.ids = torch.randint(vocab, (batch, target.total_len), generator=generator).to(device)

    def table_widths(self) -> list[int]:
        return list(range(self.family.step, min(self.family.stored) + 1, self.family.step))

    def measure_table(
        self, *, repeats: int, warmup: int, seed: int, on_round: Callable[[int], None]
    ) -> LayerTable:
        model, widths = self.family.model, self.table_widths()
        x = model.embed_ids(self.ids)
        fixed = {
            "embedding": lambda: model.embed_ids(self.ids),
            "head": lambda: model.head(model.norm(x)),
        }
        cells = [(lambda b=block, w=w: b(x, w)) for block in model.blocks for w in widths]
        stats = profiler.time_interleaved(
            [*fixed.values(), *cells],
            device=self.device,
            repeats=repeats,
            warmup=warmup,
            seed=seed,
            on_round=on_round,
        )
        fixed_stats, table = dict(zip(fixed, stats)), stats[len(fixed) :]
        return LayerTable(
            widths=widths,
            per_layer=[table[i : i + len(widths)] for i in range(0, len(table), len(widths))],
            fixed=fixed_stats,
            fixed_ms=sum(s.median_ms for s in fixed_stats.values()),
            meaning="FFN time at that width, residual add included",
        )

    def runner(self, widths: Sequence[int]) -> Callable[[], object]:
        sliced = self.family.sliced_module(widths)
        if self.target.phase == "prefill":
            return lambda: sliced(self.ids)
        decoder, context = ToyDecoder(sliced, None), self.target.context_len
        decoder.prefill(self.ids[:, :context])

        def step() -> torch.Tensor:
            decoder.rollback(context)
            return decoder.step(self.ids[:, context:])

        return step

    def anchors(self, *, allow_skip: bool) -> list[Widths]:
        anchors = list(self.family.uniform_configs().values())
        if allow_skip:
            anchors.append([0, *self.family.stored[1:]])
        return anchors

    def sample(
        self, n: int, rng: random.Random, *, allow_skip: bool, exclude: Sequence[Sequence[int]] = ()
    ) -> list[Widths]:
        excluded = {tuple(w) for w in exclude}
        space = self.family.search_space(allow_skip=allow_skip)  # small: enumerate it
        pool = sorted((w for w in space.all_configs() if tuple(w) not in excluded), key=sum)
        return [pool[i] for i in sorted(rng.sample(range(len(pool)), min(n, len(pool))))]

    def checkpoint_info(self) -> dict[str, Any]:
        family = self.family
        return {"n_layers": family.n_layers, "d_ff": max(family.stored), "step": family.step}


class ToyFamily(Family):
    """A toy checkpoint: config.json (`model_type: mnm-toy`) + model.safetensors."""

    name = "toy"
    summary = "toy nested-FFN MLP LM (config.json `model_type: mnm-toy`, tests only)"

    def __init__(self, model: ToyLM, config: dict[str, Any], path: Path, step: int) -> None:
        self.model, self.config, self.path, self.step = model, config, path, step
        self.stored: list[int] = list(config["widths"])
        files = [path / "config.json", path / TOY_WEIGHTS]
        self.fingerprint = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        weights: bool = True,
        dtype: str | None = None,
        step: int | None = None,
    ) -> ToyFamily:
        config = read_config_json(path)
        step = config["step"] if step is None else step
        if any(w % step for w in config["widths"]):
            raise ConfigError(f"step {step} does not divide the stored widths {config['widths']}")
        with torch.device("cpu" if weights else "meta"):
            model = ToyLM(config["vocab_size"], config["d_model"], config["widths"])
        if weights:
            model.load_state_dict(load_file(Path(path) / TOY_WEIGHTS))
            if dtype not in (None, "auto"):
                model = model.to(profiler.TORCH_DTYPES[dtype])
        return cls(model.eval().requires_grad_(False), config, Path(path), step)

    # -- facts
    @property
    def n_layers(self) -> int:
        return len(self.stored)

    @property
    def has_weights(self) -> bool:
        return not self.model.embed.weight.is_meta

    @property
    def is_universal(self) -> bool:
        return bool(self.config.get("universal", True))

    @property
    def eval_seq_len(self) -> int:
        return int(self.config["max_seq_len"])

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.name,
            "fingerprint": self.fingerprint,
            "n_layers": self.n_layers,
            "stored_widths": self.stored,
            "step": self.step,
            "params_full": self.param_count(),
        }

    # -- widths
    def full_widths(self) -> Widths:
        return list(self.stored)

    def parse_widths(self, spec: str | Sequence[int | str]) -> Widths:
        items = expand_widths_spec(spec, max_entries=self.n_layers)
        if not all(item.isdigit() for item in items):
            raise WidthsError(f"toy widths are integers, got {spec!r}")
        return self.validate_widths([int(item) for item in items])

    def format_widths(self, widths: Sequence[int]) -> str:
        return ",".join(str(w) for w in widths)

    def validate_widths(self, widths: Sequence[int]) -> Widths:
        widths = list(widths)
        if len(widths) != self.n_layers:
            raise WidthsError(f"got {len(widths)} widths, the toy has {self.n_layers} layers")
        for layer, (width, top) in enumerate(zip(widths, self.stored)):
            ok = isinstance(width, numbers.Integral) and not isinstance(width, bool)
            if not ok or not 0 <= width <= top or width % self.step:
                raise WidthsError(
                    f"layer {layer}: width {width!r} must be 0 or a multiple of {self.step} "
                    f"up to {top}"
                )
        return [int(w) for w in widths]

    def search_space(
        self,
        *,
        allow_skip: bool = False,
        interpolate: int = 0,
        min_widths: Sequence[int] | None = None,
        max_widths: Sequence[int] | None = None,
    ) -> SearchSpace:
        if interpolate:
            raise ConfigError("--interpolate does not apply to the toy: its widths are steps")
        lows = list(min_widths) if min_widths is not None else [0] * self.n_layers
        highs = list(max_widths) if max_widths is not None else self.stored
        choices = [
            tuple(w for w in range(0, top + 1, self.step) if (w or allow_skip) and lo <= w <= hi)
            for top, lo, hi in zip(self.stored, lows, highs)
        ]
        steps = tuple(range(self.step, max(self.stored) + 1, self.step))
        return SearchSpace(choices=tuple(choices), granularities=steps)

    def uniform_configs(self) -> dict[str, Widths]:
        top = min(self.stored)
        return {str(w): [w] * self.n_layers for w in range(self.step, top + 1, self.step)}

    # -- costs
    def param_count(self, widths: Sequence[int] | None = None) -> int:
        widths = self.validate_widths(self.stored if widths is None else widths)
        vocab, d = self.config["vocab_size"], self.config["d_model"]
        return 2 * vocab * d + 2 * d + sum(2 * d + 2 * d * w for w in widths if w)

    def memory_bytes(self, widths: Sequence[int], target: HardwareTarget) -> MemoryEstimate:
        size, widths = DTYPE_BYTES[target.dtype], self.validate_widths(widths)
        widest = max([*widths, self.config["vocab_size"]])
        tokens = target.batch * target.total_len  # recomputed at every step: no KV cache
        return MemoryEstimate(
            weights=self.param_count(widths) * size,
            kv_cache=0,
            activations=tokens * (2 * self.config["d_model"] + widest) * size,
        )

    # -- quality
    def load_eval_set(self, data: str | Path | None, *, max_tokens: int | None) -> EvalSet:
        return mnm_data.load_eval_set(data, seq_len=self.eval_seq_len, max_tokens=max_tokens)

    def layer_steps(self) -> LayerSteps:
        if not self.is_universal:
            raise ConfigError("prefix caching needs the universal toy, not an export")
        return ToySteps(self.model)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, widths: Sequence[int] | None = None) -> torch.Tensor:
        widths = None if widths is None else self.validate_widths(widths)
        return self.model(input_ids, widths).float()

    # -- latency, decoding, export
    def latency_probe(self, target: HardwareTarget, device: torch.device) -> LatencyProbe:
        if not self.is_universal:
            raise ConfigError("profile the universal toy, not an export")
        return ToyProbe(self, target, device)

    def prepare_for_target(self, target: HardwareTarget) -> ToyFamily:
        device, dtype = profiler.select_device(target.device), profiler.TORCH_DTYPES[target.dtype]
        param = self.model.embed.weight
        if param.device == device and param.dtype == dtype:
            return self
        prepared = copy.copy(self)
        prepared.model = copy.deepcopy(self.model).to(device=device, dtype=dtype)
        return prepared

    def decoder(self, widths: Sequence[int] | None = None) -> Decoder:
        return ToyDecoder(self.model, None if widths is None else self.validate_widths(widths))

    def module(self) -> nn.Module:
        return self.model

    def sliced_module(self, widths: Sequence[int]) -> nn.Module:
        widths = self.validate_widths(widths)
        param = self.model.embed.weight
        sliced = ToyLM(self.config["vocab_size"], self.config["d_model"], widths)
        sliced = sliced.to(device=param.device, dtype=param.dtype)
        source = self.model.state_dict()
        # Nested FFNs: every sliced tensor is the leading block of the stored one.
        sliced.load_state_dict(
            {
                k: source[k][tuple(slice(0, n) for n in v.shape)]
                for k, v in sliced.state_dict().items()
            }
        )
        return sliced.eval().requires_grad_(False)

    def write_export(
        self, directory: Path, widths: Sequence[int], *, fmt: str, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        if fmt not in self.export_formats:
            raise ExportError(f"the toy exports {self.export_formats}, not {fmt!r}")
        widths = self.validate_widths(widths)
        config = {**self.config, "widths": widths, "universal": False, "metadata": metadata}
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        state = self.sliced_module(widths).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / TOY_WEIGHTS))
        ids = torch.arange(self.eval_seq_len)[None] % self.config["vocab_size"]
        diff = float((ToyFamily.load(directory).logits(ids) - self.logits(ids, widths)).abs().max())
        if not diff <= 1e-5:
            raise ExportError(f"the reloaded export differs from the in-place forward by {diff}")
        return {"verified_max_abs_diff": diff, "params": self.param_count(widths)}


def save_toy_checkpoint(path: Path, *, seed: int = 0) -> Path:
    config = {
        "model_type": TOY_TYPE,
        "vocab_size": 256,
        "d_model": 16,
        "widths": [32, 32, 32],
        "step": 8,
        "max_seq_len": 16,
    }
    torch.manual_seed(seed)
    model = ToyLM(config["vocab_size"], config["d_model"], config["widths"])
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(model.state_dict(), str(path / TOY_WEIGHTS))
    return path


def _is_toy(config: dict[str, Any]) -> bool:
    return config.get("model_type") == TOY_TYPE


# ============================================================= the built-in families


def _save_matlm(path: Path) -> Path:
    from mnm_search.checkpoint import save_checkpoint
    from mnm_search.config import ModelConfig
    from mnm_search.model import MatLM

    config = ModelConfig(
        d_model=32, n_layers=3, n_heads=2, d_ff=64, granularities=(8, 16, 32, 64), max_seq_len=32
    )
    torch.manual_seed(0)
    return save_checkpoint(MatLM(config).eval(), path)


def _save_gemma3n(path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma3nForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 3n")
    from gemma3n_models import save_tiny_checkpoint

    return save_tiny_checkpoint(path)


def _save_llama(path: Path) -> Path:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from llama_models import save_tiny_llama

    return save_tiny_llama(path)  # vocab 300, with a tokenizer: the ids below are < 256


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "matlm": _save_matlm,
    "gemma3n": _save_gemma3n,
    "llama": _save_llama,
    "toy": save_toy_checkpoint,
}
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
ATOL = 1e-5
TINY_TARGET = HardwareTarget(
    name="tiny-prefill", phase="prefill", seq_len=8, repeats=3, warmup=1, calibration=6,
    validation=3,
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def toy_registered() -> Any:
    entry = register_family("toy", summary=ToyFamily.summary, detect=_is_toy, load=ToyFamily.load)
    yield entry
    unregister_family("toy")


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    path = BUILDERS[request.param](tmp_path_factory.mktemp(request.param) / "checkpoint")
    loaded = load_family(path)
    assert isinstance(loaded, Family) and loaded.name == request.param
    return loaded


def contract_configs(family: Family) -> dict[str, Widths]:
    """Full, smallest, mixed, and (where the family allows it) two dropped layers."""
    space = family.search_space(allow_skip=True)
    positive = [[w for w in options if w > 0] for options in space.choices]
    configs = {
        "full": family.full_widths(),
        "smallest": [options[0] for options in positive],
        "mixed": [options[(i + 1) % len(options)] for i, options in enumerate(positive)],
    }
    droppable = [i for i, options in enumerate(space.choices) if 0 in options]
    if droppable:
        dropped = list(configs["mixed"])
        dropped[droppable[0]] = dropped[droppable[-1]] = 0
        configs["dropped"] = dropped
    return configs


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(
        actual.float(),
        expected.float(),
        atol=ATOL,
        rtol=0,
        msg=lambda details: f"{what}\n{details}",
    )


# ================================================================================ checks


def test_sliced_module_equals_universal_forward(family: Family) -> None:
    for name, widths in contract_configs(family).items():
        reference = family.logits(IDS, widths)
        with torch.inference_mode():
            sliced = family.sliced_module(widths)(IDS)
            universal = family.module()(IDS, widths=widths)
        assert isinstance(sliced, torch.Tensor), f"{name}: sliced forward must return logits"
        _close(sliced, reference, f"{family.name} {name} {widths}: sliced != universal")
        _close(universal, reference, f"{family.name} {name} {widths}: module() != logits()")


def test_cached_evaluation_equals_plain_evaluation(family: Family) -> None:
    tokens = torch.randint(0, 256, (4 * 17,), generator=torch.Generator().manual_seed(2))
    eval_set = make_eval_set(tokens, seq_len=16)
    space = family.search_space(allow_skip=True)
    evaluator = CachedEvaluator(family, eval_set, layer_widths=space.choices, agreement=True)
    configs = contract_configs(family)
    for name, widths in [*configs.items(), *configs.items()]:  # the second round hits caches
        quality = evaluator.evaluate(widths)
        logits = family.logits(eval_set.inputs, widths)
        plain = F.cross_entropy(logits.flatten(0, 1), eval_set.targets.flatten()).item()
        assert quality.loss == pytest.approx(plain, rel=1e-6), f"{family.name} {name} {widths}"
    full = evaluator.evaluate(family.full_widths())
    assert full.kl == pytest.approx(0.0, abs=1e-6)
    assert full.agreement == 1.0
    assert evaluator.stats.prefix_hits > 0


def test_eval_set_has_the_family_windows(family: Family) -> None:
    eval_set = family.load_eval_set(None, max_tokens=2 * family.eval_seq_len)
    assert eval_set.inputs.shape == eval_set.targets.shape
    assert eval_set.inputs.shape[1] == family.eval_seq_len
    logits = family.logits(eval_set.inputs[:1])
    assert logits.shape[:2] == (1, family.eval_seq_len) and bool(logits.isfinite().all())


def test_param_count_is_exact(family: Family) -> None:
    for name, widths in contract_configs(family).items():
        module = family.sliced_module(widths)
        counted = sum(p.numel() for p in module.parameters())  # unique tensors
        assert family.param_count(widths) == counted, f"{family.name} {name} {widths}"
    assert family.param_count() == family.param_count(family.full_widths())


def test_memory_estimate_counts_the_sliced_weights(family: Family) -> None:
    configs = contract_configs(family)
    full = family.memory_bytes(configs["full"], TINY_TARGET)
    smallest = family.memory_bytes(configs["smallest"], TINY_TARGET)
    assert full.weights == family.param_count(configs["full"]) * DTYPE_BYTES["float32"]
    assert 0 < smallest.total <= full.total


def test_export_reloads_to_the_in_place_forward(family: Family, tmp_path: Path) -> None:
    widths = contract_configs(family).get("dropped") or contract_configs(family)["mixed"]
    directory = tmp_path / "export"
    directory.mkdir()
    report = family.write_export(directory, widths, fmt=family.export_formats[0], metadata={})
    assert report["verified_max_abs_diff"] <= ATOL
    assert detect_family(directory) == family.name
    exported = load_family(directory)
    assert exported.name == family.name
    assert exported.param_count() == family.param_count(widths)
    _close(exported.logits(IDS), family.logits(IDS, widths), f"{family.name} export {widths}")


def test_profile_json_schema(family: Family) -> None:
    prepared = family.prepare_for_target(TINY_TARGET)
    profile = profiler.profile(prepared, TINY_TARGET, quick=True)
    json.dumps(profile, allow_nan=False)  # strict JSON
    for key in (
        "format",
        "version",
        "target",
        "checkpoint",
        "ffn_table",
        "latency_model",
        "calibration",
        "validation",
        "warnings",
    ):
        assert key in profile, f"profile lacks {key!r}"
    assert profile["format"] == PROFILE_FORMAT
    assert profile["checkpoint"]["fingerprint"] == family.fingerprint
    assert profile["checkpoint"]["family"] == family.name
    table = profile["ffn_table"]
    assert len(table["per_layer"]) == family.n_layers
    assert all(len(row) == len(table["widths"]) for row in table["per_layer"])
    assert isinstance(profile["warnings"], list)
    latency = LatencyModel.from_profile(profile)
    assert latency.n_layers == family.n_layers
    for widths in contract_configs(family).values():
        predicted = latency.predict_ms(widths)
        assert math.isfinite(predicted) and predicted > 0, widths


def test_widths_round_trip(family: Family) -> None:
    space = family.search_space(allow_skip=True)
    for widths in contract_configs(family).values():
        assert family.parse_widths(family.format_widths(widths)) == widths
        assert family.validate_widths(widths) == widths
        assert space.contains(widths)
        for wrong in (widths[:-1], [*widths, widths[-1]]):
            with pytest.raises(WidthsError):
                family.validate_widths(wrong)
    for widths in family.uniform_configs().values():
        assert family.validate_widths(widths) == widths
    for seed in family.seed_configs(family.search_space()):
        assert family.search_space().contains(seed.widths), seed


def test_decoder_steps_equal_one_forward(family: Family) -> None:
    for name, widths in contract_configs(family).items():
        reference = family.logits(IDS, widths)
        decoder = family.decoder(widths)
        parts = [decoder.prefill(IDS[:, :6])]
        parts += [decoder.step(IDS[:, t : t + 1]) for t in range(6, 9)]
        parts.append(decoder.step(IDS[:, 9:]))
        assert decoder.length == IDS.shape[1]
        _close(torch.cat(parts, dim=1), reference, f"{family.name} {name}: decode != forward")
        decoder.rollback(8)  # forget positions 8.. and decode them again
        assert decoder.length == 8
        _close(decoder.step(IDS[:, 8:]), reference[:, 8:], f"{family.name} {name}: rollback")


def test_speculative_greedy_equals_plain_greedy(family: Family) -> None:
    """A narrower configuration drafting for the full model changes no token (DESIGN.md §4),
    through `generate` on the family and, where registered, on its `load_model` module."""
    from mnm_search import generate

    prompt = IDS[:, :5]
    plain = generate(family, prompt, max_new_tokens=7)
    assert plain.shape == (2, 12) and torch.equal(plain[:, :5], prompt)
    for name, draft in contract_configs(family).items():
        for lookahead in (1, 3):
            spec = generate(
                family, prompt, max_new_tokens=7, draft_widths=draft, lookahead=lookahead
            )
            assert torch.equal(spec, plain), f"{family.name} draft {name}, lookahead {lookahead}"
    if family.name != "toy":  # the toy registers no module types: it is passed as a family
        smallest = contract_configs(family)["smallest"]
        module = family.module()
        assert torch.equal(
            generate(module, prompt, max_new_tokens=7, draft_widths=smallest, lookahead=2), plain
        )


def test_registry_detects_the_family(family: Family) -> None:
    assert family.path is not None
    assert detect_family(family.path) == family.name
    description = family.describe()
    json.dumps(description)
    assert description["family"] == family.name
    assert description["fingerprint"] == family.fingerprint
    structure = load_family(family.path, weights=False)
    assert structure.fingerprint == family.fingerprint
    assert structure.n_layers == family.n_layers
    assert structure.param_count() == family.param_count()


def test_unknown_checkpoint_lists_every_registered_family(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not-a-matformer"}))
    names = set(registered_families())
    assert {"matlm", "gemma3n", "llama", "toy"} <= names
    for call in (detect_family, load_family):
        with pytest.raises(CheckpointError, match="unsupported model family") as error:
            call(tmp_path)
        assert all(f"{name}:" in str(error.value) for name in names), str(error.value)
    register_family("toy2", summary="another toy", detect=lambda c: False, load=ToyFamily.load)
    try:
        with pytest.raises(CheckpointError, match="toy2: another toy"):
            detect_family(tmp_path)
    finally:
        unregister_family("toy2")
    with pytest.raises(CheckpointError) as error:
        detect_family(tmp_path)
    assert "toy2" not in str(error.value)
