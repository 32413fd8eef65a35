"""Latency as a deployment sees it: each exported configuration loaded with `load_model` in
its own new Python process.

The profiler times configurations inside one long-lived process that holds many sliced
models at once, each call preceded by an untimed one; a user runs one exported model in its
own process, minutes later. This module measures the latter, for any family and phase:

- the parent writes each configuration with the family's own `write_export` (what
  `mnm export` ships) into a temporary directory;
- a child, `python -m mnm_search._fresh_process`, loads it with `load_model`, moves it to
  the target's device and dtype with the threads pinned as the target says, runs `warmup`
  calls and then `runs` timed calls back to back, and reports every sample.

The timed call is the target's phase through the public interface: prefill is
`model(input_ids)` on `seq_len` tokens; decode is one `Decoder.step` of `seq_len` token(s)
after `context_len` cached ones, rolled back before each call so every call repeats the same
step. Children run one after another, never two at a time.

Request (stdin, JSON): `{"target": {...}, "paths": [...], "warmup": N, "runs": N}`.
Reply (stdout, JSON): `{"results": [{"samples_ms": [...], "load_s": s}], "threads": n}`.
With several paths, one child times them one after another, each model freed before the next
is loaded (`per_process`): cheaper than a process each, at the cost of a process that has
already run another model.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnm_search.errors import ProfileError
from mnm_search.targets import HardwareTarget

if TYPE_CHECKING:
    import torch

    from mnm_search.families.base import Family
    from mnm_search.profiler import TimingStats

CHILD_MODULE = "mnm_search._fresh_process"
# Start-up (importing torch: 1-4 s on a busy 2-core machine) plus loading and timing; far
# above that means the child hangs.
CHILD_TIMEOUT_S = 600.0
STDERR_TAIL_CHARS = 2000


def time_exports(
    paths: Sequence[str | Path],
    target: HardwareTarget,
    *,
    warmup: int,
    runs: int,
    per_process: int = 1,
    on_done: Callable[[int], None] | None = None,
) -> list[TimingStats]:
    """Time each exported model directory in fresh processes, `per_process` per child.

    Returns one `TimingStats` (median of `runs` back-to-back calls after `warmup` untimed
    ones) per path, in order. `on_done(k)` is called after each child with the number of
    paths timed so far. ProfileError if a child fails, naming what it printed.
    """
    from mnm_search.profiler import TimingStats

    if per_process < 1:
        raise ProfileError(f"per_process must be >= 1, got {per_process}")
    if runs < 1 or warmup < 0:
        raise ProfileError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    stats: list[TimingStats] = []
    for start in range(0, len(paths), per_process):
        batch = [str(Path(p).resolve()) for p in paths[start : start + per_process]]
        reply = _run_child(
            {"target": target.to_dict(), "paths": batch, "warmup": warmup, "runs": runs},
            threads=target.threads,
        )
        stats += [TimingStats.from_samples(r["samples_ms"]) for r in reply["results"]]
        if on_done is not None:
            on_done(len(stats))
    return stats


def measure_fresh(
    family: Family,
    target: HardwareTarget,
    configs: Sequence[Sequence[int]],
    *,
    warmup: int,
    runs: int,
    per_process: int = 1,
    on_done: Callable[[int], None] | None = None,
) -> list[TimingStats]:
    """Export each configuration of `family` and time it in fresh processes (`time_exports`).

    A configuration listed more than once (a reference re-measured through the session) is
    exported once and timed in a new child each time. Exports live in a temporary directory
    that is removed afterwards, even on failure; at most `per_process` new ones are written
    ahead of their child, so big models need little disk.
    """
    timed: list[TimingStats] = []
    workdir = Path(tempfile.mkdtemp(prefix="mnm-fresh-"))
    exported: dict[tuple[int, ...], Path] = {}
    try:
        for start in range(0, len(configs), per_process):
            batch = [tuple(int(w) for w in c) for c in configs[start : start + per_process]]
            for widths in batch:
                if widths not in exported:
                    exported[widths] = export_config(
                        family, widths, workdir / f"config-{len(exported)}"
                    )
            timed += time_exports(
                [exported[w] for w in batch],
                target,
                warmup=warmup,
                runs=runs,
                per_process=len(batch),
            )
            if on_done is not None:
                on_done(len(timed))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return timed


def export_config(family: Family, widths: Sequence[int], directory: Path) -> Path:
    """Write the configuration as `mnm export` ships it (the family's first format)."""
    directory.mkdir(parents=True)
    family.write_export(
        directory,
        list(widths),
        fmt=family.export_formats[0],
        metadata={"written_by": "mnm profile: fresh-process latency validation"},
    )
    return directory


def _run_child(request: dict[str, Any], *, threads: int | None) -> dict[str, Any]:
    env = dict(os.environ)
    # The child imports the same mnm_search (and add-on families) as this process.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root, *[p for p in sys.path if p]])
    if threads is not None:  # pinned before torch starts, as a deployment would
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    try:
        result = subprocess.run(
            [sys.executable, "-m", CHILD_MODULE],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            env=env,
            timeout=CHILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ProfileError(
            f"a fresh-process latency measurement took more than {CHILD_TIMEOUT_S:.0f} s "
            f"({len(request['paths'])} model(s)); is the machine overloaded?"
        ) from None
    reply: dict[str, Any] = {}
    with contextlib.suppress(ValueError):  # a crash before the reply: stderr says why
        reply = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout else {}
    if result.returncode != 0 or "results" not in reply:
        why = reply.get("error") or result.stderr[-STDERR_TAIL_CHARS:].strip() or "no output"
        raise ProfileError(
            f"timing an exported model in a fresh process failed (exit {result.returncode}): {why}"
        )
    return reply


# ------------------------------------------------------------------------------- child


def timed_call(model: torch.nn.Module, target: HardwareTarget) -> Callable[[], object]:
    """The target's phase as one no-argument call of a loaded model (already on the device).

    Prefill: `model(input_ids)` on `seq_len` tokens. Decode: the family's decoder holds a
    cache of `context_len` tokens; each call rolls it back and steps `seq_len` token(s).
    """
    import torch

    from mnm_search.families.base import family_for_module

    device = next(model.parameters()).device
    with torch.inference_mode():
        vocab = model(torch.zeros(1, 1, dtype=torch.long, device=device)).shape[-1]
    generator = torch.Generator().manual_seed(0)

    def ids(length: int) -> torch.Tensor:
        return torch.randint(vocab, (target.batch, length), generator=generator).to(device)

    new = ids(target.seq_len)
    if target.phase == "prefill":
        return lambda: model(new)
    decoder = family_for_module(model).decoder()
    with torch.inference_mode():
        decoder.prefill(ids(target.context_len))

    def step() -> object:
        decoder.rollback(target.context_len)
        return decoder.step(new)

    return step


def _time_one(path: str, target: HardwareTarget, *, warmup: int, runs: int) -> dict[str, Any]:
    import torch

    from mnm_search.checkpoint import load_model
    from mnm_search.profiler import TORCH_DTYPES, Clock, select_device

    device = select_device(target.device)
    started = time.perf_counter()
    model = load_model(path).to(device=device, dtype=TORCH_DTYPES[target.dtype])
    call = timed_call(model, target)
    clock = Clock(device)
    load_s = time.perf_counter() - started
    samples: list[float] = []
    gc.disable()  # a collection inside a timed call is noise, as in timeit and the profiler
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                call()
            clock.synchronize()
            samples = [clock.time_ms(call) for _ in range(runs)]
    finally:
        gc.enable()
    del call, model
    gc.collect()
    return {"samples_ms": samples, "load_s": round(load_s, 3)}


def _child_main() -> int:
    try:
        request = json.loads(sys.stdin.read())
        target = HardwareTarget.from_dict(request["target"], source="fresh-process request")
        import torch

        if target.threads is not None:
            torch.set_num_threads(target.threads)
        results = [
            _time_one(path, target, warmup=int(request["warmup"]), runs=int(request["runs"]))
            for path in request["paths"]
        ]
        reply: dict[str, Any] = {"results": results, "threads": torch.get_num_threads()}
        code = 0
    except Exception as exc:  # the parent turns it into a ProfileError
        reply, code = {"error": f"{type(exc).__name__}: {exc}"}, 1
    sys.stdout.write(json.dumps(reply) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(_child_main())
