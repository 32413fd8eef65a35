"""Hardware targets: where and how a model runs, read from `profiles/NAME.yaml`.

The shipped targets live in the package (`mnm_search/profiles/`, installed with the wheel;
the repository's top-level `profiles/` points there), so `--target cpu-decode` works by bare
name from any directory; any other YAML file is named by its path.

A target fixes everything that changes latency: device, dtype, CPU threads, batch size and
the phase (`prefill`: `seq_len` new tokens from scratch; `decode`: `seq_len` new tokens,
usually 1, after a KV cache holding `context_len` tokens), plus how carefully to time it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mnm_search.errors import ConfigError

PHASES = ("prefill", "decode")
DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(cpu|cuda(:\d{1,3})?)$")
# The name ends up in file names (`profile-NAME.json`): one plain path component, no `..`.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A target file is a dozen lines; anything much bigger is not one.
MAX_TARGET_BYTES = 64 * 1024
MAX_DESCRIPTION_CHARS = 1000
# Upper bounds per integer field: far above any real setting, low enough that a typo or a
# hostile file cannot ask for terabytes of activations or days of timing.
_INT_FIELDS = {
    # field: (minimum, maximum)
    "threads": (1, 1024),
    "batch": (1, 4096),
    "seq_len": (1, 1 << 20),
    "context_len": (0, 1 << 20),
    "repeats": (3, 10_000),
    "warmup": (0, 1000),
    "calibration": (4, 10_000),
    "validation": (3, 10_000),
    "seed": (0, 2**32 - 1),
}


@dataclass(frozen=True)
class HardwareTarget:
    """One hardware setting to profile and search for. Validated on construction."""

    name: str
    device: str = "cpu"
    dtype: str = "float32"
    # CPU intra-op threads; None leaves torch's default. One thread is the quiet choice on
    # small machines: two threads on 2 cores made the same run vary by 9-20 %.
    threads: int | None = 1
    batch: int = 1
    phase: str = "prefill"
    seq_len: int = None  # type: ignore[assignment]  # None -> 128 for prefill, 1 for decode
    context_len: int = 0
    repeats: int = 15
    warmup: int = 3
    calibration: int = 32  # sampled configurations for the least-squares calibration
    validation: int = 24  # held-out configurations for the reported accuracy
    seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name) or ".." in self.name:
            raise ConfigError(
                f"target field 'name' must be a plain name of letters, digits, '.', '_' and "
                f"'-' (at most 64, no '/' or '..'; it becomes part of file names), got "
                f"{self.name!r:.80}"
            )
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise ConfigError(
                f"target field 'device' must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r:.80}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"target field 'dtype' must be one of {', '.join(DTYPES)}, got {self.dtype!r:.80}"
            )
        if self.phase not in PHASES:
            raise ConfigError(
                f"target field 'phase' must be one of {', '.join(PHASES)}, got {self.phase!r:.80}"
            )
        if not isinstance(self.description, str) or len(self.description) > MAX_DESCRIPTION_CHARS:
            raise ConfigError(
                f"target field 'description' must be a string of at most "
                f"{MAX_DESCRIPTION_CHARS} characters, got {self.description!r:.80}"
            )
        if self.seq_len is None:
            object.__setattr__(self, "seq_len", 128 if self.phase == "prefill" else 1)
        for name, (minimum, maximum) in _INT_FIELDS.items():
            value = getattr(self, name)
            if name == "threads" and value is None:
                continue  # torch's default
            _check_int(name, value, minimum=minimum, maximum=maximum)
        if self.phase == "prefill" and self.context_len != 0:
            raise ConfigError(
                f"target field 'context_len' must be 0 for phase 'prefill' (prefill starts "
                f"from an empty cache), got {self.context_len}; use phase 'decode' for a "
                f"KV cache"
            )
        if self.phase == "decode" and self.context_len < 1:
            raise ConfigError(
                "target field 'context_len' must be >= 1 for phase 'decode' (the tokens "
                f"already in the KV cache), got {self.context_len}"
            )

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def total_len(self) -> int:
        """Positions the model must hold: cached context plus the new tokens."""
        return self.context_len + self.seq_len

    def describe(self) -> str:
        threads = "" if self.is_cuda else f", {self.threads or 'default'} thread(s)"
        if self.phase == "prefill":
            work = f"prefill {self.seq_len} tokens"
        else:
            work = f"decode {self.seq_len} token(s) after {self.context_len} cached"
        return f"{self.name}: {self.device} {self.dtype}{threads}, batch {self.batch}, {work}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "target") -> HardwareTarget:
        """Build from a mapping, naming unknown or missing fields and wrong types."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        # repr before sorting: YAML keys may be numbers or null, which do not sort with str.
        unknown = sorted(repr(key)[:40] for key in data if key not in fields)
        if unknown:
            raise ConfigError(
                f"{source}: unknown field(s) {', '.join(unknown[:10])}; allowed fields: "
                f"{', '.join(fields)}"
            )
        for required in ("device", "phase"):
            if required not in data:
                raise ConfigError(f"{source}: missing required field {required!r}")
        phase = data["phase"]
        if phase == "prefill" and "seq_len" not in data:
            raise ConfigError(f"{source}: phase 'prefill' needs field 'seq_len' (tokens)")
        if phase == "decode" and "context_len" not in data:
            raise ConfigError(
                f"{source}: phase 'decode' needs field 'context_len' (tokens in the KV cache)"
            )
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def _check_int(field: str, value: Any, *, minimum: int, maximum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
        null = " (or null for torch's default)" if field == "threads" else ""
        raise ConfigError(
            f"target field {field!r} must be an integer from {minimum:,} to {maximum:,}{null}, "
            f"got {value!r:.80}"
        )


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases.

    A target never needs them, and aliases let a few hundred bytes expand into billions of
    nodes (the "billion laughs" alias bomb).
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = event.start_mark
            raise ConfigError(
                f"{self.name} line {mark.line + 1}: YAML anchors and aliases (&name, *name) are "
                f"not allowed in a target file; write each value out"
            )
        return super().compose_node(parent, index)


def load_target(path: str | Path) -> HardwareTarget:
    """Read and validate a target YAML file; `name` defaults to the file's stem.

    A bare name (`cpu-decode` or `cpu-decode.yaml`, no directory) that is not a file here
    names a shipped target.
    """
    path = resolve_target_path(path)
    size = path.stat().st_size
    if size > MAX_TARGET_BYTES:
        raise ConfigError(
            f"target file {path} is {size:,} bytes; a target is a few lines (at most "
            f"{MAX_TARGET_BYTES:,} bytes accepted); is it the right file?"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"target file {path} is not UTF-8 text ({exc})") from None
    loader = _NoAliasLoader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a target file") from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError(f"{path} is empty; it needs at least 'device' and 'phase'")
    if isinstance(data, dict):
        data.setdefault("name", _name_from_stem(path.stem))
    return HardwareTarget.from_dict(data, source=str(path))


def _name_from_stem(stem: str) -> str:
    """A valid target name from a file name (characters that cannot appear become '-')."""
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "-", stem)).strip(".-_")[:64]
    return name or "target"


def default_profiles_dir() -> Path:
    """The shipped targets' directory, inside the package (so installed wheels have it)."""
    return Path(__file__).resolve().parent / "profiles"


def shipped_target_names() -> list[str]:
    """Names of the shipped targets (`cpu-prefill`, ...), for help texts and errors."""
    return sorted(p.stem for p in default_profiles_dir().glob("*.yaml"))


def resolve_target_path(spec: str | Path) -> Path:
    """The YAML file a `--target` names: a path, else a shipped target's bare name."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = shipped_target_names()
    if len(path.parts) == 1 and path.suffix in ("", ".yaml", ".yml"):
        candidate = default_profiles_dir() / f"{path.stem if path.suffix else path.name}.yaml"
        if candidate.is_file():
            return candidate
    hint = f"; shipped targets (usable by name from anywhere): {', '.join(shipped)}"
    raise ConfigError(f"target file {path} does not exist{hint if shipped else ''}")


def default_target() -> HardwareTarget:
    """`profiles/cpu-prefill.yaml` when the source tree is at hand, else the same built in."""
    path = default_profiles_dir() / "cpu-prefill.yaml"
    if path.is_file():
        return load_target(path)
    return HardwareTarget(name="cpu-prefill", device="cpu", phase="prefill", seq_len=128)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(target: HardwareTarget) -> dict[str, Any]:
    """What identifies the hardware and software a target runs on here (for profile JSON)."""
    import torch  # only here: the rest of this module is plain configuration

    facts: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "threads": target.threads if target.threads is not None else torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "gpu_name": None,
        "cuda_version": torch.version.cuda,
    }
    if target.is_cuda and torch.cuda.is_available():
        index = int(target.device.split(":")[1]) if ":" in target.device else 0
        if index < torch.cuda.device_count():
            facts["gpu_name"] = torch.cuda.get_device_name(index)
    return facts


def hardware_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences in the facts that change latency (CPU model, GPU)."""
    diffs = []
    for key in ("cpu_model", "gpu_name"):
        if recorded.get(key) != current.get(key) and (key != "gpu_name" or recorded.get(key)):
            diffs.append(f"{key} {recorded.get(key)!r} (profiled) vs {current.get(key)!r} (here)")
    return diffs
