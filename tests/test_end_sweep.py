"""After a signal, a sweep marks KILLED the runs it was training, and only those.

On a real SQLite store: one sweep's parent run, and job runs in the states a signal can find.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pnn.io import storeguard, tracking
from pnn.sweep import lease, sweep_run

SWEEP, OLD_SWEEP, OTHER_SWEEP = (
    "20261129-100000-aaaa",
    "20261128-090000-bbbb",
    "20261129-110000-cccc",
)


@pytest.fixture
def other_process() -> Iterator[int]:
    """A live process that is not this one: another sweep's job, still training."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def job_run(client: MlflowClient, experiment_id: str, parent: str, sweeps: str, pid: int) -> str:
    owner = f"{socket.gethostname()}/{pid}/0000"
    tags = {
        "pnn.role": "job",
        "mlflow.parentRunId": parent,
        tracking.TAG_SWEEPS: sweeps,
        **lease.lease_tags(owner),
    }
    return client.create_run(experiment_id, tags=tags).info.run_id


def test_a_signal_kills_this_sweeps_runs_and_no_one_elses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other_process: int
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storeguard.prepare(uri)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("pnn")
    old_parent = client.create_run(experiment_id).info.run_id
    parent = client.create_run(experiment_id).info.run_id
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = int(gone.stdout)
    runs = {
        # Created by this sweep, its job process gone with the signal.
        "created": job_run(client, experiment_id, parent, SWEEP, dead),
        # Trained in this sweep's own process (the in-process launcher).
        "in_process": job_run(client, experiment_id, parent, SWEEP, os.getpid()),
        # Created by an older sweep, adopted by this one: its parent is the older sweep's.
        "adopted": job_run(client, experiment_id, old_parent, f"{OLD_SWEEP},{SWEEP}", dead),
        # Created by this sweep, then adopted by another sweep whose job is training it.
        "taken_over": job_run(
            client, experiment_id, parent, f"{SWEEP},{OTHER_SWEEP}", other_process
        ),
        # Another sweep's run that never touched this one.
        "unrelated": job_run(client, experiment_id, old_parent, OLD_SWEEP, dead),
    }
    monkeypatch.setenv(tracking.ENV_PARENT, parent)
    monkeypatch.setenv(tracking.ENV_URI, uri)
    monkeypatch.setenv(tracking.ENV_SWEEP, SWEEP)
    monkeypatch.setenv(storeguard.ENV_STORE_ID, "")

    assert sweep_run.end_sweep("KILLED", "SIGTERM") is None

    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {
        "created": "KILLED",
        "in_process": "KILLED",
        "adopted": "KILLED",
        "taken_over": "RUNNING",
        "unrelated": "RUNNING",
    }
    for name in ("created", "in_process", "adopted"):
        assert client.get_run(runs[name]).data.tags["pnn.killed_by"] == "SIGTERM"
    assert client.get_run(parent).info.status == "KILLED"
