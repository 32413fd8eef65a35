"""`mnm ARGS...` with the time spent evaluating and sampling recorded (a benchmark hook).

The real CLI runs in this process; the only change is a timer around the quality evaluator
(`CachedEvaluator.evaluate*`) and around every call into the study's sampler, so that a
search's wall time can be split into start-up, evaluation, sampler and the rest without
adding anything to the product. The totals go to the JSON file named by
$MNM_BENCH_TIMINGS when the process exits (also after Ctrl-C, which exits 130).

    MNM_BENCH_TIMINGS=t.json python bench/timed_search.py search --trials 100 ...
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from mnm_search import evaluator, study

SAMPLER_METHODS = (
    "infer_relative_search_space",
    "sample_relative",
    "sample_independent",
    "before_trial",
    "after_trial",
)

totals: dict[str, float | None] = {
    "evaluate_s": 0.0,
    "evaluate_calls": 0,
    "sampler_s": 0.0,
    "sampler_calls": 0,
    # Unix times of the first call of each kind: where start-up ends even when a search
    # evaluates before it adds any trial (an enumeration adds them in bulk).
    "first_evaluate_at": None,
    "first_sampler_at": None,
}
# Calls of each kind in progress: an evaluate* that calls another one is counted once.
depth = {"evaluate": 0, "sampler": 0}


def _timed(kind: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        depth[kind] += 1
        if totals[f"first_{kind}_at"] is None:
            totals[f"first_{kind}_at"] = time.time()
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            depth[kind] -= 1
            if depth[kind] == 0:
                totals[f"{kind}_s"] += time.perf_counter() - started
                totals[f"{kind}_calls"] += 1

    return wrapper


def install() -> None:
    cls = evaluator.CachedEvaluator
    for name in [name for name in vars(cls) if name.startswith("evaluate")]:
        setattr(cls, name, _timed("evaluate", getattr(cls, name)))
    for name in SAMPLER_METHODS:
        setattr(study._OwnedSampler, name, _timed("sampler", getattr(study._OwnedSampler, name)))


def _write(path: str) -> None:
    with open(path, "w") as handle:
        json.dump(totals, handle)


def main() -> None:
    install()
    path = os.environ.get("MNM_BENCH_TIMINGS")
    if path:
        atexit.register(_write, path)
    from mnm_search.cli import main as cli

    sys.argv = ["mnm", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
