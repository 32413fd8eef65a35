"""Adversarial robustness of `mnm search` and its study: what a crash, a kill, a bad checkpoint,
a leaked password, an interrupt or a hand-edited results file must not break.

Every class is table-driven. Subprocess tests (signals, a stale lock with a relative --out)
run the real CLI with `sys.executable -m mnm_search`; the rest run in-process.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from typer.testing import CliRunner

import mnm_search.study as study_module
from mnm_search.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from mnm_search.cli import app
from mnm_search.config import ModelConfig
from mnm_search.data import EvalSet, load_eval_set
from mnm_search.errors import SearchError
from mnm_search.families.matlm import MatLMFamily
from mnm_search.model import MatLM
from mnm_search.pareto import ResultsError, read_results
from mnm_search.space import SearchSpace
from mnm_search.study import JOURNAL_FILE, SearchSettings, open_storage, run_search

TINY = ModelConfig(
    d_model=32, n_layers=3, n_heads=2, d_ff=64, granularities=(8, 16, 32, 64), max_seq_len=32
)
runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(MatLM(TINY).eval(), tmp_path_factory.mktemp("rob") / "tiny")


@pytest.fixture(scope="module")
def eval_set() -> EvalSet:
    return load_eval_set(None, seq_len=TINY.max_seq_len, max_tokens=4 * 32)


def _search(
    checkpoint: Checkpoint, eval_set: EvalSet, results: Path, n_trials: int, **kwargs: object
) -> object:
    storage = kwargs.pop("storage", None)
    return run_search(
        MatLMFamily(checkpoint),
        SearchSpace.from_config(checkpoint.config),
        SearchSettings(n_trials=n_trials, objectives=("loss", "params"), **kwargs),  # type: ignore[arg-type]
        eval_set,
        study_name="s",
        results_dir=results,
        storage=storage,  # type: ignore[arg-type]
        on_warning=lambda message: None,
    )


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _cli(ckpt: Path, out: str, trials: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "mnm_search", "search", str(ckpt), "--objectives", "loss,params",
        "--trials", str(trials), "--study", "s", "--out", out, "--max-tokens", "128", *extra,
    ]  # fmt: skip


# -- 1. a torn journal is repaired, with a backup -------------------------------------------


def _journal(directory: Path, n_trials: int = 3) -> Path:
    """A journal holding study "s" with N complete trials, written by Optuna itself."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / JOURNAL_FILE
    study = optuna.create_study(
        study_name="s", storage=JournalStorage(JournalFileBackend(str(path)))
    )
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=n_trials)
    return path


def _tear(fraction: float) -> Callable[[bytes], bytes]:
    """Append the first FRACTION of a record, as a write cut short by a full disk does."""
    record = b'{"op_code":4,"worker_id":"w","study_id":0,"datetime_start":"2026-01-01T00:00:00"}'
    return lambda data: data + record[: max(1, int(len(record) * fraction))]


TORN = {
    "one byte": _tear(0.0),
    "half a record": _tear(0.5),
    "garbage line": lambda data: data + b"\x00\xffgarbage\n",
}


@pytest.mark.parametrize("variant", list(TORN))
def test_torn_journal_tail_is_cut_with_a_backup(tmp_path: Path, variant: str) -> None:
    path = _journal(tmp_path / "r")
    sound = path.read_bytes()
    path.write_bytes(TORN[variant](sound))
    damaged = path.read_bytes()
    warnings: list[str] = []
    study = optuna.load_study(
        study_name="s", storage=open_storage(None, tmp_path / "r", on_warning=warnings.append)
    )
    assert len(study.get_trials()) == 3
    assert path.read_bytes() == sound
    backups = list(path.parent.glob(f"{JOURNAL_FILE}.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == damaged
    assert len(warnings) == 1
    assert (
        str(backups[0]) in warnings[0]
        and f"dropped {len(damaged) - len(sound)} bytes" in warnings[0]
    )
    # The next run appends after complete records: every later run still reads the journal.
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again: list[str] = []
    reloaded = optuna.load_study(
        study_name="s", storage=open_storage(None, tmp_path / "r", on_warning=again.append)
    )
    assert len(reloaded.get_trials()) == 5 and again == []


def test_torn_record_continued_by_the_next_append_is_recovered(tmp_path: Path) -> None:
    """The field failure: the next run (before this fix) appended right after a torn record."""
    path = _journal(tmp_path / "r")
    path.write_bytes(_tear(0.5)(path.read_bytes()))
    # The next process's append: its first record now continues the torn line.
    JournalFileBackend(str(path)).append_logs(
        [
            {"op_code": 2, "worker_id": "w", "study_id": 0, "user_attr": {"after": 1}},
            {"op_code": 2, "worker_id": "w", "study_id": 0, "user_attr": {"later": 2}},
        ]
    )
    with pytest.raises(json.JSONDecodeError):  # unusable for Optuna from now on
        JournalStorage(JournalFileBackend(str(path)))
    warnings: list[str] = []
    study = optuna.load_study(
        study_name="s", storage=open_storage(None, tmp_path / "r", on_warning=warnings.append)
    )
    assert study.user_attrs == {"after": 1, "later": 2}  # the records after it were kept
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
    assert "1 damaged record" in warnings[0] and ".bak-" in warnings[0]


def test_corrupt_record_in_the_middle_is_a_clear_error(tmp_path: Path) -> None:
    path = _journal(tmp_path / "r")
    lines = path.read_bytes().split(b"\n")
    lines[2] = b"this is not a record"
    path.write_bytes(b"\n".join(lines))
    damaged = path.read_bytes()
    with pytest.raises(SearchError) as caught:
        open_storage(None, tmp_path / "r")
    message = str(caught.value)
    assert "\n" not in message
    assert str(path.absolute()) in message and "record 3 of" in message
    offset = len(b"\n".join(lines[:2])) + 1
    assert f"head -c {offset} " in message and ".bak-" in message
    assert path.read_bytes() == damaged  # nothing changed without the user's say
    with pytest.raises(SearchError):  # another attempt keeps the one backup
        open_storage(None, tmp_path / "r")
    assert len(list(path.parent.glob(f"{JOURNAL_FILE}.bak-*"))) == 1


# -- 3. a stale journal lock does not block the next run ------------------------------------


def _stale_lock(kind: str, journal: Path) -> None:
    """A lock left the way a killed Optuna worker leaves it (journal given as a relative path)."""
    lock = Path(f"{journal}.lock")
    if kind == "relative symlink":  # an older mnm, or Optuna, run with a relative --out
        os.symlink(str(journal), lock)
    elif kind == "absolute symlink, old":
        os.symlink(str(journal.absolute()), lock)
        os.utime(lock, (time.time() - 3600,) * 2, follow_symlinks=False)
    elif kind == "open-lock file, old":  # JournalFileOpenLock's kind
        lock.touch()
        os.utime(lock, (time.time() - 3600,) * 2)
    elif kind == "absolute symlink, fresh":  # killed a moment ago: Optuna's grace period
        os.symlink(str(journal.absolute()), lock)


@pytest.mark.parametrize(
    "kind",
    ["relative symlink", "absolute symlink, old", "open-lock file, old", "absolute symlink, fresh"],
)
def test_stale_lock_with_a_relative_results_dir_is_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = Path("results") / "s"
    _journal(relative)
    _stale_lock(kind, relative / JOURNAL_FILE)
    done: list[int] = []

    def resume() -> None:
        study = optuna.load_study(study_name="s", storage=open_storage(None, relative))
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        done.append(len(study.get_trials()))

    # A thread: a regression spins forever, which must fail the test rather than hang it.
    worker = threading.Thread(target=resume, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert done == [5], f"still blocked on the stale lock ({kind})"


# -- 2. trials.csv follows the study trial by trial ----------------------------------------


def test_trials_csv_is_written_after_each_trial(
    ckpt_dir: Path, eval_set: EvalSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tmp_path / "r"
    seen: list[int] = []  # COMPLETE rows in trials.csv when each evaluation starts
    real = study_module._evaluator

    def spying(*args: object, **kwargs: object) -> object:
        inner = real(*args, **kwargs)  # type: ignore[arg-type]

        class Spy:
            stats = inner.stats

            def evaluate(self, widths: list[int]) -> object:
                path = results / "trials.csv"
                complete = (pd.read_csv(path)["state"] == "COMPLETE").sum() if path.exists() else 0
                seen.append(int(complete))
                return inner.evaluate(widths)

        return Spy()

    monkeypatch.setattr(study_module, "_evaluator", spying)
    # Writes count as cheap whatever this busy machine's fsync costs (the policy under test:
    # after every trial while writing is cheap; spaced out only where it is not).
    monkeypatch.setattr(study_module, "_FAST_WRITE_S", math.inf)
    _search(load_checkpoint(ckpt_dir), eval_set, results, 8, sampler="random")
    assert len(seen) >= 6
    # Every evaluation sees every trial finished before it (no duplicates among seeds).
    assert seen[:6] == list(range(6))
    assert all(b >= a for a, b in itertools.pairwise(seen))


# -- 4. non-finite losses fail trials, count toward the budget, and stop the study ----------


def _nan_weights(model: MatLM) -> None:
    model.norm.weight.data.fill_(math.nan)


def _nan_norm_eps(model: MatLM) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.RMSNorm):
            module.eps = math.nan


@pytest.mark.parametrize(
    ("poison", "n_trials", "expected_trials"),
    [(_nan_weights, 3, 3), (_nan_norm_eps, 3, 3), (_nan_weights, 40, 10)],
    ids=["weights, budget 3", "norm_eps, budget 3", "weights, stopped after 10"],
)
def test_a_study_that_only_fails_stops_with_the_cause(
    ckpt_dir: Path,
    eval_set: EvalSet,
    tmp_path: Path,
    poison: Callable[[MatLM], None],
    n_trials: int,
    expected_trials: int,
) -> None:
    checkpoint = load_checkpoint(ckpt_dir)
    poison(checkpoint.model)
    started = time.monotonic()
    with pytest.raises(SearchError, match=r"^every trial failed .*loss is NaN — .*norm_eps.*"):
        _search(checkpoint, eval_set, tmp_path / "r", n_trials, sampler="random")
    assert time.monotonic() - started < 30
    study = optuna.load_study(study_name="s", storage=open_storage(None, tmp_path / "r"))
    # (Seed configurations not reached stay WAITING.)
    trials = [t for t in study.get_trials() if t.state != TrialState.WAITING]
    assert len(trials) == expected_trials
    assert all(t.state == TrialState.FAIL for t in trials)
    assert all("loss is NaN" in t.user_attrs["fail_reason"] for t in trials)
    table = pd.read_csv(tmp_path / "r" / "trials.csv")
    assert (table["state"] == "FAIL").all() and table["fail_reason"].notna().all()


def test_failures_count_toward_the_budget_next_to_completions(
    ckpt_dir: Path, eval_set: EvalSet, tmp_path: Path
) -> None:
    checkpoint = load_checkpoint(ckpt_dir)
    with torch.no_grad():  # only configurations wider than S in layer 0 see the NaN neuron
        checkpoint.model.blocks[0].ffn.down.weight[:, 60] = math.nan
    result = _search(checkpoint, eval_set, tmp_path / "r", 12, sampler="random")
    trials = result.trials  # type: ignore[attr-defined]
    states = trials["state"].value_counts().to_dict()
    assert states.get("COMPLETE", 0) + states.get("FAIL", 0) == 12, states
    assert states.get("FAIL", 0) >= 1 and states.get("COMPLETE", 0) >= 1, states
    failed = trials[trials["state"] == "FAIL"]
    assert failed["fail_reason"].str.startswith("loss is NaN").all()
    assert (failed["widths"].str.split(",").str[0] == "64").all()
    assert not result.pareto.empty  # type: ignore[attr-defined]


def test_nan_cost_fails_the_trial_before_evaluating(
    ckpt_dir: Path, eval_set: EvalSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(study_module.CostModel, "params", lambda self, widths: math.inf)
    with pytest.raises(SearchError, match=r"every trial failed .*params is inf"):
        _search(load_checkpoint(ckpt_dir), eval_set, tmp_path / "r", 2)


@pytest.mark.parametrize(("sampler", "n_failed"), [("gp", "4"), ("exhaustive", "every")])
def test_cli_names_the_failure_and_stops(
    ckpt_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sampler: str, n_failed: str
) -> None:
    monkeypatch.setattr(study_module.CostModel, "params", lambda self, widths: math.nan)
    result = runner.invoke(
        app, ["search", str(ckpt_dir), "--objectives", "loss,params", "--trials", "4", "--out",
              str(tmp_path / "r"), "--max-tokens", "128", "--sampler", sampler],
    )  # fmt: skip
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in output
    assert "a trial failed: params is NaN — the checkpoint's config" in output
    # An enumeration decides (here: fails) every configuration of the space at once.
    count = "4" if n_failed == "4" else r"\d+"
    assert re.search(rf"Error: every trial failed \({count} of them\): params is NaN", output)


def test_nan_norm_eps_in_config_is_a_clean_cli_error(ckpt_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for item in ckpt_dir.iterdir():
        (bad / item.name).write_bytes(item.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "norm_eps": math.nan}))
    result = runner.invoke(
        app, ["search", str(bad), "--objectives", "loss,params", "--trials", "3", "--out",
              str(tmp_path / "r"), "--max-tokens", "128"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "Traceback" not in result.output and "norm_eps" in result.output


# -- 5. credentials never reach run.json or an error message --------------------------------

SECRET = "s3cretpw"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://mnm:{SECRET}@127.0.0.1:1/db",
        f"postgresql://mnm@127.0.0.1:1/db?password={SECRET}",
        "postgresql://mnm:s3c@retpw@127.0.0.1:1/db",
        f"postgresql://mnm:{SECRET}@127.0.0.1:1/db?sslpassword={SECRET}x",
        f"sqlite:////nonexistent-dir/x.db?password={SECRET}",
    ],
    ids=["userinfo", "query", "unencoded @", "both", "sqlite query"],
)
def test_storage_errors_never_show_the_password(tmp_path: Path, url: str) -> None:
    with pytest.raises(SearchError) as caught:
        open_storage(url, tmp_path)
    message = str(caught.value)
    for piece in (SECRET, "s3c@retpw", "retpw", f"{SECRET}x"):
        assert piece not in message, message
    assert "***" in message
    if "s3c@" in url:
        assert "%40" in message and "connection" not in message.lower()


@pytest.mark.parametrize("form", ["--storage", "--storage="])
def test_run_json_never_holds_the_password(
    ckpt_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    url = f"sqlite:///{tmp_path}/s.db?password={SECRET}"
    storage = [f"--storage={url}"] if form.endswith("=") else ["--storage", url]
    args = ["search", str(ckpt_dir), "--objectives", "loss,params", "--trials", "2",
            "--out", str(tmp_path / "r"), "--max-tokens", "128", *storage]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["mnm", *args])
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r" / "run.json").read_text()
    assert SECRET not in text and SECRET not in result.output
    info = json.loads(text)
    assert "password=***" in info["command"] and "password=***" in info["storage"]


# -- 6 (and 3) through the real CLI: a signal mid-search ------------------------------------

# name -> (storage backend, signal, a stale lock with a relative target in the way first)
SIGNALLED = {
    "journal-SIGINT": (None, signal.SIGINT, False),
    "sqlite-SIGINT": ("sqlite", signal.SIGINT, False),
    "journal-SIGTERM, stale relative lock": (None, signal.SIGTERM, True),
}


@pytest.mark.parametrize("name", list(SIGNALLED))
def test_signal_prints_one_line_and_fails_the_running_trial(
    ckpt_dir: Path, tmp_path: Path, name: str
) -> None:
    backend, signum, stale_lock = SIGNALLED[name]
    out = Path("res") / "s"  # relative, as users type it (and as the stale-lock bug needs)
    (tmp_path / out).mkdir(parents=True)
    if stale_lock:  # as a killed older run left it: the relative target never resolves
        os.symlink(str(out / JOURNAL_FILE), tmp_path / out / f"{JOURNAL_FILE}.lock")
    storage = f"sqlite:///{tmp_path}/s.db" if backend == "sqlite" else None
    extra = ["--storage", storage] if storage else []
    proc = subprocess.Popen(
        _cli(ckpt_dir, str(out), 5000, "--sampler", "random", *extra),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        # Bounded: before the lock fix a stale lock kept the run from ever writing a trial.
        deadline = time.monotonic() + 120
        trials = tmp_path / out / "trials.csv"
        while time.monotonic() < deadline and proc.poll() is None:
            if trials.exists() and len(trials.read_text().splitlines()) > 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None and trials.exists(), "no trial finished in time"
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signum, stderr[-2000:]
    for noise in ("Traceback", "KeyboardInterrupt", "failed because of", "Error", "Retrying"):
        assert noise not in stderr, stderr[-3000:]
    assert ("stale journal lock" in stderr) == stale_lock
    word = "Interrupted" if signum == signal.SIGINT else "Terminated"
    assert f"{word}: finished trials are saved in {out}" in stderr
    study = optuna.load_study(study_name="s", storage=open_storage(storage, tmp_path / out))
    states = [t.state for t in study.get_trials()]
    assert TrialState.RUNNING not in states and states.count(TrialState.COMPLETE) >= 2
    table = read_results(tmp_path / out)[0]  # whole, valid files
    assert (table["state"] == "COMPLETE").sum() == states.count(TrialState.COMPLETE)
    assert not list((tmp_path / out).glob(".*tmp*"))


# -- 7. results files are validated on reading ----------------------------------------------


@pytest.fixture(scope="module")
def results_dir(
    ckpt_dir: Path, eval_set: EvalSet, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    results = tmp_path_factory.mktemp("res") / "r"
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.DEBUG)
    try:
        _search(load_checkpoint(ckpt_dir), eval_set, results, 6)
        # 9. The library leaves Optuna's log level to the application.
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG
    finally:
        optuna.logging.set_verbosity(level)
    return results


def _edit_csv(column: str, value: str) -> Callable[[Path], None]:
    def edit(results: Path) -> None:
        table = pd.read_csv(results / "trials.csv", dtype=str)
        table.loc[1, column] = value
        table.to_csv(results / "trials.csv", index=False)

    return edit


def _edit_run(key: str, value: object) -> Callable[[Path], None]:
    def edit(results: Path) -> None:
        info = json.loads((results / "run.json").read_text())
        info[key] = value
        (results / "run.json").write_text(json.dumps(info))

    return edit


def _truncate(name: str, keep: float) -> Callable[[Path], None]:
    def edit(results: Path) -> None:
        data = (results / name).read_bytes()
        (results / name).write_bytes(data[: int(len(data) * keep)])

    return edit


def _drop_column(column: str) -> Callable[[Path], None]:
    def edit(results: Path) -> None:
        table = pd.read_csv(results / "trials.csv", dtype=str)
        table.drop(columns=[column]).to_csv(results / "trials.csv", index=False)

    return edit


CORRUPTIONS = {
    "trials.csv truncated mid-row": (_truncate("trials.csv", 0.6), "trials.csv"),
    "trials.csv empty": (_truncate("trials.csv", 0), "trials.csv is not a readable table"),
    "widths column missing": (_drop_column("widths"), "lacks the column(s) widths"),
    "widths not integers": (_edit_csv("widths", "8,x,16"), "widths is '8,x,16'"),
    "widths of another length": (_edit_csv("widths", "8,8"), "mixes [2, 3] layers"),
    "loss not a number": (_edit_csv("loss", "low"), "loss is 'low'"),
    "loss infinite": (_edit_csv("loss", "inf"), "expected a finite number"),
    "unknown state": (_edit_csv("state", "DONE"), "state is 'DONE'"),
    "trial not a number": (_edit_csv("trial", "2.5"), "trial is '2.5'"),
    "run.json truncated": (_truncate("run.json", 0.5), "run.json is not readable JSON"),
    "run.json a list": (lambda r: (r / "run.json").write_text("[1]"), "JSON list, not an object"),
    "objectives wrong type": (_edit_run("objective_columns", "loss"), "objective_columns is"),
    "constraint not finite": (_edit_run("constraints", {"params": "big"}), "constraint params"),
    "granularities broken": (_edit_run("space", {"granularities": [0]}), "granularities"),
}


@pytest.mark.parametrize("variant", list(CORRUPTIONS))
def test_corrupt_results_files_are_clear_errors(
    results_dir: Path, tmp_path: Path, variant: str
) -> None:
    corrupt, expected = CORRUPTIONS[variant]
    results = tmp_path / "r"
    results.mkdir()
    for name in ("trials.csv", "pareto.csv", "run.json"):
        (results / name).write_bytes((results_dir / name).read_bytes())
    read_results(results)  # sound before the edit
    corrupt(results)
    with pytest.raises(ResultsError) as caught:
        read_results(results)
    assert expected in str(caught.value) and "mnm search" in str(caught.value)
    cli = runner.invoke(app, ["pareto", str(results)])
    assert cli.exit_code == 1 and "Traceback" not in cli.output
    assert expected.split(",")[0] in " ".join(cli.output.split())


# -- 8. optuna-dashboard names the objectives --------------------------------------------------


def test_study_names_its_objectives(results_dir: Path) -> None:
    study = optuna.load_study(study_name="s", storage=open_storage(None, results_dir))
    assert study.metric_names == ["loss", "params"]


def test_cli_hides_optunas_trial_failure_logs() -> None:
    from mnm_search.cli._search import quiet_optuna

    quiet_optuna()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("optuna.study._optimize")
    logger.addHandler(handler)
    try:
        logger.warning("Trial 3 failed with value (nan, 1.0).")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something else"]
