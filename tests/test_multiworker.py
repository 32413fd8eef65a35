"""Real multi-process studies: 3 `mnm search` workers on one PostgreSQL study, and a worker
killed with SIGKILL mid-run whose study is resumed by re-running the same command."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from mnm_search.checkpoint import save_checkpoint
from mnm_search.config import ModelConfig
from mnm_search.model import MatLM
from mnm_search.study import JOURNAL_FILE, open_storage

ROOT = Path(__file__).resolve().parent.parent
TINY = ModelConfig(
    d_model=32, n_layers=3, n_heads=2, d_ff=64, granularities=(8, 16, 32, 64), max_seq_len=32
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server of this session: a free port, a fresh directory, both gone at the end.

    `scripts/postgres.sh` installs the server with apt-get where it is missing and we are
    root (saying so; MNM_PG_INSTALL=0 refuses); elsewhere without a server the tests skip.
    """
    script = ROOT / "scripts" / "postgres.sh"
    # Not under pytest's tmp_path: as root the server runs as `postgres`, which cannot enter
    # pytest's 0700 directories; the script hands this one to it.
    directory = Path(tempfile.mkdtemp(prefix="mnm-pg-"))
    env = {**os.environ, "MNM_PG_PORT": str(_free_port()), "MNM_PG_DIR": str(directory)}

    def stop() -> None:
        subprocess.run(["bash", str(script), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(directory, ignore_errors=True)

    try:
        proc = subprocess.run(
            ["bash", str(script), "start"], env=env, capture_output=True, text=True, timeout=900
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        stop()
        pytest.skip(f"PostgreSQL could not be installed or started here: {exc}")
    if proc.returncode != 0:
        stop()
        pytest.skip(
            "PostgreSQL could not be installed or started here (scripts/postgres.sh exit "
            f"{proc.returncode}): {proc.stderr.strip()[-400:]}"
        )
    if "apt-get" in proc.stderr:  # installing system packages must not go unnoticed
        warnings.warn(f"scripts/postgres.sh: {proc.stderr.strip()[-400:]}", stacklevel=1)
    try:
        yield proc.stdout.strip().splitlines()[-1]
    finally:
        stop()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(MatLM(TINY).eval(), tmp_path_factory.mktemp("mw") / "tiny")


def _command(checkpoint: Path, study: str, trials: int, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "mnm_search", "search", str(checkpoint),
        "--objectives", "loss,params", "--trials", str(trials), "--study", study,
        "--out", str(out), "--max-tokens", "1024", "--sampler", "gp", *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}


def _load(study: str, storage: str | None, results: Path) -> optuna.Study:
    return optuna.load_study(study_name=study, storage=open_storage(storage, results))


def _check_exact(study: optuna.Study, total: int) -> None:
    trials = study.get_trials()
    states = Counter(t.state.name for t in trials)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == total, states
    assert len({t.number for t in trials}) == len(trials), "duplicate trial numbers"
    assert states["RUNNING"] == 0 and states["WAITING"] == 0, states


def test_three_workers_share_one_postgres_study(
    postgres_url: str, checkpoint_dir: Path, tmp_path: Path
) -> None:
    study = f"mw-{uuid.uuid4().hex[:8]}"
    total = 30
    logs = [(tmp_path / f"w{i}.log").open("w") for i in range(3)]
    workers = [
        subprocess.Popen(
            _command(checkpoint_dir, study, total, tmp_path / f"w{i}", "--storage", postgres_url),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
        for i, log in enumerate(logs)
    ]
    try:
        for worker in workers:
            worker.wait(timeout=400)
    finally:
        for worker, log in zip(workers, logs):
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            log.close()
    for i, worker in enumerate(workers):
        output = (tmp_path / f"w{i}.log").read_text()
        assert worker.returncode == 0, output[-2000:]
        assert "Traceback" not in output
    loaded = _load(study, postgres_url, tmp_path)
    _check_exact(loaded, total)
    complete = loaded.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    by_worker = Counter(t.user_attrs["worker"] for t in complete)
    assert len(by_worker) >= 2, f"the work was not shared: {by_worker}"
    # Every seeded configuration was evaluated once, by whichever worker got it.
    seeds = Counter(t.user_attrs.get("seed") for t in complete if t.user_attrs.get("seed"))
    assert seeds["min-slope"] == 6 and sum(seeds.values()) == 10
    # The worker that finished last wrote the complete table.
    tables = [pd.read_csv(tmp_path / f"w{i}" / "trials.csv") for i in range(3)]
    longest = max(tables, key=len)
    assert len(longest) == total
    assert sorted(longest["trial"]) == sorted(t.number for t in complete)


@pytest.mark.parametrize("backend", ["journal", "postgres"])
def test_sigkilled_worker_loses_only_its_running_trial(
    request: pytest.FixtureRequest, checkpoint_dir: Path, tmp_path: Path, backend: str
) -> None:
    storage = request.getfixturevalue("postgres_url") if backend == "postgres" else None
    study = f"kill-{uuid.uuid4().hex[:8]}"
    total = 40
    out = tmp_path / "res"
    extra = ["--storage", storage] if storage else []
    command = _command(checkpoint_dir, study, total, out, *extra, "--max-tokens", "4096")
    worker = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env()
    )
    try:
        deadline = time.monotonic() + 120
        done = 0
        while time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.3)
            if backend == "journal" and not (out / JOURNAL_FILE).exists():
                continue
            try:
                loaded = _load(study, storage, out)
            except KeyError:  # not created yet
                continue
            done = len(loaded.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
            if done >= 5:
                break
        assert worker.poll() is None, "the worker finished before it could be killed"
        assert done >= 5
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
    killed = _load(study, storage, out)
    before = {t.number: t.state for t in killed.get_trials()}
    complete_before = [n for n, s in before.items() if s == optuna.trial.TrialState.COMPLETE]
    assert len(complete_before) < total

    resumed = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"of {total} trials complete" in resumed.stderr
    after = _load(study, storage, out)
    _check_exact(after, total)
    states = {t.number: t.state for t in after.get_trials()}
    # Nothing finished before the kill was lost or changed; the running trial was failed.
    for number in complete_before:
        assert states[number] == optuna.trial.TrialState.COMPLETE
    for number, state in before.items():
        if state == optuna.trial.TrialState.RUNNING:
            assert states[number] == optuna.trial.TrialState.FAIL
    table = pd.read_csv(out / "trials.csv")
    assert (table["state"] == "COMPLETE").sum() == total
